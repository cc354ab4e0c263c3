//! Bounded compilation of candidate policies (issue 12, finding 1), against the real binary: a
//! compile bomb (`wasm_bomb`) sent over the API, written to the watched file, checked with
//! `policy check` or given at start-up is refused within a bounded time naming the limit it hit,
//! while the host's memory stays small, other swaps go on, and SIGTERM still stops the host at
//! once; a component over `policy.max_size` is refused naming that limit.
//!
//! The limits are tight here (2 s of CPU, or 256 MiB) to keep the tests fast; in process, the
//! bombs take more than 15 s and 1.5 GB.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use regcache::policy::{Compiler, EngineOptions, MAX_POLICY_SIZE, PolicyEngine, PolicySpec};
use regcache_tests::binary::{regcache_bin, run_regcache};
use regcache_tests::host::{Host, write_atomically};
use regcache_tests::http::{Response, request};
use regcache_tests::policies::{policy_path, policy_wasm};
use regcache_tests::wait::eventually_blocking;
use regcache_tests::wasm_bomb::compile_bomb;

const TOKEN: &str = "s3cret-token";

/// 91 KB; compiling it takes 256 MiB within 3 s of CPU, and in process 1.5 GB in 16 s.
fn memory_bomb() -> Vec<u8> {
    compile_bomb(4000, 400)
}

/// A tight memory limit, the CPU time limit left at its default (30 s): [`memory_bomb`] meets
/// the memory limit.
const MEMORY_BOUND: [&str; 2] = ["--policy-compile-memory", "256MiB"];

/// 34 KB; compiling it takes 2 s of CPU before 400 MiB, and in process more than a minute.
fn cpu_bomb() -> Vec<u8> {
    compile_bomb(1500, 150)
}

/// A tight CPU time limit, the memory limit left at its default (1 GiB): [`cpu_bomb`] meets
/// the CPU time limit.
const CPU_BOUND: [&str; 2] = ["--policy-compile-cpu-time", "2s"];

/// How long a refusal may take: about 3 s of CPU for either bomb, the child's start, and a
/// loaded machine.
const REFUSAL: Duration = Duration::from_secs(12);

/// How long after a bomb is sent it is surely compiling (and far from done).
const BOMB_UNDER_WAY: Duration = Duration::from_millis(700);

/// The host's own memory may not grow past this while a bomb compiles (it idles at ~30 MB; in
/// process the bomb takes it past 1.5 GB).
const HOST_MEMORY: u64 = 300 << 20;

fn put_policy(host: &Host, wasm: &[u8]) -> Response {
    let auth = format!("Bearer {TOKEN}");
    host.request("PUT", "/v1/policy", &[("Authorization", &auth)], wasm)
        .unwrap_or_else(|e| panic!("PUT /v1/policy: {e:#}\n{}", host.log()))
}

fn active_digest(host: &Host) -> String {
    host.get("/v1/policy").unwrap().json()["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

/// A `VmHWM`-style line of /proc/<pid>/status, in bytes.
fn proc_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kib << 10
}

/// The pids of `parent`'s children running the policy compiler.
fn compile_children(parent: u32) -> Vec<u32> {
    let mut children = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(parent)
            && String::from_utf8_lossy(&cmdline).contains(regcache::policy::CHILD_COMMAND)
        {
            children.push(pid);
        }
    }
    children
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `regcache <args>`, bounded by `timeout`: its exit code, stderr and how long it ran.
fn regcache(args: &[&str], timeout: Duration) -> (Option<i32>, String, Duration) {
    let (output, took) = run_regcache(args, &[], timeout);
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
        took,
    )
}

#[test]
fn a_bomb_over_the_api_is_refused_in_bounded_time_and_memory_while_other_swaps_go_on() {
    let mut args = vec!["--admin-token", TOKEN];
    args.extend(MEMORY_BOUND);
    let host = Host::start(&args).unwrap();
    let before = active_digest(&host);

    let bomb = memory_bomb();
    let started = Instant::now();
    let refusal = std::thread::scope(|scope| {
        let refusal = scope.spawn(|| {
            let answer = put_policy(&host, &bomb);
            (answer, started.elapsed())
        });
        // While the bomb compiles (it takes seconds), a good swap is not held up.
        std::thread::sleep(BOMB_UNDER_WAY);
        let good = Instant::now();
        let answer = put_policy(&host, &policy_wasm("strict"));
        let good = good.elapsed();
        assert_eq!(answer.status, 200, "{}", answer.text());
        assert!(
            !refusal.is_finished(),
            "the bomb was refused before the good swap was done: nothing was shown"
        );
        assert!(good < Duration::from_secs(5), "good swap took {good:?}");
        refusal.join().unwrap()
    });
    let (answer, took) = refusal;
    eprintln!("the bomb was refused after {took:?}");
    assert_eq!(answer.status, 422, "{}", answer.text());
    let message = answer.json()["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("memory limit of 256 MiB (policy.compile_memory)"),
        "{message}"
    );
    assert!(took < REFUSAL, "refused after {took:?}");
    let peak = proc_memory(host.pid(), "VmHWM");
    assert!(
        peak < HOST_MEMORY,
        "the host's memory peaked at {} MiB",
        peak >> 20
    );
    let active = active_digest(&host);
    assert_ne!(active, before, "the good swap is active");
    assert!(compile_children(host.pid()).is_empty(), "no child is left");
}

