//! Compiled policies, kept so that a restart or a swap back to a known policy skips cranelift.
//!
//! Two levels: an in-memory map of the components this process compiled (a swap back costs a
//! lookup), and, when the host has a state directory, precompiled artifacts on disk keyed by the
//! policy's digest and the engine's compatibility hash (a restart costs a `deserialize`, ~0.1 ms
//! instead of ~20 ms).
//!
//! The directory is bounded: an artifact is written (or, already there, marked used) only when
//! its policy becomes active, so a refused policy leaves nothing on disk; then the least
//! recently activated artifacts beyond [`ON_DISK`] are removed, never the active policy's. An
//! upgrade of wasmtime changes the compatibility hash, and the old artifacts age out the same
//! way. The directory being an optimisation, a failure to create or use it is a warning, and the
//! host compiles instead.
//!
//! Deserializing is `unsafe` in wasmtime because the bytes are trusted to be wasmtime's own
//! output. So the host only reads artifacts from a directory nobody else can write: it creates
//! it with mode 0700, and refuses to use one (compiling every time instead) that is not owned by
//! the host's user or that others can access. Each artifact has a sha256 of its bytes written
//! after it, so a torn write or a truncated file means recompiling, never loading.
//!
//! Pruning also clears what a crash leaves behind: temporary files of an interrupted write, and
//! checksums whose artifact is gone.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::MAX_POLICY_SIZE;
use crate::fsutil::{open_regular, read_regular, remove_stale_temporaries, write_atomically};

/// Components kept in memory; policies are small, and operators rarely juggle more.
const IN_MEMORY: usize = 16;

/// Artifacts kept on disk, the active policy's included. An artifact weighs a few times its
/// policy (the default policy's is about 1 MiB); eight cover the active policy, rollbacks to
/// the last few, and an upgrade's leftovers, without a setting operators would have to size.
pub(crate) const ON_DISK: usize = 8;

/// File name suffix of an artifact (its checksum is `<artifact>` + [`CHECKSUM_SUFFIX`]).
const ARTIFACT_SUFFIX: &str = ".cwasm";

/// File name suffix of an artifact's checksum.
const CHECKSUM_SUFFIX: &str = ".sha256";

/// Largest artifact read: machine code and metadata weigh a few times the component they were
/// compiled from (about ten times for the default policy), and components are bounded (by
/// default: an operator who allows larger ones may see theirs compiled at each start).
const MAX_ARTIFACT: u64 = 32 * MAX_POLICY_SIZE as u64;

/// Largest checksum file read: 64 hex digits and perhaps a newline.
const MAX_CHECKSUM: u64 = 128;

pub(crate) struct ArtifactCache {
    dir: Option<PathBuf>,
    compatibility: String,
    compiled: Mutex<Vec<(String, Component)>>,
}

/// Where a component came from, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Compiled from the wasm bytes.
    Compiled,
    /// Deserialized from an artifact this host wrote earlier.
    Disk,
    /// Already compiled by this process.
    Memory,
}

impl ArtifactCache {
    /// A cache that keeps artifacts in `dir` if it can (created with mode 0700 if missing);
    /// in memory only otherwise, with a warning saying why.
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> Self {
        let dir = dir.and_then(|dir| {
            let usable = create_private_dir(&dir)
                .map_err(|e| format!("cannot create it: {e}"))
                .and_then(|()| check_private(&dir));
            match usable {
                Ok(()) => Some(dir),
                Err(reason) => {
                    tracing::warn!(path = %dir.display(), "not using the precompiled-policy cache: {reason}");
                    None
                }
            }
        });
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        ArtifactCache {
            dir,
            compatibility: format!("{:016x}", hasher.finish()),
            compiled: Mutex::new(Vec::new()),
        }
    }

