//! End-to-end tests of the `runtime` binary: `inspect`, `init`, `convert` and `forward` run as real
//! processes on real files in temporary folders, on the happy paths and on broken inputs, where
//! each must fail with one `error:` line naming the file and the tensor or field, and write nothing.

mod common;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{fixtures, read_reference, rel_err};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// helpers

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn runtime<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().expect("the runtime binary runs");
    Output { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Asserts success and returns stdout.
fn ok(out: Output, what: &str) -> String {
    assert_eq!(out.code, Some(0), "{what} failed:\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    out.stdout
}

/// Asserts a clean failure: non-zero exit, no panic, exactly one stderr line, starting with
/// `error:` and containing every one of `needles`. Returns that line.
fn error_line(out: Output, what: &str, needles: &[&str]) -> String {
    assert!(out.code.is_some_and(|c| c != 0), "{what}: expected a non-zero exit, got {:?}\nstdout: {}\nstderr: {}", out.code, out.stdout, out.stderr);
    assert!(!out.stderr.contains("panicked"), "{what}: the binary panicked:\n{}", out.stderr);
    let lines: Vec<&str> = out.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{what}: expected exactly one stderr line, got:\n{}", out.stderr);
    let line = lines[0];
    assert!(line.starts_with("error:"), "{what}: stderr does not start with `error:`: {line}");
    for needle in needles {
        assert!(line.contains(needle), "{what}: error line does not mention `{needle}`: {line}");
    }
    line.to_string()
}

/// Asserts that neither `parent/name` nor a leftover `.name.partial-*` / `.name.old-*` exists.
fn assert_nothing_written(parent: &Path, name: &str, what: &str) {
    assert!(!parent.join(name).exists(), "{what}: output folder {} was left behind", parent.join(name).display());
    for entry in fs::read_dir(parent).unwrap() {
        let entry = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!entry.starts_with(&format!(".{name}.")), "{what}: temporary folder {entry} was left behind");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A copy of `tests/fixtures/<case>/model` at `tmp/<case>`.
fn fixture_copy(tmp: &TempDir, case: &str) -> PathBuf {
    let dir = tmp.path().join(case);
    copy_dir(&fixtures().join(case).join("model"), &dir);
    dir
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

fn write_json(path: &Path, v: &Value) {
    fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// One tensor of a safetensors file, owned.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// Reads a safetensors file into owned entries (in file order) plus its metadata.
fn read_entries(path: &Path) -> (Vec<Entry>, Option<HashMap<String, String>>) {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> =
        st.tensors().into_iter().map(|(name, v)| Entry { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }).collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (entries, meta.metadata().clone())
}

fn write_entries(path: &Path, entries: &[Entry], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = entries.iter().map(|e| (e.name.clone(), TensorView::new(e.dtype, e.shape.clone(), &e.data).unwrap())).collect();
    fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// Rewrites the safetensors file `path` after letting `edit` change its tensors.
fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Vec<Entry>)) {
    let (mut entries, meta) = read_entries(path);
    edit(&mut entries);
    write_entries(path, &entries, meta);
}

fn entry<'a>(entries: &'a mut [Entry], name: &str) -> &'a mut Entry {
    entries.iter_mut().find(|e| e.name == name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

/// An I64 input file for `forward`.
fn write_inputs(path: &Path, tensors: &[(&str, Vec<usize>, Vec<i64>)]) {
    let entries: Vec<Entry> = tensors
        .iter()
        .map(|(name, shape, values)| Entry {
            name: name.to_string(),
            dtype: Dtype::I64,
            shape: shape.clone(),
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
        .collect();
    write_entries(path, &entries, None);
}

/// The `F32` tensor `name` of a safetensors file: shape and values.
fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name}", path.display()));
    assert_eq!(v.dtype(), Dtype::F32, "{name} dtype");
    let values = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (v.shape().to_vec(), values)
}

/// Name -> (dtype, shape) of every tensor in a safetensors file, from its header.
fn header(path: &Path) -> HashMap<String, (Dtype, Vec<usize>)> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec()))).collect()
}

