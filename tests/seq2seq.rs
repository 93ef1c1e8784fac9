//! Encoder-decoder parity with transformers + PyTorch (`tests/parity/make_seq2seq_fixtures.py`):
//! T5 v1.1 (gated GELU, untied head, more decoder than encoder layers), the original T5 (ReLU,
//! tied head with the output rescale) and BART (learned positions, post-LayerNorm with biases,
//! scaled embeddings, `final_logits_bias`, `padding_idx`): relative position buckets, logits,
//! loss, every gradient, AdamW steps, saving, generation.

mod common;

use common::{assert_close, fixtures, read_reference, RefTensor};
use runtime::backend::cpu::Cpu;
use runtime::engine::optimizer::{clip_coefficient, AdamW, AdamWConfig};
use runtime::model::io::hf_tensors;
use runtime::model::seq2seq::{Seq2SeqBatch, Seq2SeqModel};
use runtime::model::t5::relative_bucket;
use runtime::model::{Grads, LoadOptions};
use std::collections::HashMap;

/// Every parity case.
const CASES: [&str; 3] = ["t5", "t5_v1_0", "bart"];

/// The transformers names of the tensors that are not trained (BART's `final_logits_bias`, a
/// buffer in transformers: no gradient, no optimizer state).
fn frozen(model: &Seq2SeqModel<Cpu>) -> Vec<String> {
    model.layout.specs.iter().zip(&model.trainable).filter(|(_, &t)| !t).flat_map(|(s, _)| s.parts.iter().map(|p| p.name.clone())).collect()
}

