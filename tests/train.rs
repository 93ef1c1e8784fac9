//! `runtime train` end to end on the generated addition example: HF-format output and logs,
//! exact resume from a mid-run checkpoint (byte-identical weights), checkpoint rotation that keeps
//! the best, accumulation that does not depend on how a batch is split, and bad runs refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// A small addition example in `dir`.
fn example(dir: &Path) -> PathBuf {
    let d = dir.join("addition");
    ok(runtime(&["example", "addition", "--output_dir", d.to_str().unwrap(), "--n_train", "256", "--n_eval", "32", "--digits", "2"]), "example");
    d
}

fn train(ex: &Path, out: &Path, extra: &[&str]) -> Output {
    let cfg = ex.join("train.toml");
    let mut args = vec![
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--disable_tqdm",
        "--per_device_train_batch_size",
        "16",
        "--logging_steps",
        "4",
    ];
    args.extend_from_slice(extra);
    runtime(&args)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

#[test]
fn trains_evaluates_and_writes_hf_output() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    ok(train(&ex, &out, &["--num_train_epochs", "3", "--eval_steps", "16", "--save_steps", "16"]), "train");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "trainer_state.json",
        "training_args.json",
        "train_results.json",
        "all_results.json",
        "loss.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing from output_dir");
    }
    let state = json(&out.join("trainer_state.json"));
    assert_eq!(state["global_step"], 48, "3 epochs of 16 steps");
    let losses: Vec<f64> = state["log_history"].as_array().unwrap().iter().filter_map(|e| e["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 12);
    assert!(losses.last().unwrap() < &(losses[0] * 0.8), "the loss falls: {losses:?}");
    let evals: Vec<&Value> = state["log_history"].as_array().unwrap().iter().filter(|e| e.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 3);
    // load_best_model_at_end with save_total_limit 2: the best checkpoint survives rotation
    let best = state["best_model_checkpoint"].as_str().unwrap().to_string();
    assert!(Path::new(&best).is_dir(), "best checkpoint {best} was rotated away");
    let cps: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")).collect();
    assert!(cps.len() <= 2, "{} checkpoints kept with save_total_limit 2", cps.len());
    assert!(json(&out.join("all_results.json"))["eval_loss"].as_f64().is_some());
    assert_eq!(json(&out.join("training_args.json"))["per_device_train_batch_size"], 16);
    // the output is a model folder the rest of the runtime reads
    ok(runtime(&["inspect", out.to_str().unwrap()]), "inspect output");
    let eval = ok(
        runtime(&[
            "eval",
            "--model_name_or_path",
            out.to_str().unwrap(),
            "--validation_file",
            ex.join("validation.jsonl").to_str().unwrap(),
            "--output_dir",
            tmp.path().join("e").to_str().unwrap(),
        ]),
        "eval",
    );
    assert!(eval.contains("eval_loss"), "{eval}");
}

#[test]
fn resume_from_a_checkpoint_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let a = tmp.path().join("a");
    let common = ["--max_steps", "24", "--save_steps", "12", "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_total_limit", "5"];
    ok(train(&ex, &a, &common), "straight run");
    let b = tmp.path().join("b");
    let cp = a.join("checkpoint-12");
    let mut args = common.to_vec();
    args.extend(["--resume_from_checkpoint", cp.to_str().unwrap()]);
    ok(train(&ex, &b, &args), "resumed run");
    let wa = std::fs::read(a.join("model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("model.safetensors")).unwrap();
    assert!(wa == wb, "resumed weights differ from the straight run's");
    assert_eq!(json(&b.join("trainer_state.json"))["global_step"], 24);
    // `true` picks the newest complete checkpoint and skips an incomplete one
    let c = tmp.path().join("c");
    std::fs::create_dir_all(c.join("checkpoint-99")).unwrap(); // incomplete: no state, no optimizer
    copy_dir(&cp, &c.join("checkpoint-12"));
    let mut args = common.to_vec();
    args.extend(["--resume_from_checkpoint", "true"]);
    let out = train(&ex, &c, &args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out, "resume true");
    assert!(err.contains("checkpoint-99") && err.contains("incomplete"), "{err}");
    assert!(std::fs::read(c.join("model.safetensors")).unwrap() == wa, "resume true: weights differ");
}

/// SIGKILL a run as soon as it has written a checkpoint (so mid-step or mid-write), resume it
/// from the newest complete checkpoint, and get the straight run's weights to the byte.
#[test]
fn a_killed_run_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let args = ["--max_steps", "160", "--save_steps", "4", "--save_total_limit", "3", "--eval_strategy", "no", "--load_best_model_at_end", "false"];
    let straight = tmp.path().join("straight");
    ok(train(&ex, &straight, &args), "straight run");
    let killed = tmp.path().join("killed");
    let cfg = ex.join("train.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runtime"));
    cmd.args([
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--output_dir",
        killed.to_str().unwrap(),
        "--disable_tqdm",
        "--per_device_train_batch_size",
        "16",
        "--logging_steps",
        "4",
    ])
    .args(args);
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    while !killed.join("checkpoint-8").join("trainer_state.json").exists() {
        assert!(started.elapsed().as_secs() < 60, "no checkpoint-8 after a minute");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("model.safetensors").exists(), "the run finished before it was killed; the test needs a longer run");
    let mut resume = args.to_vec();
    resume.extend(["--resume_from_checkpoint", "true"]);
    ok(train(&ex, &killed, &resume), "resume after SIGKILL");
    assert!(
        std::fs::read(straight.join("model.safetensors")).unwrap() == std::fs::read(killed.join("model.safetensors")).unwrap(),
        "weights after kill + resume differ"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&killed).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().contains(".partial-")).collect();
    assert!(leftovers.is_empty(), "half-written folders left behind");
}