const CASES: [(&str, &str, &str); 3] =
    [("gpt2", "GPT2LMHeadModel", "29,568"), ("llama", "LlamaForCausalLM", "21,664"), ("qwen2", "Qwen2ForCausalLM", "37,296")];

/// Runs `forward` on `model` with `inputs`, returning the logits' shape and values.
fn forward_logits(model: &Path, inputs: &Path, output: &Path) -> (Vec<usize>, Vec<f32>) {
    let what = format!("forward {}", model.display());
    ok(
        runtime([
            OsStr::new("forward"),
            "--model".as_ref(),
            model.as_os_str(),
            "--inputs".as_ref(),
            inputs.as_os_str(),
            "--output".as_ref(),
            output.as_os_str(),
        ]),
        &what,
    );
    read_f32(output, "logits")
}

fn small_llama_config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": false
    })
}

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
// bad input: every command that reads the model fails the same clean way

/// Runs `inspect`, `convert` and `forward` on the broken model folder `dir` and checks each
/// fails with one `error:` line containing `needles`; `convert` must leave no output folder and
/// `forward` no output file. `inspect` reads only the headers but applies the same checks to
/// names, shapes and dtypes; it is checked against `inspect_needles` when given.
fn assert_model_rejected(dir: &Path, needles: &[&str], inspect_needles: Option<&[&str]>) {
    let tmp = TempDir::new().unwrap();
    let what = |cmd: &str| format!("{cmd} {}", dir.display());
    if let Some(inspect_needles) = inspect_needles {
        error_line(runtime([OsStr::new("inspect"), dir.as_os_str()]), &what("inspect"), inspect_needles);
    }
    let out_dir = tmp.path().join("converted");
    let args = [OsStr::new("convert"), "--model".as_ref(), dir.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str()];
    error_line(runtime(args), &what("convert"), needles);
    assert_nothing_written(tmp.path(), "converted", &what("convert"));

    let inputs = fixtures().join("gpt2").join("reference.safetensors");
    let output = tmp.path().join("logits.safetensors");
    let args = [OsStr::new("forward"), "--model".as_ref(), dir.as_os_str(), "--inputs".as_ref(), inputs.as_os_str(), "--output".as_ref(), output.as_os_str()];
    error_line(runtime(args), &what("forward"), needles);
    assert!(!output.exists(), "{}: output written despite the error", what("forward"));
}

#[test]
fn model_folder_does_not_exist() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("no-such-model");
    assert_model_rejected(&dir, &["no-such-model"], Some(&["no-such-model"]));
}

#[test]
fn config_json_missing() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    fs::remove_file(dir.join("config.json")).unwrap();
    assert_model_rejected(&dir, &["config.json"], Some(&["config.json"]));
}

#[test]
fn config_json_not_json() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    fs::write(dir.join("config.json"), "{\"model_type\": \"gpt2\", oops").unwrap();
    assert_model_rejected(&dir, &["config.json", "JSON"], Some(&["config.json", "JSON"]));
}

#[test]
fn config_unsupported_model_type() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    let mut cfg = read_json(&dir.join("config.json"));
    cfg["model_type"] = json!("bert");
    write_json(&dir.join("config.json"), &cfg);
    assert_model_rejected(&dir, &["config.json", "model_type", "bert"], Some(&["config.json", "model_type", "bert"]));
}

#[test]
fn config_missing_required_field() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    let mut cfg = read_json(&dir.join("config.json"));
    cfg.as_object_mut().unwrap().remove("n_embd");
    write_json(&dir.join("config.json"), &cfg);
    assert_model_rejected(&dir, &["config.json", "n_embd"], Some(&["config.json", "n_embd"]));
}