fn load(name: &str) -> (Seq2SeqModel<Cpu>, HashMap<String, RefTensor>, Seq2SeqBatch) {
    let dir = fixtures().join(name);
    let model = Seq2SeqModel::load(Cpu, &dir.join("model"), LoadOptions::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
    let r = read_reference(&dir.join("reference.safetensors"));
    let (ids, labels) = (&r["input_ids"], &r["labels"]);
    let batch = Seq2SeqBatch {
        batch: ids.shape[0],
        src_len: ids.shape[1],
        tgt_len: labels.shape[1],
        input_ids: ids.i32s(),
        attention_mask: r["attention_mask"].i32s(),
        decoder_input_ids: r["decoder_input_ids"].i32s(),
        labels: labels.i32s(),
    };
    (model, r, batch)
}

#[test]
fn relative_position_buckets_match_transformers() {
    let r = read_reference(&fixtures().join("t5/reference.safetensors"));
    for (nb, md) in [(32, 128), (8, 20)] {
        for bi in [true, false] {
            let want = r[&format!("buckets.{nb}.{md}.{}", if bi { "bi" } else { "causal" })].i32s();
            let ours: Vec<i32> = (-300..=300).map(|rel| relative_bucket(rel, bi, nb, md) as i32).collect();
            assert_eq!(ours, want, "buckets {nb} {md} bidirectional={bi}");
        }
    }
}

#[test]
fn shift_right_matches_transformers() {
    for name in ["t5", "bart"] {
        let (model, _, batch) = load(name);
        let c = &model.config;
        assert_eq!(Seq2SeqBatch::shift_right(&batch.labels, batch.tgt_len, c.decoder_start_token_id, c.pad_token_id), batch.decoder_input_ids, "{name}");
    }
}

fn norm(x: &[f32]) -> f64 {
    x.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
}

/// Rounding noise: a gradient whose norm is below 1e-5 of the largest reference gradient's (BART's
/// key biases: a shift common to all of a query's scores leaves the softmax unchanged, so their
/// gradient is zero in exact arithmetic).
fn noise_level(r: &HashMap<String, RefTensor>) -> f64 {
    1e-5 * r.iter().filter(|(k, _)| k.starts_with("grad.")).map(|(_, t)| norm(&t.f32s())).fold(0.0, f64::max)
}

fn check_forward_backward(name: &str) {
    let (model, r, batch) = load(name);
    let (acts, loss) = model.forward(&batch, 0.0, None).unwrap();
    assert_close(&format!("{name} logits"), &acts.logits, &r["logits"].f32s(), 1e-5);
    let want = r["loss"].values[0];
    assert!(((loss.mean() as f64 - want) / want).abs() < 1e-5, "{name} loss {} vs {want}", loss.mean());

    let mut grads = model.zero_grads().unwrap();
    let (mut acts, _) = model.forward(&batch, 0.0, Some(1.0 / loss.n_tokens as f32)).unwrap();
    model.backward(&mut acts, &batch, &mut grads).unwrap();
    let frozen = frozen(&model);
    let hf: Vec<_> = hf_tensors(&model.layout, &grads).into_iter().filter(|(n, _, _)| !frozen.contains(n)).collect();
    let n = r.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(hf.len(), n, "{name}: every parameter has a gradient");
    let noise = noise_level(&r);
    for (hf_name, _, g) in &hf {
        let want = r[&format!("grad.{hf_name}")].f32s();
        if norm(&want) < noise {
            assert!(norm(g) < noise, "{name} grad {hf_name}: norm {} where transformers has rounding noise ({})", norm(g), norm(&want));
            continue;
        }
        assert_close(&format!("{name} grad {hf_name}"), g, &want, 1e-4);
    }
}

#[test]
fn t5_v1_1_gated_gelu_untied_matches_transformers() {
    check_forward_backward("t5");
}

#[test]
fn t5_v1_0_relu_tied_scaled_matches_transformers() {
    check_forward_backward("t5_v1_0");
}

#[test]
fn bart_matches_transformers() {
    check_forward_backward("bart");
}

/// Three AdamW steps with weight decay (not on norms nor on the relative position bias, as
/// transformers' Trainer decides) and gradient clipping, through the engine's optimizer.
#[test]
fn three_adamw_steps_match_torch() {
    for name in CASES {
        let (mut model, r, batch) = load(name);
        let frozen = frozen(&model);
        let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(name).join("reference.json")).unwrap()).unwrap();
        let f = |k: &str| meta[k].as_f64().unwrap() as f32;
        let cfg = AdamWConfig {
            lr: f("lr"),
            beta1: meta["betas"][0].as_f64().unwrap() as f32,
            beta2: meta["betas"][1].as_f64().unwrap() as f32,
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        };
        let no_decay: Vec<&str> = meta["no_decay"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for spec in &model.layout.specs {
            for part in spec.parts.iter().filter(|p| !frozen.contains(&p.name)) {
                assert_eq!(spec.decay, !no_decay.contains(&part.name.as_str()), "{name}: decay flag of {}", part.name);
            }
        }
        let initial = hf_tensors(&model.layout, &model.tensors().unwrap());
        let mut opt = AdamW::new(&model, cfg).unwrap();
        for step in 0..meta["steps"].as_u64().unwrap() as usize {
            let mut grads = Grads { tensors: model.zero_grads().unwrap() };
            let (_, loss) = model.forward(&batch, 0.0, None).unwrap();
            let (mut acts, _) = model.forward(&batch, 0.0, Some(1.0 / loss.n_tokens as f32)).unwrap();
            model.backward(&mut acts, &batch, &mut grads.tensors).unwrap();
            let (norm, coef) = clip_coefficient(&model.backend, &grads, f("max_grad_norm")).unwrap();
            // the first norm is of the same weights; later ones of weights whose updates agree to
            // ~1e-4 (Adam divides by the gradients' running RMS, amplifying their rounding)
            let (want, tol) = (r["grad_norm"].values[step], if step == 0 { 1e-5 } else { 1e-4 });
            assert!(((norm as f64 - want) / want).abs() < tol, "{name} step {step}: grad norm {norm} vs {want}");
            assert!(norm > f("max_grad_norm"), "{name} step {step}: the fixture should exercise clipping");
            opt.step(&mut model, &grads, cfg.lr, coef).unwrap();
        }
        // the update itself (after - before), so the starting values cannot hide an error; the
        // tolerance is the decoder-only parity's (tests/parity.rs). An element whose first
        // gradient is within ~10x of rounding noise (non-zero, below 1e-6 of its tensor's largest) gets
        // an Adam step of noise-decided sign on both sides: it is held to Adam's bound instead.
        let steps = meta["steps"].as_f64().unwrap() as f32;
        let mut noise_only = 0;
        for ((hf_name, _, p), (_, _, p0)) in hf_tensors(&model.layout, &model.tensors().unwrap()).iter().zip(&initial) {
            if frozen.contains(hf_name) {
                assert_eq!(p, p0, "{name} {hf_name}: not trained");
                continue;
            }
            let g0 = r[&format!("grad.{hf_name}")].f32s();
            // a tensor whose gradient is noise only (BART's key biases) is all exempt
            let noise = norm(&g0) < noise_level(&r);
            let floor = 1e-6 * g0.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let live: Vec<bool> = g0.iter().map(|g| !noise && (*g == 0.0 || g.abs() >= floor)).collect();
            let want = r[&format!("after3.{hf_name}")].f32s();
            for (((a, b), l), c) in p.iter().zip(&want).zip(&live).zip(p0) {
                if !l {
                    noise_only += 1;
                    assert!(
                        (a - c).abs() <= 2.0 * steps * cfg.lr * 1.01 && (b - c).abs() <= 2.0 * steps * cfg.lr * 1.01,
                        "{name} {hf_name}: moved more than Adam can"
                    );
                }
            }
            let pick = |x: &[f32]| -> Vec<f32> { x.iter().zip(p0).zip(&live).filter(|(_, &l)| l).map(|((a, b), _)| a - b).collect() };
            assert_close(&format!("{name} {hf_name} update over 3 steps"), &pick(p), &pick(&want), 3e-4);
        }
        assert!(noise_only * 100 < model.num_parameters(), "{name}: {noise_only} elements exempt as noise");
    }
}

