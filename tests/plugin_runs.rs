//! Plugins end to end: the shipped ones (built here from `plugins/` for wasm32-wasip2) through
//! `runtime train`, `eval` and `predict` as real processes, against the built-in runs they stand
//! in for, and a failing plugin failing its run cleanly.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{fixtures, wasm_plugins};
use serde_json::{json, Value};

fn wasm(name: &str) -> PathBuf {
    wasm_plugins().join(format!("{name}.wasm"))
}

// ---------------------------------------------------------------- end to end through `runtime train`

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn json_file(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// A prompt/completion run on the trainer fixture (a tiny Llama on addition problems), with a
/// `weight` column added to the training data.
fn train_run(tmp: &Path, name: &str, extra: &[&str]) -> (PathBuf, Output) {
    let dir = fixtures().join("trainer");
    let data = tmp.join("train.jsonl");
    if !data.exists() {
        let text = std::fs::read_to_string(dir.join("data/train.jsonl")).unwrap();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                let mut v: Value = serde_json::from_str(l).unwrap();
                v["weight"] = json!(1.0);
                v.to_string()
            })
            .collect();
        std::fs::write(&data, lines.join("\n") + "\n").unwrap();
    }
    let out_dir = tmp.join(name);
    let mut args = vec![
        "train".to_string(),
        "--model_name_or_path".into(),
        dir.join("init").to_str().unwrap().into(),
        "--tokenizer_name".into(),
        dir.join("data").to_str().unwrap().into(),
        "--train_file".into(),
        data.to_str().unwrap().into(),
        "--validation_file".into(),
        dir.join("data/validation.jsonl").to_str().unwrap().into(),
        "--output_dir".into(),
        out_dir.to_str().unwrap().into(),
        "--disable_tqdm".into(),
        "--max_steps".into(),
        "8".into(),
        "--per_device_train_batch_size".into(),
        "4".into(),
        "--logging_steps".into(),
        "2".into(),
        "--learning_rate".into(),
        "3e-3".into(),
        "--save_strategy".into(),
        "no".into(),
    ];
    // `--config FILE` belongs right after the subcommand
    let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if let Some(i) = extra.iter().position(|a| a == "--config") {
        let file = extra.remove(i + 1);
        extra.remove(i);
        args.splice(1..1, ["--config".to_string(), file]);
    }
    args.extend(extra);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (out_dir.clone(), runtime(&refs))
}

fn losses(out_dir: &Path) -> Vec<f64> {
    json_file(&out_dir.join("trainer_state.json"))["log_history"].as_array().unwrap().iter().filter_map(|e| e.get("loss").and_then(Value::as_f64)).collect()
}

/// `runtime plugin check` passes on every shipped plugin (a loss's gradient is checked against
/// finite differences there), and `inspect` reports the interface and hooks.
#[test]
fn every_shipped_plugin_passes_check() {
    let tok = fixtures().join("tokenizer");
    for (file, hook) in [
        ("token_metrics", "metrics:"),
        ("text_metrics", "metrics:"),
        ("focal_loss", "finite differences"),
        ("weighted_ce", "finite differences"),
        ("z_loss", "finite differences"),
        ("left_pad", "with position ids"),
        ("early_stopping", "early_stopping_counter"),
        ("loss_ema", "loss_ema"),
        ("rows_ce", "loss-logits: loss"),
    ] {
        let path = wasm(file);
        let out = runtime(&["plugin", "check", path.to_str().unwrap(), "--tokenizer", tok.to_str().unwrap()]);
        let text = ok(out, &format!("plugin check {file}"));
        assert!(text.contains(hook), "{file}: {text}");
        let text = ok(runtime(&["plugin", "inspect", path.to_str().unwrap()]), "inspect");
        assert!(text.contains("interface: trainer:plugin@0.1.0"), "{text}");
        assert!(!text.contains("wasi:filesystem") && !text.contains("wasi:sockets"), "{file} should need no files or sockets: {text}");
    }
}

