//! Building a [`Trainer`] for an encoder-decoder model (T5), as `run_summarization.py` sets up
//! `Seq2SeqTrainer`: source/target records tokenized and truncated to `max_source_length` /
//! `max_target_length` (`val_max_target_length` for the validation set), batches made by
//! `DataCollatorForSeq2Seq`, and `generation_max_length` defaulting to `val_max_target_length`.
//! What the encoder-decoder path does not do yet is refused here, before any step.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::setup::{check_supported, columns_of, load_tokenizer, make_step, train_file, Data};
use super::trainer::Trainer;
use crate::args::distributed::Sharding;
use crate::args::TrainingArguments;
use crate::backend::seq2seq::Seq2SeqOps;
use crate::data::dataset::read_records;
use crate::data::seq2seq::{seq2seq_examples, Seq2SeqColumns};
use crate::data::{Example, PadOptions, Padding, Tokenizer};
use crate::engine::Step;
use crate::error::{Error, Result};
use crate::model::seq2seq::Seq2SeqModel;
use crate::model::seq2seq_config::Seq2SeqConfig;
use crate::model::{Dtype, LoadOptions};
use crate::plugin::roles::Plugins;
use crate::protocol::TokenDecoder;

/// Settings the encoder-decoder path does not implement yet: refused, never ignored.
fn check_seq2seq_supported(args: &TrainingArguments, training: bool) -> Result<()> {
    let unsupported = [
        (args.peft.is_some() || args.adapter_name_or_path.is_some(), "LoRA adapters (`peft`, `adapter_name_or_path`)"),
        (args.auto_find_batch_size, "`auto_find_batch_size`"),
        (args.block_size.is_some() || args.max_seq_length.is_some(), "`block_size` / `max_seq_length` (use `max_source_length` and `max_target_length`)"),
        (
            args.include_for_metrics.iter().any(|x| x == "inputs") && !args.predict_with_generate,
            "`include_for_metrics = [\"inputs\"]` without `predict_with_generate`",
        ),
        (training && args.sharding()? == Sharding::FullShard, "fsdp `full_shard` (`shard_grad_op` works)"),
    ];
    match unsupported.iter().find(|(set, _)| *set) {
        Some((_, what)) => Err(Error::Unsupported(format!("{what} with an encoder-decoder model is not supported yet"))),
        None => Ok(()),
    }
}

/// The model from `model_name_or_path`, or initialised from `config_name` with the run's seed;
/// and the folder it came from.
fn load_seq2seq<B: Seq2SeqOps>(backend: B, args: &TrainingArguments) -> Result<(Seq2SeqModel<B>, PathBuf)> {
    let torch_dtype = args.torch_dtype.as_deref().map(|d| Dtype::parse(d).ok_or_else(|| Error::Invalid(format!("unknown torch_dtype `{d}`")))).transpose()?;
    let model = match (&args.model_name_or_path, &args.config_name) {
        (Some(m), _) => (Seq2SeqModel::load(backend, Path::new(m), LoadOptions { torch_dtype, ..LoadOptions::default() })?, PathBuf::from(m)),
        (None, Some(c)) => {
            let path = if Path::new(c).is_dir() { Path::new(c).join("config.json") } else { PathBuf::from(c) };
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            (Seq2SeqModel::from_config(backend, Seq2SeqConfig::from_file(&path)?, args.seed)?, dir)
        }
        (None, None) => return Err(Error::Invalid("set model_name_or_path (a model folder) or config_name (a config.json to train from scratch)".into())),
    };
    let c = &model.0.config;
    let dropout = (c.dropout_rate, c.attn_dropout(), c.act_dropout());
    if dropout != (0.0, 0.0, 0.0) {
        tracing::info!(
            "dropout in training: {} on the embeddings and each sublayer's output, {} on the attention probabilities, {} after the feed-forward's activation",
            dropout.0,
            dropout.1,
            dropout.2
        );
    }
    Ok(model)
}

