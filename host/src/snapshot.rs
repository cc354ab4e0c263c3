//! The state snapshot on disk: Nacos' failover cache, done safely.
//!
//! The host writes the cache's export to `<state dir>/cache.snapshot` periodically and at
//! shutdown, and reads it back at start so that a host started while etcd is unreachable can
//! answer (stale) instead of failing.
//!
//! Writes are atomic ([`crate::fsutil::write_atomically`]): a crash leaves either the old or the
//! new snapshot, never a mix, and concurrent writes (a periodic one still running when the
//! shutdown one starts) each use their own temporary file. Writes and reads are streamed, so
//! the format has no size limit of its own: whatever the cache holds can be written and read
//! back. Reads are suspicious: only a regular file is read, never past the size it had when
//! opened; the file starts with a header line carrying the payload's length and sha256, and a
//! file that is truncated, corrupt, or of another format is refused with a [`SnapshotError`]
//! (the host logs it and starts empty).
//!
//! Architecture invariant: this module knows the file format only; what the payload holds is the
//! cache's business.

use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::fsutil::{FileError, open_regular, write_atomically_with};

/// File name of the snapshot inside the state dir.
pub const FILE_NAME: &str = "cache.snapshot";

/// First word of the header line; the version changes with the format.
const MAGIC: &str = "regcache-snapshot/1";

/// Digits of the payload length in the header. The length is zero-padded to a fixed width so
/// that the header can be written last, over a placeholder of the same size, once the streamed
/// payload's length and checksum are known.
const LENGTH_DIGITS: usize = 20;

/// Longest header line a reader accepts (the fixed-width header is 106 bytes).
const MAX_HEADER: u64 = 256;

/// Why a snapshot could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An I/O error on `path`.
    #[error("{op} {}: {error}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The file cannot be read: not a regular file, permissions.
    #[error("cannot read {}: {error}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        error: FileError,
    },
    /// The file is not a (complete, intact) snapshot.
    #[error("{} is not a valid snapshot: {reason}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The snapshot file of one state dir.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    path: PathBuf,
}

impl SnapshotFile {
    /// The snapshot in `state_dir` (nothing is read or created yet).
    pub fn in_dir(state_dir: &Path) -> Self {
        SnapshotFile {
            path: state_dir.join(FILE_NAME),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `payload` atomically and durably, streamed: the encoded payload is never held
    /// in memory, however many services and nodes it carries. The directory must exist: the
    /// host creates the state dir (mode 0700) at start, and does not recreate it, with default
    /// permissions, if someone removes it while it runs.
    pub fn write<T: Serialize>(&self, payload: &T) -> Result<(), SnapshotError> {
        write_atomically_with(&self.path, |file| {
            file.write_all(header(0, &[0; 32]).as_bytes())?;
            let (len, digest) = {
                let mut body = HashingWriter {
                    inner: BufWriter::new(&mut *file),
                    hasher: Sha256::new(),
                    len: 0,
                };
                serde_json::to_writer(&mut body, payload)?;
                body.inner.flush()?;
                (body.len, body.hasher.finalize())
            };
            file.seek(SeekFrom::Start(0))?;
            file.write_all(header(len, &digest).as_bytes())
        })
        .map_err(|error| SnapshotError::Io {
            op: "write",
            path: self.path.clone(),
            error,
        })
    }

    /// Reads the snapshot: `Ok(None)` if there is none, an error if it is unreadable, not a
    /// regular file, or not intact. Reading is bounded by the file's size when opened; the
    /// payload is checked against its checksum in a first pass, then decoded streaming.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Option<T>, SnapshotError> {
        let io_error = |op: &'static str| {
            move |error: io::Error| SnapshotError::Io {
                op,
                path: self.path.clone(),
                error,
            }
        };
        let invalid = |reason: String| SnapshotError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let (file, size) = match open_regular(&self.path) {
            Ok(opened) => opened,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(error) => {
                return Err(SnapshotError::Unreadable {
                    path: self.path.clone(),
                    error,
                });
            }
        };
        let mut reader = BufReader::new(file.take(size));

        let mut header_line = Vec::new();
        (&mut reader)
            .take(MAX_HEADER)
            .read_until(b'\n', &mut header_line)
            .map_err(io_error("read"))?;
        if header_line.pop() != Some(b'\n') {
            return Err(invalid("no header line".into()));
        }
        let header_line = std::str::from_utf8(&header_line)
            .map_err(|_| invalid("the header is not text".into()))?;
        let mut words = header_line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(invalid(format!("the header does not start with {MAGIC}")));
        }
        let len: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| invalid("the header has no length".into()))?;
        let checksum = words
            .next()
            .ok_or_else(|| invalid("the header has no checksum".into()))?
            .to_owned();
        let body_start = header_line.len() as u64 + 1;
        let body_len = size - body_start;
        if body_len != len {
            return Err(invalid(format!(
                "truncated or extended: {body_len} bytes of payload, the header says {len}"
            )));
        }

        let mut hasher = Sha256::new();
        let hashed = io::copy(&mut reader, &mut hasher).map_err(io_error("read"))?;
        if hashed != len || hex(&hasher.finalize()) != checksum {
            return Err(invalid("checksum mismatch".into()));
        }

        let mut file = reader.into_inner().into_inner();
        file.seek(SeekFrom::Start(body_start))
            .map_err(io_error("read"))?;
        serde_json::from_reader(BufReader::new(file.take(len)))
            .map(Some)
            .map_err(|e| invalid(format!("cannot decode: {e}")))
    }
}

