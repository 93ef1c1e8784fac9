//! Optuna's `MedianPruner` (a `PercentilePruner` at 50): after `n_startup_trials` complete
//! trials, and from step `n_warmup_steps` on, a trial is pruned when the best value it has
//! reported so far is worse than the median of the complete trials' values at the same step
//! (NaN values ignored; no complete trial with a value at that step: no pruning). A trial whose
//! every value is NaN is pruned.

/// The pruner's settings (Optuna's defaults: 5 startup trials, no warm-up).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MedianPruner {
    pub n_startup_trials: usize,
    pub n_warmup_steps: u64,
}

impl Default for MedianPruner {
    fn default() -> Self {
        MedianPruner { n_startup_trials: 5, n_warmup_steps: 0 }
    }
}

/// NumPy's `nanpercentile(values, q)` with linear interpolation; NaN when no value is a number.
pub fn nanpercentile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = q / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

impl MedianPruner {
    /// Whether the trial that reported `values` (`(step, value)`, the last is the newest) stops,
    /// given the complete trials' reported values.
    pub fn should_prune(&self, values: &[(u64, f64)], completed: &[Vec<(u64, f64)>], maximize: bool) -> bool {
        let Some(&(step, _)) = values.last() else { return false };
        if completed.is_empty() || completed.len() < self.n_startup_trials || step < self.n_warmup_steps {
            return false;
        }
        let finite = values.iter().map(|v| v.1).filter(|v| !v.is_nan());
        let best = if maximize { finite.fold(f64::NAN, f64::max) } else { finite.fold(f64::NAN, f64::min) };
        if best.is_nan() {
            return true;
        }
        let at_step: Vec<f64> = completed.iter().filter_map(|t| t.iter().find(|v| v.0 == step).map(|v| v.1)).collect();
        let median = nanpercentile(&at_step, 50.0);
        if median.is_nan() {
            return false;
        }
        if maximize {
            best < median
        } else {
            best > median
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_as_numpy() {
        assert_eq!(nanpercentile(&[3.0, 1.0, 2.0], 50.0), 2.0);
        assert_eq!(nanpercentile(&[4.0, 1.0, 2.0, 3.0], 50.0), 2.5);
        assert_eq!(nanpercentile(&[1.0, f64::NAN, 3.0], 50.0), 2.0);
        assert!(nanpercentile(&[f64::NAN], 50.0).is_nan());
        assert_eq!(nanpercentile(&[0.0, 10.0], 25.0), 2.5);
    }

    #[test]
    fn prunes_only_what_is_worse_than_the_median_at_that_step() {
        let p = MedianPruner { n_startup_trials: 2, n_warmup_steps: 0 };
        let done = vec![vec![(10, 2.0), (20, 1.0)], vec![(10, 3.0), (20, 1.5)]];
        // minimise: median at step 10 is 2.5
        assert!(p.should_prune(&[(10, 2.6)], &done, false));
        assert!(!p.should_prune(&[(10, 2.4)], &done, false));
        // at step 20 the median is 1.25; the best value so far counts, not the latest
        assert!(!p.should_prune(&[(10, 2.0), (20, 1.2)], &done, false));
        assert!(p.should_prune(&[(10, 2.6), (20, 1.3)], &done, false));
        assert!(!p.should_prune(&[(10, 1.0), (20, 1.3)], &done, false));
        // maximise
        assert!(p.should_prune(&[(10, 2.4)], &done, true));
        // too few complete trials, warm-up, no value at that step
        assert!(!p.should_prune(&[(10, 9.0)], &done[..1], false));
        assert!(!MedianPruner { n_startup_trials: 1, n_warmup_steps: 11 }.should_prune(&[(10, 9.0)], &done, false));
        assert!(!p.should_prune(&[(15, 9.0)], &done, false));
        // all NaN
        assert!(p.should_prune(&[(10, f64::NAN)], &done, false));
    }
}
