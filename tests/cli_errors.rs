//! End-to-end tests of the `runtime` binary on broken inputs: model folders, configs, weights
//! and input files that are missing, malformed or inconsistent. Each command must fail with one
//! `error:` line naming the file and the tensor or field, and write nothing.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::Path;

use common::cli::*;
use common::fixtures;
use safetensors::tensor::Dtype;
use serde_json::{json, Value};
use tempfile::TempDir;

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
