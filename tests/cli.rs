//! End-to-end tests of the `runtime` binary: `inspect`, `init`, `convert` and `forward` run as real
//! processes on real files in temporary folders, on their happy paths; a reader of the output that
//! leaves early ends a printing command quietly and a training job not at all. Broken inputs:
//! `tests/cli_errors.rs`.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;
use std::process::Command;

use common::cli::*;
use common::{fixtures, read_reference, rel_err};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::json;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// happy paths

#[test]
fn inspect_prints_architecture_and_parameter_count() {
    for (case, arch, params) in CASES {
        let dir = fixtures().join(case).join("model");
        let stdout = ok(runtime([OsStr::new("inspect"), dir.as_os_str()]), &format!("inspect {case}"));
        assert!(stdout.contains(arch), "inspect {case}: no `{arch}` in\n{stdout}");
        let line = stdout.lines().find(|l| l.starts_with("parameters")).unwrap_or_else(|| panic!("inspect {case}: no parameters line in\n{stdout}"));
        assert!(line.contains(params), "inspect {case}: expected {params} parameters, got `{line}`");
    }
}

#[test]
fn init_is_reproducible_per_seed() {
    let tmp = TempDir::new().unwrap();
    let config = tmp.path().join("config.json");
    write_json(&config, &small_llama_config());
    let init = |name: &str, seed: &str| -> Vec<u8> {
        let out_dir = tmp.path().join(name);
        let args =
            [OsStr::new("init"), "--config".as_ref(), config.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str(), "--seed".as_ref(), seed.as_ref()];
        ok(runtime(args), &format!("init seed {seed}"));
        assert!(out_dir.join("config.json").is_file(), "init wrote no config.json");
        fs::read(out_dir.join("model.safetensors")).unwrap()
    };
    let a = init("a", "3");
    let b = init("b", "3");
    let c = init("c", "4");
    assert!(a == b, "the same seed gave different model.safetensors");
    assert!(a != c, "different seeds gave the same model.safetensors");

    // the initialised folder is a loadable model: inspect reads it and counts its parameters.
    // Per layer: q 16x16, k and v 8x16 (2 of 4 heads), o 16x16, gate/up/down 24x16, two norms of
    // 16; plus the untied embedding and lm_head (64x16 each) and the final norm.
    let per_layer = 16 * 16 + 8 * 16 + 8 * 16 + 16 * 16 + 3 * 24 * 16 + 2 * 16;
    let total = 2 * 64 * 16 + 16 + 2 * per_layer;
    let stdout = ok(runtime([OsStr::new("inspect"), tmp.path().join("a").as_os_str()]), "inspect init output");
    assert!(stdout.contains("LlamaForCausalLM"), "{stdout}");
    let grouped = format!("{},{:03}", total / 1000, total % 1000);
    assert!(stdout.contains(&grouped), "expected {grouped} parameters in\n{stdout}");
    let h = header(&tmp.path().join("a").join("model.safetensors"));
    assert!(h.values().all(|(d, _)| *d == Dtype::F32), "init saves float32 by default");
}

