//! The `runtime` subcommands other than training: `init`, `inspect`, `convert`, `forward`, `bench`.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::backend::cpu::Cpu;
use crate::backend::AttnImpl;
use crate::error::{Error, Result};
use crate::files::write_file;
use crate::model::{init::init_tensors, io, Activations, Batch, Device, Dtype, Layout, LoadOptions, LossOptions, LossOutput, Model, ModelConfig};

pub fn parse_dtype(s: &str) -> Result<Dtype> {
    Dtype::parse(s).ok_or_else(|| Error::Invalid(format!("unknown torch_dtype `{s}` (expected float32, float16 or bfloat16)")))
}

pub fn parse_attn(s: &str) -> Result<AttnImpl> {
    AttnImpl::parse(s).ok_or_else(|| Error::Invalid(format!("unknown attn_implementation `{s}` (expected eager, sdpa or flash_attention_2)")))
}

pub fn parse_device(s: &str) -> Result<Device> {
    Device::parse(s).ok_or_else(|| Error::Invalid(format!("unknown device `{s}` (expected cpu, cuda or auto)")))
}

pub fn parse_shard_size(s: &str) -> Result<u64> {
    io::parse_size(s).ok_or_else(|| Error::Invalid(format!("invalid max_shard_size `{s}` (expected e.g. 5GB, 500MB or a byte count)")))
}

/// `runtime init`: a freshly initialised model folder.
pub fn init(config: &Path, output_dir: &Path, seed: u64, dtype: Option<Dtype>, max_shard: u64, overwrite: bool) -> Result<usize> {
    if crate::tools::seq2seq::is_encoder_decoder_config(config) {
        return crate::tools::seq2seq::init(config, output_dir, seed, dtype, max_shard, overwrite);
    }
    let cfg = ModelConfig::from_file(config)?;
    // the initialised tensors and the model's copy of them
    cfg.check_memory(config, 8.0, "initialise")?;
    let layout = Layout::new(&cfg);
    let tensors = init_tensors(&cfg, &layout, seed);
    let opts = LoadOptions { torch_dtype: dtype, ..LoadOptions::default() };
    let model = Model::from_tensors(Cpu, cfg, tensors, opts)?;
    model.save(output_dir, dtype, max_shard, overwrite)?;
    Ok(model.num_parameters())
}

/// `runtime convert`: load a model folder and save it again (dtype change, resharding).
pub fn convert(model: &Path, output_dir: &Path, dtype: Option<Dtype>, max_shard: u64, overwrite: bool) -> Result<()> {
    crate::files::refuse_output_over_inputs(output_dir, &[("model", model)])?;
    if crate::tools::seq2seq::is_encoder_decoder(model) {
        return crate::tools::seq2seq::convert(model, output_dir, dtype, max_shard, overwrite);
    }
    let m = Model::load(Cpu, model, LoadOptions { torch_dtype: dtype, ..LoadOptions::default() })?;
    m.save(output_dir, dtype, max_shard, overwrite)
}

/// `runtime merge`: PEFT's `merge_and_unload`: the base with the adapter folded in, written as a
/// plain transformers model (nothing is written on any error).
pub fn merge(base: &Path, adapter: &Path, output_dir: &Path, dtype: Option<Dtype>, max_shard: u64, overwrite: bool) -> Result<()> {
    crate::files::refuse_output_over_inputs(output_dir, &[("model", base), ("adapter", adapter)])?;
    let mut m = Model::load(Cpu, base, LoadOptions { torch_dtype: None, ..LoadOptions::default() })?;
    m.load_adapter(adapter)?;
    m.merge_adapter()?;
    m.save(output_dir, dtype, max_shard, overwrite)
}