#[test]
fn init_with_bad_config_writes_nothing() {
    let tmp = TempDir::new().unwrap();
    let configs: [(&str, Value, &[&str]); 3] = [
        (
            "missing_field.json",
            {
                let mut c = small_llama_config();
                c.as_object_mut().unwrap().remove("hidden_size");
                c
            },
            &["missing_field.json", "hidden_size"],
        ),
        (
            "bert.json",
            {
                let mut c = small_llama_config();
                c["model_type"] = json!("bert");
                c
            },
            &["bert.json", "model_type", "bert"],
        ),
        (
            "negative.json",
            {
                let mut c = small_llama_config();
                c["vocab_size"] = json!(-5);
                c
            },
            &["negative.json", "vocab_size"],
        ),
    ];
    for (file, cfg, needles) in configs {
        let config = tmp.path().join(file);
        write_json(&config, &cfg);
        let out_dir = tmp.path().join("out");
        let args = [OsStr::new("init"), "--config".as_ref(), config.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str()];
        error_line(runtime(args), &format!("init --config {file}"), needles);
        assert_nothing_written(tmp.path(), "out", &format!("init --config {file}"));
    }
    let missing = tmp.path().join("absent.json");
    let out_dir = tmp.path().join("out");
    let args = [OsStr::new("init"), "--config".as_ref(), missing.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str()];
    error_line(runtime(args), "init --config absent.json", &["absent.json"]);
    assert_nothing_written(tmp.path(), "out", "init --config absent.json");
}

/// The JSON header of a safetensors file and the length of the data section after it.
fn raw_header(bytes: &[u8]) -> (Value, usize) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), 8 + n)
}

#[test]
fn weights_truncated() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let cut = bytes.len() / 2;
    fs::write(&path, &bytes[..cut]).unwrap();
    // the error names the first tensor (in file order) whose data lies past the cut
    let (head, data_start) = raw_header(&bytes);
    let first_cut = head
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (v["data_offsets"][0].as_u64().unwrap(), v["data_offsets"][1].as_u64().unwrap() as usize, k.clone()))
        .filter(|(_, end, _)| data_start + end > cut)
        .min()
        .unwrap()
        .2;
    let needles = ["model.safetensors", first_cut.as_str(), "data_offsets"];
    assert_model_rejected(&dir, &needles, Some(&needles));
}

#[test]
fn weights_header_length_too_large() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    let path = dir.join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    fs::write(&path, &bytes).unwrap();
    assert_model_rejected(&dir, &["model.safetensors", "header"], Some(&["model.safetensors", "header"]));
}

#[test]
fn weights_data_offsets_past_the_end() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    let path = dir.join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    let (mut head, data_start) = raw_header(&bytes);
    // the last tensor in the data section now claims to end a megabyte past the end of the file
    let (last, end) = head
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v["data_offsets"][1].as_u64().unwrap()))
        .max_by_key(|(_, end)| *end)
        .unwrap();
    head[&last]["data_offsets"][1] = json!(end + 1_000_000);
    let mut text = serde_json::to_string(&head).unwrap();
    while (text.len() + 8) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[data_start..]);
    fs::write(&path, &out).unwrap();
    assert_model_rejected(&dir, &["model.safetensors", &last], Some(&["model.safetensors", &last]));
}

#[test]
fn weights_wrong_shape() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    edit_tensors(&dir.join("model.safetensors"), |entries| {
        let e = entry(entries, "transformer.wpe.weight");
        assert_eq!(e.shape, vec![32, 32]);
        e.shape = vec![16, 32];
        e.data.truncate(16 * 32 * 2);
    });
    let needles = ["model.safetensors", "transformer.wpe.weight", "[16, 32]"];
    assert_model_rejected(&dir, &needles, Some(&needles));
}

#[test]
fn weights_wrong_dtype() {
    for (dtype, size) in [(Dtype::I64, 8), (Dtype::I32, 4)] {
        let tmp = TempDir::new().unwrap();
        let dir = fixture_copy(&tmp, "gpt2");
        edit_tensors(&dir.join("model.safetensors"), |entries| {
            let e = entry(entries, "transformer.ln_f.weight");
            e.dtype = dtype;
            e.data = vec![0; 32 * size];
        });
        let needles = ["model.safetensors", "transformer.ln_f.weight", &format!("{dtype:?}")];
        assert_model_rejected(&dir, &needles, Some(&needles));
    }
}

