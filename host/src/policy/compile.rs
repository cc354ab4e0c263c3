//! Compiling a candidate policy under the operator's bounds ([`LoadLimits`]).
//!
//! Cranelift's cost is not linear in a component's size: a function of a few thousand locals
//! live across a few hundred loops, 90 KiB on disk, takes it more than 15 s and 1.5 GiB (and
//! more of both as the numbers grow). wasmtime has no bound of its own on compilation, so with
//! [`Compiler::Child`] a candidate is compiled by another process: the `regcache` binary's
//! hidden [`CHILD_COMMAND`], which sets its own CPU time and data limits, reads the component on
//! stdin and writes wasmtime's precompiled artifact on stdout. The kernel enforces the limits;
//! the host only waits (bounded too: [`wall_clock`]), reads at most what the child could hold,
//! and loads the artifact. How the child ended says which bound was hit (its exit status, never
//! its words): SIGXCPU or SIGKILL after the CPU limit, SIGABRT when an allocation failed (Rust
//! aborts then), the host's own kill past the wall-clock bound.
//!
//! Bytes the host trusts skip the child: the embedded default policy, and components found in
//! the artifact cache (this host compiled them before; see `artifacts`).

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wasmtime::Engine;
use wasmtime::component::Component;

use super::{DEFAULT_POLICY_WASM, PolicyError, sandbox};

/// How candidate policies are compiled.
#[derive(Debug, Clone, Default)]
pub enum Compiler {
    /// In this process, without bounds: neither [`LoadLimits::compile_cpu`] nor
    /// [`LoadLimits::compile_memory`] applies, and a crafted component can take the process's
    /// CPU and memory for as long as it likes. For trusted bytes (unit tests, embedders who vet
    /// their policies).
    #[default]
    InProcess,
    /// In a child process running `program` (the `regcache` binary), under [`LoadLimits`].
    Child {
        /// The executable that serves the hidden compile subcommand ([`CHILD_COMMAND`]).
        program: PathBuf,
    },
}

impl Compiler {
    /// A child running the executable of this process: what `regcache run` and `regcache
    /// policy check/eval` use. Through `/proc/self/exe`, the running binary itself even once a
    /// package upgrade replaced or removed its file: the artifact must come from the same build
    /// as the engine that loads it.
    pub fn this_executable() -> std::io::Result<Compiler> {
        Ok(Compiler::Child {
            program: PathBuf::from("/proc/self/exe"),
        })
    }
}

/// Bounds on loading one candidate policy. The settings that set them are named in the errors
/// ([`LoadBound`]).
#[derive(Debug, Clone, Copy)]
pub struct LoadLimits {
    /// Largest component accepted, from a file or over the API (`policy.max_size`). Default
    /// [`super::MAX_POLICY_SIZE`], 32 MiB: components built by componentize-py weigh ~18 MiB.
    pub max_size: usize,
    /// CPU time compiling may take, all threads together (`policy.compile_cpu_time`). Default
    /// 30 s: the largest components we know of compile in a few seconds. The kernel counts
    /// whole seconds, so this is rounded up to one. Compiling also stops after twice this much
    /// wall-clock time ([`wall_clock`]).
    pub compile_cpu: Duration,
    /// Memory compiling may use (`policy.compile_memory`): the child's data segment, heap and
    /// anonymous mappings together. Default 1 GiB: the default policy needs ~30 MiB. Also the
    /// most the host reads of the artifact the child writes, which the child held in memory.
    pub compile_memory: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        LoadLimits {
            max_size: super::MAX_POLICY_SIZE,
            compile_cpu: Duration::from_secs(30),
            compile_memory: 1 << 30,
        }
    }
}

/// The wall-clock time a compile may take: twice its CPU time limit. A child alone on a core
/// spends its CPU limit in as much wall-clock time; twice that leaves room for a loaded machine
/// without letting a child that sleeps or waits hold a swap for long.
pub(crate) fn wall_clock(limits: &LoadLimits) -> Duration {
    limits.compile_cpu.saturating_mul(2)
}