/// Left padding with position ids through the padding plugin computes the same losses as the
/// built-in right padding; a weighted loss with all weights 1, z-loss with alpha 0, and
/// cross-entropy through the full-logits hook (`loss-logits`) equal the built-in loss.
#[test]
fn padding_and_weighted_loss_plugins_reproduce_the_builtin_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, out) = train_run(tmp.path(), "base", &[]);
    ok(out, "baseline run");
    let (left, out) = train_run(tmp.path(), "left", &["--plugin", wasm("left_pad").to_str().unwrap()]);
    ok(out, "left-pad run");
    let (weighted, out) = train_run(tmp.path(), "weighted", &["--plugin", wasm("weighted_ce").to_str().unwrap()]);
    ok(out, "weighted-ce run");
    let cfg = tmp.path().join("z0.toml");
    std::fs::write(&cfg, format!("[[plugins]]\npath = \"{}\"\noptions = {{ alpha = 0.0 }}\n", wasm("z_loss").display())).unwrap();
    let (z0, out) = train_run(tmp.path(), "z0", &["--config", cfg.to_str().unwrap()]);
    ok(out, "z-loss run");
    let (rows, out) = train_run(tmp.path(), "rows", &["--plugin", wasm("rows_ce").to_str().unwrap()]);
    ok(out, "loss-logits run");
    let (b, l, w, z, r) = (losses(&base), losses(&left), losses(&weighted), losses(&z0), losses(&rows));
    assert_eq!(b.len(), 4);
    for (i, x) in b.iter().enumerate() {
        assert!((x - r[i]).abs() < 1e-4 * x.abs(), "cross-entropy through the loss-logits hook differs: {b:?} vs {r:?}");
        assert!((x - l[i]).abs() < 1e-4 * x.abs(), "left padding changed the loss: {b:?} vs {l:?}");
        assert!((x - w[i]).abs() < 1e-4 * x.abs(), "weights of 1 changed the loss: {b:?} vs {w:?}");
        assert!((x - z[i]).abs() < 1e-4 * x.abs(), "z-loss with alpha 0 is not cross-entropy: {b:?} vs {z:?}");
    }
}

/// Metrics plugins add `eval_*` entries; a callbacks plugin adds a logged metric and asks for
/// saves; a focal-loss run trains.
#[test]
fn metrics_callbacks_and_loss_plugins_run_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("plugins.toml");
    std::fs::write(
        &cfg,
        format!(
            "eval_strategy = \"steps\"\neval_steps = 4\n\n[[plugins]]\npath = \"{}\"\n\n[[plugins]]\npath = \"{}\"\n\n[[plugins]]\npath = \"{}\"\noptions = {{ beta = 0.5 }}\n\n[[plugins]]\npath = \"{}\"\noptions = {{ gamma = 1.5 }}\n",
            wasm("token_metrics").display(),
            wasm("text_metrics").display(),
            wasm("loss_ema").display(),
            wasm("focal_loss").display(),
        ),
    )
    .unwrap();
    let (out_dir, out) = train_run(tmp.path(), "run", &["--config", cfg.to_str().unwrap()]);
    ok(out, "run with plugins");
    let state = json_file(&out_dir.join("trainer_state.json"));
    let history = state["log_history"].as_array().unwrap();
    let evals: Vec<&Value> = history.iter().filter(|e| e.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2);
    for e in &evals {
        let acc = e["eval_accuracy"].as_f64().unwrap();
        let ppl = e["eval_perplexity"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&acc) && ppl > 1.0, "{e}");
        assert!(e["eval_exact_match"].as_f64().is_some() && e["eval_f1"].as_f64().is_some(), "{e}");
    }
    let logged: Vec<&Value> = history.iter().filter(|e| e.get("loss").is_some()).collect();
    assert!(logged.iter().all(|e| e["loss_ema"].as_f64().is_some()), "every training log entry has loss_ema: {logged:?}");
    // loss-ema asks for a save at each new low of the average: checkpoints appear although
    // save_strategy is "no"
    let saved: Vec<u64> =
        std::fs::read_dir(&out_dir).unwrap().flatten().filter_map(|e| e.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok()).collect();
    assert!(!saved.is_empty(), "the callback's save requests were ignored");
    let ckpt_state = json_file(&out_dir.join(format!("checkpoint-{}/trainer_state.json", saved[0])));
    assert!(ckpt_state["stateful_callbacks"]["loss-ema"]["state"].as_str().is_some(), "{}", ckpt_state["stateful_callbacks"]);
}

