//! The checks of a run's arguments, as `TrainingArguments.__post_init__` makes them (and the
//! runtime's own range checks), with the 4.x names folded into the 5.x ones.

use serde_json::Value;

use super::scheduler::SchedulerType;
use super::training::{report_to_list, IntervalStrategy, SaveStrategy, TrainingArguments};
use crate::error::{Error, Result};

impl TrainingArguments {
    /// Normalises 4.x names and checks everything `TrainingArguments.__post_init__` checks.
    pub fn validated(mut self) -> Result<Self> {
        let bad = |msg: String| Err(Error::Invalid(msg));
        if let Some(s) = self.evaluation_strategy.take() {
            self.eval_strategy = s;
        }
        if let Some(r) = self.warmup_ratio.take() {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("warmup_ratio must lie in [0, 1], found {r}"));
            }
            if self.warmup_steps > 0.0 && r > 0.0 {
                return bad("set only one of warmup_steps and warmup_ratio".into());
            }
            if r > 0.0 {
                self.warmup_steps = r;
            }
        }
        if self.warmup_steps < 0.0 {
            return bad(format!("warmup_steps must be >= 0, found {}", self.warmup_steps));
        }
        SchedulerType::parse(&self.lr_scheduler_type)?;
        self.check_distributed()?;
        for (name, v) in [
            ("per_device_train_batch_size", self.per_device_train_batch_size),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        for (name, v) in [("block_size", self.block_size), ("max_seq_length", self.max_seq_length)] {
            if let Some(v) = v.filter(|&v| v < 2) {
                return bad(format!("{name} must be at least 2 (a causal LM example needs two tokens to predict one), found {v}"));
            }
        }
        for (name, v) in [
            ("max_source_length", Some(self.max_source_length)),
            ("max_target_length", Some(self.max_target_length)),
            ("val_max_target_length", self.val_max_target_length),
            ("pad_to_multiple_of", self.pad_to_multiple_of),
        ] {
            if v == Some(0) {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if self.max_steps <= 0 && self.num_train_epochs <= 0.0 {
            return bad("set num_train_epochs > 0 or max_steps > 0".into());
        }
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            return bad(format!("learning_rate must be a finite number >= 0, found {}", self.learning_rate));
        }
        for (name, b) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must lie in [0, 1), found {b}"));
            }
        }
        // as torch.optim.AdamW refuses them ("Invalid epsilon value", "Invalid weight_decay value")
        for (name, v) in [("adam_epsilon", self.adam_epsilon), ("weight_decay", self.weight_decay)] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} must be a finite number >= 0, found {v}"));
            }
        }
        // as transformers: an interval above 1 is a count of steps, a fraction below 1 a ratio
        for (name, v) in [("logging_steps", Some(self.logging_steps)), ("eval_steps", self.eval_steps), ("save_steps", Some(self.save_steps))] {
            match v {
                Some(v) if v < 0.0 || !v.is_finite() => return bad(format!("{name} must be a number >= 0, found {v}")),
                Some(v) if v > 1.0 && v.fract() != 0.0 => return bad(format!("{name} must be an integer if bigger than 1, found {v}")),
                _ => {}
            }
        }
        if let Some(a) = self.neftune_noise_alpha.filter(|&a| !(a > 0.0 && (a as f32).is_finite())) {
            return bad(format!("neftune_noise_alpha must be a positive number within f32's range, found {a}"));
        }
        if !(0.0..1.0).contains(&self.label_smoothing_factor) {
            return bad(format!("label_smoothing_factor must lie in [0, 1), found {}", self.label_smoothing_factor));
        }
        if self.bf16 && self.fp16 {
            return bad("bf16 and fp16 cannot both be set".into());
        }
        if self.fp16 {
            return bad("fp16 is not supported: use bf16 (the CUDA backend's mixed precision) or f32".into());
        }
        if self.logging_strategy == IntervalStrategy::Steps && self.logging_steps <= 0.0 {
            return bad(format!("logging_strategy steps needs logging_steps > 0, found {}", self.logging_steps));
        }
        if self.eval_strategy == IntervalStrategy::Steps {
            match self.eval_steps {
                None | Some(0.0) if self.logging_steps > 0.0 => self.eval_steps = Some(self.logging_steps),
                None | Some(0.0) => return bad("eval_strategy steps needs eval_steps (or logging_steps) > 0".into()),
                _ => {}
            }
        }
        if self.save_strategy == SaveStrategy::Steps && self.save_steps <= 0.0 {
            return bad(format!("save_strategy steps needs save_steps > 0, found {}", self.save_steps));
        }
        if self.load_best_model_at_end && self.save_strategy != SaveStrategy::Best {
            let same = matches!(
                (self.eval_strategy, self.save_strategy),
                (IntervalStrategy::No, SaveStrategy::No) | (IntervalStrategy::Steps, SaveStrategy::Steps) | (IntervalStrategy::Epoch, SaveStrategy::Epoch)
            );
            if !same {
                return bad(format!(
                    "load_best_model_at_end requires the save and eval strategy to match, but found eval_strategy {:?} and save_strategy {:?}",
                    self.eval_strategy, self.save_strategy
                )
                .to_lowercase());
            }
            if self.eval_strategy == IntervalStrategy::Steps {
                let eval = self.eval_steps.unwrap_or(self.logging_steps);
                let ratio_mismatch = (eval < 1.0) != (self.save_steps < 1.0);
                let not_multiple = if eval >= 1.0 {
                    (self.save_steps % eval).abs() > 1e-9
                } else {
                    ((self.save_steps / eval) - (self.save_steps / eval).round()).abs() > 1e-9
                };
                if ratio_mismatch || not_multiple {
                    return bad(format!(
                        "load_best_model_at_end requires save_steps to be a multiple of eval_steps, but found save_steps {} and eval_steps {eval}",
                        self.save_steps
                    ));
                }
            }
        }
        if self.save_strategy == SaveStrategy::Best && self.eval_strategy == IntervalStrategy::No {
            return bad("save_strategy best needs evaluation: set eval_strategy to steps or epoch".into());
        }
        if (self.load_best_model_at_end || self.save_strategy == SaveStrategy::Best) && self.metric_for_best_model.is_none() {
            self.metric_for_best_model = Some("loss".into());
        }
        if self.greater_is_better.is_none() {
            if let Some(m) = &self.metric_for_best_model {
                self.greater_is_better = Some(!m.ends_with("loss"));
            }
        }
        self.report_to = Value::Array(report_to_list(&self.report_to)?.into_iter().map(Value::String).collect());
        if self.peft.is_some() && self.adapter_name_or_path.is_some() {
            return bad("set one of peft (a new adapter) and adapter_name_or_path (an existing one)".into());
        }
        if let Some(n) = self.generation_num_beams {
            if n == 0 {
                return bad("generation_num_beams must be at least 1".into());
            }
        }
        if !matches!(self.optim.as_str(), "adamw_torch" | "adamw_torch_fused" | "adamw_hf") {
            return bad(format!("optim `{}` is not supported (supported: adamw_torch, adamw_torch_fused)", self.optim));
        }
        if !matches!(self.train_sampling_strategy.as_str(), "random" | "sequential") {
            return bad(format!("train_sampling_strategy `{}` is not supported (supported: random, sequential)", self.train_sampling_strategy));
        }
        if !matches!(self.device.as_str(), "cpu" | "cuda" | "auto") {
            return bad(format!("device `{}`: expected cpu, cuda or auto", self.device));
        }
        if crate::backend::AttnImpl::parse(&self.attn_implementation).is_none() {
            return bad(format!("attn_implementation `{}`: expected eager, sdpa or flash_attention_2", self.attn_implementation));
        }
        Ok(self)
    }
}