/// A bound of [`LoadLimits`] that a candidate went past, with the bound's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBound {
    /// The component is larger than `policy.max_size`.
    Size {
        /// The component's size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Compiling used more CPU time than `policy.compile_cpu_time`.
    CompileCpu(Duration),
    /// Compiling needed more memory than `policy.compile_memory`.
    CompileMemory(u64),
    /// Compiling took longer than [`wall_clock`] (twice `policy.compile_cpu_time`).
    CompileWallClock(Duration),
}

impl std::fmt::Display for LoadBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadBound::Size { size, limit } => write!(
                f,
                "the policy is {}, more than its size limit of {} (policy.max_size)",
                bytes(*size as u64),
                bytes(*limit as u64)
            ),
            LoadBound::CompileCpu(limit) => write!(
                f,
                "compiling the policy exceeded its CPU time limit of {limit:?} \
                 (policy.compile_cpu_time)"
            ),
            LoadBound::CompileMemory(limit) => write!(
                f,
                "compiling the policy exceeded its memory limit of {} (policy.compile_memory)",
                bytes(*limit)
            ),
            LoadBound::CompileWallClock(limit) => write!(
                f,
                "compiling the policy took longer than {limit:?} of wall-clock time (twice its \
                 CPU time limit, policy.compile_cpu_time)"
            ),
        }
    }
}

/// `n MiB` when it is whole mebibytes, else bytes.
fn bytes(n: u64) -> String {
    if n >= 1 << 20 && n.is_multiple_of(1 << 20) {
        format!("{} MiB", n >> 20)
    } else {
        format!("{n} bytes")
    }
}

/// The hidden subcommand of the `regcache` binary that compiles in a child (see
/// [`run_child`]).
pub const CHILD_COMMAND: &str = "compile-policy-child";

/// The child's exit code when the component is invalid; its stderr holds wasmtime's reason.
const EXIT_INVALID: u8 = 2;

/// Most of the child's stderr kept (an invalid component's reason).
const MAX_STDERR: u64 = 64 << 10;

/// How often the host looks at a compiling child, at most: its exit, the wall clock and
/// [`Compilation::stop`]. Compiles of real policies take tens of milliseconds, so the first
/// looks come sooner.
const POLL: Duration = Duration::from_millis(20);

/// An engine's compiling: the compiler, the limits, and whether the host is stopping.
#[derive(Debug)]
pub(crate) struct Compilation {
    compiler: Compiler,
    limits: LoadLimits,
    stopping: AtomicBool,
}

impl Compilation {
    pub(crate) fn new(compiler: Compiler, limits: LoadLimits) -> Self {
        Compilation {
            compiler,
            limits,
            stopping: AtomicBool::new(false),
        }
    }

    pub(crate) fn limits(&self) -> LoadLimits {
        self.limits
    }

    /// Kills the children compiling now and refuses to start more: the host is stopping, and
    /// a swap in flight must not hold it.
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Refuses bytes larger than `policy.max_size`, whatever their origin, but the embedded
    /// default policy: a limit set below its size is meant for others.
    pub(crate) fn check_size(&self, wasm: &[u8]) -> Result<(), PolicyError> {
        if wasm.len() > self.limits.max_size && wasm != DEFAULT_POLICY_WASM {
            return Err(PolicyError::Limit(LoadBound::Size {
                size: wasm.len(),
                limit: self.limits.max_size,
            }));
        }
        Ok(())
    }

    /// Compiles `wasm` for `engine`: in a child under the limits, unless the compiler is
    /// in-process or the bytes are the embedded default policy (built with the host, trusted).
    pub(crate) fn compile(&self, engine: &Engine, wasm: &[u8]) -> Result<Component, PolicyError> {
        match &self.compiler {
            Compiler::Child { program } if wasm != DEFAULT_POLICY_WASM => {
                self.in_child(program, engine, wasm)
            }
            _ => Component::new(engine, wasm).map_err(|e| PolicyError::Compile(format!("{e:#}"))),
        }
    }