#[test]
fn a_bomb_in_the_watched_file_is_refused_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "policy.wasm", &policy_wasm("strict"));
    let mut args = vec!["--policy-file", file.to_str().unwrap()];
    args.extend(CPU_BOUND);
    let host = Host::start(&args).unwrap();
    let before = active_digest(&host);

    write_atomically(&file, &cpu_bomb()).unwrap();
    assert!(
        eventually_blocking(REFUSAL, || host.log().contains("(policy.compile_cpu_time)")),
        "no refusal naming the CPU limit; log:\n{}",
        host.log()
    );
    assert_eq!(active_digest(&host), before);
    let peak = proc_memory(host.pid(), "VmHWM");
    assert!(
        peak < HOST_MEMORY,
        "the host's memory peaked at {} MiB",
        peak >> 20
    );
}

#[test]
fn policy_check_refuses_bombs_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, bomb, bound, limit) in [
        ("cpu.wasm", cpu_bomb(), CPU_BOUND, "policy.compile_cpu_time"),
        (
            "memory.wasm",
            memory_bomb(),
            MEMORY_BOUND,
            "policy.compile_memory",
        ),
    ] {
        let path = write(dir.path(), name, &bomb);
        let mut args = vec!["policy", "check", path.to_str().unwrap()];
        args.extend(bound);
        let (code, stderr, took) = regcache(&args, REFUSAL);
        eprintln!("policy check {name}: refused after {took:?}");
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(limit), "{name}: {stderr}");
    }
}

#[test]
fn run_with_a_bomb_stops_with_one_line_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bomb.wasm", &memory_bomb());
    let mut args = vec![
        "run",
        "--listen",
        "127.0.0.1:0",
        "--policy-file",
        path.to_str().unwrap(),
    ];
    args.extend(MEMORY_BOUND);
    let (code, stderr, _) = regcache(&args, REFUSAL);
    assert_ne!(code, Some(0), "{stderr}");
    let last = stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.contains(path.to_str().unwrap()) && last.contains("policy.compile_memory"),
        "{stderr}"
    );
}

#[test]
fn sigterm_stops_the_host_promptly_while_a_bomb_compiles() {
    // Generous limits: only stopping can end this compile soon.
    let mut host = Host::start(&[
        "--admin-token",
        TOKEN,
        "--policy-compile-cpu-time",
        "60s",
        "--policy-compile-memory",
        "1GiB",
    ])
    .unwrap();
    let bomb = cpu_bomb();
    let addr = host.addr;
    // Answered with a refusal or cut off by the stop: either is fine.
    let put = std::thread::spawn(move || {
        let auth = format!("Bearer {TOKEN}");
        let _ = request(
            addr,
            "PUT",
            "/v1/policy",
            &[("Authorization", &auth)],
            &bomb,
        );
    });
    {
        assert!(
            eventually_blocking(Duration::from_secs(20), || !compile_children(host.pid())
                .is_empty()),
            "no compile child was seen"
        );
        let children = compile_children(host.pid());
        host.signal("TERM").unwrap();
        let stopping = Instant::now();
        let status = host.wait_exit(Duration::from_secs(5)).unwrap();
        eprintln!("stopped {:?} after SIGTERM: {status}", stopping.elapsed());
        assert!(status.success(), "{status}");
        for child in children {
            assert!(
                eventually_blocking(Duration::from_secs(2), || !Path::new(&format!(
                    "/proc/{child}"
                ))
                .exists()),
                "the compile child {child} outlived the host"
            );
        }
    }
    put.join().unwrap();
}

#[test]
fn a_component_over_the_size_limit_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // Past 1 MiB, whatever it holds: the size is checked before anything else.
    let mut large = b"\0asm\x0d\0\x01\0".to_vec();
    large.resize(3 << 19, 0);
    let path = write(dir.path(), "large.wasm", &large);
    let size = ["--policy-max-size", "1MiB"];

    let host = Host::start(&["--admin-token", TOKEN, size[0], size[1]]).unwrap();
    let answer = put_policy(&host, &large);
    assert_eq!(answer.status, 413, "{}", answer.text());
    assert!(
        answer.text().contains("policy.max_size"),
        "{}",
        answer.text()
    );

    let (code, stderr, _) = regcache(
        &["policy", "check", path.to_str().unwrap(), size[0], size[1]],
        REFUSAL,
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("policy.max_size"), "{stderr}");

    let (code, stderr, _) = regcache(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--policy-file",
            path.to_str().unwrap(),
            size[0],
            size[1],
        ],
        REFUSAL,
    );
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("policy.max_size"), "{stderr}");
}

/// What the child costs: a real policy compiled in process and through the child, each from a
/// fresh engine with no artifact cache (printed; run with `--nocapture`).
#[test]
fn the_child_compiles_real_policies_as_the_host_does() {
    let child = Compiler::Child {
        program: regcache_bin().clone(),
    };
    for name in ["strict", "chaos", "always-stale"] {
        let wasm = policy_wasm(name);
        let mut times = Vec::new();
        for compiler in [Compiler::InProcess, child.clone()] {
            let spec =
                PolicySpec::from_file(&policy_path(name), Vec::new(), MAX_POLICY_SIZE).unwrap();
            let options = EngineOptions {
                compiler: compiler.clone(),
                ..EngineOptions::default()
            };
            let started = Instant::now();
            let engine = PolicyEngine::new(options, spec)
                .unwrap_or_else(|e| panic!("{name} through {compiler:?}: {e}"));
            times.push(started.elapsed());
            assert_eq!(engine.stats().swaps_rejected, 0);
        }
        eprintln!(
            "{name} ({} KiB): loaded in process in {:?}, through the child in {:?}",
            wasm.len() >> 10,
            times[0],
            times[1]
        );
    }
}
