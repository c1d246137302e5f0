//! Percentiles of latency samples.

use std::time::Duration;

/// p50 / p90 / p99 / max of a set of samples (nearest-rank percentiles).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Summary {
    /// `None` when there are no samples.
    pub fn of(samples: &[Duration]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        Some(Summary {
            count: sorted.len(),
            p50: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            p99: percentile(&sorted, 99.0),
            max: sorted[sorted.len() - 1],
        })
    }
}

/// Nearest-rank percentile of sorted, non-empty samples: the smallest sample that at
/// least `p` percent of the samples are less than or equal to.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Milliseconds, for tables and CSV.
pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(values: impl IntoIterator<Item = u64>) -> Vec<Duration> {
        values.into_iter().map(Duration::from_millis).collect()
    }

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let samples = millis((1..=100).rev());
        let summary = Summary::of(&samples).unwrap();
        assert_eq!(summary.count, 100);
        assert_eq!(summary.p50, Duration::from_millis(50));
        assert_eq!(summary.p90, Duration::from_millis(90));
        assert_eq!(summary.p99, Duration::from_millis(99));
        assert_eq!(summary.max, Duration::from_millis(100));
    }

    #[test]
    fn a_single_sample_is_every_percentile_and_none_is_no_summary() {
        let summary = Summary::of(&millis([7])).unwrap();
        assert_eq!(summary.p50, Duration::from_millis(7));
        assert_eq!(summary.p99, Duration::from_millis(7));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn the_tail_of_a_small_set_is_its_maximum() {
        let summary = Summary::of(&millis([1, 2, 3, 4, 1000])).unwrap();
        assert_eq!(summary.p50, Duration::from_millis(3));
        assert_eq!(summary.p99, Duration::from_millis(1000));
    }
}
