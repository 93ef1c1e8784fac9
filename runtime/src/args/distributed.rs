//! The arguments of training across processes (`ddp_backend`, `fsdp`) and the transformers
//! fields this runtime does not implement (naming one is an error that says so).

use serde_json::Value;

use super::TrainingArguments;
use crate::error::{Error, Result};

/// How the training state is spread over the processes: transformers' `fsdp` values, and
/// DeepSpeed's ZeRO stages they correspond to (docs/DISTRIBUTED.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sharding {
    /// Every process holds everything; gradients are summed (DDP; ZeRO stage 0).
    None,
    /// Gradients and optimizer state sharded (ZeRO stage 2).
    ShardGradOp,
    /// Weights sharded too, gathered per layer (ZeRO stage 3).
    FullShard,
}

impl TrainingArguments {
    /// `fsdp` read as transformers reads it: a string of space-separated options or a list of
    /// them (`"full_shard auto_wrap"`), empty or `false` for none.
    pub fn sharding(&self) -> Result<Sharding> {
        let words: Vec<String> = match &self.fsdp {
            Value::Null | Value::Bool(false) => Vec::new(),
            Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
            Value::Array(a) => a
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| Error::Invalid(format!("fsdp: expected option names, found {v}"))))
                .collect::<Result<_>>()?,
            other => return Err(Error::Invalid(format!("fsdp: expected a string or a list of options, found {other}"))),
        };
        let mut mode = Sharding::None;
        for w in &words {
            mode = match w.as_str() {
                "shard_grad_op" => Sharding::ShardGradOp,
                "full_shard" | "hybrid_shard" => Sharding::FullShard,
                // transformers' wrapping and offload options have no meaning here
                "auto_wrap" => mode,
                "offload" | "hybrid_shard_zero2" | "no_shard" => {
                    return Err(Error::Unsupported(format!("fsdp option `{w}` is not supported (supported: shard_grad_op, full_shard)")))
                }
                _ => return Err(Error::Invalid(format!("fsdp: unknown option `{w}` (expected shard_grad_op or full_shard)"))),
            };
        }
        Ok(mode)
    }

    /// Checks `ddp_backend` and `fsdp` (called by [`TrainingArguments::validated`]).
    pub(super) fn check_distributed(&self) -> Result<()> {
        match self.ddp_backend.as_deref() {
            None | Some("mpi") | Some("nccl") => {}
            Some(other) => return Err(Error::Invalid(format!("ddp_backend `{other}`: expected mpi or nccl"))),
        }
        if self.ddp_timeout == 0 {
            return Err(Error::Invalid("ddp_timeout must be at least 1 second".into()));
        }
        if self.ddp_bucket_cap_mb == Some(0) {
            return Err(Error::Invalid("ddp_bucket_cap_mb must be at least 1".into()));
        }
        if self.sharding()? == Sharding::FullShard && (self.peft.is_some() || self.adapter_name_or_path.is_some()) {
            return Err(Error::Unsupported(
                "fsdp `full_shard` with a LoRA adapter (peft, adapter_name_or_path) is not supported: the frozen base is not sharded; use `shard_grad_op`"
                    .into(),
            ));
        }
        if self.sharding()? == Sharding::FullShard && self.auto_find_batch_size {
            return Err(Error::Unsupported("fsdp `full_shard` with auto_find_batch_size is not supported: set per_device_train_batch_size".into()));
        }
        if self.sharding()? == Sharding::FullShard && self.predict_with_generate {
            return Err(Error::Unsupported(
                "fsdp `full_shard` with predict_with_generate: generation needs the whole weights in one process (use `shard_grad_op`, or evaluate the saved model with `runtime predict`)".into(),
            ));
        }
        Ok(())
    }
}

/// transformers `Seq2SeqTrainingArguments` fields that this runtime does not implement: naming
/// one is an error that says so (rather than "unknown key" or silently ignoring it).
pub(super) const HF_UNSUPPORTED: &[&str] = &[
    "optim_args",
    "optim_target_modules",
    "bf16_full_eval",
    "fp16_full_eval",
    "tf32",
    "activation_checkpointing",
    "activation_checkpointing_kwargs",
    "gradient_checkpointing_kwargs",
    "torch_compile",
    "torch_compile_backend",
    "torch_compile_mode",
    "use_liger_kernel",
    "liger_kernel_config",
    "use_cache",
    "torch_empty_cache_steps",
    "log_on_each_node",
    "include_num_input_tokens_seen",
    "log_level",
    "log_level_replica",
    "project",
    "trackio_space_id",
    "trackio_bucket_id",
    "trackio_static_space_id",
    "eval_do_concat_batches",
    "eval_use_gather_object",
    "eval_accumulation_steps",
    "batch_eval_metrics",
    "save_on_each_node",
    "enable_jit_checkpoint",
    "push_to_hub",
    "hub_token",
    "hub_private_repo",
    "hub_model_id",
    "hub_strategy",
    "hub_always_push",
    "hub_revision",
    "restore_callback_states_from_checkpoint",
    "accelerator_config",
    "parallelism_config",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "dataloader_in_order",
    "length_column_name",
    "ddp_find_unused_parameters",
    "ddp_broadcast_buffers",
    "ddp_static_graph",
    "fsdp_config",
    "deepspeed",
    "debug",
    "skip_memory_metrics",
    "local_rank",
    "sortish_sampler",
    "generation_config",
];
