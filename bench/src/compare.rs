//! A/B rounds and ratio statistics: the one way the benchmarks compare two (or more) things.
//!
//! The machines here are shared and noisy, and their load drifts over seconds. Measuring A for a
//! while and then B for a while lets that drift land in the ratio (three runs of "engine / bare
//! component call" once gave 0.58x to 1.17x). So every comparison is measured in rounds: each
//! round measures every arm once, back to back, in an order rotated from round to round (with
//! two arms, A B then B A), so that no arm always runs first, on a warmer or quieter machine. A
//! claim is the median of the per-round ratios, reported with their spread.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use serde::Serialize;

/// What each round measured, one value per arm, in arm order (not measuring order).
#[derive(Debug)]
pub struct Rounds<T, const N: usize> {
    rounds: Vec<[T; N]>,
}

/// Measures `count` rounds of the `N` arms: `measure(arm)` measures arm `arm` once.
pub async fn rounds<T, const N: usize>(
    count: usize,
    mut measure: impl AsyncFnMut(usize) -> T,
) -> Rounds<T, N> {
    let mut rounds = Vec::with_capacity(count);
    for round in 0..count {
        let mut values: [Option<T>; N] = std::array::from_fn(|_| None);
        for arm in (0..N).map(|k| (k + round) % N) {
            values[arm] = Some(measure(arm).await);
        }
        rounds.push(values.map(|v| v.expect("every arm measured")));
    }
    Rounds { rounds }
}

/// [`rounds`] for in-process measurements that never wait.
pub fn rounds_now<T, const N: usize>(
    count: usize,
    mut measure: impl FnMut(usize) -> T,
) -> Rounds<T, N> {
    now_or_never(rounds(count, async |arm| measure(arm)))
}

impl<T, const N: usize> Rounds<T, N> {
    /// `value` computed for each round (a ratio of its arms, or one arm's figure), summarised.
    pub fn per_round(&self, value: impl Fn(&[T; N]) -> f64) -> Spread {
        Spread::of(self.rounds.iter().map(value).collect())
    }
}

impl<T, E, const N: usize> Rounds<Result<T, E>, N> {
    /// The rounds if every arm of every round succeeded, else the first error.
    pub fn transpose(self) -> Result<Rounds<T, N>, E> {
        let mut rounds = Vec::with_capacity(self.rounds.len());
        for round in self.rounds {
            let mut values = Vec::with_capacity(N);
            for value in round {
                values.push(value?);
            }
            rounds.push(values.try_into().ok().expect("N values"));
        }
        Ok(Rounds { rounds })
    }
}

/// The distribution of one figure over the rounds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// The interquartile range: the middle half of the rounds lies between these.
    pub q1: f64,
    pub q3: f64,
    pub rounds: usize,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        assert!(!values.is_empty(), "a comparison needs at least one round");
        values.sort_by(f64::total_cmp);
        let at = |q: f64| {
            // Linear interpolation between the closest ranks.
            let rank = q * (values.len() - 1) as f64;
            let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
            values[low] + (values[high] - values[low]) * (rank - low as f64)
        };
        Spread {
            median: at(0.5),
            min: values[0],
            max: values[values.len() - 1],
            q1: at(0.25),
            q3: at(0.75),
            rounds: values.len(),
        }
    }
}

/// Polls a future that must complete without waiting, as a cache hit or an in-process
/// measurement does.
pub fn now_or_never<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a future that must not wait waited"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_alternate_and_values_stay_in_arm_order() {
        let mut order = Vec::new();
        let rounds: Rounds<usize, 2> = rounds_now(4, |arm| {
            order.push(arm);
            arm * 10
        });
        assert_eq!(order, [0, 1, 1, 0, 0, 1, 1, 0]);
        let spread = rounds.per_round(|[a, b]| (*b - *a) as f64);
        assert_eq!((spread.min, spread.median, spread.max), (10.0, 10.0, 10.0));
    }

    #[test]
    fn spread_interpolates_quartiles() {
        let s = Spread::of(vec![4.0, 1.0, 3.0, 2.0, 5.0]);
        assert_eq!(
            (s.min, s.q1, s.median, s.q3, s.max),
            (1.0, 2.0, 3.0, 4.0, 5.0)
        );
        let s = Spread::of(vec![1.0, 2.0]);
        assert_eq!(s.median, 1.5);
    }
}