/// Each logged loss reaches a redirected stdout (a file) as one JSON line when it is logged, not
/// at the end of the run: a run killed midway leaves the lines of the steps it logged.
#[test]
fn log_lines_reach_a_redirected_stdout_as_they_are_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    let log = tmp.path().join("stdout.jsonl");
    let cfg = ex.join("train.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runtime"));
    cmd.args(["train", "--config", cfg.to_str().unwrap(), "--output_dir", out.to_str().unwrap(), "--disable_tqdm"]).args([
        "--max_steps",
        "100000",
        "--logging_steps",
        "1",
        "--per_device_train_batch_size",
        "4",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
    ]);
    let file = std::fs::File::create(&log).unwrap();
    let mut child = cmd.stdout(file).stderr(std::process::Stdio::null()).spawn().unwrap();
    let started = std::time::Instant::now();
    let lines = || std::fs::read_to_string(&log).unwrap().lines().map(String::from).collect::<Vec<_>>();
    while lines().len() < 3 {
        assert!(started.elapsed().as_secs() < 120, "no log line in the redirected stdout after two minutes of training");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL: nothing is flushed at exit
    child.wait().unwrap();
    let got = lines();
    for (i, line) in got.iter().enumerate() {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {i} is not JSON ({e}): {line}"));
        assert!(v["loss"].is_number() && v["step"] == i + 1, "line {i}: {line}");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn accumulation_does_not_depend_on_the_split() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let runs = [
        ("one", vec!["--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1"]),
        ("two", vec!["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]),
    ];
    let mut weights = Vec::new();
    for (name, extra) in runs {
        let out = tmp.path().join(name);
        let mut args = vec!["--max_steps", "8", "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false"];
        args.extend(extra);
        // the later flag wins: the batch size here overrides the helper's 16
        ok(train(&ex, &out, &args), name);
        let st = safetensors::SafeTensors::deserialize(&std::fs::read(out.join("model.safetensors")).unwrap())
            .unwrap()
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap()
            .data()
            .to_vec();
        weights.push(st.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect::<Vec<f32>>());
    }
    let diff = weights[0].iter().zip(&weights[1]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let scale = weights[0].iter().map(|a| a.abs()).fold(0.0f32, f32::max);
    assert!(diff <= 1e-5 * scale, "16x1 and 4x4 accumulation differ by {diff} (scale {scale})");
}

#[test]
fn bad_runs_are_refused_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (vec!["--overwrite_output_dir", "false"], vec!["not empty", "resume_from_checkpoint"]),
        (vec!["--learnig_rate", "1"], vec!["learning_rate"]),
        (vec!["--train_file", "/nonexistent.jsonl", "--overwrite_output_dir", "true"], vec!["nonexistent.jsonl"]),
        (vec!["--load_best_model_at_end", "true", "--eval_strategy", "epoch", "--save_strategy", "steps"], vec!["load_best_model_at_end"]),
        (vec!["--resume_from_checkpoint", "true", "--overwrite_output_dir", "true"], vec!["no valid checkpoint"]),
        (vec!["--report_to", "wandb", "--overwrite_output_dir", "true"], vec!["report_to", "not supported"]),
        (vec!["--plugin", "/nonexistent/focal.wasm", "--overwrite_output_dir", "true"], vec!["/nonexistent/focal.wasm"]),
        (vec!["--plugins", "[{\"path\": \"x.wasm\", \"option\": {}}]", "--overwrite_output_dir", "true"], vec!["unknown key `option`", "options"]),
        (vec!["--bf16", "--overwrite_output_dir", "true"], vec!["bf16", "CUDA"]),
        // the device communicator (NCCL) needs a GPU; an unknown backend is named
        (vec!["--ddp_backend", "nccl", "--overwrite_output_dir", "true"], vec!["ddp_backend = \"nccl\"", "CUDA device", "cpu"]),
        (vec!["--ddp_backend", "gloo", "--overwrite_output_dir", "true"], vec!["ddp_backend `gloo`", "mpi or nccl"]),
        (vec!["--max_seq_length", "0", "--overwrite_output_dir", "true"], vec!["max_seq_length must be at least 2", "found 0"]),
        (vec!["--max_seq_length", "1", "--overwrite_output_dir", "true"], vec!["max_seq_length must be at least 2", "found 1"]),
        (vec!["--block_size", "0", "--overwrite_output_dir", "true"], vec!["block_size must be at least 2", "found 0"]),
        (vec!["--metric_for_best_model", "accuracy", "--overwrite_output_dir", "true"], vec!["metric_for_best_model `accuracy`", "without a metrics plugin"]),
    ];
    for (extra, needles) in cases {
        let o = train(&ex, &out, &extra);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} accepted");
        assert!(!err.contains("panicked"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{extra:?}: `{n}` not in {err}");
        }
        assert!(out.join("keep.txt").exists());
    }
}

/// A learning rate that blows the weights up makes the loss non-finite: the update is never
/// applied; `skip` goes on with finite weights, `stop` ends with a clear error and no final model.
#[test]
fn non_finite_losses_never_update_the_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let base = [
        "--max_steps",
        "6",
        "--learning_rate",
        "1e30",
        "--warmup_steps",
        "0",
        "--lr_scheduler_type",
        "constant",
        "--max_grad_norm",
        "0",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
    ];
    let skip = tmp.path().join("skip");
    let o = train(&ex, &skip, &base);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o, "skip policy");
    assert!(err.contains("update skipped"), "{err}");
    let st = safetensors::SafeTensors::deserialize(&std::fs::read(skip.join("model.safetensors")).unwrap())
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(_, v)| v.data().to_vec())
        .collect::<Vec<_>>();
    let all_finite = st.iter().all(|d| d.chunks_exact(4).all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite()));
    assert!(all_finite, "a non-finite value reached the saved weights");
    let stop = tmp.path().join("stop");
    let mut args = base.to_vec();
    args.extend(["--nan_inf_policy", "stop"]);
    let o = train(&ex, &stop, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("stopping without applying the update") && !err.contains("panicked"), "{err}");
    assert!(!stop.join("model.safetensors").exists());
}

