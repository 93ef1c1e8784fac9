//! `runtime train` on a T5 and a BART against `transformers.Seq2SeqTrainer` (the fixture from
//! `tests/parity/make_seq2seq_trainer_fixtures.py`): the same initial T5 v1.1 (or BART),
//! digit-reversal data and arguments (warmup + cosine, weight decay, clipping, sequential
//! sampling; plain, label smoothing, gradient accumulation; BART plain); the logged loss, gradient norm and learning rate of every
//! step, the evaluation losses and the final weights must agree, and `runtime predict` on the
//! trained model must generate what `Seq2SeqTrainer.predict` generated (`predict_with_generate`,
//! two beams). Also: exact resume, the errors for bad input, loss plugins, and the `reverse` example.

mod common;

use std::path::Path;

use common::trainer_case::{flag, runtime, train_and_compare};
use serde_json::Value;

/// `runtime predict` with the case's generation settings on the trained model in `out`: the
/// generated ids of each example, by index.
fn predictions(dir: &Path, case: &Value, out: &Path) -> Vec<Vec<u64>> {
    let pred = out.join("predict");
    let mut args: Vec<String> = vec!["predict".into(), "--model".into(), out.to_str().unwrap().into()];
    args.extend(flag("test_file", &Value::String(dir.join("data/validation.jsonl").to_str().unwrap().into())));
    args.extend(flag("output_dir", &Value::String(pred.to_str().unwrap().into())));
    for k in ["generation_max_length", "generation_num_beams", "per_device_eval_batch_size"] {
        args.extend(flag(k, &case["args"][k]));
    }
    let o = runtime(&args);
    assert!(o.status.success(), "predict: {}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(pred.join("generated_predictions.jsonl")).unwrap();
    let mut rows: Vec<(u64, Vec<u64>)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["index"].as_u64().unwrap(), v["prediction_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
        })
        .collect();
    rows.sort();
    rows.into_iter().map(|r| r.1).collect()
}

#[test]
fn runtime_train_matches_seq2seq_trainer() {
    let dir = common::fixtures().join("seq2seq_trainer");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let mut generated = 0;
    for (name, case) in refs["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        train_and_compare(&dir, name, case, &out, 36);
        if let Some(expected) = case.get("predictions") {
            let expected: Vec<Vec<u64>> = serde_json::from_value(expected.clone()).unwrap();
            assert_eq!(predictions(&dir, case, &out), expected, "{name}: generated ids");
            generated += expected.len();
        }
    }
    assert!(generated >= 32, "only {generated} generated rows compared");
    assert!(refs["cases"].get("bart").is_some(), "the BART case is in the fixture");
}

fn s(x: &str) -> String {
    x.to_string()
}

/// Training arguments for the tiny fixture T5 on the fixture's data, into `out`.
fn tiny_run(out: &Path, extra: &[&str]) -> Vec<String> {
    let dir = common::fixtures().join("seq2seq_trainer");
    let mut args = vec![s("train"), s("--disable_tqdm"), s("true"), s("--output_dir"), out.to_str().unwrap().into()];
    for (k, v) in [("model_name_or_path", "init"), ("train_file", "data/train.jsonl"), ("validation_file", "data/validation.jsonl")] {
        args.extend(flag(k, &Value::String(dir.join(v).to_str().unwrap().into())));
    }
    args.extend(["--per_device_train_batch_size", "4", "--learning_rate", "5e-3", "--max_steps", "6", "--save_steps", "3", "--logging_steps", "1"].map(s));
    args.extend(extra.iter().map(|x| s(x)));
    args
}