/// `runtime inspect`: a readable summary of a model folder, from the headers only.
pub fn inspect(dir: &Path, device: Device) -> Result<String> {
    if crate::tools::seq2seq::is_encoder_decoder(dir) {
        return crate::tools::seq2seq::inspect(dir);
    }
    let cfg = ModelConfig::from_dir(dir)?;
    cfg.check_against_files(dir)?;
    let layout = Layout::new(&cfg);
    let headers = io::read_headers(dir)?;
    let leaves = check_leaves(dir, &layout, &headers)?;
    let total: usize = layout.numel();
    let mut dtypes: Vec<&str> = leaves.iter().map(|l| l.2.as_str()).collect();
    dtypes.sort();
    dtypes.dedup();
    let device_name = match device.resolve() {
        Ok(d) => d,
        Err(e) => format!("unavailable ({e})"),
    };
    let mut out = String::new();
    let c = &cfg;
    out += &format!("architecture   {} (model_type `{}`)\n", c.architecture_name(), c.model_type);
    out += &format!(
        "shape          {} layers, hidden {}, {} heads ({} key/value), head dim {}, MLP {}, vocab {}, context {}\n",
        c.n_layer, c.hidden_size, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.vocab_size, c.max_positions
    );
    out += &format!("embeddings     {}\n", if c.tie_word_embeddings { "tied (lm_head shares the input embedding)" } else { "untied" });
    out += &format!("parameters     {}\n", count(total));
    out += &format!("dtype          {} on disk; computed in f32\n", dtypes.join(", "));
    out += &format!("device         {device_name}\n\n");
    out += &tree(&leaves);
    Ok(out)
}

/// A tensor as `inspect` lists it: name, shape, dtype on disk.
pub(crate) type Leaf = (String, Vec<usize>, String);

/// Every tensor of `layout` as the files hold it, in layout order; an error names a missing,
/// misshapen, unsupported or unexpected tensor.
pub(crate) fn check_leaves(dir: &Path, layout: &dyn crate::model::layout::WeightSet, headers: &BTreeMap<String, io::TensorHeader>) -> Result<Vec<Leaf>> {
    let mut leaves: Vec<Leaf> = Vec::new();
    for spec in layout.specs() {
        for part in &spec.parts {
            let Some((dt, shape, file)) = headers.get(&part.name) else {
                let files = io::weight_files(dir)?;
                let where_ = if files.len() == 1 { files[0].clone() } else { dir.join(io::INDEX_FILE) };
                return Err(Error::tensor(&where_, &part.name, "missing"));
            };
            if shape != &part.shape {
                return Err(Error::tensor(file, &part.name, format!("shape {shape:?} does not match the config, which implies {:?}", part.shape)));
            }
            if !matches!(dt.as_str(), "F32" | "F16" | "BF16") {
                return Err(Error::tensor(file, &part.name, format!("dtype {dt} is not supported (expected F32, F16 or BF16)")));
            }
            leaves.push((part.name.clone(), shape.clone(), dt.clone()));
        }
    }
    let expected: std::collections::HashSet<&str> = leaves.iter().map(|l| l.0.as_str()).collect();
    if let Some((name, (_, _, file))) = headers.iter().find(|(n, _)| !expected.contains(n.as_str()) && !layout.tolerates_extra(n)) {
        return Err(Error::tensor(file, name, "unexpected tensor for this config"));
    }
    Ok(leaves)
}

/// A parameter count grouped by thousands, with its short form: `124,439,808 (124.44M)`.
pub(crate) fn count(n: usize) -> String {
    format!("{} ({})", group(n), human(n))
}

fn human(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn group(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// The module tree: every module with its parameter count, every tensor with shape and dtype.
pub(crate) fn tree(leaves: &[Leaf]) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for (name, shape, _) in leaves {
        let n: usize = shape.iter().product();
        let parts: Vec<&str> = name.split('.').collect();
        for depth in 1..parts.len() {
            *counts.entry(parts[..depth].join(".")).or_default() += n;
        }
    }
    let mut out = String::new();
    let mut printed: std::collections::HashSet<String> = Default::default();
    for (name, shape, dt) in leaves {
        let parts: Vec<&str> = name.split('.').collect();
        for depth in 1..parts.len() {
            let module = parts[..depth].join(".");
            if printed.insert(module.clone()) {
                let label = format!("{}{}", "  ".repeat(depth - 1), parts[depth - 1]);
                out += &format!("{label:<48} {:>14}\n", group(counts[&module]));
            }
        }
        let n: usize = shape.iter().product();
        let label = format!("{}{}", "  ".repeat(parts.len() - 1), parts[parts.len() - 1]);
        out += &format!("{label:<48} {:>14}  {:?} {}\n", group(n), shape, dt);
    }
    out
}

pub(crate) fn read_ids(st: &SafeTensors, path: &Path, name: &str) -> Result<Option<(Vec<i32>, usize, usize)>> {
    let view = match st.tensor(name) {
        Ok(v) => v,
        Err(_) => return Ok(None),
    };
    let shape = view.shape();
    if shape.len() != 2 {
        return Err(Error::tensor(path, name, format!("expected shape [batch, seq], found {shape:?}")));
    }
    let data = view.data();
    let ids: Vec<i32> = match view.dtype() {
        StDtype::I64 => {
            // ids are i32 inside: a value outside that range is refused, not wrapped into a valid id
            let cols = shape[1].max(1);
            let narrow = |(i, b): (usize, &[u8])| {
                let v = i64::from_le_bytes(b.try_into().expect("8 bytes"));
                i32::try_from(v).map_err(|_| Error::tensor(path, name, format!("value {v} at [{}][{}] does not fit in 32 bits", i / cols, i % cols)))
            };
            data.chunks_exact(8).enumerate().map(narrow).collect::<Result<_>>()?
        }
        StDtype::I32 => data.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).collect(),
        d => return Err(Error::tensor(path, name, format!("dtype {d:?} is not an integer type (expected I64 or I32)"))),
    };
    Ok(Some((ids, shape[0], shape[1])))
}

