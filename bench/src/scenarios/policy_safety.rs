//! Policy safety (issue 12): what callers of `regcache run` see when the active policy turns
//! slow in production, against the same load on the default policy, interleaved round by round.
//!
//! Each arm is a fresh `regcache run` on its embedded registry with a few services registered
//! over HTTP, closed-loop lookup load on keep-alive connections, and a `/healthz` prober on a
//! connection of its own (the question is whether the host's other work stalls, not whether
//! lookups slow down). Of three arms, one keeps the default policy, one gets the chaos policy
//! configured to behave part way through (what a swap costs by itself, and whether the rollback
//! rule strikes a policy that does nothing wrong), and one gets it configured as a time bomb
//! (`fault=slow`, `after-ms` a few seconds ahead): it passes validation, whose clock is fixed in
//! the past, then spends ~20 ms of CPU per decision once the date passes, until the host's
//! run-time deadline stops each call, answers fail-safe and the automatic rollback puts the
//! default policy back. Also measured once, on an idle host: a policy slow
//! from the start is refused by `PUT /v1/policy`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::body::Bytes;
use hyper::{Method, StatusCode};
use regcache_tests::policies::policy_wasm;
use serde_json::Value;

use crate::compare::{Rounds, rounds};
use crate::host::Host;
use crate::load::{self, Outcome, Target};
use crate::report::{Row, Section};

const SERVICES: usize = 10;
const CALLERS: usize = 32;
const PROBE_EVERY: Duration = Duration::from_millis(10);
const TOKEN: &str = "policy-safety-bench";

// The arms of each round.
const DEFAULT: usize = 0;
const BENIGN: usize = 1;
const SLOW: usize = 2;
const ARMS: usize = 3;
const LABELS: [&str; ARMS] = ["default policy", "benign swap", "time bomb"];

/// When things happen in a round, counted from its start.
#[derive(Debug, Clone, Copy)]
struct Schedule {
    round: Duration,
    /// When the slow arm sends the time bomb.
    put_at: Duration,
    /// From the `PUT` to the bomb's date: longer than a validation under load takes, so that
    /// the policy is active before it turns slow.
    fuse: Duration,
}

impl Schedule {
    fn new(quick: bool) -> Self {
        // The round outlasts the rollback, which comes within a few seconds of the bomb's date
        // (2 s measured: the rule's failures, the breaker's fail-safe answers among them).
        Schedule {
            round: Duration::from_secs(if quick { 12 } else { 24 }),
            put_at: Duration::from_secs(1),
            fuse: Duration::from_secs(2),
        }
    }

    /// The bomb's date (the default arm's has none, but is measured over the same offsets).
    fn date(&self) -> Duration {
        self.put_at + self.fuse
    }
}

/// The policy an arm sends part way through its round, if any: the chaos policy with this
/// configuration, given the bomb's date in ms since the Unix epoch.
fn swap_query(arm: usize, date_ms: u64) -> Option<String> {
    match arm {
        BENIGN => Some("fault=none".into()),
        SLOW => Some(format!("fault=slow&after-ms={date_ms}")),
        _ => None,
    }
}

/// What an arm's `PUT /v1/policy` and the host's policy state after the round said.
struct Swap {
    /// How long `PUT /v1/policy` took to answer (compile and validate under load).
    put: Duration,
    status: Option<StatusCode>,
    /// When the host rolled it back, from the round's start (from `rollback.at_ms`).
    rolled_back_at: Option<Duration>,
}

/// One arm of one round.
struct Arm {
    lookups: Outcome,
    health: Outcome,
    /// `/healthz` probes: when each was sent, from the round's start, and its latency.
    probes: Vec<(Duration, Duration)>,
    /// `GET /v1/policy` after the round.
    policy: Value,
    swap: Option<Swap>,
}

impl Arm {
    /// `/healthz` latencies of the probes sent within `[from, to)`, sorted.
    fn probes_within(&self, (from, to): (Duration, Duration)) -> Vec<Duration> {
        let mut within: Vec<Duration> = self
            .probes
            .iter()
            .filter(|(sent, _)| (from..to).contains(sent))
            .map(|&(_, latency)| latency)
            .collect();
        within.sort_unstable();
        within
    }

