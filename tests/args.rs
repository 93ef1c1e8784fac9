//! Run configuration: defaults against transformers' `Seq2SeqTrainingArguments()` (the fixture
//! from `tests/parity/make_args_fixtures.py`), and `runtime args` on TOML, JSON and YAML files.

mod common;

use std::process::Command;

use runtime::args::TrainingArguments;
use serde_json::Value;

/// Where `runtime` deliberately differs from transformers' default, and why.
const DELIBERATE: &[(&str, &str)] = &[("gradient_checkpointing", "None in transformers means off; runtime says false")];

#[test]
fn defaults_match_transformers() {
    let text = std::fs::read_to_string(common::fixtures().join("training_args_defaults.json")).unwrap();
    let hf: Value = serde_json::from_str(&text).unwrap();
    let hf = hf["defaults"].as_object().unwrap();
    let ours = serde_json::to_value(TrainingArguments::default().validated().unwrap()).unwrap();
    let mut compared = 0;
    let mut diffs = Vec::new();
    for (k, v) in ours.as_object().unwrap() {
        let Some(h) = hf.get(k) else { continue };
        compared += 1;
        let same = match (v, h) {
            (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
            (Value::Object(a), Value::Null) | (Value::Object(a), Value::Object(_)) if a.is_empty() => h.as_object().is_none_or(|o| o.is_empty()),
            _ => v == h,
        };
        if !same && !DELIBERATE.iter().any(|(d, _)| d == k) {
            diffs.push(format!("{k}: runtime {v} vs transformers {h}"));
        }
    }
    assert!(diffs.is_empty(), "defaults differ from transformers:\n{}", diffs.join("\n"));
    assert!(compared >= 50, "only {compared} fields compared");
}

fn runtime(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

#[test]
fn args_reads_toml_json_yaml_and_overrides() {
    let tmp = tempfile::tempdir().unwrap();
    let files = [
        ("run.toml", "learning_rate = 3e-4\nlr_scheduler_type = \"cosine\"\nwarmup_steps = 0.1\n[lr_scheduler_kwargs]\nnum_cycles = 0.5\n"),
        ("run.json", r#"{"learning_rate": 3e-4, "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "lr_scheduler_kwargs": {"num_cycles": 0.5}}"#),
        ("run.yaml", "learning_rate: 3.0e-4\nlr_scheduler_type: cosine\nwarmup_steps: 0.1\nlr_scheduler_kwargs:\n  num_cycles: 0.5\n"),
    ];
    for (name, text) in files {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = runtime(&["args", "--config", path.to_str().unwrap(), "--per_device_train_batch_size", "4", "--bf16"]);
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["learning_rate"], 3e-4, "{name}");
        assert_eq!(v["lr_scheduler_type"], "cosine", "{name}");
        assert_eq!(v["lr_scheduler_kwargs"]["num_cycles"], 0.5, "{name}");
        assert_eq!(v["per_device_train_batch_size"], 4, "{name}");
        assert_eq!(v["bf16"], true, "{name}");
        assert_eq!(v["adam_beta2"], 0.999, "{name}: defaults fill the rest");
    }
}

#[test]
fn args_errors_name_the_file_and_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("typo.toml", "learnig_rate = 1e-3\n", vec!["typo.toml", "learnig_rate", "learning_rate"]),
        ("type.yaml", "num_train_epochs: many\n", vec!["type.yaml", "num_train_epochs"]),
        ("broken.json", "{\"learning_rate\": ", vec!["broken.json", "JSON"]),
        (
            "conflict.toml",
            "load_best_model_at_end = true\neval_strategy = \"epoch\"\nsave_strategy = \"steps\"\n",
            vec!["load_best_model_at_end", "epoch", "steps"],
        ),
        ("run.ini", "x=1\n", vec!["run.ini", ".toml"]),
        // what the weights sharded over processes cannot do, said before any work
        ("full_generate.toml", "fsdp = \"full_shard\"\npredict_with_generate = true\n", vec!["full_shard", "predict_with_generate"]),
        ("full_peft.toml", "fsdp = \"full_shard\"\n[peft]\nr = 4\n", vec!["full_shard", "LoRA", "shard_grad_op"]),
        ("full_auto.toml", "fsdp = \"full_shard\"\nauto_find_batch_size = true\n", vec!["full_shard", "auto_find_batch_size"]),
        ("zero_offload.toml", "fsdp = \"full_shard offload\"\n", vec!["offload", "not supported"]),
        // what torch.optim.AdamW and TrainingArguments.__post_init__ refuse
        ("eps.toml", "adam_epsilon = -1.0\n", vec!["adam_epsilon", ">= 0"]),
        ("decay.toml", "weight_decay = -0.1\n", vec!["weight_decay", ">= 0"]),
        ("logging.toml", "logging_steps = 2.5\n", vec!["logging_steps", "integer if bigger than 1"]),
        ("eval.toml", "eval_strategy = \"steps\"\neval_steps = -1\n", vec!["eval_steps", ">= 0"]),
        // the parser's error, in one line with where
        ("twice.toml", "learning_rate = 1\nlearning_rate = 2\n", vec!["twice.toml", "line 2, column 1", "duplicate key"]),
    ];
    for (name, text, needles) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let out = runtime(&["args", "--config", path.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} accepted");
        assert!(!err.contains("panicked"), "{name}: {err}");
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in {err}");
        }
        assert_eq!(err.trim_end().lines().count(), 1, "{name}: not one line: {err}");
    }
    let out = runtime(&["args", "--learning_rte", "1"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("learning_rate"));
}

#[test]
fn command_line_values_are_typed_by_the_setting_they_set() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run.toml");
    std::fs::write(&path, "learning_rate = 3e-4\n").unwrap();
    // a folder named 2024: the setting wants text, so the number is the text typed
    let out = runtime(&["args", "--config", path.to_str().unwrap(), "--output_dir", "2024", "--run_name", "true"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["output_dir"], "2024");
    assert_eq!(v["run_name"], "true");
    // a value of the wrong type set on the command line is named as the flag, not as the file
    let out = runtime(&["args", "--config", path.to_str().unwrap(), "--max_steps", "abc"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.starts_with("error: --max_steps:") && !err.contains("run.toml"), "{err}");
}
