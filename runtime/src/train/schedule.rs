//! Learning-rate schedules under transformers' `lr_scheduler_type` names, with the formulas of
//! `transformers.optimization` (the multiplier `LambdaLR` applies to the base rate), and
//! `lr_scheduler_kwargs` validated by name.

use serde_json::{Map, Value};

pub use crate::args::scheduler::{SchedulerType, SCHEDULER_NAMES};
use crate::error::{Error, Result};

/// Warm-up shape and decay shape of `warmup_stable_decay`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Curve {
    Linear,
    Cosine,
    OneMinusSqrt,
}

impl Curve {
    fn parse(key: &str, v: &Value) -> Result<Self> {
        match v.as_str() {
            Some("linear") => Ok(Curve::Linear),
            Some("cosine") => Ok(Curve::Cosine),
            Some("1-sqrt") => Ok(Curve::OneMinusSqrt),
            _ => Err(Error::Invalid(format!("lr_scheduler_kwargs.{key} = {v}: expected \"linear\", \"cosine\" or \"1-sqrt\""))),
        }
    }
}

/// A schedule: the base learning rate times a multiplier of the optimizer step.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub kind: SchedulerType,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    num_cycles: f64,
    lr_end: f64,
    power: f64,
    timescale: u64,
    min_lr_rate: f64,
    stable_steps: u64,
    decay_steps: u64,
    warmup_curve: Curve,
    decay_curve: Curve,
}

/// HF's `get_warmup_steps`: a value of at least 1 is a step count; below 1 it is a ratio of the
/// total, rounded up (transformers 5 folded `warmup_ratio` into `warmup_steps` this way).
pub fn warmup_steps(warmup: f64, total_steps: u64) -> u64 {
    if warmup >= 1.0 {
        warmup as u64
    } else {
        (warmup * total_steps as f64).ceil() as u64
    }
}

fn number(kwargs: &Map<String, Value>, key: &str) -> Result<Option<f64>> {
    match kwargs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).map(Some).ok_or_else(|| Error::Invalid(format!("lr_scheduler_kwargs.{key} = {v}: expected a number"))),
    }
}

fn steps(kwargs: &Map<String, Value>, key: &str) -> Result<Option<u64>> {
    match kwargs.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| Error::Invalid(format!("lr_scheduler_kwargs.{key} = {v}: expected a whole number of steps"))),
    }
}

impl Schedule {
    /// `get_scheduler(name, optimizer(lr = base_lr), num_warmup_steps, num_training_steps,
    /// scheduler_specific_kwargs = kwargs)`, with the same errors for missing or conflicting
    /// arguments and an error for any keyword the schedule does not take.
    pub fn new(kind: SchedulerType, base_lr: f64, warmup_steps: u64, total_steps: u64, kwargs: &Map<String, Value>) -> Result<Self> {
        use SchedulerType::*;
        let allowed: &[&str] = match kind {
            Linear | Constant | ConstantWithWarmup => &[],
            Cosine | CosineWithRestarts => &["num_cycles"],
            Polynomial => &["lr_end", "power"],
            InverseSqrt => &["timescale"],
            CosineWithMinLr => &["num_cycles", "min_lr", "min_lr_rate"],
            WarmupStableDecay => &["num_decay_steps", "num_stable_steps", "warmup_type", "decay_type", "min_lr_ratio", "num_cycles"],
        };
        if let Some(k) = kwargs.keys().find(|k| !allowed.contains(&k.as_str())) {
            let takes = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
            return Err(Error::Invalid(format!("lr_scheduler_kwargs.{k} is not an argument of the `{kind:?}` schedule (it takes: {takes})")));
        }
        let mut s = Schedule {
            kind,
            base_lr,
            warmup_steps,
            total_steps,
            num_cycles: number(kwargs, "num_cycles")?.unwrap_or(if kind == CosineWithRestarts { 1.0 } else { 0.5 }),
            lr_end: number(kwargs, "lr_end")?.unwrap_or(1e-7),
            power: number(kwargs, "power")?.unwrap_or(1.0),
            timescale: steps(kwargs, "timescale")?.unwrap_or(if warmup_steps > 0 { warmup_steps } else { 10_000 }),
            min_lr_rate: 0.0,
            stable_steps: 0,
            decay_steps: 0,
            warmup_curve: Curve::Linear,
            decay_curve: Curve::Cosine,
        };
        match kind {
            Polynomial if base_lr <= s.lr_end => {
                return Err(Error::Invalid(format!("lr_end ({}) must be smaller than the initial learning rate ({base_lr})", s.lr_end)));
            }
            Polynomial if total_steps <= warmup_steps => {
                return Err(Error::Invalid(format!("polynomial: the {total_steps} training steps leave no decay steps after {warmup_steps} warmup steps")));
            }
            InverseSqrt if s.timescale == 0 => return Err(Error::Invalid("lr_scheduler_kwargs.timescale must be at least 1".into())),
            CosineWithMinLr => {
                s.min_lr_rate = match (number(kwargs, "min_lr")?, number(kwargs, "min_lr_rate")?) {
                    (Some(_), Some(_)) => return Err(Error::Invalid("cosine_with_min_lr: set only one of lr_scheduler_kwargs.min_lr or min_lr_rate".into())),
                    (Some(min_lr), None) => min_lr / base_lr,
                    (None, Some(rate)) => rate,
                    (None, None) => return Err(Error::Invalid("cosine_with_min_lr needs lr_scheduler_kwargs.min_lr or min_lr_rate".into())),
                };
            }
            WarmupStableDecay => {
                s.decay_steps =
                    steps(kwargs, "num_decay_steps")?.ok_or_else(|| Error::Invalid("warmup_stable_decay needs lr_scheduler_kwargs.num_decay_steps".into()))?;
                s.stable_steps = match steps(kwargs, "num_stable_steps")? {
                    Some(n) => n,
                    None => total_steps.checked_sub(warmup_steps + s.decay_steps).ok_or_else(|| {
                        Error::Invalid(format!(
                            "warmup_stable_decay: warmup ({warmup_steps}) + decay ({}) steps exceed the {total_steps} training steps",
                            s.decay_steps
                        ))
                    })?,
                };
                s.min_lr_rate = number(kwargs, "min_lr_ratio")?.unwrap_or(0.0);
                if let Some(v) = kwargs.get("warmup_type") {
                    s.warmup_curve = Curve::parse("warmup_type", v)?;
                }
                if let Some(v) = kwargs.get("decay_type") {
                    s.decay_curve = Curve::parse("decay_type", v)?;
                }
            }
            _ => {}
        }
        Ok(s)
    }