    /// The component of the policy whose sha256 is `digest`, from memory, disk, or `compile`
    /// (under the operator's bounds: see `compile`). Nothing is written to disk: see
    /// [`ArtifactCache::keep`].
    pub(crate) fn component<E>(
        &self,
        engine: &Engine,
        digest: &str,
        compile: impl FnOnce() -> Result<Component, E>,
    ) -> Result<(Component, Origin), E> {
        if let Some((_, component)) = self
            .compiled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(d, _)| d == digest)
        {
            return Ok((component.clone(), Origin::Memory));
        }
        let (component, origin) = match self.read(engine, digest) {
            Some(component) => (component, Origin::Disk),
            None => (compile()?, Origin::Compiled),
        };
        let mut compiled = self.compiled.lock().unwrap_or_else(PoisonError::into_inner);
        if compiled.len() >= IN_MEMORY {
            compiled.remove(0);
        }
        compiled.push((digest.to_string(), component.clone()));
        Ok((component, origin))
    }

    fn paths(&self, digest: &str) -> Option<(PathBuf, PathBuf)> {
        let dir = self.dir.as_ref()?;
        let artifact = dir.join(format!("{digest}-{}{ARTIFACT_SUFFIX}", self.compatibility));
        let checksum = checksum_path(&artifact);
        Some((artifact, checksum))
    }

    fn read(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let (artifact, checksum) = self.paths(digest)?;
        let bytes = read_if_there(&artifact, MAX_ARTIFACT)?;
        let expected = read_if_there(&checksum, MAX_CHECKSUM)?;
        if std::str::from_utf8(&expected).map(str::trim) != Ok(hex_sha256(&bytes).as_str()) {
            tracing::warn!(path = %artifact.display(), "precompiled policy does not match its checksum; recompiling");
            return None;
        }
        // SAFETY: the bytes are an artifact this host serialized itself (see the module doc),
        // verified against the checksum it wrote after them, for this engine's compatibility hash.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(path = %artifact.display(), "cannot load precompiled policy ({err:#}); recompiling");
                None
            }
        }
    }

    /// Records that the policy `digest` (compiled as `component`) became active: its artifact
    /// is written, or marked used if it is on disk already, and the least recently used
    /// artifacts beyond [`ON_DISK`] are removed. Called on activation only, so that a refused
    /// policy is never stored.
    pub(crate) fn keep(&self, component: &Component, digest: &str) {
        let Some((artifact, checksum)) = self.paths(digest) else {
            return;
        };
        let result = if artifact.is_file() && checksum.is_file() {
            // Reading does not count as a use to the file system (noatime): the modification
            // time is the "last activated" stamp.
            open_regular(&artifact)
                .map_err(std::io::Error::other)
                .and_then(|(f, _)| f.set_modified(SystemTime::now()))
        } else {
            component
                .serialize()
                .map_err(std::io::Error::other)
                .and_then(|bytes| {
                    write_atomically(&artifact, &bytes)?;
                    write_atomically(&checksum, hex_sha256(&bytes).as_bytes())
                })
        };
        if let Err(err) = result {
            // The cache is an optimisation: failing to fill it costs a compile next time.
            tracing::warn!(path = %artifact.display(), "cannot store precompiled policy: {err}");
        }
        if let Some(dir) = &self.dir {
            prune(dir, ON_DISK, &artifact);
        }
    }
}

/// A file of the artifact directory, or `None` if it is missing or unusable (logged: the
/// policy is then compiled, and the next activation rewrites it).
fn read_if_there(path: &Path, max: u64) -> Option<Vec<u8>> {
    match read_regular(path, max) {
        Ok(bytes) => Some(bytes),
        Err(err) if err.is_not_found() => None,
        Err(err) => {
            tracing::warn!(path = %path.display(), "cannot read precompiled policy: {err}; recompiling");
            None
        }
    }
}

