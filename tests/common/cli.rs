//! Helpers of the command-line tests (`tests/cli.rs`, `tests/cli_errors.rs`): running the binary,
//! asserting a clean success or one clean `error:` line, and reading and editing safetensors files.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value};
use tempfile::TempDir;

use super::fixtures;

pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn runtime<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().expect("the runtime binary runs");
    Output { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

/// Asserts success and returns stdout.
pub fn ok(out: Output, what: &str) -> String {
    assert_eq!(out.code, Some(0), "{what} failed:\nstdout: {}\nstderr: {}", out.stdout, out.stderr);
    out.stdout
}

/// Asserts a clean failure: non-zero exit, no panic, exactly one stderr line, starting with
/// `error:` and containing every one of `needles`. Returns that line.
pub fn error_line(out: Output, what: &str, needles: &[&str]) -> String {
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

/// As [`error_line`] for a command that logs before it fails: the log lines may come first, the
/// error is the last line and the only one that starts with `error:`.
pub fn last_error_line(out: Output, what: &str, needles: &[&str]) -> String {
    assert!(out.code.is_some_and(|c| c != 0), "{what}: expected a non-zero exit, got {:?}\nstderr: {}", out.code, out.stderr);
    assert!(!out.stderr.contains("panicked"), "{what}: the binary panicked:\n{}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{what}: expected one error line:\n{}", out.stderr);
    assert_eq!(out.stderr.trim_end().lines().last(), Some(errors[0]), "{what}: the error is not the last line:\n{}", out.stderr);
    for needle in needles {
        assert!(errors[0].contains(needle), "{what}: error line does not mention `{needle}`: {}", errors[0]);
    }
    errors[0].to_string()
}

/// Asserts that neither `parent/name` nor a leftover `.name.partial-*` / `.name.old-*` exists.
pub fn assert_nothing_written(parent: &Path, name: &str, what: &str) {
    assert!(!parent.join(name).exists(), "{what}: output folder {} was left behind", parent.join(name).display());
    for entry in fs::read_dir(parent).unwrap() {
        let entry = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!entry.starts_with(&format!(".{name}.")), "{what}: temporary folder {entry} was left behind");
    }
}

pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A copy of `tests/fixtures/<case>/model` at `tmp/<case>`.
pub fn fixture_copy(tmp: &TempDir, case: &str) -> PathBuf {
    let dir = tmp.path().join(case);
    copy_dir(&fixtures().join(case).join("model"), &dir);
    dir
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
}

pub fn write_json(path: &Path, v: &Value) {
    fs::write(path, serde_json::to_string_pretty(v).unwrap()).unwrap();
}

/// One tensor of a safetensors file, owned.
pub struct Entry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// Reads a safetensors file into owned entries (in file order) plus its metadata.
pub fn read_entries(path: &Path) -> (Vec<Entry>, Option<HashMap<String, String>>) {
    let bytes = fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> =
        st.tensors().into_iter().map(|(name, v)| Entry { name, dtype: v.dtype(), shape: v.shape().to_vec(), data: v.data().to_vec() }).collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    (entries, meta.metadata().clone())
}

pub fn write_entries(path: &Path, entries: &[Entry], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> = entries.iter().map(|e| (e.name.clone(), TensorView::new(e.dtype, e.shape.clone(), &e.data).unwrap())).collect();
    fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
}

/// Rewrites the safetensors file `path` after letting `edit` change its tensors.
pub fn edit_tensors(path: &Path, edit: impl FnOnce(&mut Vec<Entry>)) {
    let (mut entries, meta) = read_entries(path);
    edit(&mut entries);
    write_entries(path, &entries, meta);
}

pub fn entry<'a>(entries: &'a mut [Entry], name: &str) -> &'a mut Entry {
    entries.iter_mut().find(|e| e.name == name).unwrap_or_else(|| panic!("fixture has no tensor {name}"))
}

/// An I64 input file for `forward`.
pub fn write_inputs(path: &Path, tensors: &[(&str, Vec<usize>, Vec<i64>)]) {
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
pub fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name}", path.display()));
    assert_eq!(v.dtype(), Dtype::F32, "{name} dtype");
    let values = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    (v.shape().to_vec(), values)
}

/// Name -> (dtype, shape) of every tensor in a safetensors file, from its header.
pub fn header(path: &Path) -> HashMap<String, (Dtype, Vec<usize>)> {
    let bytes = fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(n, v)| (n, (v.dtype(), v.shape().to_vec()))).collect()
}

pub const CASES: [(&str, &str, &str); 3] =
    [("gpt2", "GPT2LMHeadModel", "29,568"), ("llama", "LlamaForCausalLM", "21,664"), ("qwen2", "Qwen2ForCausalLM", "37,296")];

/// Runs `forward` on `model` with `inputs`, returning the logits' shape and values.
pub fn forward_logits(model: &Path, inputs: &Path, output: &Path) -> (Vec<usize>, Vec<f32>) {
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

pub fn small_llama_config() -> Value {
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