/// `save_pretrained` and back: the same tensors (f32 exactly; bf16 as rounded, in shards with an
/// index), the config's head settings spelled out for transformers 4 and 5, the same logits.
#[test]
fn save_and_load_round_trip() {
    use runtime::model::io::Dtype;
    for name in CASES {
        let (model, _, batch) = load(name);
        let tmp = tempfile::tempdir().unwrap();
        let (f32_dir, bf16_dir) = (tmp.path().join("f32"), tmp.path().join("bf16"));
        model.save(&f32_dir, None, u64::MAX, false).unwrap();
        model.save(&bf16_dir, Some(Dtype::BF16), 40_000, false).unwrap();
        let again = Seq2SeqModel::load(Cpu, &f32_dir, LoadOptions::default()).unwrap();
        assert_eq!(again.tensors().unwrap(), model.tensors().unwrap(), "{name}: f32 round trip");
        assert_eq!((again.config.tied_head, again.config.scale_decoder_outputs), (model.config.tied_head, model.config.scale_decoder_outputs));
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f32_dir.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["tie_word_embeddings"], model.config.tied_head, "{name}");
        if name.starts_with("t5") {
            assert_eq!(cfg["scale_decoder_outputs"], model.config.scale_decoder_outputs, "{name}");
        }
        assert_eq!(again.forward(&batch, 0.0, None).unwrap().0.logits, model.forward(&batch, 0.0, None).unwrap().0.logits);
        assert!(bf16_dir.join("model.safetensors.index.json").is_file(), "{name}: sharded");
        let rounded = Seq2SeqModel::load(Cpu, &bf16_dir, LoadOptions::default()).unwrap();
        let want: Vec<Vec<f32>> = model
            .tensors()
            .unwrap()
            .into_iter()
            .map(|mut t| {
                Dtype::BF16.round(&mut t);
                t
            })
            .collect();
        assert_eq!(rounded.tensors().unwrap(), want, "{name}: bf16 round trip");
        assert_eq!(rounded.dtype, Dtype::BF16);
    }
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().expect("the runtime binary runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// `inspect`, `convert` and `forward` take a T5 folder; `forward` gives transformers' logits and
/// loss, and refuses a batch without targets with one clear error.
#[test]
fn commands_take_t5_folders() {
    let dir = fixtures().join("t5");
    let model = dir.join("model");
    let (ok, out, err) = cli(&["inspect", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("T5ForConditionalGeneration") && out.contains("2 encoder and 3 decoder layers") && out.contains("60,448"), "{out}");
    assert!(out.contains("DenseReluDense") && out.contains("wi_0") && out.contains("untied"), "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let r = read_reference(&dir.join("reference.safetensors"));
    let inputs = tmp.path().join("inputs.safetensors");
    let ids = |name: &str| {
        let t = &r[name];
        let bytes: Vec<u8> = t.values.iter().flat_map(|v| (*v as i64).to_le_bytes()).collect();
        (name.to_string(), t.shape.clone(), bytes)
    };
    let write = |path: &std::path::Path, names: &[&str]| {
        let held: Vec<_> = names.iter().map(|n| ids(n)).collect();
        let views: Vec<_> =
            held.iter().map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, s.clone(), b).unwrap())).collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    };
    write(&inputs, &["input_ids", "attention_mask", "labels"]);
    let output = tmp.path().join("out.safetensors");
    let (ok, out, err) = cli(&["forward", "--model", model.to_str().unwrap(), "--inputs", inputs.to_str().unwrap(), "--output", output.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("loss 14.0598"), "{out}");
    let got = read_reference(&output);
    assert_close("forward logits", &got["logits"].f32s(), &r["logits"].f32s(), 1e-5);

    let sources_only = tmp.path().join("sources.safetensors");
    write(&sources_only, &["input_ids", "attention_mask"]);
    let (ok, _, err) =
        cli(&["forward", "--model", model.to_str().unwrap(), "--inputs", sources_only.to_str().unwrap(), "--output", tmp.path().join("x").to_str().unwrap()]);
    assert!(!ok && err.contains("decoder_input_ids") && err.contains("sources.safetensors"), "{err}");
    assert!(!tmp.path().join("x").exists(), "nothing written");

    let conv = tmp.path().join("conv");
    let (ok, _, err) = cli(&["convert", "--model", model.to_str().unwrap(), "--output_dir", conv.to_str().unwrap(), "--torch_dtype", "bfloat16"]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["inspect", conv.to_str().unwrap()]);
    assert!(ok && out.contains("BF16 on disk"), "{out}{err}");

    // a command that takes decoder-only models says why it refuses this one
    let (ok, _, err) =
        cli(&["merge", "--model", model.to_str().unwrap(), "--adapter", model.to_str().unwrap(), "--output_dir", tmp.path().join("m").to_str().unwrap()]);
    assert!(!ok && err.contains("encoder-decoder model") && err.contains("config.json"), "{err}");
}

/// Greedy decoding (plain and with transformers' logits processors) and beam search against
/// `transformers.generate` on sources of different lengths, token for token.
#[test]
fn generation_matches_transformers() {
    use runtime::generate::seq2seq::generate_seq2seq;
    use runtime::generate::GenerationConfig;
    use serde_json::Value;
    for case in CASES {
        let (model, _, _) = load(case);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("generate.json")).unwrap()).unwrap();
        let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        let rows = |v: &Value| -> Vec<Vec<u32>> { v.as_array().unwrap().iter().map(ids).collect() };
        let sources = rows(&r["sources"]);
        let pad = r["pad_token_id"].as_u64().unwrap();
        // the model folder's generation config (BART's forced BOS and EOS), then the run's settings
        let config = |settings: &Value, max_new: &Value, eos: &Value| -> GenerationConfig {
            let mut overrides: Vec<(String, Value)> = settings.as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            overrides.extend([("max_new_tokens".into(), max_new.clone()), ("eos_token_id".into(), eos.clone()), ("pad_token_id".into(), pad.into())]);
            GenerationConfig::load(&fixtures().join(case).join("model"), &overrides).unwrap()
        };
        let base = config(&serde_json::json!({}), &r["max_new_tokens"], &r["eos_token_id"]);
        if case == "bart" {
            assert_eq!((base.forced_bos_token_id, base.forced_eos_ids()), (Some(0), vec![2]), "BART's generation config");
        }
        let mut streamed = vec![Vec::new(); sources.len()];
        let got = generate_seq2seq(&model, &sources, &base, |b, t| streamed[b].push(t)).unwrap();
        assert_eq!(got, rows(&r["generated"]), "{case}: greedy tokens differ from transformers.generate");
        assert_eq!(streamed, got, "{case}: streamed tokens");
        for run in r["processed"].as_array().unwrap() {
            let cfg = config(&run["settings"], &r["max_new_tokens"], &r["eos_token_id"]);
            assert_eq!(generate_seq2seq(&model, &sources, &cfg, |_, _| {}).unwrap(), rows(&run["generated"]), "{case} with {}", run["settings"]);
        }
        for run in r["beams"].as_array().unwrap() {
            let cfg = config(&run["settings"], &r["beam_max_new_tokens"], &r["beam_eos_token_id"]);
            assert_eq!(generate_seq2seq(&model, &sources, &cfg, |_, _| {}).unwrap(), rows(&run["generated"]), "{case} beam search with {}", run["settings"]);
        }
    }
}