/// Removes the least recently used artifacts of `dir` (and their checksums) beyond `limit`,
/// never `active`, and what crashes left: stale temporary files, checksums without their
/// artifact.
fn prune(dir: &Path, limit: usize, active: &Path) {
    remove_stale_temporaries(dir);
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            tracing::warn!(path = %dir.display(), "cannot list precompiled policies: {err}");
            return;
        }
    };
    let paths: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    let named = |path: &Path, suffix: &str| {
        path.file_name()
            .is_some_and(|name| name.to_string_lossy().ends_with(suffix))
    };
    // A crash (or a failed removal) between removing an artifact and its checksum leaves the
    // checksum alone; nothing would ever remove it.
    for orphan in paths
        .iter()
        .filter(|path| named(path, CHECKSUM_SUFFIX))
        .filter(|path| !path.with_extension("").exists())
    {
        remove(orphan);
    }
    let mut others: Vec<(SystemTime, PathBuf)> = paths
        .into_iter()
        .filter(|path| named(path, ARTIFACT_SUFFIX))
        .filter(|path| path != active)
        .map(|path| {
            let used = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (used, path)
        })
        .collect();
    // Newest first; the active artifact takes one of the `limit` places.
    others.sort_by(|a, b| b.cmp(a));
    for (_, path) in others.into_iter().skip(limit.saturating_sub(1)) {
        remove(&path);
        remove(&checksum_path(&path));
        tracing::debug!(path = %path.display(), "old precompiled policy removed");
    }
}

/// Removes a file of the artifact directory; one already gone is fine, a failure is logged.
fn remove(file: &Path) {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            tracing::warn!(path = %file.display(), "cannot remove an old precompiled policy: {err}")
        }
    }
}

fn checksum_path(artifact: &Path) -> PathBuf {
    let mut name = artifact.as_os_str().to_owned();
    name.push(CHECKSUM_SUFFIX);
    PathBuf::from(name)
}

