//! Summaries of repeated measurements: the median, a 95% confidence
//! interval of the median, and the whole range. A goal is judged by the
//! interval (its bound on the wrong side must clear the goal), never by the
//! median alone.
//!
//! The interval is distribution-free: for n samples sorted, the median lies
//! between the j-th and the (n+1-j)-th with probability
//! 1 − 2·P(Binomial(n, ½) < j); j is the largest with that probability at
//! least 95%.

/// A measured quantity over its rounds.
#[derive(Clone, Debug)]
pub struct Summary {
    pub median: f64,
    /// 95% confidence interval of the median.
    pub lo: f64,
    pub hi: f64,
    /// The whole range.
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    /// Summarises `samples` (at least one; NaN summary when empty).
    pub fn of(samples: &[f64]) -> Summary {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n == 0 {
            return Summary {
                median: f64::NAN,
                lo: f64::NAN,
                hi: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
                n,
            };
        }
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let j = ci_rank(n);
        Summary {
            median,
            lo: v[j - 1],
            hi: v[n - j],
            min: v[0],
            max: v[n - 1],
            n,
        }
    }

    /// "median (lo–hi)" with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        format!(
            "{:.*} ({:.*}–{:.*})",
            digits, self.median, digits, self.lo, digits, self.hi
        )
    }

    /// "min–max" with `digits` decimals.
    pub fn range(&self, digits: usize) -> String {
        format!("{:.*}–{:.*}", digits, self.min, digits, self.max)
    }

    /// Whether the whole interval is at most `goal` (lower is better).
    pub fn at_most(&self, goal: f64) -> bool {
        self.hi <= goal
    }

    /// Whether the whole interval is at least `goal` (higher is better).
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "the end-to-end goals are judged with it next")
    )]
    pub fn at_least(&self, goal: f64) -> bool {
        self.lo >= goal
    }
}

/// The 1-based rank j of the lower bound of the 95% interval of the
/// median of `n` samples (1 when `n` is too small for 95%: the range).
pub fn ci_rank(n: usize) -> usize {
    // P(Binomial(n, 1/2) = i), summed from 0 up.
    let mut below = 0.0f64;
    let mut best = 1;
    let total = 2f64.powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut choose = 1.0f64; // C(n, i)
    for i in 0..n {
        // Coverage with j = i + 1: 1 − 2·P(X ≤ i).
        below += choose / total;
        if 1.0 - 2.0 * below >= 0.95 {
            best = i + 2;
        } else {
            break;
        }
        choose = choose * (n - i) as f64 / (i + 1) as f64;
    }
    best.min(n.div_ceil(2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_of_the_median_interval() {
        // Known values of the distribution-free 95% interval (j, n+1-j).
        for (n, j) in [
            (5, 1),
            (6, 1),
            (8, 1),
            (9, 2),
            (12, 3),
            (20, 6),
            (24, 7),
            (40, 14),
        ] {
            assert_eq!(ci_rank(n), j, "n = {n}");
        }
    }

    #[test]
    fn summary_bounds() {
        let s = Summary::of(&(1..=24).map(f64::from).collect::<Vec<_>>());
        assert_eq!((s.lo, s.hi), (7.0, 18.0));
        assert_eq!(s.median, 12.5);
        assert!(s.at_most(18.0) && !s.at_most(17.9));
        assert!(s.at_least(7.0) && !s.at_least(7.1));
    }
}
