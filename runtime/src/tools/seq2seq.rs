//! `inspect`, `convert` and `forward` for encoder-decoder model folders (T5, BART): the commands route
//! here when a folder's `config.json` names an encoder-decoder `model_type`.

use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::backend::cpu::Cpu;
use crate::backend::seq2seq::Seq2SeqOps;
use crate::error::{Error, Result};
use crate::files::write_file;
use crate::model::io::{self, Dtype};
use crate::model::seq2seq::{Seq2SeqBatch, Seq2SeqModel, ENCODER_DECODER};
use crate::model::seq2seq_config::{Family, FeedForward, Seq2SeqConfig, Seq2SeqLayout};
use crate::model::LoadOptions;

/// Whether the folder's `config.json` names an encoder-decoder model (a folder whose config
/// cannot be read is left to the decoder-only path, which reports why).
pub fn is_encoder_decoder(dir: &Path) -> bool {
    is_encoder_decoder_config(&dir.join("config.json"))
}

/// [`is_encoder_decoder`] of a config file.
pub fn is_encoder_decoder_config(path: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else { return false };
    let Ok(serde_json::Value::Object(map)) = serde_json::from_str(&text) else { return false };
    map.get("model_type").and_then(|v| v.as_str()).is_some_and(|t| ENCODER_DECODER.contains(&t))
}

/// `runtime inspect` of an encoder-decoder folder: the config's shape and the module tree, from
/// the headers.
pub fn inspect(dir: &Path) -> Result<String> {
    let mut c = Seq2SeqConfig::from_dir(dir)?;
    let headers = io::read_headers(dir)?;
    if headers.contains_key("lm_head.weight") {
        c.tied_head = false;
    }
    let layout = Seq2SeqLayout::new(&c);
    let leaves = crate::commands::check_leaves(dir, &layout, &headers)?;
    let total = layout.num_parameters();
    let mut dtypes: Vec<&str> = leaves.iter().map(|l| l.2.as_str()).collect();
    dtypes.sort();
    dtypes.dedup();
    let ff = match c.ff {
        FeedForward::Relu => "ReLU",
        FeedForward::GatedGelu => "gated GELU",
        FeedForward::Gelu => "GELU",
        FeedForward::GeluNew => "GELU (tanh)",
    };
    let mut out = String::new();
    out += &format!("architecture   {} (model_type `{}`)\n", c.architecture(), c.model_type());
    out += &format!(
        "shape          {} encoder and {} decoder layers, d_model {}, {} heads of {}, feed-forward {} ({ff}), vocab {}\n",
        c.num_layers, c.num_decoder_layers, c.d_model, c.num_heads, c.d_kv, c.d_ff, c.vocab_size
    );
    let head = if c.tied_head { "tied (lm_head shares the shared embedding)" } else { "untied" };
    match c.family {
        Family::T5(t) => {
            out += &format!("positions      relative, {} buckets up to distance {}\n", t.num_buckets, t.max_distance);
            out += &format!("embeddings     {head}; decoder output {}scaled by d_model^-0.5\n", if c.scale_decoder_outputs { "" } else { "not " });
        }
        Family::Bart(b) => {
            out += &format!("positions      learned, at most {} (offset 2)\n", b.max_positions);
            out += &format!(
                "embeddings     {head}; token embedding {}scaled by sqrt(d_model); final_logits_bias added\n",
                if b.scale_embedding { "" } else { "not " }
            );
        }
    }
    out += &format!("parameters     {}\n", crate::commands::count(total));
    out += &format!("dtype          {} on disk; computed in f32\n", dtypes.join(", "));
    out += "device         cpu (encoder-decoder models run on the CPU backend)\n\n";
    out += &crate::commands::tree(&leaves);
    Ok(out)
}

