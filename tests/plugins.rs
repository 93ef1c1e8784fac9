//! Plugins in process: the shipped loss plugins (built here from `plugins/` for wasm32-wasip2)
//! against PyTorch, and the sandbox against the hostile ones in `tests/plugins/`. Plugins through
//! `runtime train`, `eval` and `predict`: `tests/plugin_runs.rs`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{assert_close, fixtures, read_reference, wasm_plugins};
use runtime::backend::cpu::Cpu;
use runtime::model::decoder::CustomLoss;
use runtime::model::io::hf_tensors;
use runtime::model::{Activations, Batch, Grads, LoadOptions, Model};
use runtime::plugin::roles::Plugins;
use runtime::plugin::{Hook, Limits, Plugin, PluginSpec, TokenBatch};
use serde_json::{json, Value};

fn wasm(name: &str) -> PathBuf {
    wasm_plugins().join(format!("{name}.wasm"))
}

// ---------------------------------------------------------------- loss plugins vs PyTorch

/// Every parameter gradient of the Llama parity model under each loss plugin matches PyTorch
/// autograd on the same loss (`tests/parity/make_plugin_fixtures.py`).
#[test]
fn loss_plugins_match_pytorch_gradients() {
    let dir = fixtures().join("llama");
    let reference = read_reference(&dir.join("reference.safetensors"));
    let want = read_reference(&fixtures().join("plugins/reference.safetensors"));
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(fixtures().join("plugins/reference.json")).unwrap()).unwrap();
    let model = Model::load(Cpu, &dir.join("model"), LoadOptions::default()).unwrap();
    let weights: Vec<f64> = meta["weights"].as_array().unwrap().iter().map(|w| w.as_f64().unwrap()).collect();
    let batch = Batch { columns: vec![("weight".into(), weights)], ..common::reference_batch(&reference) };
    let cases = [
        ("focal", "focal_loss", json!({"gamma": meta["gamma"]})),
        ("weighted", "weighted_ce", json!({"column": "weight"})),
        ("zloss", "z_loss", json!({"alpha": meta["alpha"]})),
    ];
    for (name, file, options) in cases {
        let plugins = Plugins::load(&[json!({"path": wasm(file), "options": options})], None).unwrap();
        let mut hook = plugins.loss_hook().unwrap();
        let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let mut grads = Grads::zeros(&model).unwrap();
        let out = model.forward_custom(&mut acts, &batch, &mut CustomLoss::Stats(&mut hook), None, true).unwrap();
        model.backward(&mut acts, &mut grads).unwrap();
        let loss = want[&format!("{name}.loss")].values[0];
        assert!(((out.mean as f64 - loss) / loss).abs() < 1e-5, "{name}: loss {} vs PyTorch {loss}", out.mean);
        for (hf_name, _, g) in &hf_tensors(&model.layout, &grads.tensors) {
            assert_close(&format!("{name} grad {hf_name}"), g, &want[&format!("{name}.grad.{hf_name}")].f32s(), 1e-4);
        }
    }
}

/// Cross-entropy through the `loss-logits` hook in training, with the LM head in chunks (one
/// that leaves a shorter last chunk, and one chunk for the whole batch), gives the built-in
/// loss's value and every parameter gradient.
#[test]
fn a_loss_logits_hook_in_lm_head_chunks_matches_the_built_in_loss() {
    let dir = fixtures().join("llama");
    let reference = read_reference(&dir.join("reference.safetensors"));
    let mut model = Model::load(Cpu, &dir.join("model"), LoadOptions::default()).unwrap();
    let batch = common::reference_batch(&reference);
    let rows = batch.batch * batch.seq;
    let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
    let mut want = Grads::zeros(&model).unwrap();
    let built_in = model.forward_backward(&mut acts, &batch, &mut want, Default::default()).unwrap();
    let plugins = Plugins::load(&[json!({"path": wasm("rows_ce")})], None).unwrap();
    let mut hook = plugins.loss_hook().unwrap();
    assert!(hook.uses_rows());
    for chunk in [rows / 3 + 1, rows] {
        model.loss_chunk_rows = Some(chunk);
        let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let mut grads = Grads::zeros(&model).unwrap();
        let out = model.forward_backward_custom(&mut acts, &batch, &mut grads, &mut CustomLoss::Rows(&mut hook), None, None, &mut |_, _| {}).unwrap();
        assert!(((out.sum - built_in.sum) / built_in.sum).abs() < 1e-5, "chunk {chunk}: loss sum {} vs built-in {}", out.sum, built_in.sum);
        assert_eq!(out.n_tokens, built_in.n_tokens);
        for ((name, _, g), (_, _, w)) in hf_tensors(&model.layout, &grads.tensors).iter().zip(hf_tensors(&model.layout, &want.tensors)) {
            assert_close(&format!("chunk {chunk}: grad {name}"), g, &w, 1e-4);
        }
    }
}

