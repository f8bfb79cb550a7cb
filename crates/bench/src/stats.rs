//! Summary statistics of repeated samples: median, min, max, and ratios of medians.
//!
//! Written by hand: three order statistics do not justify a statistics crate.

use serde::Serialize;

/// Median, minimum and maximum of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Summary {
    /// Summarizes `values`, ignoring NaN; `None` when nothing is left.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| !v.is_nan()).collect();
        if sorted.is_empty() {
            return None;
        }
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let middle = n / 2;
        let median = if n % 2 == 1 {
            sorted[middle]
        } else {
            (sorted[middle - 1] + sorted[middle]) / 2.0
        };
        Some(Summary {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        })
    }
}

/// `numerator.median / denominator.median`, or `None` when the denominator is zero (or the
/// result is not finite).
pub fn ratio_of_medians(numerator: &Summary, denominator: &Summary) -> Option<f64> {
    let ratio = numerator.median / denominator.median;
    (denominator.median != 0.0 && ratio.is_finite()).then_some(ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_count_median_is_the_middle_value() {
        let summary = Summary::of(&[5.0, 1.0, 3.0]).expect("three values");

        assert_eq!(
            summary,
            Summary {
                median: 3.0,
                min: 1.0,
                max: 5.0,
                n: 3
            }
        );
    }

    #[test]
    fn even_count_median_is_the_mean_of_the_middle_pair() {
        let summary = Summary::of(&[4.0, 1.0, 10.0, 2.0]).expect("four values");

        assert_eq!(summary.median, 3.0);
        assert_eq!((summary.min, summary.max, summary.n), (1.0, 10.0, 4));
    }

    #[test]
    fn nan_is_ignored_and_nothing_left_gives_none() {
        assert_eq!(Summary::of(&[f64::NAN, 7.0]).map(|s| s.median), Some(7.0));
        assert_eq!(Summary::of(&[f64::NAN]), None);
        assert_eq!(Summary::of(&[]), None);
    }

    #[test]
    fn ratio_divides_medians_and_refuses_a_zero_denominator() {
        let fast = Summary::of(&[200.0, 300.0, 100.0]).expect("values");
        let slow = Summary::of(&[100.0, 50.0, 150.0]).expect("values");
        let zero = Summary::of(&[0.0]).expect("values");

        assert_eq!(ratio_of_medians(&fast, &slow), Some(2.0));
        assert_eq!(ratio_of_medians(&slow, &fast), Some(0.5));
        assert_eq!(ratio_of_medians(&fast, &zero), None);
    }
}