/// `runtime init` from an encoder-decoder config: returns the parameter count.
pub fn init(config: &Path, output_dir: &Path, seed: u64, dtype: Option<Dtype>, max_shard: u64, overwrite: bool) -> Result<usize> {
    let cfg = Seq2SeqConfig::from_file(config)?;
    let n: u128 = Seq2SeqLayout::new(&cfg).specs.iter().map(|s| s.shape.iter().map(|&d| d as u128).product::<u128>()).sum();
    if let Some(available) = crate::backend::device::host_memory_budget().filter(|&a| 8 * n > a) {
        return Err(Error::config(
            config,
            format!("its sizes imply {n} parameters, {} bytes to initialise, but {available} bytes of memory are available", 8 * n),
        ));
    }
    let mut model = Seq2SeqModel::from_config(Cpu, cfg, seed)?;
    if let Some(dt) = dtype {
        model.dtype = dt;
    }
    model.save(output_dir, dtype, max_shard, overwrite)?;
    Ok(model.num_parameters())
}

/// `runtime convert` of an encoder-decoder folder.
pub fn convert(model: &Path, output_dir: &Path, dtype: Option<Dtype>, max_shard: u64, overwrite: bool) -> Result<()> {
    let m = Seq2SeqModel::load(Cpu, model, LoadOptions { torch_dtype: dtype, ..LoadOptions::default() })?;
    m.save(output_dir, dtype, max_shard, overwrite)
}

/// `runtime forward` of an encoder-decoder folder: `input_ids` (with `attention_mask`) are the sources,
/// `decoder_input_ids` and/or `labels` the targets (`decoder_input_ids` made from the labels
/// when absent, as the model does). Writes `logits` `[batch, target length, vocab]` and, with
/// labels, `loss`.
pub fn forward(model_dir: &Path, inputs: &Path, output: &Path, opts: LoadOptions) -> Result<Option<f32>> {
    match opts.device.select(false)? {
        crate::model::Selected::Cpu => forward_on(Cpu, model_dir, inputs, output, opts),
        crate::model::Selected::Cuda(cuda) => forward_on(cuda, model_dir, inputs, output, opts),
    }
}

fn forward_on<B: Seq2SeqOps>(be: B, model_dir: &Path, inputs: &Path, output: &Path, opts: LoadOptions) -> Result<Option<f32>> {
    let bytes = std::fs::read(inputs).map_err(|e| Error::io(inputs, e))?;
    let st = io::deserialize(inputs, &bytes)?;
    let ids = |name: &str| crate::commands::read_ids(&st, inputs, name);
    let (input_ids, b, s) = ids("input_ids")?.ok_or_else(|| Error::tensor(inputs, "input_ids", "missing"))?;
    let attention_mask = match ids("attention_mask")? {
        Some((m, bb, ss)) if (bb, ss) == (b, s) => m,
        Some((_, bb, ss)) => return Err(Error::tensor(inputs, "attention_mask", format!("shape [{bb}, {ss}] differs from input_ids' [{b}, {s}]"))),
        None => vec![1; b * s],
    };
    let model = Seq2SeqModel::load(be, model_dir, opts)?;
    let c = &model.config;
    let (labels, dec) = (ids("labels")?, ids("decoder_input_ids")?);
    let (decoder_input_ids, t, labels) = match (dec, labels) {
        (None, None) => return Err(Error::tensor(inputs, "decoder_input_ids", "missing (an encoder-decoder model needs `decoder_input_ids` or `labels`)")),
        (Some((d, bb, t)), None) if bb == b => (d, t, None),
        (None, Some((l, bb, t))) if bb == b => (Seq2SeqBatch::shift_right(&l, t, c.decoder_start_token_id, c.pad_token_id), t, Some(l)),
        (Some((d, bb, t)), Some((l, lb, lt))) if bb == b && (lb, lt) == (b, t) => (d, t, Some(l)),
        _ => {
            return Err(Error::tensor(
                inputs,
                "labels",
                format!("the batch sizes or target lengths of `labels` and `decoder_input_ids` differ from each other or from the {b} sources"),
            ))
        }
    };
    let has_labels = labels.is_some();
    let batch =
        Seq2SeqBatch { batch: b, src_len: s, tgt_len: t, input_ids, attention_mask, decoder_input_ids, labels: labels.unwrap_or_else(|| vec![-100; b * t]) };
    batch.check(c.vocab_size).map_err(|e| Error::weights(inputs, e.to_string()))?;
    let (acts, loss) = model.forward(&batch, 0.0, None)?;
    let logits = model.backend.download(&acts.logits)?;
    let mut out_bytes: Vec<u8> = Vec::with_capacity(logits.len() * 4);
    logits.iter().for_each(|v| out_bytes.extend_from_slice(&v.to_le_bytes()));
    let mut tensors = vec![("logits".to_string(), view(vec![b, t, c.vocab_size], &out_bytes)?)];
    let loss_bytes = loss.mean().to_le_bytes();
    if has_labels {
        tensors.push(("loss".to_string(), view(vec![1], &loss_bytes)?));
    }
    let data = safetensors::serialize(tensors, None).map_err(|e| Error::weights(output, e.to_string()))?;
    write_file(output, &data)?;
    Ok(has_labels.then(|| loss.mean()))
}

