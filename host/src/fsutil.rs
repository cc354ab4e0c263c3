//! File-system helpers: the one way the host reads a file it is pointed at, and the one way it
//! writes one.
//!
//! Reading ([`open_regular`], [`read_regular`]): every file named by the configuration or found
//! in the state dir (secrets, TLS files, the policy, the snapshot, the leases file, precompiled
//! policies) is opened without blocking and checked on the opened descriptor to be a regular
//! file, then read no further than its size at open and a maximum its caller states. A FIFO
//! would otherwise hang the start waiting for a writer, and a link to `/dev/zero` would be read
//! until memory runs out; checking the path before opening it would leave a window in which it
//! can be swapped for either.
//!
//! Writing ([`write_atomically`]): a unique temporary file, fsync, rename, fsync of the
//! directory, so a crash leaves the old file or the new one. A crash before the rename leaves
//! the temporary file: [`remove_stale_temporaries`] clears those.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

/// Why a file could not be read. The caller names the file and the setting that gave it.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It could not be opened (missing, permissions).
    #[error("{0}")]
    Open(#[source] io::Error),
    /// It is a FIFO, a device, a directory or a socket.
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    /// It is larger than its kind of file may be.
    #[error("{size} bytes, more than the {max} bytes accepted")]
    TooLarge {
        /// Its size when opened.
        size: u64,
        /// The most its reader accepts.
        max: u64,
    },
    /// Reading failed.
    #[error("{0}")]
    Read(#[source] io::Error),
}

impl FileError {
    /// Whether the file does not exist (which some callers treat as "nothing there yet").
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Open(e) if e.kind() == io::ErrorKind::NotFound)
    }
}

/// Opens `path` for reading if it is a regular file (following symbolic links), and returns it
/// with its size at open. Never blocks: a FIFO is opened non-blocking (which succeeds without
/// a writer) and then refused like every other file that is not regular.
pub fn open_regular(path: &Path) -> Result<(File, u64), FileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer. It has no
        // effect on a regular file's reads. O_NOCTTY: a path that is a terminal must not
        // become the host's controlling terminal just by being looked at.
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(FileError::Open)?;
    // The type is checked on the descriptor, not the path: the path may have changed since.
    let metadata = file.metadata().map_err(FileError::Open)?;
    if !metadata.file_type().is_file() {
        return Err(FileError::NotRegular(kind_of(metadata.file_type())));
    }
    Ok((file, metadata.len()))
}

/// The contents of the regular file at `path` ([`open_regular`]), refused if it is larger than
/// `max` bytes, and never read past its size at open (a file that grows while it is read is
/// read as it was).
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, FileError> {
    let (file, size) = open_regular(path)?;
    if size > max {
        return Err(FileError::TooLarge { size, max });
    }
    // `size` fits: it is at most `max`, which its callers keep in the megabytes.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(size)
        .read_to_end(&mut bytes)
        .map_err(FileError::Read)?;
    Ok(bytes)
}

/// Writes `bytes` to `path` atomically and durably: a temporary file in the same directory is
/// written, fsynced, renamed over `path`, and the directory fsynced, so a crash leaves either
/// the old file or the whole new one, never a mix.
///
/// Every call uses its own temporary name (process id, a counter, a random part), so
/// concurrent writers of the same path (a periodic snapshot still running on a blocking thread
/// when the shutdown one starts) never write into each other's temporary file; the last rename
/// wins.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomically_with(path, |file| file.write_all(bytes))
}

/// [`write_atomically`] for contents streamed by `write` into the temporary file (which it may
/// also seek in), so that a large file is never held in memory whole.
pub fn write_atomically_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let tmp = temp_name(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename is durable only once the directory entry is.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Infix of [`write_atomically`]'s temporary names, which [`is_temporary`] recognizes.
const TEMP_INFIX: &str = ".tmp.";

/// `<dir>/.<name>.tmp.<pid>.<n>.<random>`: hidden, unique within this process (the counter),
/// and unlikely to meet a leftover of an earlier run: in a container every run has the same
/// process id, and a leftover of the same name would make `create_new` fail every write.
fn temp_name(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = path
        .file_name()
        .map_or_else(|| "file".into(), |name| name.to_string_lossy().into_owned());
    let pid = std::process::id();
    let random: u32 = rand::random();
    path.with_file_name(format!(".{name}{TEMP_INFIX}{pid}.{n}.{random:08x}"))
}

/// Whether `name` is one of [`write_atomically`]'s temporary names: hidden, and ending in
/// `.tmp.` and dot-separated hex digits (earlier versions had no random part).
fn is_temporary(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    let Some((base, tail)) = name.rsplit_once(TEMP_INFIX) else {
        return false;
    };
    base.len() > 1
        && base.starts_with('.')
        && !tail.is_empty()
        && tail
            .split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Age past which a temporary file of [`write_atomically`] is a crash's leftover: writes take
/// milliseconds (a snapshot of a huge cache, seconds), and a younger file may be a write in
/// progress, in this process or in another host sharing the directory.
const STALE_TEMPORARY: Duration = Duration::from_secs(10 * 60);

/// Removes the temporary files [`write_atomically`] left in `dir` (a crash between creating
/// and renaming one) last modified more than [`STALE_TEMPORARY`] ago. Returns how many were
/// removed; failures are logged, the files being only wasted space.
pub fn remove_stale_temporaries(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.filter_map(Result::ok) {
        if !is_temporary(&entry.file_name()) {
            continue;
        }
        // `DirEntry::metadata` does not follow links: a link is judged (and removed) itself.
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|modified| {
                now.duration_since(modified).unwrap_or_default() > STALE_TEMPORARY
            });
        if !stale {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                removed += 1;
                tracing::info!(path = %path.display(), "removed an interrupted write's temporary file");
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), "cannot remove an interrupted write's temporary file: {e}")
            }
        }
    }
    removed
}

