//! Timing primitives. Machines here are shared and noisy, so every claim is a ratio between
//! two measurements taken in the same run, each the median of several samples.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// How hard to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Samples per measurement; the median is reported.
    pub samples: usize,
    /// Minimum time of one sample.
    pub sample_time: Duration,
}

impl Effort {
    pub fn new(quick: bool) -> Self {
        if quick {
            Effort {
                samples: 3,
                sample_time: Duration::from_millis(20),
            }
        } else {
            Effort {
                samples: 11,
                sample_time: Duration::from_millis(200),
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