#[test]
fn cached_decode_steps_match_the_full_forward_pass() {
    for case in CASES {
        let (model, r, b) = load(case);
        let sources: Vec<Vec<u32>> = (0..b.batch)
            .map(|i| (0..b.src_len).filter(|&j| b.attention_mask[i * b.src_len + j] == 1).map(|j| b.input_ids[i * b.src_len + j] as u32).collect())
            .collect();
        let v = model.config.vocab_size;
        let want = r["logits"].f32s();
        let mut st = model.decode_start(&sources, b.batch, b.tgt_len + 2).unwrap();
        for t in 0..b.tgt_len {
            let ids: Vec<i32> = (0..b.batch).map(|i| b.decoder_input_ids[i * b.tgt_len + t]).collect();
            let got = model.decode_step(&mut st, &ids).unwrap();
            let at: Vec<f32> = (0..b.batch).flat_map(|i| want[(i * b.tgt_len + t) * v..(i * b.tgt_len + t + 1) * v].to_vec()).collect();
            assert_close(&format!("{case} step {t}"), &got, &at, 1e-5);
        }
    }
}

/// `runtime generate --prompt` with a T5 folder: each prompt is a source (its tokenizer appends
/// `</s>`), and the texts are transformers'.
#[test]
fn generate_command_feeds_the_encoder() {
    for case in CASES {
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("generate.json")).unwrap()).unwrap();
        let cli_case = &r["cli"];
        let model = fixtures().join(case).join("model");
        let mut args = vec!["generate".to_string(), "--model".into(), model.to_str().unwrap().into()];
        for p in cli_case["prompts"].as_array().unwrap() {
            args.extend(["--prompt".to_string(), p.as_str().unwrap().to_string()]);
        }
        args.extend(["--max_new_tokens".to_string(), cli_case["max_new_tokens"].to_string()]);
        let (ok, out, err) = cli(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ok, "{err}");
        let texts: Vec<&str> = cli_case["texts"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0].trim(), texts[0], "{case}: {out}");
        assert_eq!(lines[1].trim(), format!("[1] {}", texts[1]).trim(), "{case}: {out}");
    }
    // absurd sizes: one clear error before any allocation of them
    let model = fixtures().join("t5/model");
    for (k, v) in [("--num_beams", "100000000"), ("--max_new_tokens", "1000000000000")] {
        let (ok, _, err) = cli(&["generate", "--model", model.to_str().unwrap(), "--prompt", "w5 w6", k, v]);
        assert!(!ok && err.contains("GiB of memory is available") && !err.contains("panicked"), "{k} {v}: {err}");
    }
}