/// Opens `path` for appending, created if missing, if it is a regular file (following symbolic
/// links, as [`open_regular`] does), and returns it with its size at open: the one way the host
/// opens a file it writes to in place (the policy recording). Never blocks: opened non-blocking,
/// a FIFO without a reader is refused by the open itself and one with a reader by the check on
/// the descriptor, like a device (`/dev/full` would take every write and fail it) or a
/// directory. `O_NONBLOCK` has no effect on a regular file's writes; std adds `O_CLOEXEC`.
pub fn open_regular_append(path: &Path) -> Result<(File, u64), FileError> {
    let opened = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let file = match opened {
        Ok(file) => file,
        // A FIFO without a reader (ENXIO) or a directory (EISDIR): named by its kind, which
        // says more than the errno. The path is looked at only to word a refusal.
        Err(error) => {
            return Err(match std::fs::metadata(path) {
                Ok(metadata) if !metadata.file_type().is_file() => {
                    FileError::NotRegular(kind_of(metadata.file_type()))
                }
                _ => FileError::Open(error),
            });
        }
    };
    let metadata = file.metadata().map_err(FileError::Open)?;
    if !metadata.file_type().is_file() {
        return Err(FileError::NotRegular(kind_of(metadata.file_type())));
    }
    Ok((file, metadata.len()))
}

/// What a file that is not regular is, for [`FileError::NotRegular`].
fn kind_of(file_type: std::fs::FileType) -> &'static str {
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_dir() {
        "a directory"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else if file_type.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    }
}

/// Fixtures for the tests of every reader of files.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    /// Puts a FIFO, then a symbolic link to `/dev/zero`, at `path` (which must not exist),
    /// and checks that `read` refuses each within seconds, with an error that says the file is
    /// not a regular file; removes them after.
    ///
    /// `read` runs on its own thread: a reader that waited for the FIFO's writer would
    /// otherwise hang the test run instead of failing it.
    pub(crate) fn assert_refuses_special_files(
        path: &Path,
        read: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        let read = Arc::new(read);
        for what in ["FIFO", "/dev/zero link"] {
            if what == "FIFO" {
                let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: a valid NUL-terminated path; mkfifo touches nothing else.
                assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
            } else {
                std::os::unix::fs::symlink("/dev/zero", path).unwrap();
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = read.clone();
            std::thread::spawn(move || {
                let _ = tx.send(reader());
            });
            let result = rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|_| {
                panic!("{what} at {}: still reading after 5 s", path.display())
            });
            let err = result.expect_err(what);
            assert!(err.contains("not a regular file"), "{what}: {err}");
            std::fs::remove_file(path).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_are_read_and_within_their_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, b"0123456789").unwrap();
        assert_eq!(read_regular(&path, 10).unwrap(), b"0123456789");
        let err = read_regular(&path, 9).unwrap_err();
        assert!(
            matches!(err, FileError::TooLarge { size: 10, max: 9 }),
            "{err}"
        );
        assert_eq!(open_regular(&path).unwrap().1, 10);

        let missing = read_regular(&dir.path().join("missing"), 10).unwrap_err();
        assert!(missing.is_not_found(), "{missing}");
        let err = read_regular(dir.path(), 10).unwrap_err();
        assert!(matches!(err, FileError::NotRegular("a directory")), "{err}");

        let special = dir.path().join("special");
        let reader = special.clone();
        testing::assert_refuses_special_files(&special, move || {
            read_regular(&reader, u64::MAX)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        let reader = special.clone();
        testing::assert_refuses_special_files(&special, move || {
            open_regular(&reader).map(drop).map_err(|e| e.to_string())
        });
    }

    #[test]
    fn temporary_names_are_recognized() {
        let dir = Path::new("/d");
        let name = temp_name(&dir.join("cache.snapshot"));
        assert!(is_temporary(name.file_name().unwrap()), "{name:?}");
        for other in [
            "cache.snapshot",
            "etcd-leases",
            "x.cwasm",
            "x.cwasm.sha256",
            ".tmp.1.2",
            ".a.tmp.",
            ".a.tmp.1..2",
            "a.tmp.1.2",
            ".a.tmp.12z",
        ] {
            assert!(!is_temporary(OsStr::new(other)), "{other}");
        }
        assert!(
            is_temporary(OsStr::new(".cache.snapshot.tmp.7.0")),
            "older names"
        );
    }

    #[test]
    fn only_old_temporary_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let old = temp_name(&dir.path().join("cache.snapshot"));
        let young = temp_name(&dir.path().join("cache.snapshot"));
        let kept = dir.path().join("cache.snapshot");
        for path in [&old, &young, &kept] {
            std::fs::write(path, "x").unwrap();
        }
        let long_ago = SystemTime::now() - 6 * STALE_TEMPORARY;
        for path in [&old, &kept] {
            File::options()
                .write(true)
                .open(path)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()), 1);
        assert!(!old.exists());
        assert!(young.exists(), "maybe a write in progress");
        assert!(kept.exists(), "not a temporary file");
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let contents: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 64 * 1024]).collect();
        std::thread::scope(|s| {
            for bytes in &contents {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomically(path, bytes).unwrap();
                    }
                });
            }
        });
        let written = std::fs::read(&path).unwrap();
        assert!(contents.contains(&written), "one writer's whole content");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["file"], "no temporary file stays behind");
    }
}
