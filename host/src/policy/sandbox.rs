//! The sandbox every policy runs in: one wasmtime `Engine` configured for the features regcache
//! uses, the per-instance state (a deny-all WASI, resource limits, the guest's output: see
//! `stdio`), and the epoch ticker that enforces call deadlines.
//!
//! This is the one place that decides pooling, epochs and limits (the "thin engine layer" of
//! wasmtime and Spin): change a limit here, nowhere else.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use wasmtime::component::{HasData, HasSelf, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::{self, Host, LogLevel};
use super::stdio::{self, GuestOutput};

/// Limits applied to every policy instance. Defaults suit policies of a few hundred KiB.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Validation's deadline of one decision (`decide-lookup`, `guard-eviction`) in the
    /// conformance battery. Default 100 ms. It only stops loops (what a decision costs is
    /// measured in CPU time against `latency_budget`): a call descheduled past it is given as
    /// long again, and stopped only if it ran meanwhile (see `instance::Deadlines`).
    pub decision_deadline: Duration,
    /// Deadline of `configure` and of instantiation, which may build tables. Default 500 ms.
    pub configure_deadline: Duration,
    /// Linear memory per instance. Default 16 MiB.
    pub memory_bytes: usize,
    /// Policy instances alive at once, all generations and threads together. Default 256.
    pub max_instances: u32,
    /// The p99 cost a decision may have. Default 200 µs. Validation measures each call of the
    /// battery in the calling thread's CPU time and refuses a policy whose p99 exceeds it; at
    /// run time it is the deadline of a decision, in whole epoch ticks (at least two: 1-2 ms
    /// for the default), so a policy that turns slow costs a fail-safe answer rather than a
    /// stalled worker. Our Rust policies decide in about a microsecond, and a ~3 µs policy
    /// written in JS or Python (issue 13) passes with room; at 200 µs one core still decides
    /// 5,000 lookups a second.
    pub latency_budget: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            decision_deadline: Duration::from_millis(100),
            configure_deadline: Duration::from_millis(500),
            memory_bytes: 16 << 20,
            max_instances: 256,
            latency_budget: Duration::from_micros(200),
        }
    }
}

/// How often the epoch advances. Deadlines are whole ticks, so a deadline of `d` fires between
/// `d` and `d + TICK` after the call starts; a deadline of one tick could fire mid-call at once.
pub(crate) const TICK: Duration = Duration::from_millis(1);

pub(crate) fn ticks(deadline: Duration) -> u64 {
    (deadline.as_micros() / TICK.as_micros()).max(2) as u64
}

/// CPU time the calling thread has used.
pub(crate) fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill; the clock exists on every Linux.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    if !ok {
        // Never seen, but a clock that stood still would let a serving decision's overruns be
        // forgiven forever: wall-clock time stands in, which stops them.
        static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        return STARTED.get_or_init(Instant::now).elapsed();
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Builds the engine. Features regcache does not use stay off: besides a smaller attack surface,
/// `concurrency_support(false)` makes each typed component call about 3x cheaper.
pub(crate) fn engine(limits: &Limits) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    // A wasip2 component instantiates a few core instances (the guest plus WASI shims).
    pool.total_component_instances(limits.max_instances)
        .total_core_instances(limits.max_instances * 8)
        .total_memories(limits.max_instances * 2)
        .total_tables(limits.max_instances * 4)
        .max_memory_size(limits.memory_bytes);
    let mut config = compile_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config)
}

/// What the engine's compiled code depends on (an artifact's compatibility hash), without the
/// pool: the engine of the policy compiler's child (`compile.rs`), which instantiates nothing.
pub(crate) fn compile_config() -> Config {
    let mut config = Config::new();
    config
        .wasm_component_model(true)
        .concurrency_support(false)
        .epoch_interruption(true)
        .max_wasm_stack(512 << 10);
    config
}

/// The thread that advances the engine's epoch every [`TICK`], from the moment the engine exists:
/// the first policy's validation (`policy check`, `policy eval`, start-up) runs under the same
/// deadlines as a swap's, so a policy that loops is refused there too rather than hanging it.
/// The thread ends within a tick of this value and its every clone being dropped (with the
/// engine, or with an engine whose first policy was refused): whoever calls a policy holds one.
#[derive(Clone)]
pub(crate) struct Ticker {
    _alive: Arc<()>,
}

