//! Timing of in-process operations: nanoseconds per call, the median of a few samples. One such
//! measurement is one arm of one round (`compare.rs`); the rounds carry the claims.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// How hard to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Rounds of every comparison (`compare::rounds`).
    pub rounds: usize,
    /// Samples per measurement; the median is reported.
    pub samples: usize,
    /// Minimum time of one sample.
    pub sample_time: Duration,
}

impl Effort {
    pub fn new(quick: bool) -> Self {
        if quick {
            Effort {
                rounds: 3,
                samples: 1,
                sample_time: Duration::from_millis(10),
            }
        } else {
            Effort {
                rounds: 12,
                samples: 3,
                sample_time: Duration::from_millis(100),
            }
        }
    }
}

/// Median nanoseconds per call of `op`.
pub fn ns_per_op(effort: Effort, mut op: impl FnMut()) -> f64 {
    // Calibrate: how many calls fill one sample.
    let mut batch = 1u64;
    loop {
        let started = Instant::now();
        for _ in 0..batch {
            op();
        }
        if started.elapsed() >= effort.sample_time / 4 || batch >= 1 << 30 {
            break;
        }
        batch *= 2;
    }
    let batch = batch * 4;
    let mut samples: Vec<f64> = (0..effort.samples)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..batch {
                op();
            }
            started.elapsed().as_nanos() as f64 / batch as f64
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    black_box(&mut op);
    samples[samples.len() / 2]
}