fn view(shape: Vec<usize>, data: &[u8]) -> Result<TensorView<'_>> {
    TensorView::new(StDtype::F32, shape, data).map_err(|e| Error::Invalid(e.to_string()))
}

/// `runtime generate` with an encoder-decoder folder: each prompt is a source for the encoder
/// (tokenized with the special tokens, so T5's tokenizer appends `</s>`); the decoder generates from
/// `decoder_start_token_id` under the folder's generation config and the overrides.
pub fn generate(
    model_dir: &Path,
    prompts: &[String],
    chat: bool,
    overrides: &[(String, serde_json::Value)],
    device: crate::model::Device,
    out: &mut dyn std::io::Write,
) -> Result<Vec<String>> {
    match device.select(false)? {
        crate::model::Selected::Cpu => generate_on(Cpu, model_dir, prompts, chat, overrides, out),
        crate::model::Selected::Cuda(cuda) => generate_on(cuda, model_dir, prompts, chat, overrides, out),
    }
}

fn generate_on<B: Seq2SeqOps>(
    be: B,
    model_dir: &Path,
    prompts: &[String],
    chat: bool,
    overrides: &[(String, serde_json::Value)],
    out: &mut dyn std::io::Write,
) -> Result<Vec<String>> {
    let model = Seq2SeqModel::load(be, model_dir, LoadOptions::default())?;
    let (tok, cfg, sources) = crate::commands::generation_inputs(model_dir, model.config.vocab_size, &model.config.raw, prompts, chat, overrides)?;
    crate::commands::stream_generation(&tok, &cfg, prompts.len(), out, |on_token| crate::generate::seq2seq::generate_seq2seq(&model, &sources, &cfg, on_token))
}

/// The shape `runtime bench --arch t5` trains: a T5 v1.1 (gated GELU; the head tied, as
/// transformers 5 builds a T5 from a config) with
/// `n_layer` encoder and decoder layers, `d_kv = d_model / n_head`, `d_ff = 2 d_model`.
pub struct BenchShape {
    pub n_layer: usize,
    pub d_model: usize,
    pub n_head: usize,
    pub vocab: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub batch: usize,
    pub steps: usize,
    pub warmup: usize,
}

#[derive(serde::Serialize)]
pub struct BenchResult {
    pub arch: &'static str,
    pub parameters: usize,
    /// Source and target tokens of one step.
    pub tokens_per_step: usize,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
    pub peak_rss_mib: f64,
    pub threads: usize,
    pub final_loss: f32,
}

impl BenchResult {
    pub fn report(&self) -> String {
        format!(
            "t5 ({} parameters), {} tokens per step, {} threads: {:.3} s per step, {:.0} tokens/s, peak RSS {:.0} MiB, loss {:.4}",
            self.parameters, self.tokens_per_step, self.threads, self.step_seconds, self.tokens_per_second, self.peak_rss_mib, self.final_loss
        )
    }
}