impl Ticker {
    pub(crate) fn start(engine: Engine) -> Ticker {
        let alive = Arc::new(());
        let owner: Weak<()> = Arc::downgrade(&alive);
        std::thread::Builder::new()
            .name("regcache-policy-epoch".into())
            .spawn(move || {
                while owner.strong_count() > 0 {
                    std::thread::sleep(TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the policy epoch thread");
        Ticker { _alive: alive }
    }
}

/// Builds the linker: the `host` interface regcache offers, and a deny-all WASI so that policies
/// compiled by toolchains that always import WASI still load.
///
/// WASI is wasmtime-wasi's (`add_to_linker_sync`'s interfaces, listed here), except
/// `wasi:cli/stdout`, `wasi:cli/stderr`, `wasi:io/streams` and `wasi:io/poll`, which are
/// `stdio`'s: a policy's output goes to the host's log, and no stream call may `block_on` a
/// runtime (see `stdio`).
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<InstanceState>> {
    use wasmtime_wasi::cli::{WasiCli, WasiCliView as _};
    use wasmtime_wasi::clocks::{WasiClocks, WasiClocksView as _};
    use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView as _};
    use wasmtime_wasi::p2::bindings::{self as wasi, sync};
    use wasmtime_wasi::random::{WasiRandom, WasiRandomView as _};
    use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsView as _};

    type S = InstanceState;
    let mut linker = Linker::new(engine);
    let l = &mut linker;
    wasi::clocks::wall_clock::add_to_linker::<S, WasiClocks>(l, S::clocks)?;
    wasi::clocks::monotonic_clock::add_to_linker::<S, WasiClocks>(l, S::clocks)?;
    wasi::filesystem::preopens::add_to_linker::<S, WasiFilesystem>(l, S::filesystem)?;
    sync::filesystem::types::add_to_linker::<S, WasiFilesystem>(l, S::filesystem)?;
    wasi::random::random::add_to_linker::<S, WasiRandom>(l, S::random)?;
    wasi::random::insecure::add_to_linker::<S, WasiRandom>(l, S::random)?;
    wasi::random::insecure_seed::add_to_linker::<S, WasiRandom>(l, S::random)?;
    wasi::cli::exit::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::environment::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::stdin::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::terminal_input::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::terminal_output::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::terminal_stdin::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::terminal_stdout::add_to_linker::<S, WasiCli>(l, S::cli)?;
    wasi::cli::terminal_stderr::add_to_linker::<S, WasiCli>(l, S::cli)?;
    let network = wasi::sockets::network::LinkOptions::default();
    wasi::sockets::tcp_create_socket::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    wasi::sockets::instance_network::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    wasi::sockets::network::add_to_linker::<S, WasiSockets>(l, &network, S::sockets)?;
    wasi::sockets::ip_name_lookup::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    sync::sockets::tcp::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    sync::sockets::udp::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    sync::sockets::udp_create_socket::add_to_linker::<S, WasiSockets>(l, S::sockets)?;
    wasi::io::error::add_to_linker::<S, HasTable>(l, |s| &mut s.table)?;
    stdio::add_to_linker(l, |s| stdio::GuestIo {
        table: &mut s.table,
        output: &s.output,
    })?;
    bindings::regcache::policy::host::add_to_linker::<_, HasSelf<_>>(l, |s| s)?;
    Ok(linker)
}

/// The [`HasData`] of `wasi:io/error`, which needs the resource table only.
struct HasTable;

impl HasData for HasTable {
    type Data<'a> = &'a mut ResourceTable;
}

/// Whether the linker offers an import of this name (WASI, and the world's own `types` and
/// `host` interfaces); anything else is refused at load.
pub(crate) fn is_offered_import(name: &str) -> bool {
    name.starts_with("wasi:") || name.starts_with("regcache:policy/")
}

/// Per-instance state held in the `Store`.
pub(crate) struct InstanceState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: StoreLimits,
    /// Where the `log` import, stdout and stderr go.
    output: Arc<GuestOutput>,
    /// The thread's CPU time when the current call last reached its deadline (see
    /// `instance::Deadlines`); cleared as each call starts.
    pub(crate) overrun_at: Option<Duration>,
    /// The current call's deadline in epoch ticks: what a call that reached it is given again.
    pub(crate) deadline_ticks: u64,
}

/// Host resources (streams, pollables) an instance may hold at once; a policy needs a handful.
const MAX_HOST_RESOURCES: usize = 256;

impl InstanceState {
    pub(crate) fn new(limits: &Limits, digest: Arc<str>) -> Self {
        let wasi = WasiCtx::builder()
            .wall_clock(FrozenClock)
            .monotonic_clock(FrozenClock)
            .secure_random(ZeroRandom)
            .insecure_random(ZeroRandom)
            .insecure_random_seed(0)
            .build();
        // Host memory the store's limits do not count: a guest asking for streams in a loop
        // fills this table, a million entries by default.
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_HOST_RESOURCES);
        InstanceState {
            wasi,
            table,
            limits: wasmtime::StoreLimitsBuilder::new()
                .memory_size(limits.memory_bytes)
                .instances(16)
                .tables(16)
                .table_elements(100_000)
                .trap_on_grow_failure(true)
                .build(),
            output: GuestOutput::new(digest),
            overrun_at: None,
            deadline_ticks: 0,
        }
    }
}

impl InstanceState {
    /// See [`GuestOutput::logging_cost`].
    pub(crate) fn logging_cost(&self) -> Duration {
        self.output.logging_cost()
    }
}

impl WasiView for InstanceState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host for InstanceState {
    fn log(&mut self, level: LogLevel, message: String) {
        self.output.log(level, &message);
    }
}

/// A clock stuck at the epoch: policies get time only through their contexts, which keeps them
/// pure and replayable.
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// "Randomness" that is always zero, for the same reason.
struct ZeroRandom;

impl rand::TryRng for ZeroRandom {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(0)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(0)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        dst.fill(0);
        Ok(())
    }
}