/// Every safetensors file under `dir` (recursively), with whether all its F32 values are finite.
fn safetensors_finite(dir: &Path) -> Vec<(PathBuf, bool)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(safetensors_finite(&path));
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = std::fs::read(&path).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let finite = st.tensors().iter().all(|(_, v)| {
                assert_eq!(v.dtype(), safetensors::Dtype::F32, "{}", path.display());
                v.data().chunks_exact(4).all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite())
            });
            out.push((path, finite));
        }
    }
    out
}

/// An update that would make the weights non-finite (here an infinite learning rate: 1e300
/// does not fit in f32) is refused like a non-finite loss: with `skip` the weights stay as they
/// were and every checkpoint and the final model are finite (and equal, since every update was
/// refused); with `stop` the run ends at once, naming the last checkpoint, and nothing
/// non-finite was written either.
#[test]
fn an_update_that_would_make_weights_non_finite_is_refused_and_nothing_non_finite_is_saved() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let base = [
        "--max_steps",
        "6",
        "--learning_rate",
        "1e300",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "false",
        "--save_total_limit",
        "0",
    ];
    let skip = tmp.path().join("skip");
    let o = train(&ex, &skip, &base);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    ok(o, "skip policy");
    assert_eq!(err.matches("would make a weight or an optimizer moment non-finite; update skipped").count(), 6, "{err}");
    // save_total_limit 0 deletes nothing, as in transformers
    for n in [2, 4, 6] {
        assert!(skip.join(format!("checkpoint-{n}/trainer_state.json")).exists(), "checkpoint-{n} was deleted with save_total_limit 0");
    }
    let files = safetensors_finite(&skip);
    assert!(files.len() >= 7, "final model and three checkpoints' weights and optimizer states: {files:?}");
    assert!(files.iter().all(|(_, finite)| *finite), "{files:?}");
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    assert!(read(skip.join("model.safetensors")) == read(skip.join("checkpoint-2/model.safetensors")), "a refused update changed the weights");
    let stop = tmp.path().join("stop");
    let mut args = base.to_vec();
    args.extend(["--nan_inf_policy", "stop"]);
    let o = train(&ex, &stop, &args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("step 1: the update at learning rate") && err.contains("Last good checkpoint: none"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(safetensors_finite(&stop).iter().all(|(_, finite)| *finite));
}

/// NEFTune noise changes training, and comes from (seed, step), so a resumed run is still exact.
#[test]
fn neftune_changes_training_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let base = ["--max_steps", "12", "--save_steps", "6", "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_total_limit", "5"];
    let run = |name: &str, extra: &[&str]| -> Vec<u8> {
        let out = tmp.path().join(name);
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        ok(train(&ex, &out, &args), name);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let noisy = run("noisy", &["--neftune_noise_alpha", "5"]);
    let plain = run("plain", &[]);
    assert!(noisy != plain, "neftune_noise_alpha had no effect");
    let cp = tmp.path().join("noisy").join("checkpoint-6");
    let resumed = run("resumed", &["--neftune_noise_alpha", "5", "--resume_from_checkpoint", cp.to_str().unwrap()]);
    assert!(resumed == noisy, "a resumed NEFTune run differs from the straight one");
}

/// `auto_find_batch_size`: under a memory budget the batch is divided and the accumulation
/// multiplied by the same factor (the examples per step stay the same), with a log line; a budget
/// too small for one example is a clear error.
#[test]
fn auto_find_batch_size_fits_the_batch_to_the_memory_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let run = |budget_mb: &str, out: &str| {
        let cfg = ex.join("train.toml");
        Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(["train", "--config", cfg.to_str().unwrap(), "--output_dir", tmp.path().join(out).to_str().unwrap(), "--disable_tqdm"])
            .args(["--per_device_train_batch_size", "32", "--max_steps", "2", "--eval_strategy", "no", "--save_strategy", "no", "--auto_find_batch_size"])
            .env("RUNTIME_MEMORY_BUDGET_MB", budget_mb)
            .output()
            .unwrap()
    };
    let out = run("100000", "roomy");
    ok(out, "roomy run");
    let args = json(&tmp.path().join("roomy/training_args.json"));
    assert_eq!((args["per_device_train_batch_size"].as_u64(), args["gradient_accumulation_steps"].as_u64()), (Some(32), Some(1)));
    let out = run("20", "tight");
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    ok(out, "tight run");
    let args = json(&tmp.path().join("tight/training_args.json"));
    let (b, acc) = (args["per_device_train_batch_size"].as_u64().unwrap(), args["gradient_accumulation_steps"].as_u64().unwrap());
    assert!(b < 32 && b * acc == 32, "batch {b} x accumulation {acc}");
    assert!(log.contains("auto_find_batch_size: per_device_train_batch_size 32 does not fit"), "{log}");
    // 12 MB: the weights, gradients and moments (11.9 MB) fit, which the start checks; with
    // an example's activations they do not fit in 90% of it
    let out = run("12", "hopeless");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auto_find_batch_size: even one example"), "{err}");
}