    fn in_child(
        &self,
        program: &Path,
        engine: &Engine,
        wasm: &[u8],
    ) -> Result<Component, PolicyError> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err(PolicyError::Stopping);
        }
        let failed = |reason: String| PolicyError::Compiler {
            program: program.to_path_buf(),
            reason,
        };
        let request = ChildRequest {
            parent: std::process::id(),
            cpu: self.limits.compile_cpu,
            memory: self.limits.compile_memory,
        };
        // The child gets PR_SET_PDEATHSIG, tied to this thread: it is the thread that waits
        // for the child below, so it outlives it.
        let mut child = Command::new(program)
            .arg(CHILD_COMMAND)
            .args(request.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot start it: {e}")))?;
        let (mut stdin, stdout, stderr) = (
            child.stdin.take().expect("piped"),
            child.stdout.take().expect("piped"),
            child.stderr.take().expect("piped"),
        );
        let limit = self.limits.compile_memory;
        let (ended, artifact, message) = std::thread::scope(|scope| {
            // A child that dies early closes its stdin: the write fails, and the status says
            // why.
            scope.spawn(move || stdin.write_all(wasm));
            let artifact = scope.spawn(move || read_at_most(stdout, limit));
            let message = scope.spawn(move || read_at_most(stderr, MAX_STDERR));
            let ended = self.wait(&mut child);
            (
                ended,
                artifact.join().expect("reader thread"),
                message.join().expect("reader thread"),
            )
        });
        let message = message.map_or_else(String::from, |m| {
            String::from_utf8_lossy(&m).trim_end().to_string()
        });
        let status = match ended {
            Ended::Exited(status) => status,
            Ended::TimedOut => {
                return Err(PolicyError::Limit(LoadBound::CompileWallClock(wall_clock(
                    &self.limits,
                ))));
            }
            Ended::Stopped => return Err(PolicyError::Stopping),
            Ended::Lost(e) => return Err(failed(format!("cannot wait for it: {e}"))),
        };
        let artifact = match artifact {
            // The child held the whole artifact in its memory before writing it.
            Err(ReadError::TooLong) => {
                return Err(PolicyError::Limit(LoadBound::CompileMemory(limit)));
            }
            Err(ReadError::Io(e)) => return Err(failed(format!("cannot read its output: {e}"))),
            Ok(artifact) => artifact,
        };
        match (status.code(), status.signal()) {
            (Some(0), _) => {}
            (Some(code), _) if code == i32::from(EXIT_INVALID) => {
                return Err(PolicyError::Compile(message));
            }
            (_, Some(libc::SIGXCPU | libc::SIGKILL)) => {
                return Err(PolicyError::Limit(LoadBound::CompileCpu(
                    self.limits.compile_cpu,
                )));
            }
            (_, Some(libc::SIGABRT)) => {
                return Err(PolicyError::Limit(LoadBound::CompileMemory(limit)));
            }
            _ => return Err(failed(format!("{status}: {message}"))),
        }
        // SAFETY: `deserialize` trusts its bytes to be wasmtime's own output for this
        // engine's configuration. They are: the child is this host's own program, compiling
        // with the same engine configuration ([`compiling_engine`]), and wrote them to a pipe
        // this process created and alone reads; an engine mismatch is still caught by
        // wasmtime's compatibility check.
        unsafe { Component::deserialize(engine, &artifact) }
            .map_err(|e| failed(format!("its output does not load: {e:#}")))
    }

    /// Waits for `child` to exit, killing it past the wall-clock bound or when the host stops.
    fn wait(&self, child: &mut Child) -> Ended {
        let deadline = Instant::now() + wall_clock(&self.limits);
        let mut pause = Duration::from_millis(1);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Ended::Exited(status),
                Ok(None) => {}
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Ended::Lost(e);
                }
            }
            let ended = if self.stopping.load(Ordering::Relaxed) {
                Ended::Stopped
            } else if Instant::now() >= deadline {
                Ended::TimedOut
            } else {
                std::thread::sleep(pause);
                pause = (pause * 2).min(POLL);
                continue;
            };
            // Not yet reaped, so the pid is still the child's.
            let _ = child.kill();
            let _ = child.wait();
            return ended;
        }
    }
}

