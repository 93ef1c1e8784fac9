//! A padding plugin whose batch is wrong (`tests/plugins/bad-pad`: too few rows, ragged lists, a
//! mask value of 2, a token id, label or position out of range, rows longer than the model
//! takes) gets one clear error naming the plugin, the hook and what is wrong; through
//! `runtime train` that error ends the run of a decoder-only and of an encoder-decoder model
//! before any step, with a non-zero exit and no model written.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use runtime::plugin::{PadExample, Plugin, PluginSpec, Side, WitPadOptions};

fn bad_pad() -> PathBuf {
    common::wasm_plugins().join("bad_pad.wasm")
}

fn with_mode(mode: &str) -> Plugin {
    let mut spec = PluginSpec::new(bad_pad());
    spec.options.insert("mode".into(), mode.into());
    Plugin::load(&spec, None).unwrap()
}

#[test]
fn each_wrong_batch_is_one_clear_error() {
    let examples = vec![PadExample { input_ids: vec![3, 4, 5], labels: vec![3, 4, 5] }, PadExample { input_ids: vec![6, 7], labels: vec![-100, 7] }];
    let opts = WitPadOptions { side: Side::Right, pad_token_id: 0, max_length: None, pad_to_multiple_of: None };
    // without a mode the plugin pads as the tokenizer does, and the batch is taken
    let good = with_mode("").pad(&examples, &opts, 50, 64).unwrap();
    assert_eq!((good.batch_size, good.seq_len), (2, 3));
    for (mode, expected) in [
        ("rows", "returned 1 rows for 2 examples"),
        ("ragged", "`input-ids` has 5 values, not batch-size x seq-len = 2 x 3 (not rectangular)"),
        ("mask", "attention mask value 2 is not 0 or 1"),
        ("id", "token id 1073741824 is out of range (vocabulary of 50)"),
        ("label", "label -7 is out of range (-100 or a token id below 50)"),
        ("long", "returned rows of 1048576 tokens; the model takes 1 to 64"),
        ("position", "position id 1073741824 is out of range (the model has 64 positions)"),
    ] {
        let err = with_mode(mode).pad(&examples, &opts, 50, 64).unwrap_err().to_string();
        assert!(err.contains("plugin `bad-pad`") && err.contains("hook padding.pad") && err.contains(expected), "{mode}: {err}");
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

/// `runtime train` with the bad-pad plugin in `mode` on the model and data in `settings` (TOML
/// lines): it fails with the plugin's error and writes no model.
fn fails_cleanly(tmp: &Path, name: &str, settings: &str, mode: &str, expected: &str) {
    let out = tmp.join(name);
    let cfg = tmp.join(format!("{name}.toml"));
    let plugin = format!("[[plugins]]\npath = \"{}\"\noptions = {{ mode = \"{mode}\" }}\n", bad_pad().display());
    std::fs::write(&cfg, format!("{settings}output_dir = \"{}\"\nmax_steps = 2\nsave_steps = 1\ndisable_tqdm = true\n\n{plugin}", out.display())).unwrap();
    let o = run(&["train", "--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{name}: the run succeeded");
    assert!(err.contains("plugin `bad-pad`") && err.contains("padding.pad") && err.contains(expected), "{name}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let written: Vec<String> = std::fs::read_dir(&out).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect()).unwrap_or_default();
    assert!(!written.iter().any(|n| n.starts_with("model") || n.starts_with("checkpoint-")), "{name}: wrote {written:?}");
}

#[test]
fn a_wrong_batch_ends_a_decoder_only_and_an_encoder_decoder_run() {
    let tmp = tempfile::tempdir().unwrap();
    let fx = common::fixtures();
    let decoder = fx.join("trainer");
    let settings = format!(
        "model_name_or_path = \"{}\"\ntokenizer_name = \"{}\"\ntrain_file = \"{}\"\n",
        decoder.join("init").display(),
        decoder.join("data").display(),
        decoder.join("data/train.jsonl").display()
    );
    fails_cleanly(tmp.path(), "decoder_only", &settings, "mask", "attention mask value 2 is not 0 or 1");
    let seq2seq = fx.join("seq2seq_trainer");
    let settings = format!("model_name_or_path = \"{}\"\ntrain_file = \"{}\"\n", seq2seq.join("init").display(), seq2seq.join("data/train.jsonl").display());
    fails_cleanly(tmp.path(), "t5_rows", &settings, "rows", "rows for");
    fails_cleanly(tmp.path(), "t5_id", &settings, "id", "token id 1073741824 is out of range");
}