/// The example's arguments with `set` over them, without evaluation, checkpoints or progress bar.
fn quiet_args(ex: &Path, set: &[(&str, Value)]) -> runtime::args::TrainingArguments {
    let quiet = [("eval_strategy", Value::from("no")), ("save_strategy", Value::from("no")), ("disable_tqdm", Value::Bool(true))];
    let set: Vec<(String, Value)> = set.iter().cloned().chain(quiet).map(|(k, v)| (k.to_string(), v)).collect();
    runtime::args::TrainingArguments::load(Some(&ex.join("train.toml")), &set).unwrap()
}

/// Out of memory is an error value (the CPU with a memory budget stands in for a device that
/// runs out): without `auto_find_batch_size` the run ends with it; with it, the step is retried
/// with the batch halved and the accumulation doubled, and the run trains exactly as one planned
/// at that batch from the start (same weights, bit for bit), as transformers'
/// `find_executable_batch_size` retries after CUDA's out-of-memory error.
#[test]
fn out_of_memory_is_a_value_and_auto_find_batch_size_retries_the_step_with_a_smaller_batch() {
    use runtime::backend::budget::Budget;
    use runtime::backend::cpu::Cpu;
    use runtime::train::trainer::Trainer;
    use runtime::Error;
    use serde_json::json;

    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let args = |out: &str, batch: usize, accum: usize, auto: bool| {
        quiet_args(
            &ex,
            &[
                ("output_dir", json!(tmp.path().join(out))),
                ("per_device_train_batch_size", json!(batch)),
                ("gradient_accumulation_steps", json!(accum)),
                ("auto_find_batch_size", json!(auto)),
                ("max_steps", json!(3)),
            ],
        )
    };
    let weights = |t: &Trainer<Budget<Cpu>>| t.model().tensors().unwrap().concat().iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // the memory a run needs at batch 8 and at batch 4 x 2, measured with no limit
    let measured = |out: &str, batch: usize, accum: usize| {
        let be = Budget::new(Cpu, usize::MAX);
        let mut t = Trainer::new_on(be.clone(), args(out, batch, accum, false), true).unwrap();
        t.train().unwrap();
        (be.peak(), weights(&t))
    };
    let (peak8, _) = measured("b8", 8, 1);
    let (peak4, weights4) = measured("b4", 4, 2);
    assert!(peak4 < peak8, "batch 4 peaks at {peak4} bytes, batch 8 at {peak8}");
    let limit = (peak4 + peak8) / 2;

    let mut t = Trainer::new_on(Budget::new(Cpu, limit), args("plain", 8, 1, false), true).unwrap();
    match t.train() {
        Err(Error::OutOfMemory(msg)) => assert!(msg.contains("budget"), "{msg}"),
        other => panic!("expected an out-of-memory error, got {:?}", other.map(|_| ())),
    }

    let mut t = Trainer::new_on(Budget::new(Cpu, limit), args("auto", 8, 1, true), true).unwrap();
    t.train().unwrap();
    assert_eq!((t.args.per_device_train_batch_size, t.args.gradient_accumulation_steps), (4, 2));
    assert_eq!(t.state.global_step, 3);
    assert!(weights(&t) == weights4, "the retried run differs from a run at batch 4 x 2");
    let saved = json(&tmp.path().join("auto/training_args.json"));
    assert_eq!((saved["per_device_train_batch_size"].as_u64(), saved["gradient_accumulation_steps"].as_u64()), (Some(4), Some(2)));
}