/// How a child compile ended.
enum Ended {
    Exited(ExitStatus),
    TimedOut,
    Stopped,
    Lost(std::io::Error),
}

enum ReadError {
    TooLong,
    Io(std::io::Error),
}

impl From<ReadError> for String {
    fn from(error: ReadError) -> String {
        match error {
            ReadError::TooLong => "(more than fits)".into(),
            ReadError::Io(e) => format!("(unreadable: {e})"),
        }
    }
}

/// All of `reader` if it holds at most `limit` bytes. Past the limit, it stops reading and
/// closes the pipe (the writer gets EPIPE rather than blocking).
fn read_at_most(reader: impl Read, limit: u64) -> Result<Vec<u8>, ReadError> {
    let mut bytes = Vec::new();
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > limit {
        return Err(ReadError::TooLong);
    }
    Ok(bytes)
}

/// What the parent tells the child, as its arguments.
#[derive(Debug, PartialEq)]
struct ChildRequest {
    /// The parent's pid: the child stops if it was orphaned before it could ask to die with
    /// its parent.
    parent: u32,
    cpu: Duration,
    memory: u64,
}

impl ChildRequest {
    fn to_args(&self) -> [String; 3] {
        [
            self.parent.to_string(),
            self.cpu.as_millis().to_string(),
            self.memory.to_string(),
        ]
    }

    fn from_args(args: &[String]) -> Result<ChildRequest, String> {
        fn number<T: std::str::FromStr>(arg: Option<&String>) -> Result<T, String> {
            arg.and_then(|a| a.parse().ok())
                .ok_or_else(|| format!("expected 3 numbers as arguments, got {arg:?}"))
        }
        let mut args = args.iter();
        let request = ChildRequest {
            parent: number(args.next())?,
            cpu: Duration::from_millis(number(args.next())?),
            memory: number(args.next())?,
        };
        match args.next() {
            Some(extra) => Err(format!("unexpected argument {extra:?}")),
            None => Ok(request),
        }
    }
}

