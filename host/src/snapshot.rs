//! The state snapshot on disk: Nacos' failover cache, done safely.
//!
//! The host writes the cache's export to `<state dir>/cache.snapshot` periodically and at
//! shutdown, and reads it back at start so that a host started while etcd is unreachable can
//! answer (stale) instead of failing.
//!
//! Writes are atomic ([`crate::fsutil::write_atomically`]): a crash leaves either the old or the
//! new snapshot, never a mix, and concurrent writes (a periodic one still running when the
//! shutdown one starts) each use their own temporary file. Reads are suspicious: the file starts with a header line carrying the payload's
//! length and sha256, and a file that is truncated, corrupt, or of another format is refused
//! with a [`SnapshotError`] (the daemon logs it and starts empty).
//!
//! Architecture invariant: this module knows the file format only; what the payload holds is the
//! cache's business.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::fsutil::write_atomically;

/// File name of the snapshot inside the state dir.
pub const FILE_NAME: &str = "cache.snapshot";

/// First word of the header line; the version changes with the format.
const MAGIC: &str = "regcache-snapshot/1";

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
        error: std::io::Error,
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

    /// Writes `payload` atomically and durably ([`write_atomically`]).
    pub fn write<T: Serialize>(&self, payload: &T) -> Result<(), SnapshotError> {
        let body = serde_json::to_vec(payload).map_err(|e| SnapshotError::Invalid {
            path: self.path.clone(),
            reason: format!("cannot encode: {e}"),
        })?;
        let mut bytes =
            format!("{MAGIC} {} {}\n", body.len(), hex(&Sha256::digest(&body))).into_bytes();
        bytes.extend_from_slice(&body);
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|error| SnapshotError::Io {
            op: "create",
            path: dir.to_path_buf(),
            error,
        })?;
        write_atomically(&self.path, &bytes).map_err(|error| SnapshotError::Io {
            op: "write",
            path: self.path.clone(),
            error,
        })
    }

    /// Reads the snapshot: `Ok(None)` if there is none, an error if it is unreadable or not
    /// intact.
    pub fn read<T: DeserializeOwned>(&self) -> Result<Option<T>, SnapshotError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(error) => {
                return Err(SnapshotError::Io {
                    op: "read",
                    path: self.path.clone(),
                    error,
                });
            }
        };
        let invalid = |reason: String| SnapshotError::Invalid {
            path: self.path.clone(),
            reason,
        };
        let newline = bytes
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| invalid("no header line".into()))?;
        let header = std::str::from_utf8(&bytes[..newline])
            .map_err(|_| invalid("the header is not text".into()))?;
        let body = &bytes[newline + 1..];
        let mut words = header.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(invalid(format!("the header does not start with {MAGIC}")));
        }
        let len: usize = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| invalid("the header has no length".into()))?;
        if body.len() != len {
            return Err(invalid(format!(
                "truncated or extended: {} bytes of payload, the header says {len}",
                body.len()
            )));
        }
        if words.next() != Some(hex(&Sha256::digest(body)).as_str()) {
            return Err(invalid("checksum mismatch".into()));
        }
        serde_json::from_slice(body)
            .map(Some)
            .map_err(|e| invalid(format!("cannot decode: {e}")))
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