/// Out of memory inside the optimizer's update (a sharded update's two temporaries per piece,
/// which the budget counts as the CUDA backend allocates them) ends the run with one error that
/// says so: `auto_find_batch_size` does not retry the step, which would apply the pieces already
/// updated a second time.
#[test]
fn out_of_memory_inside_the_update_is_not_retried_with_a_smaller_batch() {
    use runtime::backend::budget::Budget;
    use runtime::backend::cpu::Cpu;
    use runtime::train::trainer::Trainer;
    use runtime::Error;
    use serde_json::json;

    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let args = |out: &str| {
        quiet_args(
            &ex,
            &[
                ("output_dir", json!(tmp.path().join(out))),
                ("per_device_train_batch_size", json!(2)),
                ("auto_find_batch_size", json!(true)),
                ("fsdp", json!("shard_grad_op")),
                ("max_steps", json!(1)),
            ],
        )
    };
    // at two examples a step the update's temporaries (the largest piece's, twice) are the
    // peak: one byte less fails there
    let be = Budget::new(Cpu, usize::MAX);
    let mut t = Trainer::new_on(be.clone(), args("roomy"), true).unwrap();
    t.train().unwrap();
    let mut t = Trainer::new_on(Budget::new(Cpu, be.peak() - 1), args("tight"), true).unwrap();
    match t.train() {
        Err(Error::Device(msg)) => assert!(msg.contains("budget") && msg.contains("in the optimizer's update"), "{msg}"),
        other => panic!("expected the update's out-of-memory error as a device error, got {:?}", other.map(|_| ())),
    }
    assert_eq!((t.args.per_device_train_batch_size, t.state.global_step), (2, 0), "the step was retried");
}