/// `runtime forward`: logits (and the loss, when `labels` are given) for the batch in a
/// safetensors file holding `input_ids` and optionally `attention_mask`, `labels`, `position_ids`.
pub fn forward(model_dir: &Path, adapter: Option<&Path>, inputs: &Path, output: &Path, opts: LoadOptions) -> Result<Option<f32>> {
    if crate::tools::seq2seq::is_encoder_decoder(model_dir) {
        if adapter.is_some() {
            return Err(Error::Unsupported("adapters on encoder-decoder models are not supported yet".into()));
        }
        return crate::tools::seq2seq::forward(model_dir, inputs, output, opts);
    }
    let bytes = std::fs::read(inputs).map_err(|e| Error::io(inputs, e))?;
    let st = io::deserialize(inputs, &bytes)?;
    let (input_ids, b, t) = read_ids(&st, inputs, "input_ids")?.ok_or_else(|| Error::tensor(inputs, "input_ids", "missing"))?;
    let other = |name: &str| -> Result<Option<Vec<i32>>> {
        match read_ids(&st, inputs, name)? {
            Some((v, bb, tt)) if (bb, tt) == (b, t) => Ok(Some(v)),
            Some((_, bb, tt)) => Err(Error::tensor(inputs, name, format!("shape [{bb}, {tt}] differs from input_ids' [{b}, {t}]"))),
            None => Ok(None),
        }
    };
    let batch = Batch {
        batch: b,
        seq: t,
        input_ids,
        attention_mask: other("attention_mask")?,
        labels: other("labels")?,
        position_ids: other("position_ids")?,
        ..Batch::default()
    };
    let (logits, loss) = match opts.device.select(false)? {
        crate::model::Selected::Cpu => forward_on(Cpu, model_dir, adapter, inputs, &batch, opts)?,
        crate::model::Selected::Cuda(cuda) => forward_on(cuda, model_dir, adapter, inputs, &batch, opts)?,
    };
    let mut out_bytes: Vec<u8> = Vec::with_capacity(logits.len() * 4);
    logits.iter().for_each(|v| out_bytes.extend_from_slice(&v.to_le_bytes()));
    let v = logits.len() / (b * t).max(1);
    let mut tensors = vec![("logits".to_string(), TensorView::new(StDtype::F32, vec![b, t, v], &out_bytes).map_err(|e| Error::Invalid(e.to_string()))?)];
    let loss_bytes = loss.map(|l| l.mean.to_le_bytes());
    if let Some(lb) = &loss_bytes {
        tensors.push(("loss".to_string(), TensorView::new(StDtype::F32, vec![1], lb).map_err(|e| Error::Invalid(e.to_string()))?));
    }
    let data = safetensors::serialize(tensors, None).map_err(|e| Error::weights(output, e.to_string()))?;
    write_file(output, &data)?;
    Ok(loss.map(|l| l.mean))
}

fn forward_on<B: crate::backend::Backend>(
    be: B,
    model_dir: &Path,
    adapter: Option<&Path>,
    inputs: &Path,
    batch: &Batch,
    opts: LoadOptions,
) -> Result<(Vec<f32>, Option<LossOutput>)> {
    let mut model = Model::load(be, model_dir, opts)?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    model.validate(batch).map_err(|e| Error::weights(inputs, e.to_string()))?;
    let mut acts = Activations::new(&model, batch.batch, batch.seq)?;
    let loss = model.forward(&mut acts, batch, LossOptions::default(), false)?;
    Ok((model.backend.download(&acts.logits)?, loss))
}

