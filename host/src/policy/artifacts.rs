//! Compiled policies, kept so that a restart or a swap back to a known policy skips cranelift.
//!
//! Two levels: an in-memory map of the components this process compiled (a swap back costs a
//! lookup), and, when the host has a state directory, precompiled artifacts on disk keyed by the
//! policy's digest and the engine's compatibility hash (a restart costs a `deserialize`, ~0.1 ms
//! instead of ~20 ms).
//!
//! Deserializing is `unsafe` in wasmtime because the bytes are trusted to be wasmtime's own
//! output. So the host only reads artifacts from a directory nobody else can write: it creates
//! it with mode 0700, and refuses to use one (compiling every time instead) that is not owned by
//! the host's user or that others can access. Each artifact has a sha256 of its bytes written
//! after it, so a torn write or a truncated file means recompiling, never loading.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::fsutil::write_atomically;

/// Components kept in memory; policies are small, and operators rarely juggle more.
const IN_MEMORY: usize = 16;

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
    pub(crate) fn new(engine: &Engine, dir: Option<PathBuf>) -> std::io::Result<Self> {
        let dir = match dir {
            Some(dir) => {
                create_private_dir(&dir)?;
                match check_private(&dir) {
                    Ok(()) => Some(dir),
                    Err(reason) => {
                        tracing::warn!(path = %dir.display(), "not using the precompiled-policy cache: {reason}");
                        None
                    }
                }
            }
            None => None,
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Ok(ArtifactCache {
            dir,
            compatibility: format!("{:016x}", hasher.finish()),
            compiled: Mutex::new(Vec::new()),
        })
    }

    /// The component for `bytes` (whose sha256 is `digest`), from memory, disk or cranelift.
    pub(crate) fn component(
        &self,
        engine: &Engine,
        bytes: &[u8],
        digest: &str,
    ) -> wasmtime::Result<(Component, Origin)> {
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
            None => {
                let component = Component::new(engine, bytes)?;
                self.write(&component, digest);
                (component, Origin::Compiled)
            }
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
        let artifact = dir.join(format!("{digest}-{}.cwasm", self.compatibility));
        let checksum = artifact.with_extension("cwasm.sha256");
        Some((artifact, checksum))
    }

    fn read(&self, engine: &Engine, digest: &str) -> Option<Component> {
        let (artifact, checksum) = self.paths(digest)?;
        let bytes = std::fs::read(&artifact).ok()?;
        let expected = std::fs::read_to_string(&checksum).ok()?;
        if hex_sha256(&bytes) != expected.trim() {
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

    fn write(&self, component: &Component, digest: &str) {
        let Some((artifact, checksum)) = self.paths(digest) else {
            return;
        };
        let result = component
            .serialize()
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                write_atomically(&artifact, &bytes)?;
                write_atomically(&checksum, hex_sha256(&bytes).as_bytes())
            });
        if let Err(err) = result {
            // The cache is an optimisation: failing to fill it costs a compile next time.
            tracing::warn!(path = %artifact.display(), "cannot store precompiled policy: {err}");
        }
    }
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