/// `run_summarization.py`'s preprocessing and `DataCollatorForSeq2Seq` (given the model) on a
/// small dataset: the same sources, masks, labels and decoder inputs as transformers', with and
/// without truncation and `pad_to_multiple_of`.
#[test]
fn seq2seq_data_matches_transformers_collator() {
    use runtime::data::dataset::read_records;
    use runtime::data::seq2seq::{collate_seq2seq, seq2seq_examples, Seq2SeqColumns};
    use runtime::data::Tokenizer;
    let path = fixtures().join("data/seq2seq.jsonl");
    let records = read_records(&path).unwrap();
    let tok = Tokenizer::from_dir(&fixtures().join("t5/model")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("t5/collate.json")).unwrap()).unwrap();
    let flat = |v: &serde_json::Value| -> Vec<i32> {
        v.as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_i64().unwrap() as i32)).collect()
    };
    for run in r["runs"].as_array().unwrap() {
        let s = &run["settings"];
        let opt = |k: &str| s[k].as_u64().map(|x| x as usize);
        let examples = seq2seq_examples(&path, &records, &tok, &Seq2SeqColumns::default(), opt("max_source_length"), opt("max_target_length")).unwrap();
        let b = collate_seq2seq(&examples, 0, 0, tok.padding_side, opt("pad_to_multiple_of")).unwrap();
        for (name, ours) in
            [("input_ids", &b.input_ids), ("attention_mask", &b.attention_mask), ("labels", &b.labels), ("decoder_input_ids", &b.decoder_input_ids)]
        {
            assert_eq!(ours, &flat(&run[name]), "{name} with {s}");
        }
        assert_eq!(b.batch * b.src_len, b.input_ids.len());
    }
    // a record without a target names the file, the line and the fields it has
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"source\": \"w3\", \"target\": \"w4\"}\n{\"source\": \"w5\", \"summary\": \"w6\"}\n").unwrap();
    let err = seq2seq_examples(&bad, &read_records(&bad).unwrap(), &tok, &Seq2SeqColumns::default(), None, None).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2") && err.contains("no `target` field") && err.contains("summary"), "{err}");
    let cols = Seq2SeqColumns { source: "source".into(), target: "summary".into() };
    let err = seq2seq_examples(&bad, &read_records(&bad).unwrap(), &tok, &cols, None, None).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:1") && err.contains("no `summary` field"), "{err}");
}

