//! The binary on hostile input found by exploring it: sizes beyond any batch or this machine's
//! memory, outputs that would delete their inputs, files that are not regular files, malformed
//! configs of the kinds the model and tokenizer libraries panic or compute garbage on. Each must
//! end as one `error:` line without a panic, an abort or lost data; and `save_total_limit 1` keeps
//! a resumable checkpoint as transformers does.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::cli::*;
use common::fixtures;
use serde_json::json;
use tempfile::TempDir;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The addition example (2 digits, 64 examples) in `tmp/ex`.
fn example(tmp: &TempDir) -> std::path::PathBuf {
    let ex = tmp.path().join("ex");
    ok(runtime(["example", "addition", "--output_dir", s(&ex), "--n_train", "64", "--n_eval", "16", "--digits", "2"]), "example");
    ex
}

/// `runtime train` on the example, writing to `out`, with `extra` settings.
fn train(ex: &Path, out: &Path, extra: &[&str]) -> Output {
    let config = ex.join("train.toml");
    let mut args = vec!["train", "--config", s(&config), "--output_dir", s(out), "--disable_tqdm", "--per_device_train_batch_size", "8"];
    args.extend(["--logging_steps", "1", "--eval_strategy", "no", "--load_best_model_at_end", "false"]);
    args.extend(extra);
    runtime(args)
}

#[test]
fn an_output_folder_that_is_or_holds_an_input_is_refused() {
    let tmp = TempDir::new().unwrap();
    let model = fixture_copy(&tmp, "llama");
    // convert into the folder above the model: replacing it would delete the model
    let out = runtime(["convert", "--model", s(&model), "--output_dir", s(tmp.path()), "--overwrite_output_dir"]);
    error_line(out, "convert into the model's parent", &["holds the model folder"]);
    assert!(model.join("model.safetensors.index.json").is_file() && model.join("config.json").is_file(), "the model was deleted");
    // merge into the adapter's own folder
    let adapter = tmp.path().join("adapter");
    copy_dir(&fixtures().join("lora/llama_all_linear/adapter"), &adapter);
    let out = runtime(["merge", "--model", s(&model), "--adapter", s(&adapter), "--output_dir", s(&adapter), "--overwrite_output_dir"]);
    error_line(out, "merge into the adapter", &["the output folder is the adapter folder"]);
    assert!(adapter.join("adapter_model.safetensors").is_file(), "the adapter was deleted");
}

#[test]
fn sizes_beyond_any_batch_or_the_memory_are_one_error_line() {
    let tmp = TempDir::new().unwrap();
    let tok = fixtures().join("tokenizer");
    let small = ["bench", "--hidden", "32", "--n_head", "4", "--vocab", "64", "--seq", "8", "--steps", "1", "--warmup", "0"];
    // one layer unless the case sets the count
    let with = |extra: &[&str]| {
        let layers: &[&str] = if extra.contains(&"--n_layer") { &[] } else { &["--n_layer", "1"] };
        small.iter().chain(layers).chain(extra).map(|a| a.to_string()).collect::<Vec<_>>()
    };
    let ex = tmp.path().join("never");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (with(&["--batch", "18446744073709551615"]), vec!["--batch x --seq", "beyond any batch"]),
        (with(&["--batch", "2", "--lora_r", "4294967296"]), vec!["the training benchmark needs at least"]),
        (with(&["--batch", "2", "--n_layer", "100000000"]), vec![]),
        (with(&["--batch", "2", "--device", "cuda", "--bf16", "--roofline", "h100", "--n_layer", "100000000"]), vec!["at most 4096 layers"]),
        (with(&["--batch", "2", "--decode", "4", "--prompt", "4294967296"]), vec!["--prompt + --decode"]),
        (with(&["--batch", "2", "--decode", "4", "--device", "cuda"]), vec!["--device does not apply to --decode"]),
        (["bench", "--arch", "t5", "--n_head", "0"].map(String::from).to_vec(), vec!["--n_head"]),
        (with(&["--batch", "2", "--arch", "t5", "--device", "cuda", "--roofline", "h100"]), vec!["--device, --roofline do not apply"]),
        (
            ["tokenize", "--model", s(&tok), "--text", "a", "--padding", "longest", "--pad_to_multiple_of", "18446744073709551615"].map(String::from).to_vec(),
            vec!["pad_to_multiple_of"],
        ),
        (
            ["tokenize", "--model", s(&tok), "--text", "a", "--padding", "max_length", "--max_length", "4294967296"].map(String::from).to_vec(),
            vec!["padded batch"],
        ),
        (["plugin", "bench"].map(String::from).to_vec(), vec!["--loss"]),
        (["example", "addition", "--output_dir", s(&ex), "--n_train", "18446744073709551615", "--n_eval", "1"].map(String::from).to_vec(), vec!["--n_train"]),
    ];
    for (args, needles) in cases {
        let what = args.join(" ");
        error_line(runtime(&args), &what, &needles);
    }
    assert!(!ex.exists(), "the refused example wrote {}", ex.display());
}

