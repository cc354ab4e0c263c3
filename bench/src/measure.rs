//! Timing of in-process operations: nanoseconds per call, over batches sized once per operation
//! so that one operation's samples can be taken one at a time, each next to the other arms'
//! samples of the same round (`compare.rs`).

use std::hint::black_box;
use std::time::{Duration, Instant};

/// How hard to measure.
#[derive(Debug, Clone, Copy)]
pub struct Effort {
    /// Rounds of every comparison (`compare::rounds`).
    pub rounds: usize,
    /// Samples per arm per round; their median is the arm's figure for the round.
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
                sample_time: Duration::from_millis(5),
            }
        } else {
            // Many short rounds: the arms of a round are then measured within a fraction of a
            // second of each other, closer than the machine's load drifts; three samples per
            // arm so that one preempted sample does not decide the round.
            Effort {
                rounds: 20,
                samples: 3,
                sample_time: Duration::from_millis(30),
            }
        }
    }
}

/// An operation and the number of calls that fill one sample.
pub struct Timed<F> {
    op: F,
    batch: u64,
    samples: usize,
}

impl<F: FnMut()> Timed<F> {
    /// Sizes the batch of `op` for `effort`.
    pub fn new(effort: Effort, mut op: F) -> Self {
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
        Timed {
            op,
            batch: batch * 4,
            samples: effort.samples,
        }
    }

    /// Nanoseconds per call: the median of the effort's samples, taken now.
    pub fn ns_per_op(&mut self) -> f64 {
        let mut samples: Vec<f64> = (0..self.samples)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..self.batch {
                    (self.op)();
                }
                started.elapsed().as_nanos() as f64 / self.batch as f64
            })
            .collect();
        samples.sort_by(f64::total_cmp);
        black_box(&mut self.op);
        samples[samples.len() / 2]
    }
}