#[test]
fn weights_holding_nan_or_inf_are_rejected() {
    // bf16 NaN and +inf
    for bits in [[0xc0u8, 0x7f], [0x80, 0x7f]] {
        let tmp = TempDir::new().unwrap();
        let dir = fixture_copy(&tmp, "gpt2");
        edit_tensors(&dir.join("model.safetensors"), |entries| {
            let e = entry(entries, "transformer.h.1.attn.c_proj.weight");
            assert_eq!(e.dtype, Dtype::BF16);
            e.data[10..12].copy_from_slice(&bits);
        });
        // inspect reads only the headers, so it does not see the values
        assert_model_rejected(&dir, &["model.safetensors", "transformer.h.1.attn.c_proj.weight", "non-finite"], None);
    }
}

#[test]
fn weights_missing_tensor() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    edit_tensors(&dir.join("model.safetensors"), |entries| entries.retain(|e| e.name != "transformer.h.1.mlp.c_fc.bias"));
    assert_model_rejected(&dir, &["model.safetensors", "transformer.h.1.mlp.c_fc.bias"], Some(&["model.safetensors", "transformer.h.1.mlp.c_fc.bias"]));
}

#[test]
fn weights_unexpected_extra_tensor() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "gpt2");
    edit_tensors(&dir.join("model.safetensors"), |entries| {
        entries.push(Entry { name: "transformer.h.0.mlp.extra.weight".into(), dtype: Dtype::BF16, shape: vec![4, 4], data: vec![0; 32] });
    });
    let needles = ["model.safetensors", "transformer.h.0.mlp.extra.weight"];
    assert_model_rejected(&dir, &needles, Some(&needles));
}

#[test]
fn sharded_index_points_at_missing_shard() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "llama");
    fs::remove_file(dir.join("model-00002-of-00003.safetensors")).unwrap();
    assert_model_rejected(&dir, &["model-00002-of-00003.safetensors"], Some(&["model-00002-of-00003.safetensors"]));
}

#[test]
fn sharded_missing_tensor_names_the_index() {
    let tmp = TempDir::new().unwrap();
    let dir = fixture_copy(&tmp, "llama");
    let shard = dir.join("model-00003-of-00003.safetensors");
    let (entries, _) = read_entries(&shard);
    assert!(entries.iter().any(|e| e.name == "lm_head.weight"));
    edit_tensors(&shard, |entries| entries.retain(|e| e.name != "lm_head.weight"));
    let mut index = read_json(&dir.join("model.safetensors.index.json"));
    index["weight_map"].as_object_mut().unwrap().remove("lm_head.weight");
    write_json(&dir.join("model.safetensors.index.json"), &index);
    assert_model_rejected(&dir, &["model.safetensors.index.json", "lm_head.weight"], Some(&["model.safetensors.index.json", "lm_head.weight"]));
}

#[test]
fn convert_refuses_a_non_empty_output_folder() {
    let tmp = TempDir::new().unwrap();
    let out_dir = tmp.path().join("existing");
    fs::create_dir(&out_dir).unwrap();
    fs::write(out_dir.join("keep.txt"), "precious").unwrap();
    let src = fixtures().join("gpt2").join("model");
    let args = [OsStr::new("convert"), "--model".as_ref(), src.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str()];
    error_line(runtime(args), "convert into a non-empty folder", &["existing", "overwrite_output_dir"]);
    let names: Vec<_> = fs::read_dir(&out_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![OsStr::new("keep.txt").to_os_string()], "the folder's contents changed");
    assert_eq!(fs::read_to_string(out_dir.join("keep.txt")).unwrap(), "precious");
    for entry in fs::read_dir(tmp.path()).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "temporary {name} left behind");
    }

    // with --overwrite_output_dir the folder is replaced by the converted model
    let args = [OsStr::new("convert"), "--model".as_ref(), src.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str(), "--overwrite_output_dir".as_ref()];
    ok(runtime(args), "convert --overwrite_output_dir");
    assert!(out_dir.join("model.safetensors").is_file());
    assert!(!out_dir.join("keep.txt").exists(), "the old contents were replaced");
}