/// `runtime init` from a T5 config: transformers' `_init_weights` spreads (written out here from
/// its source), norms at 1, the same folder for the same seed, and a model that loads.
#[test]
fn init_follows_transformers_spreads() {
    let tmp = tempfile::tempdir().unwrap();
    let config = fixtures().join("t5/model/config.json");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for dir in [&a, &b] {
        let (ok, out, err) = cli(&["init", "--config", config.to_str().unwrap(), "--output_dir", dir.to_str().unwrap(), "--seed", "3"]);
        assert!(ok && out.contains("parameters"), "{out}{err}");
    }
    assert_eq!(std::fs::read(a.join("model.safetensors")).unwrap(), std::fs::read(b.join("model.safetensors")).unwrap(), "same seed, same weights");
    let model = Seq2SeqModel::load(Cpu, &a, LoadOptions::default()).unwrap();
    let c = &model.config;
    let (d, dkv, h, ff) = (c.d_model as f32, c.d_kv as f32, c.num_heads as f32, c.d_ff as f32);
    for ((name, _, t), _) in hf_tensors(&model.layout, &model.tensors().unwrap()).iter().zip(0..) {
        let want = if name.contains("layer_norm") {
            assert!(t.iter().all(|&x| x == 1.0), "{name}: ones");
            continue;
        } else if name == "shared.weight" || name == "lm_head.weight" {
            1.0
        } else if name.ends_with(".q.weight") {
            (d * dkv).powf(-0.5)
        } else if name.ends_with(".k.weight") || name.ends_with(".v.weight") || name.contains("wi") || name.contains("relative_attention_bias") {
            d.powf(-0.5)
        } else if name.ends_with(".o.weight") {
            (h * dkv).powf(-0.5)
        } else if name.ends_with("wo.weight") {
            ff.powf(-0.5)
        } else {
            panic!("{name}: no expected spread");
        };
        let n = t.len() as f32;
        let std = (t.iter().map(|x| x * x).sum::<f32>() / n).sqrt();
        // a sample's standard deviation is within 5 standard errors of the truth
        let tol = 5.0 * want / (2.0 * n).sqrt();
        assert!((std - want).abs() < tol, "{name}: std {std} vs {want} (n {n})");
    }
}

/// A pass in the buffers of an earlier one (same shape: reused; another shape: made anew) gives
/// exactly a fresh pass's logits and gradients.
#[test]
fn passes_reusing_buffers_equal_fresh_ones() {
    let (model, _, batch) = load("t5");
    let pass = |reuse, b: &Seq2SeqBatch| {
        let (_, loss) = model.forward(b, 0.0, None).unwrap();
        let (mut acts, _) = model.forward_reusing(reuse, b, 0.1, Some(1.0 / loss.n_tokens as f32)).unwrap();
        let mut grads = model.zero_grads().unwrap();
        model.backward(&mut acts, b, &mut grads).unwrap();
        (acts, grads)
    };
    let (acts, fresh) = pass(None, &batch);
    let (acts, again) = pass(Some(acts), &batch);
    assert_eq!(again, fresh, "same shape, reused buffers");
    let (acts, _) = pass(Some(acts), &batch);
    // the first two rows: other shapes, so new buffers
    let two = Seq2SeqBatch {
        batch: 2,
        input_ids: batch.input_ids[..2 * batch.src_len].to_vec(),
        attention_mask: batch.attention_mask[..2 * batch.src_len].to_vec(),
        decoder_input_ids: batch.decoder_input_ids[..2 * batch.tgt_len].to_vec(),
        labels: batch.labels[..2 * batch.tgt_len].to_vec(),
        ..batch.clone()
    };
    let (_, fresh_two) = pass(None, &two);
    let (_, reused_two) = pass(Some(acts), &two);
    assert_eq!(reused_two, fresh_two, "another shape");
}

