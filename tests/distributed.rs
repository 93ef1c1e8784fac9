//! Data parallel training across processes (docs/DISTRIBUTED.md). With the `mpi` feature (the
//! test script builds the suite with it and installs MPICH): `mpirun -np 2` and `-np 3` runs
//! against one process with the global batch, checkpoints resumed at the same and at other world
//! sizes, a killed rank, and processes given different runs. Without the feature: a launcher's
//! processes are refused with the reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The addition example with `n_train` training examples in `dir`.
fn example(dir: &Path, n_train: usize) -> PathBuf {
    let d = dir.join("addition");
    let n = n_train.to_string();
    ok(runtime(&["example", "addition", "--output_dir", d.to_str().unwrap(), "--n_train", &n, "--n_eval", "16", "--digits", "2"]), "example");
    d
}

/// The arguments of `runtime train` on the example, writing to `out`, with `extra` after them.
fn train_args(ex: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["train", "--config", ex.join("train.toml").to_str().unwrap(), "--output_dir", out.to_str().unwrap()].iter().map(|s| s.to_string()).collect();
    a.extend(
        [
            "--disable_tqdm",
            "--logging_steps",
            "1",
            "--eval_strategy",
            "no",
            "--load_best_model_at_end",
            "false",
            "--save_strategy",
            "no",
            "--warmup_steps",
            "0",
            // AdamW's first steps move every weight by about the learning rate whatever its
            // gradient's size, so a gradient near zero whose sign differs by rounding (the sums'
            // order differs between one process and several, as between one batch and the same
            // examples in accumulated micro-batches) moves its weight the other way. The weights'
            // relative difference grows with the learning rate: about 2e-5 at 3e-3 in 4 steps,
            // 6e-6 at 1e-3, either way as large as one process's with another split.
            "--learning_rate",
            "1e-3",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_launchers_processes_are_refused_without_mpi_support() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path(), 16);
    let args = train_args(&ex, &tmp.path().join("out"), &["--max_steps", "1"]);
    let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(&args).env("PMI_SIZE", "2").env("PMI_RANK", "0").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("one of 2 started by an MPI launcher") && err.contains("--features mpi"), "{err}");
    assert!(!tmp.path().join("out").exists(), "nothing may be written");
}