#[test]
fn a_named_checkpoint_without_its_state_is_refused_and_kept() {
    let tmp = TempDir::new().unwrap();
    let ex = example(&tmp);
    let out = tmp.path().join("out");
    ok(train(&ex, &out, &["--max_steps", "2", "--save_steps", "1"]), "train");
    let cp = out.join("checkpoint-1");
    std::fs::remove_file(cp.join("trainer_state.json")).unwrap();
    let run = train(&ex, &out, &["--max_steps", "3", "--save_steps", "1", "--resume_from_checkpoint", s(&cp)]);
    let line = last_error_line(run, "resume from a checkpoint without trainer_state.json", &["checkpoint-1", "trainer_state.json"]);
    assert!(cp.join("model.safetensors").is_file() && cp.join("optimizer.safetensors").is_file(), "{line}: the checkpoint was removed");
}

#[test]
fn save_total_limit_1_keeps_the_newest_checkpoint_beside_the_best() {
    let tmp = TempDir::new().unwrap();
    let ex = example(&tmp);
    let out = tmp.path().join("out");
    let extra = ["--max_steps", "6", "--eval_strategy", "steps", "--eval_steps", "1", "--save_steps", "1", "--save_total_limit", "1"];
    ok(train(&ex, &out, &[&extra[..], &["--load_best_model_at_end", "true", "--learning_rate", "0.05"]].concat()), "train");
    let state = read_json(&out.join("trainer_state.json"));
    let best = state["best_model_checkpoint"].as_str().expect("a best checkpoint").to_string();
    let mut kept: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("checkpoint-")).collect();
    kept.sort();
    // as transformers: the best, and the newest so that the run can be resumed
    let best_name = Path::new(&best).file_name().unwrap().to_string_lossy().into_owned();
    let mut want = vec![best_name, "checkpoint-6".to_string()];
    want.sort();
    want.dedup();
    assert_eq!(kept, want, "best {best}");
}