#[test]
fn convert_reshards_and_keeps_the_weights() {
    let tmp = TempDir::new().unwrap();
    let src = fixtures().join("llama").join("model");
    let out_dir = tmp.path().join("sharded");
    let args = [
        OsStr::new("convert"),
        "--model".as_ref(),
        src.as_os_str(),
        "--output_dir".as_ref(),
        out_dir.as_os_str(),
        "--max_shard_size".as_ref(),
        "20KB".as_ref(),
    ];
    ok(runtime(args), "convert --max_shard_size 20KB");

    assert!(!out_dir.join("model.safetensors").exists(), "a sharded save has no single model.safetensors");
    let index = read_json(&out_dir.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().expect("weight_map");
    let mut shards: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    shards.sort();
    shards.dedup();
    assert!(shards.len() >= 3, "expected several shards, got {shards:?}");
    let mut tensors = 0;
    for shard in &shards {
        let path = out_dir.join(shard);
        let h = header(&path);
        let data: usize = h.values().map(|(_, s)| s.iter().product::<usize>() * 4).sum();
        assert!(data <= 20_000 || h.len() == 1, "{shard}: {data} bytes of tensors exceed 20KB");
        for name in h.keys() {
            assert_eq!(weight_map[name].as_str(), Some(*shard), "index places {name} elsewhere");
        }
        tensors += h.len();
    }
    assert_eq!(tensors, weight_map.len(), "every indexed tensor is in a shard");
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(21_664 * 4));
    assert!(out_dir.join("config.json").is_file());
    assert!(out_dir.join("generation_config.json").is_file(), "companion files are carried along");
    for entry in fs::read_dir(tmp.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temporary {name} left behind");
    }

    // the resharded model computes the same logits as the original
    let reference = fixtures().join("llama").join("reference.safetensors");
    let (_, before) = forward_logits(&src, &reference, &tmp.path().join("before.safetensors"));
    let (_, after) = forward_logits(&out_dir, &reference, &tmp.path().join("after.safetensors"));
    assert!(before == after, "resharding changed the logits");
    let stdout = ok(runtime([OsStr::new("inspect"), out_dir.as_os_str()]), "inspect the sharded model");
    assert!(stdout.contains("21,664"), "{stdout}");
}

#[test]
fn convert_to_bfloat16() {
    let tmp = TempDir::new().unwrap();
    let src = fixtures().join("llama").join("model");
    let out_dir = tmp.path().join("bf16");
    let args = [
        OsStr::new("convert"),
        "--model".as_ref(),
        src.as_os_str(),
        "--output_dir".as_ref(),
        out_dir.as_os_str(),
        "--torch_dtype".as_ref(),
        "bfloat16".as_ref(),
    ];
    ok(runtime(args), "convert --torch_dtype bfloat16");

    // 21,664 bf16 values fit one file under the default 5GB shard size
    let h = header(&out_dir.join("model.safetensors"));
    assert!(!h.is_empty());
    assert!(h.values().all(|(d, _)| *d == Dtype::BF16), "every tensor is BF16");
    let n: usize = h.values().map(|(_, s)| s.iter().product::<usize>()).sum();
    assert_eq!(n, 21_664);
    assert_eq!(read_json(&out_dir.join("config.json"))["dtype"], "bfloat16");
    let stdout = ok(runtime([OsStr::new("inspect"), out_dir.as_os_str()]), "inspect the bf16 model");
    assert!(stdout.contains("BF16"), "{stdout}");

    // the logits stay close to the f32 reference (bf16 keeps about 3 significant digits)
    let reference = fixtures().join("llama").join("reference.safetensors");
    let (_, logits) = forward_logits(&out_dir, &reference, &tmp.path().join("out.safetensors"));
    let (_, want) = read_f32(&reference, "logits");
    let e = rel_err(&logits, &want);
    assert!(e < 2e-2, "bf16 logits relative error {e:.3e}");
}

#[test]
fn forward_matches_the_reference_logits() {
    let tmp = TempDir::new().unwrap();
    for (case, _, _) in CASES {
        let dir = fixtures().join(case);
        let reference_path = dir.join("reference.safetensors");
        let reference = read_reference(&reference_path);
        let output = tmp.path().join(format!("{case}.safetensors"));
        let (shape, logits) = forward_logits(&dir.join("model"), &reference_path, &output);
        let ids = &reference["input_ids"].shape;
        assert_eq!(shape, vec![ids[0], ids[1], 96], "{case} logits shape [B, T, vocab]");
        let want = &reference["logits"];
        assert_eq!(shape, want.shape, "{case}: logits shape");
        let e = rel_err(&logits, &want.f32s());
        assert!(e < 1e-5, "{case}: logits relative error {e:.3e}");
        // labels were given, so the loss is written too
        let (loss_shape, loss) = read_f32(&output, "loss");
        assert_eq!(loss_shape, vec![1]);
        let want_loss = reference["loss"].values[0];
        assert!(((loss[0] as f64 - want_loss) / want_loss).abs() < 1e-5, "{case}: loss {} vs {want_loss}", loss[0]);
    }
}