#[cfg(feature = "mpi")]
mod mpi {
    use std::path::Path;
    use std::process::{Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::Value;

    use super::*;

    fn mpirun(np: usize, args: &[String]) -> Output {
        Command::new("mpirun").arg("-np").arg(np.to_string()).arg(env!("CARGO_BIN_EXE_runtime")).args(args).output().expect("mpirun (MPICH) is installed")
    }

    /// The training loss of every step, from `trainer_state.json`.
    fn losses(out: &Path) -> Vec<f64> {
        let s: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
        s["log_history"].as_array().unwrap().iter().filter_map(|e| e["loss"].as_f64()).collect()
    }

    /// The saved model's tensors by name.
    fn weights(dir: &Path) -> Vec<(String, Vec<f32>)> {
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut out: Vec<(String, Vec<f32>)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                assert_eq!(v.dtype(), safetensors::Dtype::F32, "{n}");
                (n, v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn assert_same_training(got: &Path, want: &Path, what: &str) {
        let (g, w) = (losses(got), losses(want));
        assert_eq!(g.len(), w.len(), "{what}: steps logged");
        for (i, (a, b)) in g.iter().zip(&w).enumerate() {
            assert!(((a - b) / b).abs() <= 1e-6, "{what}: step {} loss {a} against {b}", i + 1);
        }
        for ((name, a), (_, b)) in weights(got).iter().zip(&weights(want)) {
            if common::zero_gradient_weight(name) {
                // the sum over processes rounds differently; the runs are 6 steps at 5e-3
                common::assert_within_adam_steps(&format!("{what}: {name}"), a, b, 6.0, 5e-3);
                continue;
            }
            let err = common::rel_err(a, b);
            assert!(err <= 1e-5, "{what}: {name} differs by {err:e} (relative)");
        }
    }

    /// Data parallel over 2 and 3 processes, plain, with the optimizer sharded
    /// (`shard_grad_op`: the parameters laid end to end and cut into 2 or 3 parts mid-tensor)
    /// and with the weights sharded too (`full_shard`), trains as one process with the global
    /// batch:
    /// accumulation 2, clipping, label smoothing; 40 examples in batches of 6 leave a short last
    /// batch (4 examples: 2 + 2 over 2 processes, 1 + 1 + 2 over 3) in each of the 2 epochs.
    #[test]
    fn data_parallel_trains_as_one_process_with_the_global_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 40);
        let common = ["--num_train_epochs", "2", "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5", "--label_smoothing_factor", "0.1"];
        let one = tmp.path().join("one");
        ok(
            runtime(&[&train_args(&ex, &one, &common).iter().map(String::as_str).collect::<Vec<_>>()[..], &["--per_device_train_batch_size", "6"]].concat()),
            "one process",
        );
        assert_eq!(losses(&one).len(), 8, "2 epochs of 4 steps");
        // (every addition example has as many label tokens, and every share of a batch here as
        // many examples, so normalising each process's loss by its own tokens and averaging,
        // `average_tokens_across_devices = false`, trains the same too)
        // (with buckets of 1 MiB the 2.8 MiB of gradients are summed in 3 windows)
        let cases = [
            (2, "3", "", "true", "25"),
            (3, "2", "", "true", "25"),
            (2, "3", "", "true", "1"),
            (2, "3", "shard_grad_op", "true", "25"),
            (3, "2", "shard_grad_op", "true", "25"),
            (2, "3", "full_shard", "true", "25"),
            (3, "2", "full_shard", "true", "25"),
            (2, "3", "", "false", "25"),
        ];
        for (np, b, fsdp, average, bucket) in cases {
            let out = tmp.path().join(format!("np{np}{fsdp}{average}{bucket}"));
            let mut args = train_args(&ex, &out, &common);
            let flags = ["--per_device_train_batch_size", b, "--fsdp", fsdp, "--average_tokens_across_devices", average, "--ddp_bucket_cap_mb", bucket];
            args.extend(flags.iter().map(|s| s.to_string()));
            let stdout = ok(mpirun(np, &args), &format!("mpirun -np {np}"));
            // rank 0 alone prints the logs (8 steps, the final metrics) and writes the output
            assert_eq!(stdout.matches("\"loss\"").count(), 8, "{stdout}");
            if bucket == "1" {
                // the windows sum what one window sums (two numbers add up the same in either
                // order, so with 2 processes to the bit)
                let whole = tmp.path().join(format!("np{np}{fsdp}{average}25"));
                let same = std::fs::read(out.join("model.safetensors")).unwrap() == std::fs::read(whole.join("model.safetensors")).unwrap();
                assert!(same, "buckets of 1 MiB and of 25 MiB trained different weights");
            }
            assert_same_training(&out, &one, &format!("{np} processes, fsdp {fsdp:?}, average_tokens_across_devices {average}"));
            let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
            let one_state: Value = serde_json::from_str(&std::fs::read_to_string(one.join("trainer_state.json")).unwrap()).unwrap();
            assert_eq!(state["num_input_tokens_seen"], one_state["num_input_tokens_seen"], "tokens are counted over every process");
        }
    }

    /// Plain data parallel starts each bucket's sum while the backward pass still runs, and a
    /// process that runs no backward pass in a step (its share of a short last batch is empty)
    /// starts the same sums at the end: 20 examples in batches of 6 over 3 processes leave the
    /// last batch's 2 examples to ranks 1 and 2, and rank 0 idle. The 2.8 MiB of gradients go in
    /// buckets of 1 MiB. The run trains as one process with the global batch.
    #[test]
    fn gradient_sums_start_during_the_backward_pass_and_an_idle_process_joins_them() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 20);
        let base = ["--num_train_epochs", "1", "--max_grad_norm", "0.5"];
        let one = tmp.path().join("one");
        ok(
            runtime(&[&train_args(&ex, &one, &base).iter().map(String::as_str).collect::<Vec<_>>()[..], &["--per_device_train_batch_size", "6"]].concat()),
            "one process",
        );
        let three = tmp.path().join("three");
        let mut args = train_args(&ex, &three, &base);
        args.extend(["--per_device_train_batch_size", "2", "--ddp_bucket_cap_mb", "1"].iter().map(|s| s.to_string()));
        // rank 0 logs at debug level, ranks 1 and 2 as usual
        let bin = env!("CARGO_BIN_EXE_runtime");
        let mut cmd = Command::new("mpirun");
        cmd.args(["-np", "1", "-env", "RUST_LOG", "runtime=debug", bin]).args(&args).args([":", "-np", "2", bin]).args(&args);
        let out = cmd.output().unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{log}");
        assert_same_training(&three, &one, "3 processes, one idle in the last step");
        // rank 0's debug line per step: the buckets, and how many were started before the end
        let sums: Vec<(usize, usize)> = log
            .lines()
            .filter_map(|l| {
                let rest = l.split("MiB in ").nth(1)?;
                let (buckets, rest) = rest.split_once(" buckets, ")?;
                Some((buckets.parse().ok()?, rest.split_once(" started")?.0.parse().ok()?))
            })
            .collect();
        assert_eq!(sums.len(), 4, "one sum per step: {log}");
        for (i, &(buckets, early)) in sums.iter().enumerate() {
            assert!(buckets >= 3, "2.8 MiB in buckets of 1 MiB: {buckets}");
            if i < 3 {
                assert_eq!(early, buckets, "step {}: {early} of {buckets} buckets started during the backward pass", i + 1);
            } else {
                assert_eq!(early, 0, "rank 0 ran no backward pass in the last step");
            }
        }
        // with a LoRA adapter the frozen norms keep gradients that the pass never reports: they
        // go in a bucket of their own, after the adapters', which starts during the pass
        let peft = ["--peft", r#"{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#, "--max_steps", "2"];
        let one = tmp.path().join("lora_one");
        ok(
            runtime(
                &[&train_args(&ex, &one, &base).iter().map(String::as_str).collect::<Vec<_>>()[..], &["--per_device_train_batch_size", "6"], &peft].concat(),
            ),
            "LoRA, one process",
        );
        let two = tmp.path().join("lora_two");
        let mut args = train_args(&ex, &two, &base);
        args.extend(["--per_device_train_batch_size", "3"].iter().chain(&peft).map(|s| s.to_string()));
        let out = Command::new("mpirun").args(["-np", "2"]).arg(bin).args(&args).env("RUST_LOG", "runtime=debug").output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert_eq!(losses(&two).len(), 2);
        for (a, b) in losses(&two).iter().zip(&losses(&one)) {
            assert!(((a - b) / b).abs() <= 1e-6, "LoRA over 2 processes: loss {a} against {b}");
        }
        let lines: Vec<&str> = log.lines().filter(|l| l.contains("gradients summed")).collect();
        assert_eq!(lines.len(), 4, "2 processes x 2 steps: {log}");
        assert!(lines.iter().all(|l| l.contains("in 2 buckets, 1 started during the backward pass")), "{log}");
    }