/// Trains `steps` AdamW steps (after `warmup` untimed ones) of a fresh T5 on random tokens:
/// forward, backward, the global norm with clipping at 1, the update. Reports the median step.
/// The gradients and the activations' buffers are kept from step to step, as a training loop
/// keeps them.
pub fn bench(s: &BenchShape) -> Result<BenchResult> {
    use crate::engine::optimizer::{clip_coefficient, AdamW, AdamWConfig};
    use rand::{RngExt, SeedableRng};
    let mut raw = serde_json::Map::new();
    for (k, v) in [
        ("vocab_size", s.vocab),
        ("d_model", s.d_model),
        ("d_kv", s.d_model / s.n_head),
        ("d_ff", 2 * s.d_model),
        ("num_layers", s.n_layer),
        ("num_heads", s.n_head),
    ] {
        raw.insert(k.into(), v.into());
    }
    raw.insert("feed_forward_proj".into(), "gated-gelu".into());
    raw.insert("model_type".into(), "t5".into());
    let cfg = Seq2SeqConfig::from_json(Path::new("bench"), raw)?;
    let mut model = Seq2SeqModel::from_config(Cpu, cfg, 0)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let mut ids = |n: usize| -> Vec<i32> { (0..n).map(|_| rng.random_range(2..s.vocab as i32)).collect() };
    let labels = ids(s.batch * s.tgt_len);
    let c = &model.config;
    let batch = Seq2SeqBatch {
        batch: s.batch,
        src_len: s.src_len,
        tgt_len: s.tgt_len,
        input_ids: ids(s.batch * s.src_len),
        attention_mask: vec![1; s.batch * s.src_len],
        decoder_input_ids: Seq2SeqBatch::shift_right(&labels, s.tgt_len, c.decoder_start_token_id, c.pad_token_id),
        labels,
    };
    let mut opt = AdamW::new(&model, AdamWConfig { lr: 1e-4, ..AdamWConfig::default() })?;
    let mut grads = crate::model::Grads { tensors: model.zero_grads()? };
    let mut times = Vec::new();
    let mut loss = f32::NAN;
    let mut kept = None;
    for step in 0..s.warmup + s.steps {
        let started = std::time::Instant::now();
        grads.zero(&model.backend);
        let n_tokens = batch.labels.len() as f32;
        let (mut acts, l) = model.forward_reusing(kept.take(), &batch, 0.0, Some(1.0 / n_tokens))?;
        model.backward(&mut acts, &batch, &mut grads.tensors)?;
        kept = Some(acts);
        let (_, coef) = clip_coefficient(&model.backend, &grads, 1.0)?;
        opt.step(&mut model, &grads, 1e-4, coef)?;
        loss = l.mean();
        if step >= s.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let step_seconds = times[times.len() / 2];
    let tokens_per_step = s.batch * (s.src_len + s.tgt_len);
    Ok(BenchResult {
        arch: "t5",
        parameters: model.num_parameters(),
        tokens_per_step,
        step_seconds,
        tokens_per_second: tokens_per_step as f64 / step_seconds,
        peak_rss_mib: crate::mem::peak_rss_mib(),
        threads: rayon::current_num_threads(),
        final_loss: loss,
    })
}

/// `runtime cuda-check`'s encoder-decoder part: a training pass (forward with dropout and label
/// smoothing, backward) of a small T5 v1.1 and a small BART on `gpu` and on the CPU from the same
/// weights and dropout masks, then cached decoding steps (beam rows of padded sources). The loss,
/// every gradient and the decoding logits are compared, with the decoder-only checks' limits (in
/// `bf16`: 1e-2, the gradients to 2e-2 by relative L2; in f32 1e-4).
pub fn device_parity<G: Seq2SeqOps + Clone>(gpu: &G, bf16: bool) -> Result<Vec<crate::tools::cuda_check::Check>> {
    use crate::tools::cuda_check::{rel_err, rel_err_l2, Check};
    let (lim, grad_lim) = if bf16 { (1e-2, 2e-2) } else { (1e-4, 1e-4) };
    let t5 = serde_json::json!({"model_type": "t5", "vocab_size": 300, "d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 2,
        "num_decoder_layers": 3, "num_heads": 4, "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 20, "dropout_rate": 0.1, "tie_word_embeddings": false});
    let bart = serde_json::json!({"model_type": "bart", "vocab_size": 300, "d_model": 64, "encoder_attention_heads": 4,
        "decoder_attention_heads": 4, "encoder_ffn_dim": 96, "decoder_ffn_dim": 96, "encoder_layers": 2, "decoder_layers": 3,
        "max_position_embeddings": 64, "scale_embedding": true, "dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.1});
    let mut checks = Vec::new();
    for (name, raw) in [("t5", t5), ("bart", bart)] {
        let serde_json::Value::Object(map) = raw else { unreachable!("a JSON object literal") };
        let cfg = Seq2SeqConfig::from_json(Path::new("<cuda-check>"), map)?;
        let (b, s, t) = (3, 20, 9);
        let pad = cfg.pad_token_id as i32;
        let id = |i: usize| 3 + ((i * 37 + 11) % (cfg.vocab_size - 3)) as i32;
        let mut input_ids: Vec<i32> = (0..b * s).map(id).collect();
        let mut attention_mask = vec![1; b * s];
        for (row, n) in [(1, 13), (2, 4)] {
            for j in n..s {
                input_ids[row * s + j] = pad;
                attention_mask[row * s + j] = 0;
            }
        }
        let mut labels: Vec<i32> = (0..b * t).map(|i| id(i + 500)).collect();
        labels[t + 5..2 * t].iter_mut().for_each(|l| *l = -100);
        let decoder_input_ids = Seq2SeqBatch::shift_right(&labels, t, cfg.decoder_start_token_id, cfg.pad_token_id);
        let batch = Seq2SeqBatch { batch: b, src_len: s, tgt_len: t, input_ids, attention_mask, decoder_input_ids, labels };
        let sources: Vec<Vec<u32>> = [s, 13, 4].iter().enumerate().map(|(r, &n)| (0..n).map(|j| id(r * s + j) as u32).collect()).collect();
        fn pass<B: Seq2SeqOps>(m: &Seq2SeqModel<B>, batch: &Seq2SeqBatch, sources: &[Vec<u32>]) -> Result<(f32, Vec<f32>, Vec<f32>)> {
            let (_, loss) = m.forward(batch, 0.1, None)?;
            let (mut acts, l) = m.forward_dropping(None, batch, 0.1, Some(1.0 / loss.n_tokens as f32), Some(77))?;
            let mut grads = m.zero_grads()?;
            m.backward(&mut acts, batch, &mut grads)?;
            let g = grads.iter().map(|t| m.backend.download(t)).collect::<Result<Vec<_>>>()?.concat();
            let mut st = m.decode_start(sources, 2 * sources.len(), 5)?;
            let mut logits = Vec::new();
            for step in 0..4 {
                let ids: Vec<i32> =
                    (0..2 * sources.len()).map(|r| if step == 0 { m.config.decoder_start_token_id as i32 } else { 5 + (r * 7 + step) as i32 }).collect();
                logits.extend(m.decode_step(&mut st, &ids)?);
                if step == 1 {
                    st.reorder(&m.backend, &[1, 1, 2, 3, 5, 4])?;
                }
            }
            Ok((l.mean(), g, logits))
        }
        let cpu = pass(&Seq2SeqModel::from_config(Cpu, cfg.clone(), 5)?, &batch, &sources)?;
        let dev = pass(&Seq2SeqModel::from_config(gpu.clone(), cfg, 5)?, &batch, &sources)?;
        let case = format!("{name}, 2 + 3 layers, batch {b}x{s} -> {t}, dropout 0.1");
        for (output, e, limit) in [
            ("loss", rel_err(&[dev.0], &[cpu.0]), lim),
            if bf16 { ("gradients (L2)", rel_err_l2(&dev.1, &cpu.1), grad_lim) } else { ("gradients", rel_err(&dev.1, &cpu.1), grad_lim) },
            ("decoding logits (cached, beams reordered)", rel_err(&dev.2, &cpu.2), lim),
        ] {
            checks.push(Check { op: "encoder-decoder pass".into(), case: case.clone(), output: output.into(), rel_err: e, limit, pass: e <= limit });
        }
    }
    Ok(checks)
}