/// The child's side: `regcache compile-policy-child <args>`, run by the host, not by people.
/// Bounds itself, then reads a component on stdin and writes its precompiled artifact on
/// stdout; an invalid component exits with [`EXIT_INVALID`] and the reason on stderr.
#[doc(hidden)]
pub fn run_child(args: &[String]) -> ExitCode {
    let request = match ChildRequest::from_args(args) {
        Ok(request) => request,
        Err(e) => {
            eprintln!("{CHILD_COMMAND}: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = bound_self(&request) {
        eprintln!("{CHILD_COMMAND}: cannot set its limits: {e}");
        return ExitCode::FAILURE;
    }
    let mut wasm = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut wasm) {
        eprintln!("{CHILD_COMMAND}: cannot read the component: {e}");
        return ExitCode::FAILURE;
    }
    let artifact = compiling_engine().and_then(|engine| engine.precompile_component(&wasm));
    match artifact {
        Ok(artifact) => {
            let mut stdout = std::io::stdout().lock();
            match stdout.write_all(&artifact).and_then(|()| stdout.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("{CHILD_COMMAND}: cannot write the artifact: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::from(EXIT_INVALID)
        }
    }
}

/// The child's engine: the host's configuration ([`sandbox::compile_config`]) without its
/// pool, which reserves gigabytes of stacks the memory limit would count. The pool is no part
/// of an artifact's compatibility (a test checks it).
fn compiling_engine() -> wasmtime::Result<Engine> {
    Engine::new(&sandbox::compile_config())
}

/// The child's bounds, set before it reads anything: it dies with its parent, and the kernel
/// stops it past the CPU and memory limits. RLIMIT_DATA rather than RLIMIT_AS: wasmtime
/// reserves terabytes of address space it never touches (PROT_NONE), which RLIMIT_AS would
/// count. No core dumps: a bomb's would be as large as the memory it took.
fn bound_self(request: &ChildRequest) -> std::io::Result<()> {
    use rustix::process::{Resource, Rlimit, Signal, getppid, set_parent_process_death_signal};
    let limit = |current: u64, maximum: u64| Rlimit {
        current: Some(current),
        maximum: Some(maximum),
    };
    set_parent_process_death_signal(Some(Signal::KILL))?;
    // Orphaned before the line above took effect: nobody waits for the answer.
    if getppid().map(|p| p.as_raw_pid() as u32) != Some(request.parent) {
        return Err(std::io::Error::other("its parent is gone"));
    }
    let cpu = request.cpu.as_secs_f64().ceil().max(1.0) as u64;
    // SIGXCPU at the soft limit; SIGKILL a second later if it is caught or ignored.
    rustix::process::setrlimit(Resource::Cpu, limit(cpu, cpu + 1))?;
    rustix::process::setrlimit(Resource::Data, limit(request.memory, request.memory))?;
    rustix::process::setrlimit(Resource::Core, limit(0, 0))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Limits;

    #[test]
    fn the_request_survives_its_arguments() {
        let request = ChildRequest {
            parent: 42,
            cpu: Duration::from_millis(2500),
            memory: 256 << 20,
        };
        let args = request.to_args();
        assert_eq!(ChildRequest::from_args(&args), Ok(request));
        assert!(ChildRequest::from_args(&args[..2]).is_err());
        let mut more = args.to_vec();
        more.push("1".into());
        assert!(ChildRequest::from_args(&more).is_err());
    }

    #[test]
    fn the_child_compiles_for_any_host_engine() {
        fn hash(engine: &Engine) -> u64 {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            hasher.finish()
        }
        let child = compiling_engine().unwrap();
        for limits in [
            Limits::default(),
            Limits {
                max_instances: 1000,
                memory_bytes: 256 << 20,
                ..Limits::default()
            },
        ] {
            let host = sandbox::engine(&limits).unwrap();
            assert_eq!(hash(&child), hash(&host), "{limits:?}");
        }
        let artifact = child.precompile_component(DEFAULT_POLICY_WASM).unwrap();
        let host = sandbox::engine(&Limits::default()).unwrap();
        // SAFETY: the artifact was just made by wasmtime, for an engine of this configuration.
        unsafe { Component::deserialize(&host, &artifact) }.unwrap();
    }

    #[test]
    fn bounds_name_their_setting() {
        let size = LoadBound::Size {
            size: 40 << 20,
            limit: 32 << 20,
        };
        assert_eq!(
            size.to_string(),
            "the policy is 40 MiB, more than its size limit of 32 MiB (policy.max_size)"
        );
        let cpu = LoadBound::CompileCpu(Duration::from_secs(30)).to_string();
        assert!(cpu.contains("30s (policy.compile_cpu_time)"), "{cpu}");
        let memory = LoadBound::CompileMemory(1 << 30).to_string();
        assert!(
            memory.contains("1024 MiB (policy.compile_memory)"),
            "{memory}"
        );
    }

    #[test]
    fn in_process_bytes_are_still_bounded_in_size() {
        let compilation = Compilation::new(
            Compiler::InProcess,
            LoadLimits {
                max_size: 8,
                ..LoadLimits::default()
            },
        );
        assert!(compilation.check_size(&[0; 8]).is_ok());
        assert!(matches!(
            compilation.check_size(&[0; 9]),
            Err(PolicyError::Limit(LoadBound::Size { size: 9, limit: 8 }))
        ));
    }
}