/// Dropout is part of the function the gradients are of: with a training pass's masks fixed
/// (`dropout_rate` 0.2, both model variants), every tensor's largest gradient entry and two random
/// ones match central differences of the loss; the masks change the loss, the same key gives the
/// same loss, and evaluation (no key) has no dropout.
#[test]
fn gradients_with_dropout_match_finite_differences() {
    use rand::{RngExt, SeedableRng};
    for name in CASES {
        let (mut model, _, batch) = load(name);
        model.config.dropout_rate = 0.2;
        if name == "bart" {
            // BART's own probabilities, at each of its sites
            (model.config.attention_dropout, model.config.activation_dropout) = (Some(0.15), Some(0.1));
        }
        let key = Some(17);
        let loss = |m: &Seq2SeqModel<Cpu>, key: Option<u64>| m.forward_dropping(None, &batch, 0.0, None, key).unwrap().1.mean() as f64;
        let (with, again, without) = (loss(&model, key), loss(&model, key), loss(&model, None));
        assert_eq!(with, again, "{name}: the same key draws the same masks");
        assert!((with - without).abs() > 1e-4, "{name}: dropout had no effect ({with} vs {without})");
        let n = batch.labels.iter().filter(|&&l| l != -100).count();
        let (mut acts, _) = model.forward_dropping(None, &batch, 0.0, Some(1.0 / n as f32), key).unwrap();
        let mut grads = model.zero_grads().unwrap();
        model.backward(&mut acts, &batch, &mut grads).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let h = 3e-3f32; // small enough not to cross the ReLU variant's kinks
        let mut checked = 0;
        for (i, g) in grads.iter().enumerate().filter(|(i, _)| model.trainable[*i]) {
            let g = g.clone();
            let biggest = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
            for j in [biggest, rng.random_range(0..g.len()), rng.random_range(0..g.len())] {
                let orig = model.params[i][j];
                model.params[i][j] = orig + h;
                let up = loss(&model, key);
                model.params[i][j] = orig - h;
                let down = loss(&model, key);
                model.params[i][j] = orig;
                let (fd, an) = ((up - down) / (2.0 * h as f64), g[j] as f64);
                let spec = &model.layout.specs[i].name;
                assert!((fd - an).abs() <= 1e-3 + 3e-2 * an.abs(), "{name} {spec}[{j}]: analytic {an:.6e} vs finite difference {fd:.6e}");
                checked += 1;
            }
        }
        assert!(checked >= 3 * model.trainable.iter().filter(|&&t| t).count());
    }
}

/// Gradient checkpointing (one layer's state kept, each layer recomputed in the backward pass)
/// gives the same loss and gradients, bit for bit, with dropout on, over two passes in the same
/// buffers.
#[test]
fn gradient_checkpointing_gives_the_same_gradients() {
    for name in ["t5", "t5_v1_0"] {
        let (mut model, _, batch) = load(name);
        model.config.dropout_rate = 0.1;
        let n = batch.labels.iter().filter(|&&l| l != -100).count();
        let run = |m: &Seq2SeqModel<Cpu>| {
            let mut grads = m.zero_grads().unwrap();
            let mut reuse = None;
            let mut losses = Vec::new();
            for key in [3, 4] {
                let (mut acts, loss) = m.forward_dropping(reuse.take(), &batch, 0.0, Some(1.0 / n as f32), Some(key)).unwrap();
                m.backward(&mut acts, &batch, &mut grads).unwrap();
                losses.push(loss.sum);
                reuse = Some(acts);
            }
            (losses, grads)
        };
        let plain = run(&model);
        model.gradient_checkpointing = true;
        let checkpointed = run(&model);
        assert_eq!(plain.0, checkpointed.0, "{name}: losses");
        assert!(plain.1 == checkpointed.1, "{name}: gradients differ with gradient checkpointing");
    }
}