/// The header line: magic, zero-padded payload length, payload sha256.
fn header(len: u64, digest: &[u8]) -> String {
    format!("{MAGIC} {len:0LENGTH_DIGITS$} {}\n", hex(digest))
}

/// Passes the payload through to the file while measuring and hashing it.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        assert!(file.read::<Vec<String>>().unwrap().is_none());
        let payload = vec!["a".to_string(), "b".to_string()];
        file.write(&payload).unwrap();
        assert_eq!(file.read::<Vec<String>>().unwrap(), Some(payload.clone()));

        let good = std::fs::read(file.path()).unwrap();
        let mut truncated = good.clone();
        truncated.truncate(good.len() - 3);
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        for (bytes, want) in [
            (truncated, "truncated"),
            (flipped, "checksum"),
            (b"garbage".to_vec(), "header"),
            (Vec::new(), "header"),
        ] {
            std::fs::write(file.path(), bytes).unwrap();
            let err = file.read::<Vec<String>>().unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        file.write(&payload).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file stays behind");
    }

    /// Far beyond any single etcd value: the format itself has no size limit.
    #[test]
    fn a_large_payload_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        let payload: Vec<String> = (0..200_000).map(|i| format!("node-{i}")).collect();
        file.write(&payload).unwrap();
        assert!(std::fs::metadata(file.path()).unwrap().len() > 2_000_000);
        assert_eq!(file.read::<Vec<String>>().unwrap(), Some(payload));
    }

    /// A FIFO would block the start waiting for a writer, and a link to a device would be read
    /// without end: only regular files are read.
    #[test]
    fn files_that_are_not_regular_are_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        let reader = file.clone();
        crate::fsutil::testing::assert_refuses_special_files(file.path(), move || {
            reader
                .read::<Vec<String>>()
                .map(drop)
                .map_err(|e| e.to_string())
        });
        std::fs::create_dir(file.path()).unwrap();
        let err = file.read::<Vec<String>>().unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    /// A header line that never ends is not read past its bound.
    #[test]
    fn an_endless_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        std::fs::write(file.path(), vec![b'x'; 1 << 20]).unwrap();
        let err = file.read::<Vec<String>>().unwrap_err().to_string();
        assert!(err.contains("no header line"), "{err}");
    }

    /// A periodic write still running on its blocking thread when the shutdown write starts.
    #[test]
    fn overlapping_writes_leave_an_intact_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let file = SnapshotFile::in_dir(dir.path());
        let payloads: Vec<Vec<String>> = (0..4).map(|i| vec![format!("{i}"); 10_000]).collect();
        std::thread::scope(|s| {
            for payload in &payloads {
                let file = &file;
                s.spawn(move || {
                    for _ in 0..10 {
                        file.write(payload).unwrap();
                    }
                });
            }
        });
        let read = file.read::<Vec<String>>().unwrap().unwrap();
        assert!(payloads.contains(&read));
    }
}
