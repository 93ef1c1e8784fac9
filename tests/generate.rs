//! Greedy generation with the KV cache against `transformers.generate` (the fixture from
//! `tests/parity/make_generate_fixtures.py`): left-padded prompts of different lengths on the three
//! parity models, token for token; and the cache against full forward passes.

mod common;

use runtime::backend::cpu::Cpu;
use runtime::backend::AttnImpl;
use runtime::generate::{decode_step, generate, greedy, DecodeState, GenerationConfig, GreedyOptions};
use runtime::model::{Activations, Batch, LoadOptions, LossOptions, Model};
use serde_json::Value;

fn load(case: &str) -> Model<Cpu> {
    Model::load(Cpu, &common::fixtures().join(case).join("model"), LoadOptions { attn_implementation: AttnImpl::Eager, ..LoadOptions::default() }).unwrap()
}

#[test]
fn greedy_matches_transformers_generate() {
    for case in ["gpt2", "llama", "qwen2"] {
        let model = load(case);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join(case).join("generate.json")).unwrap()).unwrap();
        let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        let prompts: Vec<Vec<u32>> = r["prompts"].as_array().unwrap().iter().map(ids).collect();
        let want: Vec<Vec<u32>> = r["generated"].as_array().unwrap().iter().map(ids).collect();
        let opts = GreedyOptions {
            max_new_tokens: r["max_new_tokens"].as_u64().unwrap() as usize,
            eos_token_id: vec![r["eos_token_id"].as_u64().unwrap() as u32],
            pad_token_id: r["pad_token_id"].as_u64().unwrap() as u32,
        };
        let mut streamed = vec![Vec::new(); prompts.len()];
        let got = greedy(&model, &prompts, &opts, |b, t| streamed[b].push(t)).unwrap();
        assert_eq!(got, want, "{case}: greedy tokens differ from transformers.generate");
        assert_eq!(streamed, want, "{case}: streamed tokens");
        // with transformers' logits processors: repetition penalty, n-gram ban, minimum length
        for run in r["processed"].as_array().unwrap() {
            let mut cfg: GenerationConfig = serde_json::from_value(run["settings"].clone()).unwrap();
            cfg.max_new_tokens = Some(opts.max_new_tokens);
            cfg.eos_token_id = serde_json::json!(opts.eos_token_id);
            cfg.pad_token_id = Some(opts.pad_token_id);
            let want: Vec<Vec<u32>> = run["generated"].as_array().unwrap().iter().map(ids).collect();
            assert_eq!(generate(&model, &prompts, &cfg, |_, _| {}).unwrap(), want, "{case} with {}", run["settings"]);
        }
    }
}

/// Beam search against `transformers.generate` with `num_beams` > 1: length penalties of both
/// signs, each early-stopping mode, logits processors and `num_return_sequences`, on a batch of
/// left-padded prompts whose beams reach EOS at different steps.
#[test]
fn beam_search_matches_transformers_generate() {
    for case in ["gpt2", "llama", "qwen2"] {
        let model = load(case);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(common::fixtures().join(case).join("generate.json")).unwrap()).unwrap();
        let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
        let prompts: Vec<Vec<u32>> = r["prompts"].as_array().unwrap().iter().map(ids).collect();
        for run in r["beams"].as_array().unwrap() {
            let mut cfg: GenerationConfig = serde_json::from_value(run["settings"].clone()).unwrap();
            cfg.max_new_tokens = Some(r["beam_max_new_tokens"].as_u64().unwrap() as usize);
            cfg.eos_token_id = r["beam_eos_token_id"].clone();
            cfg.pad_token_id = Some(r["pad_token_id"].as_u64().unwrap() as u32);
            let want: Vec<Vec<u32>> = run["generated"].as_array().unwrap().iter().map(ids).collect();
            assert_eq!(generate(&model, &prompts, &cfg, |_, _| {}).unwrap(), want, "{case} beam search with {}", run["settings"]);
        }
    }
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let model = load("llama");
    let prompts = vec![vec![5, 9, 17], vec![40]];
    let base = GenerationConfig { max_new_tokens: Some(12), eos_token_id: serde_json::json!(2), pad_token_id: Some(0), ..GenerationConfig::default() };
    let greedy_out = generate(&model, &prompts, &base, |_, _| {}).unwrap();
    let top1 = GenerationConfig { do_sample: true, top_k: 1, seed: Some(3), ..base.clone() };
    assert_eq!(generate(&model, &prompts, &top1, |_, _| {}).unwrap(), greedy_out);
    let hot = GenerationConfig { do_sample: true, temperature: 5.0, top_k: 0, top_p: 0.95, seed: Some(3), ..base.clone() };
    let a = generate(&model, &prompts, &hot, |_, _| {}).unwrap();
    assert_eq!(a, generate(&model, &prompts, &hot, |_, _| {}).unwrap(), "same seed, same samples");
    assert_ne!(a, greedy_out, "sampling at temperature 5 stayed greedy");
    let other = GenerationConfig { seed: Some(4), ..hot.clone() };
    assert_ne!(a, generate(&model, &prompts, &other, |_, _| {}).unwrap(), "another seed, other samples");
    // bad settings are refused before any work
    for (cfg, needle) in [
        (GenerationConfig { top_p: 1.5, ..base.clone() }, "top_p"),
        (GenerationConfig { do_sample: true, temperature: 0.0, ..base.clone() }, "temperature"),
        (GenerationConfig { num_beams: 0, ..base.clone() }, "num_beams"),
        (GenerationConfig { eos_token_id: serde_json::json!([2, 5000]), ..base.clone() }, "5000"),
    ] {
        let e = generate(&model, &prompts, &cfg, |_, _| {}).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
}

/// The logits of each cached decoding step equal the full forward pass's at that position.
#[test]
fn kv_cache_steps_match_the_full_forward_pass() {
    for case in ["gpt2", "llama", "qwen2"] {
        let model = load(case);
        let v = model.config.vocab_size;
        let seq: Vec<i32> = (0..9).map(|i| (i * 7 + 3) % v as i32).collect();
        let mut acts = Activations::new(&model, 1, seq.len()).unwrap();
        let batch = Batch { batch: 1, seq: seq.len(), input_ids: seq.clone(), ..Batch::default() };
        model.forward(&mut acts, &batch, LossOptions::default(), false).unwrap();
        let mut st = DecodeState::new(&model, 1, seq.len()).unwrap();
        for (t, &id) in seq.iter().enumerate() {
            let step = decode_step(&model, &mut st, &[id], &[1]).unwrap();
            common::assert_close(&format!("{case} position {t}"), &step, &acts.logits[t * v..(t + 1) * v], 1e-5);
        }
        assert!(decode_step(&model, &mut st, &[1], &[1]).unwrap_err().to_string().contains("full"));
    }
}

#[test]
fn generate_command_streams_text_and_reports_speed() {
    let model = common::fixtures().join("trainer").join("init");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "12+30=", "--prompt", "7+8=", "--max_new_tokens", "4"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.lines().count() == 2 && stdout.contains("[1] "), "{stdout}");
    assert!(stderr.contains("tokens/s"), "{stderr}");
    // --chat needs a chat template, and says so
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["generate", "--model", model.to_str().unwrap(), "--prompt", "hi", "--chat"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("chat_template") && !stderr.contains("panicked"), "{stderr}");
}