/// `runtime tokenize`: what the tokenizer does with each text under the run's settings.
pub fn tokenize(model_dir: &Path, texts: &[String], add_special_tokens: bool, pad: Option<crate::data::PadOptions>) -> Result<String> {
    use crate::data::{pad_batch, Example, Tokenizer};
    let tok = Tokenizer::from_dir(model_dir)?;
    let mut out = String::new();
    let name = |t: &Option<crate::data::tokenizer::SpecialToken>| t.as_ref().map_or("-".to_string(), |s| format!("{:?} ({})", s.text, s.id));
    out += &format!("tokenizer      {} ({} tokens)\n", model_dir.join("tokenizer.json").display(), tok.len());
    out += &format!("special        bos {}, eos {}, pad {}, unk {}\n", name(&tok.bos), name(&tok.eos), name(&tok.pad), name(&tok.unk));
    out += &format!("padding side   {:?}; model_max_length {}\n", tok.padding_side, tok.model_max_length.map_or("-".into(), |l| l.to_string()));
    let mut examples = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let enc = tok.encode(text, add_special_tokens)?;
        out += &format!("\n[{i}] {text:?}\n    {} tokens{}\n", enc.ids.len(), if add_special_tokens { " (special tokens added)" } else { "" });
        for ((id, t), s) in enc.ids.iter().zip(&enc.tokens).zip(&enc.special) {
            out += &format!("    {id:>7}  {t:?}{}\n", if *s == 1 { "  special" } else { "" });
        }
        let back = tok.decode(&enc.ids, false)?;
        let clean = tok.decode(&enc.ids, true)?;
        out += &format!(
            "    decode                      {back:?}\n    decode(skip_special_tokens) {clean:?}{}\n",
            if clean == *text { "  (round trip exact)" } else { "" }
        );
        examples.push(Example { labels: enc.ids.iter().map(|&x| x as i32).collect(), input_ids: enc.ids });
    }
    if let Some(mut opts) = pad {
        opts.pad_id = match (&tok.pad, &tok.eos) {
            (Some(p), _) => p.id,
            (None, Some(e)) => e.id,
            (None, None) => return Err(Error::Invalid("padding needs a pad_token (or an eos_token) in tokenizer_config.json".into())),
        };
        let b = pad_batch(&examples, &opts)?;
        out += &format!(
            "\nbatch {} x {} ({:?} padding on the {:?}{})\n",
            b.batch,
            b.seq,
            opts.padding,
            opts.side,
            opts.max_length.map_or(String::new(), |l| format!(", max_length {l}{}", if opts.truncation { ", truncated" } else { "" }))
        );
        for r in 0..b.batch {
            let row = &b.input_ids[r * b.seq..(r + 1) * b.seq];
            let mask = &b.attention_mask.as_ref().expect("padded batches have a mask")[r * b.seq..(r + 1) * b.seq];
            out += &format!("    input_ids      {row:?}\n    attention_mask {mask:?}\n");
        }
    }
    Ok(out)
}

/// `runtime generate`: decoding with the KV cache under a `GenerationConfig` (the model's
/// `generation_config.json`, overridden by `overrides`), streaming the first prompt's tokens to
/// `out` as they come.
pub fn generate(
    model_dir: &Path,
    adapter: Option<&Path>,
    prompts: &[String],
    chat: bool,
    overrides: &[(String, serde_json::Value)],
    device: Device,
    out: &mut dyn std::io::Write,
) -> Result<Vec<String>> {
    if crate::tools::seq2seq::is_encoder_decoder(model_dir) {
        if adapter.is_some() {
            return Err(Error::Unsupported("adapters on encoder-decoder models are not supported yet".into()));
        }
        return crate::tools::seq2seq::generate(model_dir, prompts, chat, overrides, device, out);
    }
    match device.select(false)? {
        crate::model::Selected::Cpu => generate_on(Cpu, model_dir, adapter, prompts, chat, overrides, out),
        crate::model::Selected::Cuda(cuda) => generate_on(cuda, model_dir, adapter, prompts, chat, overrides, out),
    }
}

