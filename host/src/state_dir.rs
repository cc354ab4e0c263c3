//! The state directory (`state_dir`): the cache snapshot and the precompiled policies
//! (`artifacts/`), and what the host does when it cannot write there.
//!
//! Both are optimisations: without the snapshot a host started while etcd is down has nothing
//! to serve until etcd answers, and without the artifacts each start compiles its policy
//! (tens of milliseconds). So a state dir that cannot be written (a read-only mount, a path
//! that is a file, missing permissions) is a warning naming the setting and the path, not a
//! start-up failure: the host runs without the on-disk policy cache and writes no snapshot,
//! and still reads the snapshot it finds there, if any.
//!
//! A writable state dir is also cleared of the temporary files a crash during a write left
//! ([`remove_stale_temporaries`]): a snapshot's can weigh as much as the cache.

use std::path::{Path, PathBuf};

use crate::fsutil::remove_stale_temporaries;
use crate::snapshot::SnapshotFile;

/// Start of the write probe's name.
const PROBE_PREFIX: &str = ".regcache-write-test.";

/// The state directory as the host found it at start.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
    is_dir: bool,
    writable: bool,
}

impl StateDir {
    /// Creates the directory if it is missing (mode 0700: the snapshot lists every service
    /// this host looked up) and tries a write in it (I/O: a build step). Logs a warning if it
    /// cannot be written.
    pub fn open(path: &Path) -> StateDir {
        match try_write(path) {
            Ok(()) => {
                remove_stale_temporaries(path);
                StateDir {
                    path: path.to_path_buf(),
                    is_dir: true,
                    writable: true,
                }
            }
            Err(reason) => {
                tracing::warn!(
                    path = %path.display(),
                    "state_dir {} cannot be written ({reason}): running without the \
                     precompiled-policy cache (the policy is compiled at each start) and \
                     without writing snapshots",
                    path.display()
                );
                StateDir {
                    path: path.to_path_buf(),
                    is_dir: path.is_dir(),
                    writable: false,
                }
            }
        }
    }

    /// The directory, if the host can write in it (what the registry keeps there is only
    /// worth keeping if it can be written).
    pub fn writable_path(&self) -> Option<&Path> {
        self.writable.then_some(self.path.as_path())
    }

    /// Where precompiled policies are kept, if the directory can be written.
    pub fn artifact_dir(&self) -> Option<PathBuf> {
        self.writable.then(|| self.path.join("artifacts"))
    }

    /// The snapshot to read at start: there is one to look for if the path is a directory,
    /// writable or not.
    pub fn snapshot_to_read(&self) -> Option<SnapshotFile> {
        self.is_dir.then(|| SnapshotFile::in_dir(&self.path))
    }

    /// The snapshot to write, if the directory can be written.
    pub fn snapshot_to_write(&self) -> Option<SnapshotFile> {
        self.writable.then(|| SnapshotFile::in_dir(&self.path))
    }
}

/// Creates `dir` if need be and creates (then removes) a file in it.
///
/// The probe's name is random: a name that can repeat (the process id is the same at every
/// start in a container) would, left behind by a crash, make `create_new` fail at every later
/// start, and the directory would look read-only forever.
fn try_write(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.exists() && !dir.is_dir() {
        return Err("not a directory".into());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create it: {e}"))?;
    // Permission bits alone do not say it (root ignores them, a read-only mount overrides
    // them): only a write does.
    let random: u64 = rand::random();
    let probe = dir.join(format!("{PROBE_PREFIX}{random:016x}"));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|e| format!("cannot create a file in it: {e}"))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_dir_is_created_private_and_writable() {
        use std::os::unix::fs::PermissionsExt;
        let parent = tempfile::tempdir().unwrap();
        let path = parent.path().join("a").join("state");
        let state = StateDir::open(&path);
        assert_eq!(state.writable_path(), Some(path.as_path()));
        assert_eq!(state.artifact_dir(), Some(path.join("artifacts")));
        assert!(state.snapshot_to_write().is_some());
        assert!(state.snapshot_to_read().is_some());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let left: Vec<_> = std::fs::read_dir(&path).unwrap().collect();
        assert!(left.is_empty(), "the probe file is removed: {left:?}");
    }

    /// Probes left by crashes (the old names were the process id, the same at every start in
    /// a container) do not make the directory look read-only; interrupted writes are cleared.
    #[test]
    fn leftovers_of_a_crash_do_not_poison_the_probe_and_are_cleared() {
        let dir = tempfile::tempdir().unwrap();
        let old_probe = dir
            .path()
            .join(format!("{PROBE_PREFIX}{}", std::process::id()));
        let interrupted = dir.path().join(".cache.snapshot.tmp.1.0.0badcafe");
        for file in [&old_probe, &interrupted] {
            std::fs::write(file, "").unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(&interrupted)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(86_400))
            .unwrap();
        for _ in 0..2 {
            let state = StateDir::open(dir.path());
            assert!(state.writable_path().is_some());
        }
        assert!(!interrupted.exists());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(left, [old_probe], "each probe is removed");
    }

    #[test]
    fn a_file_or_a_path_under_a_file_is_not_writable() {
        let parent = tempfile::tempdir().unwrap();
        let file = parent.path().join("file");
        std::fs::write(&file, "x").unwrap();
        for path in [file.clone(), file.join("state")] {
            let state = StateDir::open(&path);
            assert_eq!(state.writable_path(), None, "{}", path.display());
            assert_eq!(state.artifact_dir(), None);
            assert!(state.snapshot_to_write().is_none());
            assert!(state.snapshot_to_read().is_none(), "nothing to read either");
        }
        assert_eq!(
            std::fs::read(&file).unwrap(),
            b"x",
            "the file is left alone"
        );
    }

    #[test]
    fn a_read_only_dir_is_read_but_not_written() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o500)).unwrap();
        // Root (and CAP_DAC_OVERRIDE) writes through permission bits: then there is no
        // read-only directory to test without mounting one, and the check above (a file as
        // the state dir) is what exercises the fallback.
        let privileged = std::fs::write(dir.path().join("probe"), "").is_ok();
        let state = StateDir::open(dir.path());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state.writable_path().is_some(), privileged);
        assert!(state.snapshot_to_read().is_some());
        assert_eq!(state.snapshot_to_write().is_some(), privileged);
    }
}