/// Runs `runtime args` and fails the test, rather than hanging it, past 60 s.
fn output_within_a_minute(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("`runtime {}` still waits after 60 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    Output { code: out.status.code(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
}

#[test]
fn a_fifo_or_a_device_as_an_input_file_is_refused_not_read() {
    let tmp = TempDir::new().unwrap();
    let fifo = tmp.path().join("run.toml");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    error_line(output_within_a_minute(&["args", "--config", s(&fifo)]), "a FIFO as the config", &["run.toml", "not a regular file"]);
    let zero = tmp.path().join("zero.toml");
    std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
    error_line(output_within_a_minute(&["args", "--config", s(&zero)]), "/dev/zero as the config", &["zero.toml", "not a regular file"]);
}

#[test]
fn malformed_model_adapter_and_tokenizer_files_are_one_error_line() {
    let tmp = TempDir::new().unwrap();
    // T5 buckets whose logarithmic range is empty: the bucket formula would index out of bounds
    let t5 = fixture_copy(&tmp, "t5");
    let mut cfg = read_json(&t5.join("config.json"));
    cfg["relative_attention_max_distance"] = json!(1);
    write_json(&t5.join("config.json"), &cfg);
    error_line(runtime(["inspect", s(&t5)]), "T5 max distance 1", &["relative_attention_max_distance"]);
    // an init spread beyond f32: every weight would be drawn as zero or infinity
    let config = tmp.path().join("config.json");
    let mut c = small_llama_config();
    c["initializer_range"] = json!(1e40);
    write_json(&config, &c);
    let init_out = tmp.path().join("init");
    error_line(runtime(["init", "--config", s(&config), "--output_dir", s(&init_out)]), "initializer_range 1e40", &["initializer_range", "32-bit float"]);
    // a Llama that rotates half of each head: computing the whole head would be another model
    let llama = fixture_copy(&tmp, "llama");
    let mut cfg = read_json(&llama.join("config.json"));
    cfg["partial_rotary_factor"] = json!(0.5);
    write_json(&llama.join("config.json"), &cfg);
    error_line(runtime(["inspect", s(&llama)]), "partial rotary", &["partial_rotary_factor"]);
    cfg.as_object_mut().unwrap().remove("partial_rotary_factor");
    write_json(&llama.join("config.json"), &cfg);
    // an adapter config that gives a key twice
    let adapter = tmp.path().join("adapter");
    copy_dir(&fixtures().join("lora/llama_all_linear/adapter"), &adapter);
    let text = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    let twice = text.replacen('{', "{\"lora_alpha\": 1, ", 1);
    std::fs::write(adapter.join("adapter_config.json"), twice).unwrap();
    let merged = tmp.path().join("merged");
    error_line(runtime(["merge", "--model", s(&llama), "--adapter", s(&adapter), "--output_dir", s(&merged)]), "adapter key twice", &["lora_alpha", "twice"]);
    // a template that inserts a special token it does not define: the tokenizers crate panics
    let tok = tmp.path().join("tok");
    copy_dir(&fixtures().join("tokenizer"), &tok);
    let mut t = read_json(&tok.join("tokenizer.json"));
    t["post_processor"]["single"][0]["SpecialToken"]["id"] = json!("<nope>");
    write_json(&tok.join("tokenizer.json"), &t);
    error_line(runtime(["tokenize", "--model", s(&tok), "--text", "hello"]), "undefined template token", &["post_processor", "<nope>"]);
}

#[test]
fn a_search_whose_trials_all_fail_fails_and_a_huge_grid_is_refused() {
    let tmp = TempDir::new().unwrap();
    let ex = example(&tmp);
    let space = tmp.path().join("space.toml");
    // a float batch size: every trial fails to start
    std::fs::write(&space, "[per_device_train_batch_size]\ntype = \"float\"\nlow = 1\nhigh = 2\n").unwrap();
    let config = ex.join("train.toml");
    let base = ["hp-search", "--config", s(&config), "--space", s(&space), "--n_trials", "2"];
    let tail = ["--eval_strategy", "steps", "--eval_steps", "2", "--max_steps", "2", "--disable_tqdm"];
    let out = tmp.path().join("search");
    let args: Vec<&str> = base.iter().copied().chain(["--output_dir", s(&out), "--sampler", "random"]).chain(tail).collect();
    last_error_line(runtime(&args), "all trials failed", &["none of the 2 trials completed"]);
    std::fs::write(&space, "[learning_rate]\ntype = \"float\"\nlow = 0\nhigh = 1\nstep = 1e-300\n").unwrap();
    let out = tmp.path().join("grid");
    let args: Vec<&str> = base.iter().copied().chain(["--output_dir", s(&out), "--sampler", "grid"]).chain(tail).collect();
    last_error_line(runtime(&args), "a grid of 1e300 points", &["learning_rate", "at most 1000000 points"]);
}

#[test]
fn a_qwen2_whose_layers_all_attend_fully_runs_past_its_window() {
    let tmp = TempDir::new().unwrap();
    let model = fixture_copy(&tmp, "qwen2");
    let inputs = tmp.path().join("inputs.safetensors");
    write_inputs(&inputs, &[("input_ids", vec![1, 8], (1..=8).collect())]);
    let plain = forward_logits(&model, &inputs, &tmp.path().join("plain.safetensors"));
    // transformers: with use_sliding_window, only the layers from max_window_layers (28) on, or
    // those layer_types marks, slide; these two layers attend to the whole 8 tokens
    let mut cfg = read_json(&model.join("config.json"));
    cfg["use_sliding_window"] = json!(true);
    cfg["sliding_window"] = json!(4);
    cfg.as_object_mut().unwrap().remove("layer_types");
    write_json(&model.join("config.json"), &cfg);
    assert_eq!(forward_logits(&model, &inputs, &tmp.path().join("full.safetensors")), plain);
    // every layer from 0 on slides: refused past the window, not computed as full attention
    cfg["max_window_layers"] = json!(0);
    write_json(&model.join("config.json"), &cfg);
    let out = tmp.path().join("sliding.safetensors");
    error_line(runtime(["forward", "--model", s(&model), "--inputs", s(&inputs), "--output", s(&out)]), "sliding layers", &["sliding_window (4)"]);
    cfg["layer_types"] = json!(["full_attention", "banana"]);
    write_json(&model.join("config.json"), &cfg);
    error_line(runtime(["inspect", s(&model)]), "a bad layer type", &["layer_types", "banana"]);
}