    fn counter(&self, name: &str) -> f64 {
        self.policy["counters"][name].as_f64().unwrap_or(f64::NAN)
    }
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `PUT /v1/policy` of `wasm` with `query`: how long it took, the status and the body.
async fn put_policy(
    host: &Host,
    wasm: &Bytes,
    query: &str,
) -> (Duration, Option<(StatusCode, Bytes)>) {
    let target = Target {
        method: Method::PUT,
        paths: vec![format!("/v1/policy?{query}")],
        body: wasm.clone(),
        ..Target::get(host.addr, "")
    };
    let auth = format!("Bearer {TOKEN}");
    let sent = Instant::now();
    let answer = load::send(&target, &[("authorization", &auth)]).await;
    (sent.elapsed(), answer)
}

/// A host on the embedded registry with `SERVICES` services registered and looked up once.
async fn host_with_services() -> anyhow::Result<(Host, Target)> {
    let host = Host::start(&["--admin-token", TOKEN]).await?;
    for s in 0..SERVICES {
        let registration = Target {
            method: Method::POST,
            paths: vec!["/v1/registrations".into()],
            body: Bytes::from(format!(
                r#"{{"name":"svc-{s}","version":"1","nodes":[{{"id":"svc-{s}-1","address":"127.0.0.1:{}"}}]}}"#,
                9000 + s
            )),
            ..Target::get(host.addr, "")
        };
        let outcome = load::drive(&registration, 1, load::Until::EachPathOnce).await;
        anyhow::ensure!(outcome.ok == 1, "registering svc-{s} failed");
    }
    let lookups = Target {
        paths: (0..SERVICES)
            .map(|s| format!("/v1/services/svc-{s}"))
            .collect(),
        ..Target::get(host.addr, "")
    };
    let warm = load::drive(&lookups, 1, load::Until::EachPathOnce).await;
    anyhow::ensure!(warm.failed == 0, "looking the services up failed");
    Ok((host, lookups))
}

/// One arm: load and probes for a round, and the arm's policy (if any) sent on schedule.
async fn arm(schedule: Schedule, which: usize, wasm: &Bytes) -> anyhow::Result<Arm> {
    let (host, lookups) = host_with_services().await?;
    let health = Target::get(host.addr, "/healthz");
    let started = Instant::now();
    let started_ms = unix_ms(SystemTime::now());
    let end = started + schedule.round;
    let load = tokio::spawn(async move { load::run(&lookups, CALLERS, schedule.round).await });
    let prober = tokio::spawn(async move { load::paced(&health, PROBE_EVERY, end).await });
    let date_ms = started_ms + schedule.date().as_millis() as u64;
    let swap = match swap_query(which, date_ms) {
        None => None,
        Some(query) => {
            tokio::time::sleep_until((started + schedule.put_at).into()).await;
            let (put, answer) = put_policy(&host, wasm, &query).await;
            Some(Swap {
                put,
                status: answer.map(|(status, _)| status),
                rolled_back_at: None,
            })
        }
    };
    let lookups = load.await?;
    let health = prober.await?;
    let policy: Value = serde_json::from_str(
        &load::body(&Target::get(host.addr, "/v1/policy"))
            .await
            .ok_or_else(|| anyhow::anyhow!("no GET /v1/policy"))?,
    )?;
    let swap = swap.map(|swap| Swap {
        rolled_back_at: policy["rollback"]["at_ms"]
            .as_u64()
            .map(|at| Duration::from_millis(at.saturating_sub(started_ms))),
        ..swap
    });
    let probes = health
        .timeline
        .iter()
        .map(|&(sent, latency)| (sent.saturating_duration_since(started), latency))
        .collect();
    Ok(Arm {
        lookups,
        health,
        probes,
        policy,
        swap,
    })
}

/// A round's slow window: from the bomb's date to its rollback (the round's end without one);
/// the other arms of the round are measured over the same offsets of their own rounds.
fn slow_window(schedule: Schedule, round: &[Arm; ARMS]) -> (Duration, Duration) {
    let rolled_back = round[SLOW].swap.as_ref().and_then(|s| s.rolled_back_at);
    (
        schedule.date(),
        rolled_back.unwrap_or(schedule.round).max(schedule.date()),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `/healthz`'s `q` quantile over a round's slow window, in arm `arm`, in ms.
fn window_ms(schedule: Schedule, r: &[Arm; ARMS], arm: usize, q: f64) -> f64 {
    ms(load::percentile(
        &r[arm].probes_within(slow_window(schedule, r)),
        q,
    ))
}

fn arm_rows(label: &str, arm: usize, rounds: &Rounds<Arm, ARMS>, schedule: Schedule) -> Vec<Row> {
    let window = |q: f64| rounds.per_round(|r| window_ms(schedule, r, arm, q));
    vec![
        Row::rounds(
            format!("{label}: lookups/s"),
            rounds.per_round(|r| r[arm].lookups.rate()),
            "/s",
        ),
        Row::new(
            format!("{label}: failed lookups, worst round"),
            rounds.per_round(|r| r[arm].lookups.failed as f64).max,
            "",
        )
        .at_most(0.0),
        Row::rounds(
            format!("{label}: lookup p99"),
            rounds.per_round(|r| ms(r[arm].lookups.p(0.99))),
            "ms",
        ),
        Row::rounds(
            format!("{label}: lookups answered fail-safe"),
            rounds.per_round(|r| r[arm].counter("fail_safe_lookups")),
            "",
        ),
        Row::rounds(
            format!("{label}: decisions past the deadline (counters.deadline_hits)"),
            rounds.per_round(|r| r[arm].counter("deadline_hits")),
            "",
        ),
        Row::rounds(
            format!("{label}: /healthz p50, whole round"),
            rounds.per_round(|r| ms(r[arm].health.p(0.5))),
            "ms",
        ),
        Row::rounds(
            format!("{label}: /healthz p99, whole round"),
            rounds.per_round(|r| ms(r[arm].health.p(0.99))),
            "ms",
        ),
        Row::new(
            format!("{label}: /healthz max, whole round (all rounds)"),
            rounds.per_round(|r| ms(r[arm].health.p(1.0))).max,
            "ms",
        ),
        Row::rounds(
            format!("{label}: /healthz p50, slow window"),
            window(0.5),
            "ms",
        ),
        Row::rounds(
            format!("{label}: /healthz p99, slow window"),
            window(0.99),
            "ms",
        ),
        Row::new(
            format!("{label}: /healthz max, slow window (all rounds)"),
            window(1.0).max,
            "ms",
        ),
        Row::new(
            format!("{label}: /healthz probes failed, worst round"),
            rounds.per_round(|r| r[arm].health.failed as f64).max,
            "",
        ),
    ]
}

/// An arm's swap: its `PUT` and whether (and when) the host rolled it back. The time bomb must
/// be rolled back in every round, the benign policy in none.
fn swap_rows(label: &str, arm: usize, rounds: &Rounds<Arm, ARMS>, schedule: Schedule) -> Vec<Row> {
    let swap = |r: &[Arm; ARMS]| -> (Duration, Option<StatusCode>, Option<Duration>) {
        let swap = r[arm].swap.as_ref().expect("the arm sends a policy");
        (swap.put, swap.status, swap.rolled_back_at)
    };
    let accepted = rounds.per_round(|r| f64::from(swap(r).1 == Some(StatusCode::OK)));
    let rolled_back = rounds.per_round(|r| f64::from(swap(r).2.is_some()));
    let mut rows = vec![
        Row::new(
            format!("{label}: accepted by PUT /v1/policy in every round (1: yes)"),
            accepted.min,
            "",
        )
        .at_least(1.0),
        Row::rounds(
            format!("{label}: PUT /v1/policy answered in (validation under load)"),
            rounds.per_round(|r| ms(swap(r).0)),
            "ms",
        ),
    ];
    if arm == SLOW {
        rows.push(
            Row::new(
                format!("{label}: rolled back in every round (1: yes)"),
                rolled_back.min,
                "",
            )
            .at_least(1.0),
        );
        if rolled_back.min == 1.0 {
            rows.push(Row::rounds(
                format!("{label}: from its date to the rollback (rollback.at_ms)"),
                rounds.per_round(|r| ms(swap(r).2.unwrap_or_default()) - ms(schedule.date())),
                "ms",
            ));
        }
    } else {
        rows.push(
            Row::new(
                format!("{label}: rolled back in any round (1: yes)"),
                rolled_back.max,
                "",
            )
            .at_most(0.0),
        );
    }
    rows.extend([
        Row::rounds(
            format!("{label}: counters.rollbacks after the round"),
            rounds.per_round(|r| r[arm].counter("rollbacks")),
            "",
        ),
        Row::rounds(
            format!("{label}: decisions skipped by the open breaker"),
            rounds.per_round(|r| r[arm].counter("breaker_skips")),
            "",
        ),
    ]);
    rows
}

/// The claims: `/healthz` under the time bomb against the default policy, same run.
fn ratio_rows(rounds: &Rounds<Arm, ARMS>, schedule: Schedule) -> Vec<Row> {
    vec![
        Row::rounds(
            "/healthz p99, whole round: time bomb / default policy",
            rounds.per_round(|r| {
                r[SLOW].health.p(0.99).as_secs_f64() / r[DEFAULT].health.p(0.99).as_secs_f64()
            }),
            "x",
        )
        .at_most(1.5),
        Row::rounds(
            "/healthz p99, slow window: time bomb / default policy",
            rounds.per_round(|r| {
                window_ms(schedule, r, SLOW, 0.99) / window_ms(schedule, r, DEFAULT, 0.99)
            }),
            "x",
        )
        .at_most(2.0),
        Row::rounds(
            "/healthz p99, slow window: time bomb",
            rounds.per_round(|r| window_ms(schedule, r, SLOW, 0.99)),
            "ms",
        )
        .at_most(5.0),
    ]
}

/// A policy slow from its first call, sent to an idle host: refused at validation, and how long
/// that took next to the validation of the same policy configured to behave (the same bytes, so
/// compiled once, by the first `PUT`).
async fn slow_from_the_start(wasm: &Bytes) -> anyhow::Result<(Vec<Row>, String)> {
    let (host, _) = host_with_services().await?;
    let (slow, refused) = put_policy(&host, wasm, "fault=slow").await;
    let (fast, accepted) = put_policy(&host, wasm, "fault=none").await;
    let status = |answer: &Option<(StatusCode, Bytes)>| answer.as_ref().map(|(s, _)| s.as_u16());
    let reason = refused.as_ref().map_or(String::new(), |(_, body)| {
        serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or_default()
    });
    let mut refused_row = Row::new(
        "policy slow from the start: PUT /v1/policy status",
        f64::from(status(&refused).unwrap_or(0)),
        "",
    );
    refused_row.target = Some("422".into());
    refused_row.met = Some(status(&refused) == Some(422));
    Ok((
        vec![
            refused_row,
            Row::new(
                "policy slow from the start: refused in (idle host)",
                ms(slow),
                "ms",
            ),
            Row::new(
                format!(
                    "same policy configured to behave, compiled form cached by the refusal: \
                     accepted in (idle host, status {})",
                    status(&accepted).unwrap_or(0)
                ),
                ms(fast),
                "ms",
            ),
        ],
        reason,
    ))
}

pub fn run(quick: bool) -> anyhow::Result<Section> {
    let count = if quick { 2 } else { 4 };
    let schedule = Schedule::new(quick);
    let wasm = Bytes::from(policy_wasm("chaos"));
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let measured: Rounds<anyhow::Result<Arm>, ARMS> =
            rounds(count, async |which| arm(schedule, which, &wasm).await).await;
        let measured = measured.transpose()?;
        let (once, reason) = slow_from_the_start(&wasm).await?;
        let mut rows = ratio_rows(&measured, schedule);
        for (arm, label) in LABELS.into_iter().enumerate() {
            rows.extend(arm_rows(label, arm, &measured, schedule));
            if arm != DEFAULT {
                rows.extend(swap_rows(label, arm, &measured, schedule));
            }
        }
        rows.extend(once);
        Ok(Section {
            title: format!(
                "Policy safety: a policy that turns slow in production, {CALLERS} connections \
                 looking up {SERVICES} services, /healthz probed every {} ms",
                PROBE_EVERY.as_millis()
            ),
            measured: format!(
                "over HTTP/1.1 against `regcache run` (embedded registry, a fresh host per arm) \
                 with the bench's closed-loop client (load.rs, {CALLERS} keep-alive \
                 connections) and a paced `/healthz` prober on its own connection; per round \
                 three arms of {:.0} s each, in rotated order: the default policy throughout; the \
                 chaos policy sent by `PUT /v1/policy` at {:.0} s configured to behave \
                 (`fault=none`: a benign swap); the same sent at {:.0} s as a time bomb due {:.0} \
                 s later (`fault=slow`, `after-ms`); {count} rounds",
                schedule.round.as_secs_f64(),
                schedule.put_at.as_secs_f64(),
                schedule.put_at.as_secs_f64(),
                schedule.fuse.as_secs_f64(),
            ),
            rows,
            notes: vec![
                "The slow window runs from the bomb's date to its rollback (`rollback.at_ms` of \
                 GET /v1/policy); the other arms' figures for it are over the same offsets of \
                 their own rounds. The benign swap shows what a swap costs by itself, and \
                 whether the rollback rule strikes a policy that does nothing wrong."
                    .into(),
                format!("Why the policy slow from the start was refused: {reason}"),
            ],
        })
    })
}