    /// A loss plugin (z-loss) across 3 processes: its divisor is the window's label tokens over
    /// every process.
    #[test]
    fn a_loss_plugin_trains_across_processes_as_in_one() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 36);
        let wasm = common::wasm_plugins().join("z_loss.wasm");
        let wasm = wasm.to_str().unwrap();
        let base = ["--max_steps", "4", "--gradient_accumulation_steps", "2"];
        let one = tmp.path().join("one");
        let mut a1 = train_args(&ex, &one, &base);
        a1.extend(["--per_device_train_batch_size".into(), "3".into(), "--plugin".into(), wasm.into()]);
        ok(Command::new(env!("CARGO_BIN_EXE_runtime")).args(&a1).output().unwrap(), "one process with z-loss");
        for fsdp in ["", "shard_grad_op", "full_shard"] {
            let three = tmp.path().join(format!("three{fsdp}"));
            let mut a3 = train_args(&ex, &three, &base);
            a3.extend(["--per_device_train_batch_size".into(), "1".into(), "--plugin".into(), wasm.into(), "--fsdp".into(), fsdp.into()]);
            ok(mpirun(3, &a3), "3 processes with z-loss");
            assert_same_training(&three, &one, &format!("z-loss over 3 processes, fsdp {fsdp:?}"));
        }
    }

    /// Evaluation split over 2 and 3 processes (batches of 5 of 16 examples: 4 batches, the
    /// last short) reports what one process reports: the loss, the token metrics of the argmax
    /// (accuracy, perplexity) and, with `predict_with_generate`, the text metrics of generated
    /// answers, each example seen once by rank 0's plugin. The weights are a briefly trained
    /// model's, kept fixed (learning rate 0) so that every run evaluates the same weights.
    #[test]
    fn evaluation_is_split_over_processes_and_reports_as_one() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 64);
        let trained = tmp.path().join("trained");
        ok(
            runtime(
                &train_args(&ex, &trained, &["--max_steps", "60", "--per_device_train_batch_size", "8", "--learning_rate", "3e-3"])
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            ),
            "training",
        );
        let plugins = common::wasm_plugins();
        let cases = [
            ("tokens", vec!["--plugin".to_string(), plugins.join("token_metrics.wasm").to_str().unwrap().to_string()], Some("eval_accuracy")),
            // the weights sharded: a process with one batch fewer (4 batches over 3) takes part
            // in a pass that is not counted
            (
                "tokens_full_shard",
                vec!["--plugin".to_string(), plugins.join("token_metrics.wasm").to_str().unwrap().to_string(), "--fsdp".into(), "full_shard".into()],
                Some("eval_accuracy"),
            ),
            // (so briefly trained a model answers no sum right: the generated answers' metrics
            // are 0 here; the token metrics above are what shows every example reached rank 0)
            (
                "generated",
                vec!["--plugin".to_string(), plugins.join("text_metrics.wasm").to_str().unwrap().to_string(), "--predict_with_generate".into(), "true".into()],
                None,
            ),
        ];
        for (name, extra, nonzero) in cases {
            let run = |np: usize| -> Value {
                let out = tmp.path().join(format!("{name}{np}"));
                let mut a = train_args(
                    &ex,
                    &out,
                    &["--max_steps", "1", "--learning_rate", "0", "--eval_on_start", "true", "--eval_strategy", "steps", "--eval_steps", "1"],
                );
                a.extend(["--model_name_or_path".into(), trained.to_str().unwrap().into(), "--per_device_eval_batch_size".into(), "5".into()]);
                a.extend(["--per_device_train_batch_size".into(), "2".into()]);
                a.extend(extra.iter().cloned());
                if np == 1 {
                    ok(runtime(&a.iter().map(String::as_str).collect::<Vec<_>>()), &format!("{name}, one process"));
                } else {
                    ok(mpirun(np, &a), &format!("{name}, {np} processes"));
                }
                let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
                state["log_history"].as_array().unwrap().iter().find(|e| e.get("eval_loss").is_some()).unwrap().clone()
            };
            let one = run(1);
            if let Some(metric) = nonzero {
                assert!(one[metric].as_f64().unwrap() > 0.0, "{name}: the model scores something: {one}");
            }
            assert!(one.as_object().unwrap().len() > 6, "{name}: the plugin's metrics are logged: {one}");
            for np in [2, 3] {
                let got = run(np);
                let (a, b) = (got["eval_loss"].as_f64().unwrap(), one["eval_loss"].as_f64().unwrap());
                assert!(((a - b) / b).abs() < 1e-9, "{name}, {np} processes: eval_loss {a} against {b}");
                for (k, v) in one.as_object().unwrap() {
                    if k.starts_with("eval_") && !["eval_loss", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second"].contains(&k.as_str()) {
                        assert_eq!(&got[k], v, "{name}, {np} processes: {k}");
                    }
                }
            }
        }
    }

    /// Checkpoints of a data parallel run: resumed at the same world size, the run ends with the
    /// same bytes as one never stopped; resumed at another (2 -> 1, 1 -> 3) it continues with the
    /// same results up to the order of the sums.
    #[test]
    fn checkpoints_resume_at_the_same_and_at_other_world_sizes() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 48);
        let common = ["--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4", "--per_device_train_batch_size"];
        let with_batch = |out: &Path, b: &str| {
            let mut a = train_args(&ex, out, &common);
            a.push(b.into());
            a
        };
        let two = tmp.path().join("two");
        ok(mpirun(2, &with_batch(&two, "3")), "2 processes");
        let one = tmp.path().join("one");
        ok(runtime(&with_batch(&one, "6").iter().map(String::as_str).collect::<Vec<_>>()), "one process");
        // a folder holding only the first checkpoint of a run, resumed from it
        let resumed = |from: &Path, name: &str| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            let cp = from.join("checkpoint-4");
            ok(Command::new("cp").arg("-r").arg(&cp).arg(&dir).output().unwrap(), "copy");
            dir
        };
        let r22 = resumed(&two, "r22");
        let mut a = with_batch(&r22, "3");
        a.extend(["--resume_from_checkpoint".into(), "true".into()]);
        ok(mpirun(2, &a), "resume 2 -> 2");
        assert_eq!(std::fs::read(r22.join("model.safetensors")).unwrap(), std::fs::read(two.join("model.safetensors")).unwrap(), "resume 2 -> 2 is exact");
        let r21 = resumed(&two, "r21");
        let mut a = with_batch(&r21, "6");
        a.extend(["--resume_from_checkpoint".into(), "true".into()]);
        ok(runtime(&a.iter().map(String::as_str).collect::<Vec<_>>()), "resume 2 -> 1");
        assert_same_training(&r21, &two, "resume 2 -> 1");
        let r13 = resumed(&one, "r13");
        let mut a = with_batch(&r13, "2");
        a.extend(["--resume_from_checkpoint".into(), "true".into()]);
        ok(mpirun(3, &a), "resume 1 -> 3");
        assert_same_training(&r13, &one, "resume 1 -> 3");
        // sharded (the optimizer, `shard_grad_op`; the weights too, `full_shard`): the checkpoint
        // is the same folder (what is sharded gathered a tensor at a time), so it resumes sharded
        // over as many processes, or over others, or in one process
        for fsdp in ["shard_grad_op", "full_shard"] {
            let sharded = |out: &Path, b: &str| {
                let mut a = with_batch(out, b);
                a.extend(["--fsdp".into(), fsdp.into()]);
                a
            };
            let two_sharded = tmp.path().join(format!("two_{fsdp}"));
            ok(mpirun(2, &sharded(&two_sharded, "3")), &format!("2 processes, {fsdp}"));
            assert_same_training(&two_sharded, &two, &format!("{fsdp} against plain"));
            let s22 = resumed(&two_sharded, &format!("{fsdp}22"));
            let mut a = sharded(&s22, "3");
            a.extend(["--resume_from_checkpoint".into(), "true".into()]);
            ok(mpirun(2, &a), &format!("resume 2 -> 2, {fsdp}"));
            assert_eq!(
                std::fs::read(s22.join("model.safetensors")).unwrap(),
                std::fs::read(two_sharded.join("model.safetensors")).unwrap(),
                "{fsdp} resume 2 -> 2 is exact"
            );
            let s21 = resumed(&two_sharded, &format!("{fsdp}21"));
            let mut a = with_batch(&s21, "6");
            a.extend(["--resume_from_checkpoint".into(), "true".into()]);
            ok(runtime(&a.iter().map(String::as_str).collect::<Vec<_>>()), &format!("resume 2 ({fsdp}) -> 1"));
            assert_same_training(&s21, &two_sharded, &format!("resume 2 ({fsdp}) -> 1"));
            let s13 = resumed(&one, &format!("{fsdp}13"));
            let mut a = sharded(&s13, "2");
            a.extend(["--resume_from_checkpoint".into(), "true".into()]);
            ok(mpirun(3, &a), &format!("resume 1 -> 3 ({fsdp})"));
            assert_same_training(&s13, &one, &format!("resume 1 -> 3 ({fsdp})"));
        }
    }

    /// SIGKILL of one process while the run writes checkpoints: the launcher ends the others
    /// (naming the dead process) in well under a minute, and resuming from the newest complete
    /// checkpoint ends with the same bytes as a run never stopped.
    #[test]
    fn a_killed_process_ends_the_run_and_the_run_resumes_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 64);
        let common = ["--max_steps", "400", "--save_strategy", "steps", "--save_steps", "5", "--save_total_limit", "3", "--per_device_train_batch_size", "2"];
        let whole = tmp.path().join("whole");
        ok(mpirun(2, &train_args(&ex, &whole, &common)), "the whole run");
        let cut = tmp.path().join("cut");
        let child = Command::new("mpirun")
            .args(["-np", "2", env!("CARGO_BIN_EXE_runtime")])
            .args(train_args(&ex, &cut, &common))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // kill rank 1 once a few checkpoints exist
        let start = Instant::now();
        while !cut.join("checkpoint-15").exists() {
            assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint-15 after 2 minutes");
            std::thread::sleep(Duration::from_millis(20));
        }
        let rank1 = rank_pid(&child, 1).expect("rank 1's process");
        let killed = Instant::now();
        Command::new("kill").args(["-9", &rank1.to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success());
        assert!(killed.elapsed() < Duration::from_secs(60), "the run took {:?} to end", killed.elapsed());
        // (MPICH's launcher reports it on stdout)
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(said.contains(&format!("PID {rank1}")), "the launcher names the dead process:\n{said}");
        let mut a = train_args(&ex, &cut, &common);
        a.extend(["--resume_from_checkpoint".into(), "true".into()]);
        ok(mpirun(2, &a), "resume after the kill");
        assert_eq!(std::fs::read(cut.join("model.safetensors")).unwrap(), std::fs::read(whole.join("model.safetensors")).unwrap(), "resumed run is exact");
    }

    /// A process that stops answering (SIGSTOP: not dead, so the launcher sees nothing) ends the
    /// run after `ddp_timeout`: another process, waiting for it in a collective operation, says
    /// so and exits, and the launcher ends the rest.
    #[test]
    fn a_stuck_process_ends_the_run_after_ddp_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 64);
        let out = tmp.path().join("stuck");
        let child = Command::new("mpirun")
            .args(["-np", "2", env!("CARGO_BIN_EXE_runtime")])
            .args(train_args(&ex, &out, &["--max_steps", "1000000", "--per_device_train_batch_size", "2", "--ddp_timeout", "3"]))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let rank1 = loop {
            if let Some(pid) = rank_pid(&child, 1) {
                break pid;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "rank 1 did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        // training is under way once the first step is logged
        std::thread::sleep(Duration::from_secs(2));
        let stopped = Instant::now();
        Command::new("kill").args(["-STOP", &rank1.to_string()]).status().unwrap();
        let out = child.wait_with_output().unwrap();
        let _ = Command::new("kill").args(["-9", &rank1.to_string()]).status();
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{said}");
        assert!(stopped.elapsed() < Duration::from_secs(60), "the run took {:?} to end", stopped.elapsed());
        assert!(said.contains("rank 0 waited") && said.contains("ddp_timeout = 3 s"), "the waiting process says why:\n{said}");
        // and names the process it waits for: stopped, its heartbeat is silent (or it never
        // reached the operation)
        assert!(said.contains("rank 1 has not"), "the stuck process is named:\n{said}");
    }

    /// The PID of the run's process of rank `rank` (a descendant of the launcher `child`, with
    /// `PMI_RANK` set to it).
    fn rank_pid(child: &std::process::Child, rank: usize) -> Option<u32> {
        let want = format!("PMI_RANK={rank}");
        let bin = std::fs::canonicalize(env!("CARGO_BIN_EXE_runtime")).ok()?;
        for e in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            if pid == child.id() || std::fs::read_link(e.path().join("exe")).ok().as_ref() != Some(&bin) || !descends_from(pid, child.id()) {
                continue;
            }
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            if env.split(|&b| b == 0).any(|kv| kv == want.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    /// Whether process `pid` descends from `ancestor` (other tests' runs may be running too).
    fn descends_from(mut pid: u32, ancestor: u32) -> bool {
        while pid > 1 {
            // the parent is the 4th field of /proc/PID/stat, after the name in parentheses
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            let Some(parent) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok()) else { return false };
            if parent == ancestor {
                return true;
            }
            pid = parent;
        }
        false
    }

    /// Training from a config, the memory check counts every process on the node: where one
    /// process fits, two plain data-parallel processes (each with the whole state) are refused, and
    /// two `full_shard` processes (each with half of it) are not.
    #[test]
    fn the_memory_check_counts_the_processes_on_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 16);
        let params = runtime::model::ModelConfig::from_file(&ex.join("config.json")).unwrap().implied_parameters();
        // between one process's 16 bytes per parameter and two processes' 32
        let mib = ((16 * params) >> 20) + 1;
        assert!((mib << 20) < 32 * params, "{params} parameters");
        let bin = env!("CARGO_BIN_EXE_runtime");
        let run = |np: &str, out: &str, extra: &[&str]| {
            let mut extra = extra.to_vec();
            extra.extend(["--max_steps", "1"]);
            let args = train_args(&ex, &tmp.path().join(out), &extra);
            let mut c = if np == "1" { Command::new(bin) } else { Command::new("mpirun") };
            if np != "1" {
                c.args(["-np", np, bin]);
            }
            c.args(&args).env("RUNTIME_MEMORY_BUDGET_MB", mib.to_string()).output().unwrap()
        };
        ok(run("1", "one", &[]), "one process");
        let o = run("2", "plain", &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        let said = format!("{}: {err}{}", o.status, String::from_utf8_lossy(&o.stdout));
        assert!(!o.status.success() && err.contains("to train on this node (2 processes") && err.contains("of memory is available"), "{said}");
        assert!(!err.contains("panicked") && !tmp.path().join("plain").join("model.safetensors").exists(), "{err}");
        ok(run("2", "sharded", &["--fsdp", "full_shard"]), "two full_shard processes");
        assert!(tmp.path().join("sharded").join("model.safetensors").exists());
    }

    /// Processes started with different runs (here: different seeds) are refused at start, on
    /// every process, before any step.
    #[test]
    fn processes_given_different_runs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let ex = example(tmp.path(), 16);
        let out = tmp.path().join("out");
        let bin = env!("CARGO_BIN_EXE_runtime");
        let (a, b) = (train_args(&ex, &out, &["--max_steps", "2", "--seed", "1"]), train_args(&ex, &out, &["--max_steps", "2", "--seed", "2"]));
        let o = Command::new("mpirun").args(["-np", "1", bin]).args(&a).arg(":").args(["-np", "1", bin]).args(&b).output().unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("not given the same run") && err.contains("rank(s) 1"), "{err}");
        assert!(!out.join("model.safetensors").exists());
    }

    /// A T5 trains data parallel as one process with the global batch, plain and with the
    /// optimizer sharded (`shard_grad_op`); `full_shard` is refused with one clear error.
    #[test]
    fn a_t5_trains_data_parallel_as_one_process() {
        let tmp = tempfile::tempdir().unwrap();
        let fx = common::fixtures().join("seq2seq_trainer");
        let args = |init: &str, out: &Path, batch: &str, fsdp: &str| -> Vec<String> {
            let mut a: Vec<String> =
                ["train", "--disable_tqdm", "true", "--max_steps", "6", "--logging_steps", "1", "--learning_rate", "5e-3", "--max_grad_norm", "0.5"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            for (k, v) in [("model_name_or_path", fx.join(init)), ("train_file", fx.join("data/train.jsonl")), ("output_dir", out.to_path_buf())] {
                a.extend([format!("--{k}"), v.to_str().unwrap().to_string()]);
            }
            a.extend(["--per_device_train_batch_size", batch, "--fsdp", fsdp].iter().map(|s| s.to_string()));
            a
        };
        // a T5, and a BART (whose frozen final_logits_bias the sharded optimizer leaves out)
        for (name, init) in [("T5", "init"), ("BART", "init_bart")] {
            let one = tmp.path().join(format!("one{name}"));
            ok(runtime(&args(init, &one, "4", "").iter().map(String::as_str).collect::<Vec<_>>()), "one process");
            assert_eq!(losses(&one).len(), 6);
            for fsdp in ["", "shard_grad_op"] {
                let two = tmp.path().join(format!("two{name}{fsdp}"));
                ok(mpirun(2, &args(init, &two, "2", fsdp)), &format!("{name}, 2 processes {fsdp}"));
                assert_same_training(&two, &one, &format!("{name}, 2 processes {fsdp}"));
            }
        }
        let o = mpirun(2, &args("init", &tmp.path().join("full"), "2", "full_shard"));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("fsdp `full_shard` (`shard_grad_op` works) with an encoder-decoder model is not supported yet"), "{err}");
    }
}