    /// The multiplier for optimizer step `step` (0-based), as `LambdaLR`'s `lr_lambda(step)`.
    pub fn factor(&self, step: u64) -> f64 {
        use std::f64::consts::PI;
        use SchedulerType::*;
        let (s, w, t) = (step as f64, self.warmup_steps as f64, self.total_steps as f64);
        let warming = step < self.warmup_steps && self.kind != Constant && self.kind != WarmupStableDecay;
        if warming {
            return s / w.max(1.0);
        }
        let progress = (s - w) / (t - w).max(1.0);
        match self.kind {
            Constant => 1.0,
            ConstantWithWarmup => 1.0,
            Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Cosine => (0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos())).max(0.0),
            CosineWithMinLr => {
                let f = 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * progress).cos());
                (f * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0)
            }
            CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (PI * ((self.num_cycles * progress) % 1.0)).cos())).max(0.0)
                }
            }
            Polynomial => {
                if step > self.total_steps {
                    self.lr_end / self.base_lr
                } else {
                    let pct_remaining = 1.0 - (s - w) / (t - w);
                    ((self.base_lr - self.lr_end) * pct_remaining.powf(self.power) + self.lr_end) / self.base_lr
                }
            }
            InverseSqrt => {
                let ts = self.timescale as f64;
                1.0 / ((s + ts - w) / ts).sqrt()
            }
            WarmupStableDecay => self.wsd(step),
        }
    }

    fn wsd(&self, step: u64) -> f64 {
        use std::f64::consts::PI;
        let shape = |f: f64| (f * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0);
        let (w, st, d) = (self.warmup_steps, self.stable_steps, self.decay_steps);
        if step < w {
            let p = step as f64 / (w.max(1)) as f64;
            return shape(match self.warmup_curve {
                Curve::Linear => p,
                Curve::Cosine => 0.5 * (1.0 - (PI * p).cos()),
                Curve::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
            });
        }
        if step < w + st {
            return 1.0;
        }
        if step < w + st + d {
            let p = (step - w - st) as f64 / (d.max(1)) as f64;
            return shape(match self.decay_curve {
                Curve::Linear => 1.0 - p,
                Curve::Cosine => 0.5 * (1.0 + (PI * self.num_cycles * 2.0 * p).cos()),
                Curve::OneMinusSqrt => 1.0 - p.sqrt(),
            });
        }
        self.min_lr_rate
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        self.base_lr * self.factor(step)
    }
}