pub(crate) fn hex_sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// Whether `dir` is owned by this process's user and closed to everybody else.
fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).map_err(|e| e.to_string())?;
    // /proc/self belongs to the process's effective user.
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| e.to_string())?
        .uid();
    if meta.uid() != me {
        return Err(format!(
            "owned by uid {}, not by this process (uid {me})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "mode {:o} lets others in (0700 expected)",
            meta.mode() & 0o777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const EMPTY: &[u8] = b"(component)";

    fn artifacts(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Stamps `digest`'s artifact as used `seconds` after the epoch: file systems stamp times
    /// with a coarse clock, so keeps in a quick loop may share one.
    fn stamp(cache: &ArtifactCache, digest: &str, seconds: u64) {
        let (artifact, _) = cache.paths(digest).unwrap();
        std::fs::File::open(artifact)
            .unwrap()
            .set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds))
            .unwrap();
    }

    #[test]
    fn an_artifact_is_written_only_when_its_policy_is_kept() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        let cache = ArtifactCache::new(&engine, Some(path.clone()));
        let (component, origin) = cache
            .component(&engine, "d1", || Component::new(&engine, EMPTY))
            .unwrap();
        assert_eq!(origin, Origin::Compiled);
        assert!(
            artifacts(&path).is_empty(),
            "compiled, validated or not, is not stored"
        );
        cache.keep(&component, "d1");
        let names = artifacts(&path);
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].starts_with("d1-") && names[0].ends_with(".cwasm"));
        assert_eq!(names[1], format!("{}.sha256", names[0]));

        // The next process finds it on disk.
        let restarted = ArtifactCache::new(&engine, Some(path.clone()));
        let (_, origin) = restarted
            .component(&engine, "d1", || Component::new(&engine, EMPTY))
            .unwrap();
        assert_eq!(origin, Origin::Disk);
    }

    #[test]
    fn the_least_recently_kept_go_beyond_the_limit() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        let cache = ArtifactCache::new(&engine, Some(path.clone()));
        let component = Component::new(&engine, EMPTY).unwrap();
        let total = ON_DISK + 3;
        for i in 0..total {
            let digest = format!("d{i:02}");
            cache.keep(&component, &digest);
            stamp(&cache, &digest, 1_000 + i as u64);
        }
        let kept: Vec<String> = artifacts(&path)
            .into_iter()
            .filter(|n| n.ends_with(ARTIFACT_SUFFIX))
            .map(|n| n[..3].to_string())
            .collect();
        let newest: Vec<String> = (total - ON_DISK..total)
            .map(|i| format!("d{i:02}"))
            .collect();
        assert_eq!(kept, newest);
        assert_eq!(
            artifacts(&path).len(),
            2 * ON_DISK,
            "checksums go with their artifacts"
        );

        // Keeping the oldest again makes it the most recently used: when a new one comes, the
        // second oldest goes instead.
        let oldest = newest[0].clone();
        cache.keep(&component, &oldest);
        cache.keep(&component, "new");
        assert!(cache.paths(&oldest).unwrap().0.exists());
        assert!(cache.paths("new").unwrap().0.exists());
        assert!(!cache.paths(&newest[1]).unwrap().0.exists());
        assert_eq!(artifacts(&path).len(), 2 * ON_DISK);
    }

    #[test]
    fn the_active_artifact_is_never_removed() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        let cache = ArtifactCache::new(&engine, Some(path.clone()));
        let component = Component::new(&engine, EMPTY).unwrap();
        for i in 0..ON_DISK {
            let digest = format!("d{i:02}");
            cache.keep(&component, &digest);
            stamp(&cache, &digest, 1_000 + i as u64);
        }
        // The active artifact looks the oldest (a clock set back, a copied directory): the
        // others make room, not it.
        stamp(&cache, "d00", 1);
        let (active, _) = cache.paths("d00").unwrap();
        prune(&path, 2, &active);
        assert!(active.exists());
        assert!(
            cache
                .paths(&format!("d{:02}", ON_DISK - 1))
                .unwrap()
                .0
                .exists()
        );
        assert_eq!(artifacts(&path).len(), 4, "{:?}", artifacts(&path));
    }

    #[test]
    fn crash_leftovers_are_removed() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        let cache = ArtifactCache::new(&engine, Some(path.clone()));
        let component = Component::new(&engine, EMPTY).unwrap();
        cache.keep(&component, "d1");
        let (artifact, _) = cache.paths("gone").unwrap();
        let orphan = checksum_path(&artifact);
        let stale = path.join(".d2.cwasm.tmp.7.0.0badcafe");
        let young = path.join(".d3.cwasm.tmp.7.1.0badcafe");
        for file in [&orphan, &stale, &young] {
            std::fs::write(file, "x").unwrap();
        }
        std::fs::File::options()
            .write(true)
            .open(&stale)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(24 * 3600))
            .unwrap();
        let before = artifacts(&path);
        cache.keep(&component, "d1");
        let after = artifacts(&path);
        let name = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
        let removed: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
        assert_eq!(removed, [&name(&stale), &name(&orphan)], "{after:?}");
        assert!(after.contains(&name(&young)), "perhaps a write in progress");
        assert_eq!(after.len(), 3, "d1's artifact and checksum stay: {after:?}");
    }

    #[test]
    fn an_artifact_that_is_not_a_regular_file_is_compiled_instead() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("artifacts");
        let cache = std::sync::Arc::new(ArtifactCache::new(&engine, Some(path.clone())));
        let component = Component::new(&engine, EMPTY).unwrap();
        cache.keep(&component, "d1");
        let (artifact, _) = cache.paths("d1").unwrap();
        std::fs::remove_file(&artifact).unwrap();
        let reader = cache.clone();
        crate::fsutil::testing::assert_refuses_special_files(&artifact, move || {
            // A fresh process's view: nothing in memory, the disk consulted.
            reader.compiled.lock().unwrap().clear();
            match reader.component(&engine, "d1", || Component::new(&engine, EMPTY)) {
                Ok((_, Origin::Compiled)) => Err("not a regular file: compiled instead".into()),
                _ => Ok(()),
            }
        });
    }

    #[test]
    fn a_directory_that_cannot_be_created_means_memory_only() {
        let engine = Engine::default();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let cache = ArtifactCache::new(&engine, Some(file.join("artifacts")));
        let (component, origin) = cache
            .component(&engine, "d1", || Component::new(&engine, EMPTY))
            .unwrap();
        assert_eq!(origin, Origin::Compiled);
        cache.keep(&component, "d1");
        let (_, origin) = cache
            .component(&engine, "d1", || Component::new(&engine, EMPTY))
            .unwrap();
        assert_eq!(origin, Origin::Memory);
    }
}