#[test]
fn forward_with_input_ids_only() {
    let tmp = TempDir::new().unwrap();
    let inputs = tmp.path().join("inputs.safetensors");
    write_inputs(&inputs, &[("input_ids", vec![2, 5], vec![1, 2, 3, 4, 5, 95, 0, 7, 8, 9])]);
    let output = tmp.path().join("out.safetensors");
    let model = fixtures().join("gpt2").join("model");
    let args = [OsStr::new("forward"), "--model".as_ref(), model.as_os_str(), "--inputs".as_ref(), inputs.as_os_str(), "--output".as_ref(), output.as_os_str()];
    let stdout = ok(runtime(args), "forward without labels");
    assert!(stdout.contains("logits written"), "{stdout}");
    let (shape, logits) = read_f32(&output, "logits");
    assert_eq!(shape, vec![2, 5, 96]);
    assert!(logits.iter().all(|v| v.is_finite()));
    let bytes = fs::read(&output).unwrap();
    assert!(SafeTensors::deserialize(&bytes).unwrap().tensor("loss").is_err(), "no labels, no loss");
}

// ---------------------------------------------------------------------------------------------
// a reader of the output that leaves early (`runtime inspect DIR | head -1`)

/// Runs `runtime args` with its stdout a pipe whose reader has already left: every print fails.
fn with_reader_gone(args: &[&OsStr]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the runtime binary runs");
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_printing_command_ends_quietly_when_its_reader_leaves() {
    use std::os::unix::process::ExitStatusExt;
    let model = fixtures().join("llama").join("model");
    let roofline = ["bench", "--arch", "gpt2", "--n_layer", "1", "--hidden", "32", "--n_head", "2", "--vocab", "64", "--seq", "8", "--batch", "1"];
    let cases: [Vec<&OsStr>; 2] = [
        vec!["inspect".as_ref(), model.as_os_str()],
        roofline.iter().map(OsStr::new).chain(["--device", "cuda", "--bf16", "--roofline", "h100"].map(OsStr::new)).collect(),
    ];
    for args in cases {
        let what = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
        let (status, stderr) = with_reader_gone(&args);
        // as `cat` ends: by SIGPIPE, with nothing on stderr (no panic, no error line)
        assert_eq!(status.signal(), Some(libc::SIGPIPE), "{what}: {status:?}\nstderr: {stderr}");
        assert!(stderr.is_empty(), "{what} wrote to stderr:\n{stderr}");
    }
}

#[test]
fn training_goes_on_when_the_reader_of_its_output_leaves() {
    let tmp = TempDir::new().unwrap();
    let ex = tmp.path().join("addition");
    let out = tmp.path().join("out");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(runtime(["example", "addition", "--output_dir", &s(&ex), "--n_train", "64", "--n_eval", "16", "--digits", "2"]), "example");
    let args = [
        "train",
        "--config",
        &s(&ex.join("train.toml")),
        "--output_dir",
        &s(&out),
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--disable_tqdm",
    ];
    let (status, stderr) = with_reader_gone(&args.map(OsStr::new));
    // every loss line and the final metrics are dropped; the job itself finishes and saves
    assert!(status.success(), "train: {status:?}\nstderr: {stderr}");
    assert!(!stderr.contains("panicked"), "train panicked:\n{stderr}");
    assert!(out.join("model.safetensors").is_file(), "train saved no model in {}", out.display());
    assert!(read_json(&out.join("trainer_state.json"))["global_step"] == json!(3), "trainer_state.json: {}", out.display());
}