fn generate_on<B: crate::backend::Backend>(
    be: B,
    model_dir: &Path,
    adapter: Option<&Path>,
    prompts: &[String],
    chat: bool,
    overrides: &[(String, serde_json::Value)],
    out: &mut dyn std::io::Write,
) -> Result<Vec<String>> {
    let mut model = Model::load(be, model_dir, LoadOptions::default())?;
    if let Some(a) = adapter {
        model.load_adapter(a)?;
    }
    let (tok, cfg, encoded) = generation_inputs(model_dir, model.config.vocab_size, &model.config.raw, prompts, chat, overrides)?;
    let longest = encoded.iter().map(Vec::len).max().unwrap_or(0);
    let max_new = cfg.new_tokens(longest);
    // a prompt longer than the context is refused for every model; GPT-2's learned positions also
    // bound the generated tokens
    let ctx = model.config.max_positions;
    if longest > ctx || (model.config.position_limit().is_some() && longest + max_new > ctx) {
        return Err(Error::Invalid(format!("a prompt of {longest} tokens plus {max_new} new tokens exceeds the model's context ({ctx})")));
    }
    stream_generation(&tok, &cfg, prompts.len(), out, |on_token| crate::generate::generate(&model, &encoded, &cfg, on_token))
}

/// What `runtime generate` decodes with: the model folder's tokenizer, its generation config
/// (with `overrides`, and the EOS and pad ids filled in from the model's config and the
/// tokenizer when it has none) and the encoded prompts (through the chat template with `chat`).
pub(crate) fn generation_inputs(
    model_dir: &Path,
    vocab: usize,
    raw: &serde_json::Map<String, serde_json::Value>,
    prompts: &[String],
    chat: bool,
    overrides: &[(String, serde_json::Value)],
) -> Result<(crate::data::Tokenizer, crate::generate::GenerationConfig, Vec<Vec<u32>>)> {
    use crate::data::chat::ChatTemplate;
    let tok = crate::data::Tokenizer::from_dir(model_dir)?;
    let mut cfg = crate::generate::GenerationConfig::load(model_dir, overrides)?;
    if cfg.eos_ids().is_empty() {
        cfg.eos_token_id = raw.get("eos_token_id").cloned().filter(|v| !v.is_null()).unwrap_or_else(|| serde_json::json!(tok.eos.as_ref().map(|e| e.id)));
    }
    if cfg.pad_token_id.is_none() {
        cfg.pad_token_id = tok.pad.as_ref().map(|t| t.id).or(cfg.eos_ids().first().copied());
    }
    cfg.validate(vocab)?;
    let encoded = prompts
        .iter()
        .map(|p| {
            if chat {
                let tmpl = ChatTemplate::for_tokenizer(&tok)?;
                let text = tmpl.render(&[serde_json::json!({"role": "user", "content": p})], true)?;
                Ok(tok.encode(&text, false)?.ids)
            } else {
                Ok(tok.encode(p, true)?.ids)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((tok, cfg, encoded))
}

/// Runs `decode` (given the per-token callback), printing the first row's text as it grows and
/// the other rows' at the end; returns every row's text (EOS and pad tokens left out, as
/// transformers' `skip_special_tokens` leaves them out).
pub(crate) fn stream_generation(
    tok: &crate::data::Tokenizer,
    cfg: &crate::generate::GenerationConfig,
    batch: usize,
    out: &mut dyn std::io::Write,
    decode: impl FnOnce(&mut dyn FnMut(usize, u32)) -> Result<Vec<Vec<u32>>>,
) -> Result<Vec<String>> {
    let eos = cfg.eos_ids();
    let pad = cfg.pad_token_id.unwrap_or(0);
    let started = std::time::Instant::now();
    let mut shown = String::new();
    let mut first: Vec<u32> = Vec::new();
    let mut count = 0usize;
    let generated = decode(&mut |b, t| {
        count += 1;
        if b == 0 && !eos.contains(&t) && t != pad {
            first.push(t);
            // print what the decoded text gained (tokens may not be whole characters alone)
            if let Ok(text) = tok.decode(&first, true) {
                if text.starts_with(&shown) {
                    let _ = write!(out, "{}", &text[shown.len()..]);
                    let _ = out.flush();
                    shown = text;
                }
            }
        }
    })?;
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(out);
    let texts = generated
        .iter()
        .map(|g| tok.decode(&g.iter().copied().filter(|t| !eos.contains(t) && *t != pad).collect::<Vec<_>>(), true))
        .collect::<Result<Vec<_>>>()?;
    for (i, t) in texts.iter().enumerate().skip(1) {
        let _ = writeln!(out, "[{i}] {t}");
    }
    tracing::info!("{count} tokens in {secs:.2} s ({:.0} tokens/s, batch {batch})", count as f64 / secs);
    Ok(texts)
}