/// Dropout (GPT-2's `embd_pdrop` and `resid_pdrop`) changes training, a resumed run draws the
/// same masks (byte-identical weights), and evaluation does not apply it.
#[test]
fn dropout_trains_resumes_exactly_and_is_off_in_evaluation() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let vocab = json(&ex.join("config.json"))["vocab_size"].clone();
    let gpt2 = |name: &str, p: f64| {
        let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": vocab, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
            "embd_pdrop": p, "resid_pdrop": p, "attn_pdrop": 0.0, "bos_token_id": 1, "eos_token_id": 2});
        let path = tmp.path().join(name);
        std::fs::write(&path, cfg.to_string()).unwrap();
        path
    };
    let (with, without) = (gpt2("dropout.json", 0.1), gpt2("plain.json", 0.0));
    let base = ["--max_steps", "12", "--save_steps", "6", "--eval_strategy", "no", "--load_best_model_at_end", "false", "--save_total_limit", "5"];
    let run = |name: &str, cfg: &Path, extra: &[&str]| -> Vec<u8> {
        let out = tmp.path().join(name);
        let mut args = base.to_vec();
        args.extend_from_slice(&["--config_name", cfg.to_str().unwrap()]);
        args.extend_from_slice(extra);
        ok(train(&ex, &out, &args), name);
        std::fs::read(out.join("model.safetensors")).unwrap()
    };
    let dropped = run("dropped", &with, &[]);
    let plain = run("plain", &without, &[]);
    assert!(dropped != plain, "dropout had no effect");
    let cp = tmp.path().join("dropped").join("checkpoint-6");
    let resumed = run("resumed", &with, &["--resume_from_checkpoint", cp.to_str().unwrap()]);
    assert!(resumed == dropped, "a resumed run with dropout differs from the straight one");
    // the trained model evaluated with its dropout config and with dropout set to 0: the same loss
    let model = tmp.path().join("dropped");
    let copy = tmp.path().join("dropped-no-dropout");
    std::fs::create_dir_all(&copy).unwrap();
    for e in std::fs::read_dir(&model).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_file()) {
        std::fs::copy(&e, copy.join(e.file_name().unwrap())).unwrap();
    }
    let mut cfg = json(&copy.join("config.json"));
    cfg["embd_pdrop"] = 0.0.into();
    cfg["resid_pdrop"] = 0.0.into();
    std::fs::write(copy.join("config.json"), cfg.to_string()).unwrap();
    let val = ex.join("validation.jsonl");
    let eval = |m: &Path| -> f64 {
        let out = ok(
            runtime(&[
                "eval",
                "--model_name_or_path",
                m.to_str().unwrap(),
                "--validation_file",
                val.to_str().unwrap(),
                "--output_dir",
                tmp.path().join("e").to_str().unwrap(),
            ]),
            "eval",
        );
        serde_json::from_str::<Value>(out.lines().last().unwrap()).unwrap()["eval_loss"].as_f64().unwrap()
    };
    assert_eq!(eval(&model), eval(&copy), "evaluation applied dropout");
}