/// The source/target examples of `file`, targets truncated to `max_target_length`. An example's
/// `input_ids` are its source, its `labels` its target. A source or target longer than the
/// model has positions for (`limit`, BART's `max_position_embeddings`) is an error naming the
/// record.
fn examples(file: &str, tok: &Tokenizer, args: &TrainingArguments, max_target_length: usize, limit: Option<usize>) -> Result<Vec<Example>> {
    let cols = Seq2SeqColumns {
        source: args.text_column.clone().unwrap_or_else(|| "source".into()),
        target: args.summary_column.clone().unwrap_or_else(|| "target".into()),
    };
    let path = Path::new(file);
    let records = read_records(path)?;
    let pairs = seq2seq_examples(path, &records, tok, &cols, Some(args.max_source_length), Some(max_target_length))?;
    for (r, p) in records.iter().zip(&pairs).filter(|_| limit.is_some()) {
        let max = limit.unwrap_or(usize::MAX);
        for (what, n, fix) in [("source", p.input_ids.len(), "max_source_length"), ("target", p.labels.len(), "max_target_length")] {
            if n > max {
                return Err(Error::Invalid(format!(
                    "{}:{}: the {what} is {n} tokens, longer than the model's limit (`max_position_embeddings` = {max}); set {fix} to at most {max}",
                    path.display(),
                    r.line
                )));
            }
        }
    }
    Ok(pairs.into_iter().map(|p| Example { input_ids: p.input_ids, labels: p.labels.into_iter().map(|t| t as i32).collect() }).collect())
}

impl<B: Seq2SeqOps + Clone> Trainer<B, Seq2SeqModel<B>> {
    /// The trainer for an encoder-decoder model on `backend`; `training = false` loads what
    /// evaluation and prediction need only.
    pub fn new_seq2seq(backend: B, args: TrainingArguments, training: bool) -> Result<Self> {
        check_supported(&args, backend.name())?;
        check_seq2seq_supported(&args, training)?;
        let collective = if training {
            crate::engine::nccl::start(&backend, args.ddp_backend.as_deref(), args.ddp_bucket_cap_mb, Some(args.ddp_timeout))?
        } else {
            Box::new(crate::engine::SingleProcess)
        };
        let (mut model, model_dir) = load_seq2seq(backend, &args)?;
        model.gradient_checkpointing = args.gradient_checkpointing;
        let tokenizer = load_tokenizer(&args, &mut model.source, model.config.vocab_size, &model_dir)?;
        let train_file = train_file(&args, training)?;
        let limit = model.config.max_positions();
        let train = train_file.map(|f| examples(f, &tokenizer, &args, args.max_target_length, limit)).transpose()?.unwrap_or_default();
        let val_target = args.val_max_target_length.unwrap_or(args.max_target_length);
        let eval = args.validation_file.as_deref().map(|f| examples(f, &tokenizer, &args, val_target, limit)).transpose()?;
        let generation_max = args.generation_max_length.unwrap_or(val_target);
        if let Some(max) = limit.filter(|&m| args.predict_with_generate && generation_max > m) {
            return Err(Error::Invalid(format!(
                "generation_max_length {generation_max} (or val_max_target_length) is longer than the model's limit (`max_position_embeddings` = {max}); set it to at most {max}"
            )));
        }
        let plugins = Plugins::load(&args.plugins, Some(tokenizer.clone() as Arc<dyn TokenDecoder>))?;
        let train_columns = columns_of(train_file, train.len(), &plugins)?;
        let eval_columns = columns_of(args.validation_file.as_deref(), eval.as_ref().map_or(0, Vec::len), &plugins)?;
        let pad_id = tokenizer.pad.as_ref().map_or(model.config.pad_token_id as u32, |t| t.id);
        let pad = PadOptions {
            padding: Padding::Longest,
            side: tokenizer.padding_side,
            pad_id,
            max_length: None,
            truncation: false,
            pad_to_multiple_of: args.pad_to_multiple_of,
        };
        let refuse = |_: Seq2SeqModel<B>, _, _| -> Result<Step<B, Seq2SeqModel<B>>> {
            Err(Error::Unsupported("fsdp `full_shard` with an encoder-decoder model".into()))
        };
        let step = make_step(model, &args, collective, training, (&train, eval.as_deref()), refuse)?;
        let mut args = args;
        // run_summarization.py: generation runs to `val_max_target_length` unless told otherwise
        args.generation_max_length = args.generation_max_length.or(Some(val_target));
        Self::assemble(args, step, tokenizer, model_dir, Data { train, eval, train_columns, eval_columns }, plugins, pad, training)
    }
}