/// A run with dropout stopped at a checkpoint and resumed ends with the same weights, bit for
/// bit, as the run that went straight through (the masks are a function of the seed, the step and
/// the micro-batch); the dropout changes the run.
#[test]
fn resume_from_checkpoint_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let init = common::fixtures().join("seq2seq_trainer/init");
    let dropping = tmp.path().join("init");
    std::fs::create_dir_all(&dropping).unwrap();
    for e in std::fs::read_dir(&init).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dropping.join(e.file_name())).unwrap();
    }
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(init.join("config.json")).unwrap()).unwrap();
    config["dropout_rate"] = 0.1.into();
    std::fs::write(dropping.join("config.json"), config.to_string()).unwrap();
    let model = ["--model_name_or_path", dropping.to_str().unwrap(), "--gradient_accumulation_steps", "2"];
    let (whole, resumed, plain) = (tmp.path().join("whole"), tmp.path().join("resumed"), tmp.path().join("plain"));
    let o = runtime(&tiny_run(&plain, &model[2..]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = runtime(&tiny_run(&whole, &model));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::create_dir_all(&resumed).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(&whole.join("checkpoint-3"), &resumed.join("checkpoint-3"));
    let o = runtime(&tiny_run(&resumed, &[&model[..], &["--resume_from_checkpoint", "true"]].concat()));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let read = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert!(read(&whole) == read(&resumed), "the resumed run's weights differ");
    assert!(read(&whole) != read(&plain), "dropout had no effect");
    let steps = |p: &Path| -> Vec<u64> {
        let state: Value = serde_json::from_str(&std::fs::read_to_string(p.join("trainer_state.json")).unwrap()).unwrap();
        state["log_history"].as_array().unwrap().iter().filter(|e| e.get("loss").is_some()).map(|e| e["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(steps(&whole), (1..=6).collect::<Vec<_>>());
    assert_eq!(steps(&resumed), (1..=6).collect::<Vec<_>>(), "the resumed run keeps the first steps' log");
}

/// Each bad input gets one clear error that names it, and a non-zero exit.
#[test]
fn bad_input_gets_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixtures().join("seq2seq_trainer");
    let no_target = tmp.path().join("no_target.jsonl");
    std::fs::write(&no_target, "{\"source\": \"123\", \"target\": \"321\"}\n{\"source\": \"45\"}\n").unwrap();
    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"12\", \"completion\": \"21\"}\n").unwrap();
    let decoder_only = common::fixtures().join("trainer/init");
    let seq2seq_data = dir.join("data/train.jsonl");
    // BART's positions end at 32 (`max_position_embeddings`)
    let long = tmp.path().join("long.jsonl");
    std::fs::write(&long, format!("{{\"source\": \"12\", \"target\": \"21\"}}\n{{\"source\": \"{}\", \"target\": \"1\"}}\n", "7".repeat(40))).unwrap();
    let bart = dir.join("init_bart");
    let bart = bart.to_str().unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (tiny_run(&tmp.path().join("a"), &["--train_file", no_target.to_str().unwrap()]), "no_target.jsonl:2: no `target` field"),
        (tiny_run(&tmp.path().join("b"), &["--train_file", prompts.to_str().unwrap()]), "no `source` field"),
        (
            tiny_run(
                &tmp.path().join("c"),
                &[
                    "--model_name_or_path",
                    decoder_only.to_str().unwrap(),
                    "--tokenizer_name",
                    decoder_only.to_str().unwrap(),
                    "--train_file",
                    seq2seq_data.to_str().unwrap(),
                ],
            ),
            "sequence-to-sequence data",
        ),
        (tiny_run(&tmp.path().join("d"), &["--auto_find_batch_size", "true"]), "`auto_find_batch_size` with an encoder-decoder model is not supported yet"),
        (tiny_run(&tmp.path().join("e"), &["--max_source_length", "0"]), "max_source_length must be at least 1"),
        (
            tiny_run(&tmp.path().join("f"), &["--model_name_or_path", bart, "--train_file", long.to_str().unwrap()]),
            "long.jsonl:2: the source is 41 tokens, longer than the model's limit (`max_position_embeddings` = 32); set max_source_length to at most 32",
        ),
        (
            tiny_run(&tmp.path().join("g"), &["--model_name_or_path", bart, "--predict_with_generate", "true", "--eval_strategy", "steps"]),
            "generation_max_length 128 (or val_max_target_length) is longer than the model's limit",
        ),
    ];
    for (args, expected) in cases {
        let o = runtime(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "expected a failure for `{expected}`");
        assert!(err.contains(expected), "expected `{expected}` in: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

/// `runtime example reverse` writes a run that trains a T5 from scratch; evaluation generates
/// from the sources and the text-metrics plugin scores the outputs.
#[test]
fn reverse_example_trains_and_scores_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = tmp.path().join("reverse");
    let o = runtime(&["example", "reverse", "--output_dir", ex.to_str().unwrap(), "--n_train", "64", "--n_eval", "8", "--digits", "4"].map(s));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plugin = common::wasm_plugins().join("text_metrics.wasm");
    let config = ex.join("train.toml");
    let args = [
        "train",
        "--config",
        config.to_str().unwrap(),
        "--max_steps",
        "4",
        "--eval_steps",
        "4",
        "--disable_tqdm",
        "true",
        "--plugin",
        plugin.to_str().unwrap(),
    ];
    let o = runtime(&args.map(s));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let state: Value = serde_json::from_str(&std::fs::read_to_string(ex.join("output/trainer_state.json")).unwrap()).unwrap();
    let eval = state["log_history"].as_array().unwrap().iter().find(|e| e.get("eval_loss").is_some()).expect("an evaluation");
    let exact = eval["eval_exact_match"].as_f64().expect("eval_exact_match from the text-metrics plugin");
    assert!((0.0..=1.0).contains(&exact));
    let config: Value = serde_json::from_str(&std::fs::read_to_string(ex.join("output/config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "t5");
}

/// Loss plugins on a T5: cross-entropy through the statistics hook (focal loss with gamma 0) and
/// through the logits-rows hook (`rows_ce`) trains as the built-in loss does, step by step, and
/// gives the same evaluation loss.
#[test]
fn loss_plugins_train_a_t5_as_the_built_in_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = common::wasm_plugins();
    let history = |name: &str, plugin: Option<(&str, &str)>| -> Vec<(u64, String, f64)> {
        let out = tmp.path().join(name);
        let mut args = tiny_run(&out, &["--eval_strategy", "steps", "--eval_steps", "3", "--gradient_accumulation_steps", "2"]);
        if let Some((file, options)) = plugin {
            let config = tmp.path().join(format!("{name}.toml"));
            let path = wasm.join(format!("{file}.wasm"));
            std::fs::write(&config, format!("[[plugins]]\npath = \"{}\"\noptions = {options}\n", path.display())).unwrap();
            // the run config comes before the flags that override it
            args.splice(1..1, [s("--config"), config.to_str().unwrap().into()]);
        }
        let o = runtime(&args);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
        let mut rows = Vec::new();
        for e in state["log_history"].as_array().unwrap() {
            for key in ["loss", "grad_norm", "eval_loss"] {
                if let Some(v) = e.get(key).and_then(Value::as_f64) {
                    rows.push((e["step"].as_u64().unwrap(), key.to_string(), v));
                }
            }
        }
        rows
    };
    let built_in = history("built_in", None);
    assert_eq!(built_in.len(), 6 + 6 + 2, "6 steps of loss and grad_norm, 2 evaluations");
    for (name, plugin) in [("stats", ("focal_loss", "{ gamma = 0.0 }")), ("rows", ("rows_ce", "{}"))] {
        let ours = history(name, Some(plugin));
        assert_eq!(ours.len(), built_in.len(), "{name}");
        for ((step, key, x), (_, _, y)) in ours.iter().zip(&built_in) {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{name} step {step} {key}: {x} vs built-in {y}");
        }
    }
}

/// NEFTune on a T5 (noise on both stacks' input embeddings in training passes): it changes the
/// run, the same seed gives the same run, and evaluation has no noise.
#[test]
fn neftune_noise_is_deterministic_and_changes_training_only() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> (Vec<u8>, Vec<f64>) {
        let out = tmp.path().join(name);
        let args = [&["--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "3"][..], extra].concat();
        let o = runtime(&tiny_run(&out, &args));
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
        let evals = state["log_history"].as_array().unwrap().iter().filter_map(|e| e.get("eval_loss")?.as_f64()).collect();
        (std::fs::read(out.join("model.safetensors")).unwrap(), evals)
    };
    let (plain, _) = run("plain", &[]);
    let (a, _) = run("a", &["--neftune_noise_alpha", "5"]);
    let (b, _) = run("b", &["--neftune_noise_alpha", "5"]);
    assert!(a == b, "the same seed draws the same noise");
    assert!(a != plain, "the noise had no effect");
    // evaluation of the same weights, with and without the setting, gives the same loss
    let dir = common::fixtures().join("seq2seq_trainer");
    let eval = |extra: &[&str]| -> String {
        let mut args = vec![s("eval"), s("--model_name_or_path"), dir.join("init").to_str().unwrap().into()];
        args.extend([s("--validation_file"), dir.join("data/validation.jsonl").to_str().unwrap().into()]);
        args.extend(extra.iter().map(|x| s(x)));
        let o = runtime(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let m: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
        m["eval_loss"].to_string()
    };
    assert_eq!(eval(&[]), eval(&["--neftune_noise_alpha", "5"]));
}

/// A padding plugin pads the sources, as the tokenizer's `_pad` does under
/// `DataCollatorForSeq2Seq` (the collator pads the labels itself, on the tokenizer's side): with
/// a left-padding tokenizer the left-pad plugin trains a T5 bit for bit as the built-in padding
/// does; with a right-padding one it changes the run (its sources are left-padded, and T5's
/// relative positions see where the padding is).
#[test]
fn a_padding_plugin_pads_the_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = common::wasm_plugins();
    let init = common::fixtures().join("seq2seq_trainer/init");
    let left = tmp.path().join("left_init");
    std::fs::create_dir_all(&left).unwrap();
    for e in std::fs::read_dir(&init).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), left.join(e.file_name())).unwrap();
    }
    let mut tok: Value = serde_json::from_str(&std::fs::read_to_string(left.join("tokenizer_config.json")).unwrap()).unwrap();
    tok["padding_side"] = "left".into();
    std::fs::write(left.join("tokenizer_config.json"), tok.to_string()).unwrap();
    let train = |name: &str, model: &Path, plugin: bool| -> Vec<u8> {
        let out = tmp.path().join(name);
        let mut args = tiny_run(&out, &["--model_name_or_path", model.to_str().unwrap(), "--max_steps", "4"]);
        if plugin {
            let config = tmp.path().join("plugin.toml");
            std::fs::write(&config, format!("[[plugins]]\npath = \"{}\"\n", wasm.join("left_pad.wasm").display())).unwrap();
            args.splice(1..1, [s("--config"), config.to_str().unwrap().into()]);
        }
        let o = runtime(&args);
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    assert!(train("plugin_left", &left, true) == train("tokenizer_left", &left, false), "the plugin's left padding differs from the built-in one");
    assert!(train("plugin_right", &init, true) != train("right", &init, false), "the plugin had no effect");
}

/// `runtime hp-search` trains an encoder-decoder model in each trial: a grid over two learning
/// rates on the tiny T5, and each trial's objective is the evaluation loss `runtime train` reaches
/// with the same settings (training on the CPU is deterministic).
#[test]
fn hp_search_trials_train_a_t5() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::fixtures().join("seq2seq_trainer");
    let path = |p: &str| dir.join(p).to_str().unwrap().replace('\\', "/");
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model_name_or_path = \"{}\"\ntrain_file = \"{}\"\nvalidation_file = \"{}\"\nper_device_train_batch_size = 4\nmax_steps = 6\neval_strategy = \"steps\"\neval_steps = 6\nsave_steps = 6\nlogging_steps = 1\ndisable_tqdm = true\n",
            path("init"),
            path("data/train.jsonl"),
            path("data/validation.jsonl")
        ),
    )
    .unwrap();
    let space = tmp.path().join("space.toml");
    std::fs::write(&space, "[learning_rate]\ntype = \"categorical\"\nchoices = [5e-3, 1e-3]\n").unwrap();
    let study = tmp.path().join("study");
    let (config, space, study_s) = (config.to_str().unwrap(), space.to_str().unwrap(), study.to_str().unwrap());
    let args = ["hp-search", "--config", config, "--space", space, "--n_trials", "2", "--sampler", "grid", "--pruner", "none", "--output_dir", study_s];
    let o = runtime(&args.map(s));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let trials: Vec<Value> = std::fs::read_to_string(study.join("trials.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(trials.len(), 2);
    for t in &trials {
        assert_eq!(t["state"], "complete", "{t}");
        let lr = t["params"]["learning_rate"].as_f64().unwrap();
        let out = tmp.path().join(format!("train-{lr}"));
        let o = runtime(&["train", "--config", config, "--learning_rate", &lr.to_string(), "--output_dir", out.to_str().unwrap()].map(s));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
        let eval = state["log_history"].as_array().unwrap().iter().rev().find_map(|e| e.get("eval_loss")).expect("an evaluation").as_f64().unwrap();
        assert_eq!(t["objective"].as_f64().unwrap(), eval, "trial at learning rate {lr}");
    }
    assert_ne!(trials[0]["objective"], trials[1]["objective"], "the learning rate changed nothing");
}