/// `inspect`, `init` and `forward` take a BART folder; a BART config the runtime cannot run as
/// transformers does is one error naming the field.
#[test]
fn commands_take_bart_folders() {
    let dir = fixtures().join("bart");
    let model = dir.join("model");
    let (ok, out, err) = cli(&["inspect", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    // transformers' num_parameters() (final_logits_bias is a buffer)
    assert!(out.contains("BartForConditionalGeneration") && out.contains("55,248") && out.contains("learned, at most 40"), "{out}");
    assert!(out.contains("self_attn_layer_norm") && out.contains("final_logits_bias"), "{out}");

    let tmp = tempfile::tempdir().unwrap();
    let fresh = tmp.path().join("fresh");
    let (ok, _, err) = cli(&["init", "--config", model.join("config.json").to_str().unwrap(), "--output_dir", fresh.to_str().unwrap()]);
    assert!(ok, "{err}");
    let m = Seq2SeqModel::load(Cpu, &fresh, LoadOptions::default()).unwrap();
    let t = m.tensors().unwrap();
    let (pad, d) = (m.config.pad_token_id, m.config.d_model);
    assert!(t[m.layout.shared][pad * d..(pad + 1) * d].iter().all(|&x| x == 0.0), "the padding_idx row starts at zero");
    let bias = m.layout.logits_bias.unwrap();
    assert!(t[bias].iter().all(|&x| x == 0.0) && !m.trainable[bias], "final_logits_bias: zeros, not trained");
    let std = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let (q, init_std) = (m.layout.encoder.layers[0].q, m.config.raw["init_std"].as_f64().unwrap() as f32);
    assert!((std(&t[q.w]) / init_std - 1.0).abs() < 0.1 && t[q.b.unwrap()].iter().all(|&x| x == 0.0), "init_std spread, zero biases");

    // a folder without final_logits_bias (transformers ignores its absence): zeros
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(model.join("config.json"), bare.join("config.json")).unwrap();
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&weights).unwrap();
    let kept: Vec<_> = st.tensors().into_iter().filter(|(n, _)| n != "final_logits_bias").collect();
    std::fs::write(bare.join("model.safetensors"), safetensors::serialize(kept, None).unwrap()).unwrap();
    let b = Seq2SeqModel::load(Cpu, &bare, LoadOptions::default()).unwrap();
    assert!(b.tensors().unwrap()[bias].iter().all(|&x| x == 0.0));

    let raw: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    for (field, value, expected) in [
        ("decoder_ffn_dim", serde_json::json!(64), "`encoder_ffn_dim` = 48 and `decoder_ffn_dim` = 64 differ"),
        ("encoder_layerdrop", serde_json::json!(0.1), "LayerDrop is not supported"),
        ("activation_function", serde_json::json!("swish"), "unsupported `activation_function` `swish`"),
        ("d_model", serde_json::json!(30), "`d_model` = 30 is not a multiple of the 4 attention heads"),
    ] {
        let mut bad = raw.clone();
        bad[field] = value;
        let path = tmp.path().join(format!("{field}.json"));
        std::fs::write(&path, bad.to_string()).unwrap();
        let (ok, _, err) = cli(&["init", "--config", path.to_str().unwrap(), "--output_dir", tmp.path().join(field).to_str().unwrap()]);
        assert!(!ok && err.contains(expected) && err.contains(&format!("{field}.json")) && !err.contains("panicked"), "{field}: {err}");
    }
}

/// `runtime cuda-check`'s encoder-decoder part runs on any backend: the CPU against itself
/// (dropout, label smoothing, decoding with reordered beams) agrees exactly, every pass being
/// deterministic; on a GPU the same harness compares the CUDA kernels.
#[test]
fn device_parity_harness_runs_and_the_cpu_is_deterministic() {
    let checks = runtime::tools::seq2seq::device_parity(&Cpu, false).unwrap();
    assert_eq!(checks.len(), 6, "loss, gradients and decoding for T5 and BART");
    for c in &checks {
        assert!(c.pass && c.rel_err == 0.0, "{} {} {}: {}", c.op, c.case, c.output, c.rel_err);
    }
}