/// Early stopping ends the run after `patience` evaluations without improvement, and its
/// counter survives a resume: resuming from a checkpoint stops at the same step.
#[test]
fn early_stopping_stops_and_its_counter_survives_a_resume() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("es.toml");
    // a learning rate that makes the evaluation loss get worse
    std::fs::write(
        &cfg,
        format!(
            "eval_strategy = \"steps\"\neval_steps = 1\nsave_strategy = \"steps\"\nsave_steps = 1\nmetric_for_best_model = \"loss\"\n\n[[plugins]]\npath = \"{}\"\noptions = {{ early_stopping_patience = 2 }}\n",
            wasm("early_stopping").display()
        ),
    )
    .unwrap();
    let hot = ["--learning_rate", "0.5", "--max_steps", "20", "--save_strategy", "steps"];
    let (full, out) = train_run(tmp.path(), "full", &[&["--config", cfg.to_str().unwrap()][..], &hot].concat());
    ok(out, "early-stopping run");
    let state = json_file(&full.join("trainer_state.json"));
    let stopped_at = state["global_step"].as_u64().unwrap();
    assert!(stopped_at < 20, "early stopping never stopped the run");
    let counters: Vec<f64> = state["log_history"].as_array().unwrap().iter().filter_map(|e| e.get("early_stopping_counter").and_then(Value::as_f64)).collect();
    assert_eq!(*counters.last().unwrap(), 2.0, "{counters:?}");
    // resume from the checkpoint where the counter was 1: the run must stop one evaluation later
    let one = counters.iter().rposition(|&c| c == 1.0).unwrap() as u64 + 1;
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    let src = full.join(format!("checkpoint-{one}"));
    let dst = resumed.join(format!("checkpoint-{one}"));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap().flatten() {
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let (_, out) = train_run(tmp.path(), "resumed", &[&["--config", cfg.to_str().unwrap(), "--resume_from_checkpoint", "true"][..], &hot].concat());
    ok(out, "resumed run");
    let state = json_file(&resumed.join("trainer_state.json"));
    assert_eq!(state["global_step"].as_u64().unwrap(), stopped_at, "the resumed run stopped elsewhere");
}

/// A failing plugin ends `runtime train` with one clear error and a non-zero exit.
#[test]
fn a_failing_plugin_fails_the_run_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, format!("[[plugins]]\npath = \"{}\"\ncall_timeout_s = 0.2\noptions = {{ mode = \"spin\" }}\n", wasm("hostile").display())).unwrap();
    let (_, out) = train_run(tmp.path(), "bad", &["--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("plugin `hostile`") && err.contains("loss.compute-loss") && err.contains("time cap"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (_, out) = train_run(tmp.path(), "missing", &["--plugin", "no/such/plugin.wasm"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no/such/plugin.wasm"), "{err}");
}

/// componentize-py: `$COMPONENTIZE_PY`, else on `PATH`, else the copy `.ci/run` installs into
/// `target/componentize-py`.
fn componentize_py() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("COMPONENTIZE_PY") {
        return Some(PathBuf::from(p));
    }
    let local = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/componentize-py/bin/componentize-py");
    if local.is_file() {
        return Some(local);
    }
    Command::new("componentize-py").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| PathBuf::from("componentize-py"))
}

