//! `regcache-bench`: runs the benchmark scenarios and writes `results/latest.{md,json}`.
//!
//! Every claim is a ratio against a baseline measured in the same run, interleaved with it round
//! by round (`compare.rs`). `--quick` runs each
//! scenario briefly, for CI's smoke check; its numbers are not claims.

mod compare;
mod etcd_arms;
mod gomicro_clients;
mod host;
mod load;
mod measure;
mod range_load;
mod report;
mod scenarios;

use std::path::PathBuf;

use clap::Parser;

/// Benchmarks backing regcache's claims.
#[derive(Debug, Parser)]
struct Args {
    /// Measure briefly (smoke test; numbers are not claims).
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (policy_cost, policy_languages, hot_path, http_vs_etcd, outage,
    /// penetration, auth_load, scale, hot_swap, etcd_api, policy_safety); repeatable.
    #[arg(long, action = clap::ArgAction::Append)]
    only: Vec<String>,
    /// Where to write latest.md and latest.json.
    #[arg(long, default_value = "results")]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let effort = measure::Effort::new(args.quick);
    let quick = args.quick;
    type Scenario = Box<dyn Fn() -> anyhow::Result<report::Section>>;
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "policy_cost",
            Box::new(move || scenarios::policy_cost::run(effort)),
        ),
        (
            "policy_languages",
            Box::new(move || scenarios::policy_languages::run(effort, quick)),
        ),
        (
            "hot_path",
            Box::new(move || scenarios::hot_path::run(effort, quick)),
        ),
        (
            "hot_swap",
            Box::new(move || scenarios::hot_swap::run(quick)),
        ),
        (
            "http_vs_etcd",
            Box::new(move || scenarios::http_vs_etcd::run(quick)),
        ),
        ("outage", Box::new(move || scenarios::outage::run(quick))),
        (
            "penetration",
            Box::new(move || scenarios::penetration::run(quick)),
        ),
        (
            "auth_load",
            Box::new(move || scenarios::auth_load::run(quick)),
        ),
        ("scale", Box::new(move || scenarios::scale::run(quick))),
        (
            "etcd_api",
            Box::new(move || scenarios::etcd_api::run(quick)),
        ),
        (
            "policy_safety",
            Box::new(move || scenarios::policy_safety::run(quick)),
        ),
    ];
    let mut sections = Vec::new();
    for (name, scenario) in &scenarios {
        if !args.only.is_empty() && !args.only.iter().any(|o| o == name) {
            continue;
        }
        eprintln!("regcache-bench: running {name}");
        sections.push(scenario()?);
    }
    let report = report::Report {
        date: std::process::Command::new("date")
            .arg("-u")
            .arg("+%Y-%m-%d %H:%M UTC")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default(),
        machine: machine(),
        quick: args.quick,
        sections,
    };
    report.write(&args.out)?;
    println!("{}", report.markdown());
    println!("written to {}", args.out.join("latest.md").display());
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
