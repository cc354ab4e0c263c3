//! Policy cost by language (issue 13): the `strict` policy written in Rust, JavaScript
//! (componentize-qjs) and Python (componentize-py), side by side. Per call: the bare component
//! call on a cache hit's context, as `policy_cost` measures Rust's; per lookup: lookups per second
//! through the registry cache with each policy active, as `hot_path` measures them. Both are
//! interleaved round by round, so the ratios to Rust come from the same rounds. Each component's
//! size, the time to load it (compile + validate), and a swap to it by a host that compiled it
//! before (its precompiled artifact on disk, against the hot-swap target) are measured once each.

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use regcache::policy::{DirectInstance, EngineOptions, PolicyEngine, PolicySpec};
use regcache_tests::policies::{Lang, policy_path, repo_root, strict_in};

use super::hot_path::{lookups_per_second, warm_cache};
use super::policy_cost::fresh_hit;
use crate::compare::{Rounds, rounds_now};
use crate::measure::{Effort, Timed};
use crate::report::{Row, Section};

/// The implementations compared, Rust (the reference of every ratio) first.
const LANGUAGES: [&str; 3] = ["Rust", "JavaScript", "Python"];
const RUST: usize = 0;

/// The `strict` policy in `lang`: the component the tests built (`strict_in`: `regcache policy
/// build` writes `target/<project>.wasm` in the project) if it is newer than the project's files
/// and the WIT, so that CI's smoke run after the tests does not build it again (~10 s for
/// Python); otherwise built now by `strict_in`.
fn strict_component(lang: Lang) -> PathBuf {
    let project = repo_root()
        .join("policy/lang")
        .join(lang.name())
        .join("strict");
    let built = project.join("target/strict.wasm");
    let newest_source = [&project, &repo_root().join("wit")]
        .into_iter()
        .filter_map(|dir| newest_file_in(dir))
        .max();
    match (modified(&built), newest_source) {
        (Some(built_at), Some(source_at)) if built_at > source_at => built,
        _ => strict_in(lang).to_path_buf(),
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    path.metadata().and_then(|m| m.modified()).ok()
}

/// The latest modification of the files directly in `dir` (its directories are the toolchain's
/// and the build's).
fn newest_file_in(dir: &Path) -> Option<SystemTime> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| {
            let metadata = entry.ok()?.metadata().ok()?;
            metadata
                .is_file()
                .then(|| metadata.modified().ok())
                .flatten()
        })
        .max()
}

/// One implementation, loaded.
struct Loaded {
    engine: PolicyEngine,
    bytes: usize,
    /// `PolicyEngine::new`: compile, then the validation every candidate passes.
    load: Duration,
    /// The same validation again, the compiled form now cached in memory.
    validate: Duration,
    /// `swap` to it by another engine on the same artifact directory (a restarted host), from
    /// the default policy: the precompiled artifact read from disk, then validated.
    swap_from_disk: Duration,
}

fn load(source: &str, path: &Path, artifact_dir: &Path) -> anyhow::Result<Loaded> {
    let spec = PolicySpec {
        wasm: std::fs::read(path)?.into(),
        source: source.into(),
        config: vec![],
    };
    let options = || EngineOptions {
        artifact_dir: Some(artifact_dir.to_path_buf()),
        ..Default::default()
    };
    let started = Instant::now();
    let engine = PolicyEngine::new(options(), spec.clone())?;
    let load = started.elapsed();
    let started = Instant::now();
    engine.check(&spec)?;
    let validate = started.elapsed();
    let restarted = PolicyEngine::new(options(), PolicySpec::embedded_default(vec![]))?;
    let started = Instant::now();
    restarted.swap(spec.clone())?;
    let swap_from_disk = started.elapsed();
    Ok(Loaded {
        engine,
        bytes: spec.wasm.len(),
        load,
        validate,
        swap_from_disk,
    })
}

pub fn run(effort: Effort, quick: bool) -> anyhow::Result<Section> {
    let runtime = tokio::runtime::Runtime::new()?;
    let _entered = runtime.enter();
    let paths = [
        policy_path("strict"),
        strict_component(Lang::Js),
        strict_component(Lang::Python),
    ];
    // A directory of the host's own (0700, as the artifact cache requires), not the temporary
    // directory itself, which the umask leaves open to others.
    let state = tempfile::tempdir()?;
    let artifacts = state.path().join("artifacts");
    let loaded = LANGUAGES
        .iter()
        .zip(&paths)
        .map(|(language, path)| load(language, path, &artifacts))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let ctx = &fresh_hit("greeter.service");
    let mut instances = loaded
        .iter()
        .map(|l| l.engine.direct_instance())
        .collect::<Result<Vec<DirectInstance>, _>>()?;
    let mut calls: Vec<_> = instances
        .iter_mut()
        .map(|instance| {
            Timed::new(effort, move || {
                black_box(instance.decide_lookup(black_box(ctx)).unwrap());
            })
        })
        .collect();
    let per_call: Rounds<f64, 3> = rounds_now(effort.rounds, |arm| calls[arm].ns_per_op());

    let caches = loaded
        .iter()
        .map(|l| runtime.block_on(warm_cache(Arc::new(l.engine.clone()))))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let window = Duration::from_millis(if quick { 50 } else { 300 });
    let throughput: Rounds<f64, 3> = rounds_now(effort.rounds, |arm| {
        lookups_per_second(&caches[arm], 1, window)
    });

    let mut rows = Vec::new();
    for (arm, language) in LANGUAGES.iter().enumerate() {
        rows.push(Row::rounds(
            format!("{language}: bare component call (decide-lookup, cache hit)"),
            per_call.per_round(|r| r[arm]),
            "ns",
        ));
    }
    for (arm, language) in LANGUAGES.iter().enumerate().skip(1) {
        rows.push(Row::rounds(
            format!("{language} / Rust, per call"),
            per_call.per_round(|r| r[arm] / r[RUST]),
            "x",
        ));
    }
    for (arm, language) in LANGUAGES.iter().enumerate() {
        rows.push(Row::rounds(
            format!("{language}: lookups/s through the cache, 1 thread"),
            throughput.per_round(|r| r[arm]),
            "/s",
        ));
    }
    for (arm, language) in LANGUAGES.iter().enumerate().skip(1) {
        rows.push(Row::rounds(
            format!("{language} / Rust, lookups/s"),
            throughput.per_round(|r| r[arm] / r[RUST]),
            "x",
        ));
    }
    for (language, l) in LANGUAGES.iter().zip(&loaded) {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        rows.push(Row::new(
            format!("{language}: component size"),
            l.bytes as f64 / (1 << 20) as f64,
            "MiB",
        ));
        rows.push(Row::new(
            format!("{language}: load (compile + validate), once"),
            ms(l.load),
            "ms",
        ));
        rows.push(Row::new(
            format!("{language}: of which compile (load - validate again, compiled form cached)"),
            ms(l.load.saturating_sub(l.validate)),
            "ms",
        ));
        rows.push(
            Row::new(
                format!("{language}: swap to it, precompiled artifact on disk (restarted host)"),
                ms(l.swap_from_disk),
                "ms",
            )
            .at_most(250.0),
        );
    }
    Ok(Section {
        title: "Policy cost by language (the strict policy in Rust, JavaScript, Python)".into(),
        measured: format!(
            "in process, one thread; the three per-call arms interleaved round by round, then \
             the three lookup arms ({} s windows); loads are one sample each, not interleaved, \
             compiled in this process (hosts compile in a child under the load limits)",
            window.as_secs_f64()
        ),
        rows,
        notes: vec![],
    })
}