#[test]
fn init_refuses_a_non_empty_output_folder() {
    let tmp = TempDir::new().unwrap();
    let config = tmp.path().join("config.json");
    write_json(&config, &small_llama_config());
    let out_dir = tmp.path().join("existing");
    fs::create_dir(&out_dir).unwrap();
    fs::write(out_dir.join("keep.txt"), "precious").unwrap();
    let args = [OsStr::new("init"), "--config".as_ref(), config.as_os_str(), "--output_dir".as_ref(), out_dir.as_os_str()];
    error_line(runtime(args), "init into a non-empty folder", &["existing", "overwrite_output_dir"]);
    assert_eq!(fs::read_to_string(out_dir.join("keep.txt")).unwrap(), "precious");
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 1);
}

/// `forward` on the gpt2 fixture with the given inputs must fail naming the inputs file and `needles`.
fn assert_inputs_rejected(tensors: &[(&str, Vec<usize>, Vec<i64>)], needles: &[&str]) {
    let tmp = TempDir::new().unwrap();
    let inputs = tmp.path().join("bad_inputs.safetensors");
    write_inputs(&inputs, tensors);
    let output = tmp.path().join("out.safetensors");
    let model = fixtures().join("gpt2").join("model");
    let args = [OsStr::new("forward"), "--model".as_ref(), model.as_os_str(), "--inputs".as_ref(), inputs.as_os_str(), "--output".as_ref(), output.as_os_str()];
    let mut all = vec!["bad_inputs.safetensors"];
    all.extend_from_slice(needles);
    error_line(runtime(args), &format!("forward with {needles:?}"), &all);
    assert!(!output.exists(), "output written despite the error");
}

#[test]
fn forward_rejects_input_ids_outside_the_vocabulary() {
    // vocab is 96: 96 is the first id outside it
    assert_inputs_rejected(&[("input_ids", vec![1, 4], vec![1, 2, 96, 3])], &["input_ids", "96"]);
    assert_inputs_rejected(&[("input_ids", vec![1, 4], vec![1, 2, -1, 3])], &["input_ids"]);
    // an id that only fits in 64 bits must not wrap around into the vocabulary
    assert_inputs_rejected(&[("input_ids", vec![1, 4], vec![1, 2, (1 << 32) + 5, 3])], &["input_ids"]);
}

#[test]
fn forward_rejects_bad_companion_tensors() {
    let ids = ("input_ids", vec![1, 4], vec![1, 2, 3, 4]);
    assert_inputs_rejected(&[ids.clone(), ("labels", vec![1, 4], vec![1, 2, 96, 4])], &["labels"]);
    assert_inputs_rejected(&[ids.clone(), ("attention_mask", vec![1, 4], vec![1, 1, 2, 1])], &["attention_mask"]);
    assert_inputs_rejected(&[ids.clone(), ("labels", vec![1, 3], vec![1, 2, 3])], &["labels"]);
    assert_inputs_rejected(&[("input_ids", vec![4], vec![1, 2, 3, 4])], &["input_ids"]);
    assert_inputs_rejected(&[("attention_mask", vec![1, 4], vec![1, 1, 1, 1])], &["input_ids"]);
}

#[test]
fn forward_rejects_a_broken_inputs_file() {
    let tmp = TempDir::new().unwrap();
    let model = fixtures().join("gpt2").join("model");
    let output = tmp.path().join("out.safetensors");
    let inputs = tmp.path().join("garbage.safetensors");
    fs::write(&inputs, b"not a safetensors file at all").unwrap();
    let args = [OsStr::new("forward"), "--model".as_ref(), model.as_os_str(), "--inputs".as_ref(), inputs.as_os_str(), "--output".as_ref(), output.as_os_str()];
    error_line(runtime(args), "forward with a garbage inputs file", &["garbage.safetensors"]);
    let missing = tmp.path().join("absent.safetensors");
    let args =
        [OsStr::new("forward"), "--model".as_ref(), model.as_os_str(), "--inputs".as_ref(), missing.as_os_str(), "--output".as_ref(), output.as_os_str()];
    error_line(runtime(args), "forward with a missing inputs file", &["absent.safetensors"]);
    assert!(!output.exists());
}