/// Evaluation with a custom loss and the LM head in chunks gives the loss and metric statistics
/// of the whole-logits path, for a statistics hook (focal) and a `loss-logits` hook.
#[test]
fn evaluation_with_a_custom_loss_in_lm_head_chunks_matches_the_whole_logits() {
    use runtime::backend::StatsWanted;
    let dir = fixtures().join("llama");
    let reference = read_reference(&dir.join("reference.safetensors"));
    let mut model = Model::load(Cpu, &dir.join("model"), LoadOptions::default()).unwrap();
    let batch = common::reference_batch(&reference);
    let rows = batch.batch * batch.seq;
    let want = StatsWanted { label_logprob: true, argmax: true, ..StatsWanted::default() };
    for (file, options) in [("focal_loss", json!({"gamma": 2.0})), ("rows_ce", json!({}))] {
        let plugins = Plugins::load(&[json!({"path": wasm(file), "options": options})], None).unwrap();
        let mut hook = plugins.loss_hook().unwrap();
        let uses_rows = hook.uses_rows();
        model.loss_chunk_rows = None;
        let mut full = Activations::new(&model, batch.batch, batch.seq).unwrap();
        let mut custom = if uses_rows { CustomLoss::Rows(&mut hook) } else { CustomLoss::Stats(&mut hook) };
        let whole = model.forward_custom(&mut full, &batch, &mut custom, None, false).unwrap();
        let whole_stats = model.token_stats(&full, want).unwrap();
        for chunk in [rows / 3 + 1, 1] {
            model.loss_chunk_rows = Some(chunk);
            let mut acts = Activations::new(&model, batch.batch, batch.seq).unwrap();
            let (out, stats) = model.eval_custom(&mut acts, &batch, &mut custom, Some(want)).unwrap();
            assert!(((out.sum - whole.sum) / whole.sum).abs() < 1e-5, "{file} chunk {chunk}: loss {} vs {}", out.sum, whole.sum);
            let stats = stats.unwrap();
            assert_eq!(stats.argmax, whole_stats.argmax, "{file} chunk {chunk}: argmax");
            assert_close(&format!("{file} chunk {chunk}: label log-probs"), &stats.label_logprob, &whole_stats.label_logprob, 1e-5);
        }
    }
}

// ---------------------------------------------------------------- the sandbox

fn hostile(mode: &str, limits: Limits) -> Plugin {
    let mut spec = PluginSpec::new(wasm("hostile"));
    spec.options.insert("mode".into(), mode.into());
    spec.limits = limits;
    Plugin::load(&spec, None).unwrap()
}

fn token_batch() -> TokenBatch {
    TokenBatch {
        batch_size: 1,
        seq_len: 4,
        vocab_size: 10,
        labels: vec![1, 2, 3, -100],
        label_logprob: vec![-1.0, -2.0, -0.5, 0.0],
        logsumexp: vec![],
        mean_logprob: vec![],
        entropy: vec![],
        argmax: vec![],
        columns: vec![],
        num_items_in_batch: 3,
    }
}

/// The error from one hostile call, and how long it took.
fn hostile_error(mode: &str, limits: Limits) -> (String, Duration, Plugin) {
    let mut p = hostile(mode, limits);
    let t = Instant::now();
    let err = p.compute_loss(&token_batch()).expect_err(mode).to_string();
    (err, t.elapsed(), p)
}

fn expect(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "expected `{part}` in: {err}");
    }
}

/// After a failure the same plugin object answers the next call from a fresh instance.
fn still_works(p: &mut Plugin) {
    // the hostile plugin's metrics hook returns an infinite value: a checked, clean error
    let err = p.metrics_compute().unwrap_err().to_string();
    expect(&err, &["plugin `hostile`", "metrics.compute", "metric `bad` is inf"]);
}

#[test]
fn an_infinite_loop_hits_the_time_cap() {
    let limits = Limits { call_timeout: Duration::from_millis(300), ..Limits::default() };
    let (err, took, mut p) = hostile_error("spin", limits);
    expect(&err, &["plugin `hostile`", "loss.compute-loss", "time cap of 0.300 s"]);
    assert!(took < Duration::from_secs(3), "the time cap took {took:?}");
    still_works(&mut p);
}