/// The Python plugin (`plugins/python-token-accuracy`), built with componentize-py from the same
/// WIT, reports the same token accuracy as the Rust `token-metrics` plugin in one run.
#[test]
fn a_python_plugin_built_with_componentize_py_agrees_with_the_rust_one() {
    let Some(cpy) = componentize_py() else {
        eprintln!("SKIPPED: componentize-py is not installed (.ci/run installs it into target/componentize-py; see plugin-sdk/README.md)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = wasm_plugins().join("python_token_accuracy.wasm");
    let built = Command::new(&cpy)
        .current_dir(root.join("plugins/python-token-accuracy"))
        .args(["-d", "../../plugin-sdk/wit/0.1.0", "-w", "plugin", "componentize", "app", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(built.status.success(), "componentize-py failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let tmp = tempfile::tempdir().unwrap();
    let (out_dir, run) = train_run(
        tmp.path(),
        "py",
        &["--eval_strategy", "steps", "--eval_steps", "8", "--plugin", wasm("token_metrics").to_str().unwrap(), "--plugin", out.to_str().unwrap()],
    );
    ok(run, "run with the Python plugin");
    let state = json_file(&out_dir.join("trainer_state.json"));
    let eval = state["log_history"].as_array().unwrap().iter().find(|e| e.get("eval_loss").is_some()).unwrap().clone();
    let (rust, py) = (eval["eval_accuracy"].as_f64().unwrap(), eval["eval_py_accuracy"].as_f64().unwrap());
    assert!(rust > 0.0 && (rust - py).abs() < 1e-12, "rust {rust} vs python {py}");
}

/// `plugin-sdk/README.md`'s walkthrough, followed as written: its `Cargo.toml` and `src/lib.rs`
/// in a fresh crate, built for wasm32-wasip2, pass `runtime plugin check`.
#[test]
fn the_sdk_readme_walkthrough_builds_a_working_plugin() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("plugin-sdk/README.md")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let krate = tmp.path().join("answer-length");
    let mut files = 0;
    let mut lines = readme.lines();
    while let Some(line) = lines.next() {
        let Some(name) = line.strip_prefix("```").and_then(|info| info.split_whitespace().find_map(|w| w.strip_prefix("file="))) else { continue };
        let body: Vec<&str> = lines.by_ref().take_while(|l| !l.starts_with("```")).collect();
        let text = body.join("\n").replace("../runtime/plugin-sdk", root.join("plugin-sdk").to_str().unwrap());
        std::fs::create_dir_all(krate.join(name).parent().unwrap()).unwrap();
        std::fs::write(krate.join(name), text + "\n").unwrap();
        files += 1;
    }
    assert_eq!(files, 2, "the README should give Cargo.toml and src/lib.rs");
    let target = root.join("target/wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(&krate)
        .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .unwrap();
    assert!(out.status.success(), "building the README's plugin failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let wasm = target.join("wasm32-wasip2/release/answer_length.wasm");
    let text = ok(runtime(&["plugin", "check", wasm.to_str().unwrap()]), "plugin check");
    assert!(text.contains("metrics: answer_tokens = ") && text.contains("answer_token_accuracy = "), "{text}");
}

/// `runtime predict` with the text-metrics plugin: one prediction per example, the decoded text
/// consistent with the ids, and the plugin's exact match equal to the share of predictions that
/// equal their references in the written file. Beam search runs through the same path.
#[test]
fn predict_writes_predictions_and_the_metrics_plugin_scores_them() {
    let dir = fixtures().join("trainer");
    let tmp = tempfile::tempdir().unwrap();
    for (name, beams) in [("greedy", "1"), ("beams", "3")] {
        let out_dir = tmp.path().join(name);
        let text = ok(
            runtime(&[
                "predict",
                "--model",
                dir.join("init").to_str().unwrap(),
                "--test_file",
                dir.join("data/validation.jsonl").to_str().unwrap(),
                "--tokenizer_name",
                dir.join("data").to_str().unwrap(),
                "--output_dir",
                out_dir.to_str().unwrap(),
                "--generation_max_length",
                "16",
                "--generation_num_beams",
                beams,
                "--per_device_eval_batch_size",
                "3",
                "--plugin",
                wasm("text_metrics").to_str().unwrap(),
            ]),
            "predict",
        );
        assert!(text.contains("predict_exact_match"), "{text}");
        let lines: Vec<Value> =
            std::fs::read_to_string(out_dir.join("generated_predictions.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let n_examples = std::fs::read_to_string(dir.join("data/validation.jsonl")).unwrap().lines().filter(|l| !l.trim().is_empty()).count();
        assert_eq!(lines.len(), n_examples);
        let mut exact = 0;
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["index"].as_u64().unwrap() as usize, i);
            assert!(!l["input_ids"].as_array().unwrap().is_empty() && !l["label_ids"].as_array().unwrap().is_empty());
            exact += usize::from(l["prediction"].as_str().unwrap().trim() == l["label"].as_str().unwrap().trim());
        }
        let results = json_file(&out_dir.join("predict_results.json"));
        let em = results["predict_exact_match"].as_f64().unwrap();
        assert!((em - exact as f64 / n_examples as f64).abs() < 1e-12, "{name}: plugin {em} vs file {exact}/{n_examples}");
    }
}

/// Evaluation with `predict_with_generate` hands generated ids to the metrics plugin during
/// training; token-level metrics refuse generated predictions with a clear error.
#[test]
fn predict_with_generate_drives_evaluation_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let gen = ["--eval_strategy", "steps", "--eval_steps", "4", "--predict_with_generate", "--generation_max_length", "16"];
    let (out_dir, out) = train_run(tmp.path(), "gen", &[&gen[..], &["--plugin", wasm("text_metrics").to_str().unwrap()]].concat());
    ok(out, "run with predict_with_generate");
    let state = json_file(&out_dir.join("trainer_state.json"));
    let evals: Vec<&Value> = state["log_history"].as_array().unwrap().iter().filter(|e| e.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2);
    assert!(evals.iter().all(|e| e["eval_exact_match"].as_f64().is_some() && e["eval_f1"].as_f64().is_some()), "{evals:?}");
    let (_, out) = train_run(tmp.path(), "tok", &[&gen[..], &["--plugin", wasm("token_metrics").to_str().unwrap()]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token-metrics") && err.contains("metrics.update") && err.contains("use text-metrics"), "{err}");
}

/// The quickstart's evaluation scores generated answers: the addition example (small) trained
/// with `predict_with_generate` and the text-metrics plugin reports `eval_exact_match`, which
/// `runtime predict` on the trained model reproduces.
#[test]
fn the_quickstart_evaluation_reports_exact_match_from_generated_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = tmp.path().join("addition");
    ok(runtime(&["example", "addition", "--output_dir", ex.to_str().unwrap(), "--n_train", "512", "--n_eval", "40", "--digits", "2"]), "example");
    let out_dir = tmp.path().join("out");
    let text_metrics = wasm("text_metrics");
    ok(
        runtime(&[
            "train",
            "--config",
            ex.join("train.toml").to_str().unwrap(),
            "--output_dir",
            out_dir.to_str().unwrap(),
            "--disable_tqdm",
            "--max_steps",
            "40",
            "--eval_steps",
            "40",
            "--save_steps",
            "40",
            "--logging_steps",
            "10",
            "--predict_with_generate",
            "--plugin",
            text_metrics.to_str().unwrap(),
        ]),
        "quickstart training with predict_with_generate",
    );
    let state = json_file(&out_dir.join("trainer_state.json"));
    let eval = state["log_history"].as_array().unwrap().iter().rev().find(|e| e.get("eval_loss").is_some()).unwrap().clone();
    let em = eval["eval_exact_match"].as_f64().expect("eval_exact_match in the evaluation");
    let pred = tmp.path().join("pred");
    ok(
        runtime(&[
            "predict",
            "--model",
            out_dir.to_str().unwrap(),
            "--test_file",
            ex.join("validation.jsonl").to_str().unwrap(),
            "--output_dir",
            pred.to_str().unwrap(),
            "--per_device_eval_batch_size",
            "64",
            "--plugin",
            text_metrics.to_str().unwrap(),
        ]),
        "predict",
    );
    let again = json_file(&pred.join("predict_results.json"))["predict_exact_match"].as_f64().unwrap();
    assert_eq!(em, again, "evaluation and predict disagree on the same model");
}

/// `on_error = "continue"`: a loss plugin that always times out skips every step (the weights
/// never move) and a metrics plugin that returns an infinite value is left out of the
/// evaluation; the run itself completes.
#[test]
fn on_error_continue_skips_what_failed_and_finishes_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("tolerant.toml");
    std::fs::write(
        &cfg,
        format!(
            "eval_strategy = \"steps\"\neval_steps = 4\n\n[[plugins]]\npath = \"{}\"\ncall_timeout_s = 0.2\non_error = \"continue\"\noptions = {{ mode = \"spin\" }}\n",
            wasm("hostile").display()
        ),
    )
    .unwrap();
    let (out_dir, out) = train_run(tmp.path(), "tolerant", &["--config", cfg.to_str().unwrap(), "--max_steps", "4"]);
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out, "run with a failing plugin and on_error = continue");
    assert!(log.contains("the step is skipped") && log.contains("time cap"), "{log}");
    assert!(log.contains("its metrics are left out") || log.contains("going on without this result"), "{log}");
    let state = json_file(&out_dir.join("trainer_state.json"));
    let eval = state["log_history"].as_array().unwrap().iter().find(|e| e.get("eval_loss").is_some()).unwrap().clone();
    assert!(eval.get("eval_bad").is_none(), "{eval}");
    let init = std::fs::read(fixtures().join("trainer/init/model.safetensors")).unwrap();
    let after = std::fs::read(out_dir.join("model.safetensors")).unwrap();
    let (a, b) = (safetensors::SafeTensors::deserialize(&init).unwrap(), safetensors::SafeTensors::deserialize(&after).unwrap());
    for (name, t) in a.tensors() {
        assert_eq!(t.data(), b.tensor(&name).unwrap().data(), "{name} moved although every step was skipped");
    }
}

/// A plugin path is checked before the file is read whole: a FIFO (which would block a read) and
/// a folder are not regular files; a large file of anything else is refused on its first bytes.
/// `plugin check` on a plugin that decodes text, run without `--tokenizer`, says to pass one.
#[test]
fn a_plugin_file_is_checked_before_it_is_read_and_check_asks_for_a_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("pipe.wasm");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let big = tmp.path().join("big.wasm");
    std::fs::write(&big, vec![b'x'; 64 << 20]).unwrap();
    for (path, needle) in [(&fifo, "not a regular file"), (&tmp.path().to_path_buf(), "not a regular file"), (&big, "not a WebAssembly file")] {
        for cmd in ["inspect", "check"] {
            let out = runtime(&["plugin", cmd, path.to_str().unwrap()]);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success() && err.contains(needle), "plugin {cmd} {}: {err}", path.display());
        }
    }
    let out = runtime(&["plugin", "check", wasm("text_metrics").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("pass --tokenizer"), "{err}");
}

/// With a LoRA adapter every plugin hook runs: a padding plugin (left padding), a loss plugin
/// (cross-entropy through the loss-logits hook) and a callbacks plugin reproduce the adapter
/// run's losses, a metrics plugin
/// scores the evaluations, and the output is the adapter; gradient checkpointing and NEFTune
/// run with adapters too.
#[test]
fn plugins_work_with_a_lora_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let peft = r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#;
    let (base, out) = train_run(tmp.path(), "lora", &["--peft", peft]);
    ok(out, "LoRA run");
    let (left, rows, metrics, ema) = (wasm("left_pad"), wasm("rows_ce"), wasm("token_metrics"), wasm("loss_ema"));
    let hooked_args = [
        "--peft",
        peft,
        "--plugin",
        left.to_str().unwrap(),
        "--plugin",
        rows.to_str().unwrap(),
        "--plugin",
        metrics.to_str().unwrap(),
        "--plugin",
        ema.to_str().unwrap(),
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "4",
    ];
    let (hooked, out) = train_run(tmp.path(), "lora-hooked", &hooked_args);
    ok(out, "LoRA run with plugins");
    let (b, h) = (losses(&base), losses(&hooked));
    assert_eq!(b.len(), 4);
    for (x, y) in b.iter().zip(&h) {
        assert!((x - y).abs() < 1e-4 * x.abs(), "the plugins changed the LoRA run's losses: {b:?} vs {h:?}");
    }
    let history = json_file(&hooked.join("trainer_state.json"))["log_history"].as_array().unwrap().clone();
    assert!(history.iter().any(|e| e["eval_accuracy"].as_f64().is_some()), "no metrics plugin result: {history:?}");
    assert!(history.iter().filter(|e| e.get("loss").is_some()).all(|e| e["loss_ema"].as_f64().is_some()), "{history:?}");
    assert!(hooked.join("adapter_model.safetensors").is_file() && !hooked.join("model.safetensors").exists());
    // gradient checkpointing gives the same losses; NEFTune changes them
    let (ckpt, out) = train_run(tmp.path(), "lora-ckpt", &["--peft", peft, "--gradient_checkpointing", "true"]);
    ok(out, "LoRA with gradient checkpointing");
    assert_eq!(losses(&ckpt), b, "gradient checkpointing changed the LoRA run");
    let (noisy, out) = train_run(tmp.path(), "lora-neftune", &["--peft", peft, "--neftune_noise_alpha", "5"]);
    ok(out, "LoRA with NEFTune");
    assert_ne!(losses(&noisy), b);
}
