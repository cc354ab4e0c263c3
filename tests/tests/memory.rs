//! Memory per node of the etcd registry's watch mirror and of the cache, measured in process by
//! a counting global allocator over the scale scenario's values (go-micro JSON of ~200 bytes).
//!
//! RSS (the scale benchmark) says how much, this says where: bytes live after connecting (the
//! mirror), the peak while connecting (the initial list and its decoding, which glibc may keep
//! as RSS after freeing it), and bytes live after looking every service up (the cache: entry
//! state plus the published views). Sizes are glibc chunk sizes (request + 8 bytes, rounded
//! up to 16, at least 32), which is what the heap really spends. `cargo test --test memory --
//! --nocapture` prints the table; `REGCACHE_MEMORY_SERVICES` scales it (default 1,000 services
//! of 10 nodes).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use regcache::model::Service;
use regcache::policy::{EngineOptions, Envelope, PolicyEngine};
use regcache_tests::cache::{cache, registry, spec};
use regcache_tests::etcd::EtcdCluster;
use regcache_tests::registry::{fill_scale, raw_client};

const NODES: usize = 10;

/// Budgets per node, in heap bytes, that the test enforces (measured values are well below).
const MIRROR_BUDGET: f64 = 400.0;
const CACHE_BUDGET: f64 = 700.0;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

/// What glibc's malloc spends on a request of `size` bytes.
fn chunk(size: usize) -> isize {
    ((size + 8 + 15) & !15).max(32) as isize
}

fn grow(delta: isize) {
    let live = LIVE.fetch_add(delta, Ordering::Relaxed) + delta;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(chunk(layout.size()));
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(chunk(layout.size()));
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        grow(chunk(new_size) - chunk(layout.size()));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Live heap bytes once background work has settled (the count moved by less than 64 KiB over
/// 200 ms, waiting at most 20 s), and the peak since the last call.
async fn settle() -> (isize, isize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut live = LIVE.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = LIVE.load(Ordering::Relaxed);
        let quiet = (now - live).abs() < 64 * 1024;
        live = now;
        if quiet || std::time::Instant::now() > deadline {
            break;
        }
    }
    (live, PEAK.swap(live, Ordering::Relaxed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_per_node_of_the_mirror_and_the_cache() {
    let services: usize = std::env::var("REGCACHE_MEMORY_SERVICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let nodes = (services * NODES) as f64;
    let etcd = EtcdCluster::start(1).await.unwrap();
    let mut client = raw_client(&etcd, None).await;
    fill_scale(&mut client, services, NODES).await.unwrap();
    drop(client);

    let (before, _) = settle().await;
    let registry = registry(&etcd).await;
    let (connected, connect_peak) = settle().await;

    // Filling the cache asks etcd once per service: a budget past the default ceiling.
    let options = EngineOptions {
        envelope: Envelope {
            max_registry_budget: 100_000,
            ..Envelope::default()
        },
        ..EngineOptions::default()
    };
    let engine = PolicyEngine::new(
        options,
        spec("default", &[("registry-budget-per-second", "100000")]),
    )
    .unwrap();
    let cache = cache(registry.clone(), &engine);
    let (idle, _) = settle().await;
    for s in 0..services {
        cache.lookup(&format!("svc-{s:05}")).await.unwrap();
    }
    let (filled, _) = settle().await;
    assert_eq!(cache.node_count(), services * NODES);

    // The views' share: a copy of every answer's services costs what the views hold.
    let mut answers = Vec::with_capacity(services);
    for s in 0..services {
        answers.push(cache.lookup(&format!("svc-{s:05}")).await.unwrap());
    }
    let (answered, _) = settle().await;
    let copies: Vec<Vec<Service>> = answers.iter().map(|a| a.services().to_vec()).collect();
    let views = LIVE.load(Ordering::Relaxed) - answered;
    drop(copies);

    let per_node = |bytes: isize| bytes as f64 / nodes;
    let mirror = per_node(connected - before);
    let cached = per_node(filled - idle);
    println!("{services} services x {NODES} nodes, heap bytes per node:");
    println!("  mirror (live after connect)       {mirror:8.0}");
    println!(
        "  peak while connecting             {:8.0}",
        per_node(connect_peak - before)
    );
    println!("  cache (entries after lookups)     {cached:8.0}");
    println!(
        "    of which published views        {:8.0}",
        per_node(views)
    );
    println!(
        "    of which entry state and map    {:8.0}",
        per_node(filled - idle - views)
    );
    assert!(
        mirror <= MIRROR_BUDGET,
        "mirror: {mirror:.0} bytes per node"
    );
    assert!(cached <= CACHE_BUDGET, "cache: {cached:.0} bytes per node");
}