#[test]
fn unbounded_memory_growth_hits_the_memory_cap() {
    let limits = Limits { memory_bytes: 64 << 20, ..Limits::default() };
    let (err, _, mut p) = hostile_error("grow", limits);
    expect(&err, &["plugin `hostile`", "loss.compute-loss", "memory cap of 64 MiB"]);
    still_works(&mut p);
}

#[test]
fn a_one_gib_return_value_is_stopped_by_the_default_memory_cap() {
    let (err, _, mut p) = hostile_error("huge", Limits::default());
    expect(&err, &["loss.compute-loss", "memory cap of 512 MiB"]);
    still_works(&mut p);
}

#[test]
fn a_trap_names_the_plugin_hook_and_panic_message() {
    let (err, _, mut p) = hostile_error("trap", Limits::default());
    expect(&err, &["plugin `hostile`", "loss.compute-loss", "trapped", "this plugin always panics"]);
    still_works(&mut p);
}

#[test]
fn invalid_results_are_refused() {
    let (err, _, _) = hostile_error("bad-grad-len", Limits::default());
    expect(&err, &["loss.compute-loss", "`d-label-logprob` has 5 values, expected 4"]);
    let (err, _, _) = hostile_error("nan-loss", Limits::default());
    expect(&err, &["loss.compute-loss", "the loss is NaN"]);
}

#[test]
fn files_sockets_and_the_environment_are_out_of_reach() {
    let (err, _, _) = hostile_error("read-file", Limits::default());
    expect(&err, &["the plugin reported an error", "reading /etc/passwd failed"]);
    assert!(!err.contains("BREACH"), "{err}");
    let (err, _, _) = hostile_error("socket", Limits::default());
    expect(&err, &["the plugin reported an error", "connecting to 127.0.0.1:22 failed"]);
    assert!(!err.contains("BREACH"), "{err}");
    // SAFETY: set before any thread of this test reads the environment; other tests do not
    // depend on this variable
    unsafe { std::env::set_var("PLUGIN_SANDBOX_SECRET", "1") };
    let (err, _, _) = hostile_error("env", Limits::default());
    expect(&err, &["sees 0 environment variables [] and 0 arguments"]);
}

#[test]
fn output_is_captured_and_a_good_call_succeeds() {
    let mut p = hostile("print", Limits::default());
    let out = p.compute_loss(&token_batch()).unwrap();
    assert_eq!(out.loss, 1.0);
    assert!(p.has_hook(Hook::Loss) && p.has_hook(Hook::Metrics) && !p.has_hook(Hook::Padding));
    // an undeclared hook is never called
    let err =
        p.pad(&[], &runtime::plugin::WitPadOptions { side: runtime::plugin::Side::Right, pad_token_id: 0, max_length: None, pad_to_multiple_of: None }, 10, 10);
    expect(&err.unwrap_err().to_string(), &["padding.pad", "does not declare this hook"]);
}

#[test]
fn an_unsupported_interface_version_is_refused_with_the_supported_list() {
    let err = Plugin::load(&PluginSpec::new(wasm("wrong_version")), None).err().unwrap().to_string();
    expect(&err, &["wrong_version.wasm", "built for trainer:plugin@9.0.0", "it supports trainer:plugin@0.1.0"]);
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), b"\0asm not really").unwrap();
    let err = Plugin::load(&PluginSpec::new(junk.path()), None).err().unwrap().to_string();
    expect(&err, &["not a loadable WebAssembly component"]);
}

#[test]
fn the_compile_cache_makes_the_second_start_faster() {
    let cache = tempfile::tempdir().unwrap();
    // the cache folder is read from the environment at each load
    // SAFETY: the variable only redirects the compile cache, which every test tolerates
    unsafe { std::env::set_var("RUNTIME_PLUGIN_CACHE_DIR", cache.path()) };
    let spec = PluginSpec::new(wasm("focal_loss"));
    let cold = Plugin::load(&spec, None).unwrap();
    let warm = Plugin::load(&spec, None).unwrap();
    assert!(!cold.cache_hit && warm.cache_hit, "second load should come from the cache");
    assert!(warm.load_time < cold.load_time, "cached start {:?} vs cold {:?}", warm.load_time, cold.load_time);
    // a damaged cache entry is recompiled, not trusted
    for e in std::fs::read_dir(cache.path()).unwrap().flatten() {
        let mut b = std::fs::read(e.path()).unwrap();
        let n = b.len() / 2;
        b[n] ^= 0xff;
        std::fs::write(e.path(), b).unwrap();
    }
    let again = Plugin::load(&spec, None).unwrap();
    assert!(!again.cache_hit);
}
