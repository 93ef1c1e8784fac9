//! The output folder under stops, kills, full disks and concurrent runs, end to end through the
//! binary: SIGTERM/SIGINT stop with a checkpoint and an exact resume, a second signal exits at
//! once, a second run in the same folder is refused, what an earlier run left half-done is
//! cleaned, an overwritten folder's old checkpoints do not outlive the new run's, and a full disk
//! or an unwritable folder loses nothing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// A small addition example in `dir`.
fn example(dir: &Path) -> PathBuf {
    let d = dir.join("addition");
    ok(runtime(&["example", "addition", "--output_dir", d.to_str().unwrap(), "--n_train", "256", "--n_eval", "32", "--digits", "2"]), "example");
    d
}

fn train_args(ex: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--config", ex.join("train.toml").to_str().unwrap(), "--output_dir", out.to_str().unwrap(), "--disable_tqdm"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(["--per_device_train_batch_size", "16", "--eval_strategy", "no", "--load_best_model_at_end", "false"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train(ex: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(train_args(ex, out, extra)).output().unwrap()
}

/// A training run in the background with its stdout (one JSON line per logged step) in `log`.
fn spawn(ex: &Path, out: &Path, extra: &[&str], log: &Path) -> Child {
    let stdout = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(train_args(ex, out, extra)).stdout(stdout).stderr(Stdio::piped()).spawn().unwrap()
}

/// Waits until `log` holds at least `n` lines.
fn wait_for_lines(log: &Path, n: usize) {
    let started = Instant::now();
    while std::fs::read_to_string(log).unwrap_or_default().lines().count() < n {
        assert!(started.elapsed() < Duration::from_secs(120), "fewer than {n} log lines after two minutes");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

fn weights(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("model.safetensors")).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    v.sort();
    v
}

/// SIGTERM and SIGINT finish the step, write a checkpoint of it and exit with status 75
/// ("stopped, resumable"); `resume_from_checkpoint true` then ends with the same weights as an
/// uninterrupted run, byte for byte.
#[test]
fn a_signal_stops_with_a_checkpoint_and_the_resumed_run_is_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let args = ["--max_steps", "400", "--save_steps", "1000", "--logging_steps", "1"];
    let straight = tmp.path().join("straight");
    ok(train(&ex, &straight, &args), "straight run");
    for sig in ["-TERM", "-INT"] {
        let out = tmp.path().join(format!("stopped{sig}"));
        let log = tmp.path().join(format!("log{sig}"));
        let child = spawn(&ex, &out, &args, &log);
        wait_for_lines(&log, 5);
        signal(&child, sig);
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(75), "{sig}: {err}");
        assert!(err.contains("stopped after step") && err.contains("--resume_from_checkpoint true"), "{err}");
        assert!(!out.join("model.safetensors").exists(), "{sig}: the stopped run wrote a final model");
        let step: u64 = err.split("stopped after step ").nth(1).unwrap().split(';').next().unwrap().parse().unwrap();
        assert!(out.join(format!("checkpoint-{step}/trainer_state.json")).exists(), "{sig}: no checkpoint-{step}: {:?}", names(&out));
        // every step logged up to the stop reached the redirected stdout
        assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count() as u64, step, "{sig}");
        let mut resume = args.to_vec();
        resume.extend(["--resume_from_checkpoint", "true"]);
        ok(train(&ex, &out, &resume), "resume");
        assert!(weights(&straight) == weights(&out), "{sig}: weights after stop + resume differ from the uninterrupted run");
    }
}

/// A second signal while the first is being handled exits at once, with the status the
/// signal's default action gives, and leaves no half-written checkpoint in view.
#[test]
fn a_second_signal_exits_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    let log = tmp.path().join("log");
    let child = spawn(&ex, &out, &["--max_steps", "100000", "--save_steps", "100000", "--logging_steps", "1"], &log);
    wait_for_lines(&log, 3);
    let pid = child.id().to_string();
    // two signals microseconds apart: the second arrives while the step is still running (two
    // different ones, which the kernel never merges into one delivery; whichever comes second
    // exits with its own status)
    let status = Command::new("sh").args(["-c", &format!("kill -TERM {pid}; kill -INT {pid}")]).status().unwrap();
    assert!(status.success());
    let o = child.wait_with_output().unwrap();
    assert!(matches!(o.status.code(), Some(130 | 143)), "{:?}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    let visible: Vec<String> = names(&out).into_iter().filter(|n| !n.starts_with('.')).collect();
    for n in &visible {
        assert!(!n.starts_with("checkpoint-") || out.join(n).join("trainer_state.json").exists(), "half-written {n}");
    }
}

/// A second run into an output folder another run is using is refused, naming the first's PID.
#[test]
fn a_second_run_in_the_same_output_dir_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    let log = tmp.path().join("log");
    let mut first = spawn(&ex, &out, &["--max_steps", "100000", "--save_steps", "100000", "--logging_steps", "1"], &log);
    wait_for_lines(&log, 1);
    for extra in [vec![], vec!["--overwrite_output_dir", "true"], vec!["--resume_from_checkpoint", "true"]] {
        let mut args = vec!["--max_steps", "4"];
        args.extend(extra.iter());
        let o = train(&ex, &out, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?}: a second run was let in");
        if extra.is_empty() || extra[0] == "--overwrite_output_dir" {
            assert!(err.contains(&format!("in use by another run (PID {})", first.id())), "{extra:?}: {err}");
        }
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // once the first is gone, the folder can be taken over
    ok(train(&ex, &out, &["--max_steps", "2", "--overwrite_output_dir", "true"]), "after the first run ended");
}

/// What a killed run left half-done is removed at the next start and reported in one line: a
/// staging folder alone does not make the folder "not empty" (a plain rerun starts), and a
/// half-deleted checkpoint is skipped and removed when resuming.
#[test]
fn leftovers_of_an_earlier_run_are_cleaned_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join(".checkpoint-2.partial-999999")).unwrap();
    std::fs::write(out.join(".checkpoint-2.partial-999999/model.safetensors"), b"half").unwrap();
    let err = ok(train(&ex, &out, &["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0"]), "rerun after an early kill");
    assert!(err.contains("removed what an earlier run left half-done: .checkpoint-2.partial-999999"), "{err}");
    assert!(!out.join(".checkpoint-2.partial-999999").exists());
    // checkpoint-4 half-deleted (as an old rotation killed midway left it): resume skips it
    for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json"] {
        std::fs::remove_file(out.join("checkpoint-4").join(f)).unwrap();
    }
    let err = ok(train(&ex, &out, &["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "0", "--resume_from_checkpoint", "true"]), "resume");
    assert!(err.contains("resuming from") && err.contains("checkpoint-2 at step 2"), "{err}");
    assert!(err.contains("removed what an earlier run left half-done: checkpoint-4"), "{err}");
    assert!(out.join("checkpoint-4/trainer_state.json").exists() && out.join("checkpoint-6/trainer_state.json").exists());
}

/// `overwrite_output_dir` into a folder holding an earlier run's checkpoints removes them (and
/// says so), so rotation keeps the new run's checkpoints and a later resume finds the new run.
#[test]
fn overwriting_removes_the_earlier_runs_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    ok(train(&ex, &out, &["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0"]), "first run");
    for (from, to) in [(2, 78), (4, 80)] {
        std::fs::rename(out.join(format!("checkpoint-{from}")), out.join(format!("checkpoint-{to}"))).unwrap();
    }
    let err = ok(train(&ex, &out, &["--max_steps", "6", "--save_steps", "2", "--save_total_limit", "2", "--overwrite_output_dir", "true"]), "second run");
    assert!(err.contains("overwrite_output_dir: removed the earlier run's checkpoint-78, checkpoint-80"), "{err}");
    let cps: Vec<String> = names(&out).into_iter().filter(|n| n.starts_with("checkpoint-")).collect();
    assert_eq!(cps, vec!["checkpoint-4", "checkpoint-6"]);
}

/// A full disk at the final save (injected): the run fails with the file named, the staging
/// folder is gone, and the previous output and the checkpoints are intact.
#[test]
fn a_full_disk_at_the_final_save_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    ok(train(&ex, &out, &["--max_steps", "2", "--save_steps", "2"]), "first run");
    let before = weights(&out);
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(train_args(&ex, &out, &["--max_steps", "4", "--save_steps", "2", "--resume_from_checkpoint", "true", "--save_total_limit", "0"]))
        .env("RUNTIME_FAULT_DISK_FULL", ".final.partial-")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(".final.partial-") && !err.contains("panicked"), "{err}");
    assert!(names(&out).iter().all(|n| !n.contains(".partial-")), "staging left behind: {:?}", names(&out));
    assert!(weights(&out) == before, "the previous output changed");
    assert!(out.join("checkpoint-4/trainer_state.json").exists(), "{:?}", names(&out));
}

/// A folder that cannot be written (a full disk injected on the start's probe; and, when the
/// tests do not run as root, a read-only folder) is refused before step 1, not at the first save.
#[test]
fn an_unwritable_output_dir_is_refused_before_training() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(train_args(&ex, &out, &["--max_steps", "60", "--logging_steps", "1"]))
        .env("RUNTIME_FAULT_DISK_FULL", ".write-probe")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("output_dir is not writable"), "{err}");
    assert!(o.stdout.is_empty(), "it trained before failing: {}", String::from_utf8_lossy(&o.stdout));
    use std::os::unix::fs::PermissionsExt;
    let ro = tmp.path().join("read-only");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if std::fs::write(ro.join("x"), b"x").is_ok() {
        eprintln!("running as root: a read-only folder is writable, so that half is not checked");
        return;
    }
    let o = train(&ex, &ro, &["--max_steps", "60", "--logging_steps", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("Permission denied") && o.stdout.is_empty(), "{err}");
}

/// `runtime example addition` refuses a folder holding other files unless told to write into it,
/// and then leaves the other files alone.
#[test]
fn the_example_refuses_a_non_empty_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mine");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("train.jsonl"), b"my data\n").unwrap();
    let o = runtime(&["example", "addition", "--output_dir", dir.to_str().unwrap(), "--n_train", "16", "--n_eval", "4"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not empty") && err.contains("--overwrite_output_dir"), "{err}");
    assert_eq!(std::fs::read(dir.join("train.jsonl")).unwrap(), b"my data\n");
    assert_eq!(names(&dir), vec!["train.jsonl"]);
    std::fs::write(dir.join("notes.txt"), b"keep").unwrap();
    ok(
        runtime(&["example", "addition", "--output_dir", dir.to_str().unwrap(), "--n_train", "16", "--n_eval", "4", "--overwrite_output_dir"]),
        "example into a non-empty folder",
    );
    assert_eq!(std::fs::read(dir.join("notes.txt")).unwrap(), b"keep");
    assert!(dir.join("config.json").exists());
}

/// The binary under `ulimit -v 4000000` (4 GB of address space).
fn limited(args: &[&str]) -> Output {
    Command::new("sh").arg("-c").arg("ulimit -v 4000000 && exec timeout 120 \"$0\" \"$@\"").arg(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

/// One clear error (exit status 1, no panic, no abort) holding every needle.
fn refused(o: Output, what: &str, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{what}: {:?}\n{err}", o.status);
    assert!(!err.contains("panicked") && err.lines().filter(|l| l.starts_with("error:")).count() == 1, "{what}: {err}");
    for n in needles {
        assert!(err.contains(n), "{what}: `{n}` not in {err}");
    }
}

/// A copy of the model folder `base` with `config.json`'s `key` set to `value`.
fn variant(base: &Path, to: &Path, key: &str, value: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(base).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
    let path = to.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
    to.to_path_buf()
}

/// Sizes in `config.json` far beyond the weight files, beyond any model, or beyond the memory, and
/// nonsense values, get one clear error naming the field from every command, before anything is
/// allocated, under a 4 GB address-space limit: never an abort (134) or a panic (101).
#[test]
fn absurd_sizes_and_values_in_config_json_get_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let base = tmp.path().join("base");
    ok(runtime(&["init", "--config", ex.join("config.json").to_str().unwrap(), "--output_dir", base.to_str().unwrap()]), "init");
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(ex.join(f), base.join(f)).unwrap();
    }
    let gpt2 = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gpt2/model");
    let cases: Vec<(&Path, &str, serde_json::Value, Vec<&str>)> = vec![
        (&base, "num_hidden_layers", 1_000_000_000u64.into(), vec!["num_hidden_layers 1000000000", "the weight files hold"]),
        (&base, "hidden_size", 1_000_000_000u64.into(), vec!["hidden_size 1000000000", "the weight files hold"]),
        (&base, "intermediate_size", 2_000_000_000u64.into(), vec!["intermediate_size 2000000000", "the weight files hold"]),
        (&base, "vocab_size", 1_000_000_000_000u64.into(), vec!["vocab_size", "beyond any model's size"]),
        (&base, "rms_norm_eps", (-1.0).into(), vec!["rms_norm_eps", "must be positive"]),
        (&base, "rope_theta", 0.into(), vec!["rope_theta", "must be positive"]),
        (&gpt2, "n_embd", 1_000_000_000u64.into(), vec!["n_embd 1000000000", "the weight files hold"]),
        (&gpt2, "n_positions", 1_000_000_000u64.into(), vec!["n_positions 1000000000", "the weight files hold"]),
    ];
    for (i, (from, key, value, needles)) in cases.into_iter().enumerate() {
        let dir = variant(from, &tmp.path().join(format!("v{i}")), key, value);
        let d = dir.to_str().unwrap();
        let out = tmp.path().join(format!("out{i}"));
        refused(limited(&["inspect", d]), &format!("inspect {key}"), &needles);
        refused(limited(&["convert", "--model", d, "--output_dir", out.to_str().unwrap()]), &format!("convert {key}"), &needles);
        if from == base {
            refused(limited(&["generate", "--model", d, "--prompt", "12+34="]), &format!("generate {key}"), &needles);
            let cfg = ex.join("train.toml");
            let args = ["train", "--config", cfg.to_str().unwrap(), "--model_name_or_path", d, "--output_dir", out.to_str().unwrap(), "--max_steps", "1"];
            refused(limited(&args), &format!("train {key}"), &needles);
            // training or initialising from the config alone: checked against the memory
            let config = dir.join("config.json");
            refused(limited(&["init", "--config", config.to_str().unwrap(), "--output_dir", out.to_str().unwrap()]), &format!("init {key}"), &needles[..1]);
        }
        assert!(!out.exists(), "{key}: something was written");
    }
    // sizes within what a field may hold, consistent with no file, beyond the memory
    let big = variant(&base, &tmp.path().join("big"), "num_hidden_layers", 10_000_000u64.into());
    let config = big.join("config.json");
    refused(
        limited(&["init", "--config", config.to_str().unwrap(), "--output_dir", tmp.path().join("o").to_str().unwrap()]),
        "init",
        &["GiB to initialise", "of memory is available"],
    );
    let cfg = ex.join("train.toml");
    let o = limited(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--config_name",
        config.to_str().unwrap(),
        "--output_dir",
        tmp.path().join("o").to_str().unwrap(),
    ]);
    refused(o, "train from the config", &["GiB to train", "of memory is available"]);
    // generation sizes: the key/value cache is checked against the memory first
    let b = base.to_str().unwrap();
    for args in [vec!["--max_new_tokens", "1000000000"], vec!["--num_beams", "100000000"], vec!["--max_new_tokens", "5000000"]] {
        let mut all = vec!["generate", "--model", b, "--prompt", "12+34="];
        all.extend(args.iter());
        refused(limited(&all), &format!("generate {args:?}"), &["key/value cache", "lower max_new_tokens or num_beams"]);
    }
}

/// A temperature so small that the scaled scores overflow f32 samples as greedy decoding picks
/// (the limit of sampling as the temperature goes to zero), instead of garbage.
#[test]
fn sampling_at_a_vanishing_temperature_is_greedy() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    ok(train(&ex, &out, &["--max_steps", "30", "--learning_rate", "3e-3"]), "train");
    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", out.to_str().unwrap(), "--prompt", "12+34=", "--max_new_tokens", "8"];
        args.extend_from_slice(extra);
        let o = runtime(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let greedy = gen(&[]);
    assert!(!greedy.trim().is_empty());
    for seed in ["1", "2", "3"] {
        assert_eq!(gen(&["--do_sample", "--temperature", "1e-39", "--seed", seed]), greedy);
    }
}

/// A tokenization cache entry whose bytes changed (but whose structure is still valid) is noticed
/// by its checksum, said in the log and rebuilt: the run trains on the data, not on the altered
/// entry, and ends as the first run did.
#[test]
fn an_altered_tokenization_cache_entry_is_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let cache = tmp.path().join("cache");
    let run = |out: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(train_args(&ex, &tmp.path().join(out), &["--max_steps", "4"]))
            .env("RUNTIME_CACHE_DIR", &cache)
            .output()
            .unwrap();
        let err = ok(o, out);
        (err, weights(&tmp.path().join(out)))
    };
    let (_, first) = run("first");
    let entries: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().flatten().map(|e| e.path()).collect();
    assert!(!entries.is_empty());
    for entry in &entries {
        // change one token id inside `input_ids`, keeping the file a valid entry
        let mut bytes = std::fs::read(entry).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        let at = 8 + n + header["input_ids"]["data_offsets"][0].as_u64().unwrap() as usize;
        bytes[at] ^= 1;
        std::fs::write(entry, bytes).unwrap();
    }
    let (err, second) = run("second");
    assert!(err.contains("does not match its checksum; rebuilding it"), "{err}");
    assert!(first == second, "the run trained on the altered cache");
}

/// Bad data and config files get one error naming the file and the place: invalid UTF-8 (the
/// line), a key given twice (JSON and YAML run configs, `config.json`, a data line), a NaN or an
/// infinity in a TOML config, and a bad value in `generation_config.json` (the file).
#[test]
fn bad_files_are_refused_naming_the_file_and_the_place() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let out = tmp.path().join("out");
    let o = out.to_str().unwrap();
    // invalid UTF-8 on line 3 of the training data
    let data = tmp.path().join("bad.jsonl");
    let mut bytes = Vec::new();
    for line in std::fs::read_to_string(ex.join("train.jsonl")).unwrap().lines().take(2) {
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
    }
    bytes.extend_from_slice(b"{\"prompt\": \"1\xff\", \"completion\": \"2\"}\n");
    std::fs::write(&data, &bytes).unwrap();
    refused(train(&ex, &out, &["--train_file", data.to_str().unwrap()]), "invalid UTF-8", &["bad.jsonl:3: invalid UTF-8"]);
    // a data line with a key twice
    std::fs::write(&data, "{\"prompt\": \"1+1=\", \"completion\": \"2\", \"prompt\": \"9\"}\n").unwrap();
    refused(train(&ex, &out, &["--train_file", data.to_str().unwrap()]), "duplicate data key", &["bad.jsonl:1", "`prompt` appears twice"]);
    // run configs with a key twice, and with NaN/inf
    let toml = std::fs::read_to_string(ex.join("train.toml")).unwrap();
    let cases = [
        ("run.json", "{\"output_dir\": \"x\", \"learning_rate\": 1e-3, \"learning_rate\": 1}".to_string(), "`learning_rate` appears twice"),
        ("run.yaml", "output_dir: x\nseed: 1\nseed: 2\n".to_string(), "`seed` appears twice"),
        ("run.toml", toml.replace("learning_rate = 3e-3", "learning_rate = nan"), "`learning_rate` = NaN"),
        ("run2.toml", toml.replace("weight_decay = 0.01", "weight_decay = inf"), "`weight_decay` = inf"),
        ("run.yml", "output_dir: x\nlearning_rate: .nan\n".to_string(), "`learning_rate`: settings take finite numbers only"),
    ];
    for (name, text, needle) in cases {
        let path = tmp.path().join(name);
        std::fs::write(&path, text).unwrap();
        let r = runtime(&["train", "--config", path.to_str().unwrap(), "--output_dir", o]);
        refused(r, name, &[name, needle]);
    }
    // config.json with a key twice
    let model = tmp.path().join("model");
    ok(runtime(&["init", "--config", ex.join("config.json").to_str().unwrap(), "--output_dir", model.to_str().unwrap()]), "init");
    let cfg = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(model.join("config.json"), cfg.replacen('{', "{\"vocab_size\": 99,", 1)).unwrap();
    refused(runtime(&["inspect", model.to_str().unwrap()]), "config.json", &["config.json", "`vocab_size` appears twice"]);
    std::fs::write(model.join("config.json"), cfg).unwrap();
    // a bad value in generation_config.json names the file
    std::fs::write(model.join("generation_config.json"), "{\"num_beams\": \"four\"}").unwrap();
    std::fs::copy(ex.join("tokenizer.json"), model.join("tokenizer.json")).unwrap();
    std::fs::copy(ex.join("tokenizer_config.json"), model.join("tokenizer_config.json")).unwrap();
    refused(runtime(&["generate", "--model", model.to_str().unwrap(), "--prompt", "1+1="]), "generation_config.json", &["generation_config.json", "num_beams"]);
}

/// Examples longer than the model's positions are refused before training for the Llama family
/// too (`max_position_embeddings`), as for GPT-2 (`n_positions`).
#[test]
fn examples_longer_than_the_models_positions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let text = tmp.path().join("text.jsonl");
    std::fs::write(&text, "{\"text\": \"12+34=64012+34=64012+34=64012+34=64012+34=640\"}\n".repeat(8)).unwrap();
    let o = train(&ex, &tmp.path().join("out"), &["--train_file", text.to_str().unwrap(), "--block_size", "32", "--max_steps", "1"]);
    refused(o, "block_size 32", &["examples of 32 tokens exceed the model's max_position_embeddings (16)"]);
}

/// Every complete `checkpoint-N` folder holds what a resume needs, nothing half-written is in
/// view, and every weight and optimizer file in view is finite.
fn assert_folder_sound(out: &Path, when: &str) {
    for name in names(out) {
        let path = out.join(&name);
        if name.starts_with('.') {
            assert!(name == ".runtime.lock" || name.contains(".partial-") || name.contains(".deleting-"), "{when}: unexpected {name}");
            continue;
        }
        assert!(!name.contains(".partial"), "{when}: half-written {name} in view");
        if name.starts_with("checkpoint-") {
            for f in ["model.safetensors", "optimizer.safetensors", "trainer_state.json", "config.json"] {
                assert!(path.join(f).is_file(), "{when}: {name} lacks {f}: {:?}", names(&path));
            }
            for st in ["model.safetensors", "optimizer.safetensors"] {
                let bytes = std::fs::read(path.join(st)).unwrap();
                let t = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{when}: {name}/{st}: {e}"));
                for (tensor, v) in t.tensors() {
                    let finite = v.data().chunks_exact(4).all(|b| f32::from_le_bytes(b.try_into().unwrap()).is_finite());
                    assert!(finite, "{when}: {name}/{st}: `{tensor}` is not finite");
                }
            }
        }
    }
}

/// Fault injection: training is interrupted again and again, at random moments, by SIGKILL,
/// SIGTERM or a full disk at a random checkpoint, and restarted each time (resuming when a
/// checkpoint exists). After every interruption the folder is sound (only complete checkpoints in
/// view, everything finite); at the end the weights equal the uninterrupted run's, byte for byte.
#[test]
fn training_under_random_kills_signals_and_full_disks_ends_as_the_uninterrupted_run() {
    use rand::{RngExt, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let args = ["--max_steps", "96", "--save_steps", "3", "--save_total_limit", "2", "--logging_steps", "1"];
    let straight = tmp.path().join("straight");
    ok(train(&ex, &straight, &args), "uninterrupted run");
    let out = tmp.path().join("faulty");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
    let mut faults = [0usize; 3];
    for round in 0..40 {
        if out.join("model.safetensors").exists() {
            break;
        }
        let resumable = names(&out).iter().any(|n| n.starts_with("checkpoint-"));
        let mut run_args = args.to_vec();
        if resumable {
            run_args.extend(["--resume_from_checkpoint", "true"]);
        }
        let log = tmp.path().join(format!("log{round}"));
        let when = format!("round {round}");
        // the kinds in turn; the moments at random
        match round % 3 {
            0 | 1 => {
                let (sig, want) = if round % 3 == 0 { ("-KILL", None) } else { ("-TERM", Some(75)) };
                let child = spawn(&ex, &out, &run_args, &log);
                let lines = rng.random_range(1..9usize);
                let started = Instant::now();
                while std::fs::read_to_string(&log).unwrap_or_default().lines().count() < lines && started.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
                let _ = Command::new("kill").args([sig, &child.id().to_string()]).status();
                let o = child.wait_with_output().unwrap();
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(!err.contains("panicked"), "{when}: {err}");
                if o.status.success() {
                    // it finished first
                } else if let Some(code) = want {
                    assert_eq!(o.status.code(), Some(code), "{when} ({sig}): {err}");
                }
                eprintln!("{when}: {sig} after {lines} lines: {:?}", o.status);
                faults[if sig == "-KILL" { 0 } else { 1 }] += 1;
            }
            _ => {
                // one of the next three checkpoints
                let done = names(&out).iter().filter_map(|n| n.strip_prefix("checkpoint-")?.parse::<u64>().ok()).max().unwrap_or(0);
                let at = (3 * (done / 3 + rng.random_range(1..=3u64))).min(96);
                if at <= done {
                    // the last checkpoint is written (a kill came before the final save): no
                    // checkpoint is left to fail, so this round resumes and finishes
                    ok(train(&ex, &out, &run_args), &format!("{when}: resuming after the last checkpoint"));
                    assert_folder_sound(&out, &when);
                    continue;
                }
                let o = Command::new(env!("CARGO_BIN_EXE_runtime"))
                    .args(train_args(&ex, &out, &run_args))
                    .env("RUNTIME_FAULT_DISK_FULL", format!(".checkpoint-{at}.partial"))
                    .output()
                    .unwrap();
                let err = String::from_utf8_lossy(&o.stderr);
                assert!(!err.contains("panicked"), "{when}: {err}");
                assert!(o.status.code() == Some(1) && err.contains(&format!("checkpoint-{at}")), "{when}: {err}");
                eprintln!("{when}: disk full at checkpoint-{at}: {:?}", o.status);
                faults[2] += 1;
            }
        }
        assert_folder_sound(&out, &when);
    }
    if !out.join("model.safetensors").exists() {
        let mut resume = args.to_vec();
        resume.extend(["--resume_from_checkpoint", "true"]);
        ok(train(&ex, &out, &resume), "the last resume");
    }
    assert_folder_sound(&out, "the end");
    assert!(faults.iter().all(|&n| n >= 2), "too few faults of each kind: {faults:?}");
    assert!(weights(&straight) == weights(&out), "after {faults:?} (kill, term, disk full) the weights differ from the uninterrupted run's");
}

/// Argument sizes far beyond the data or the memory, under a 4 GB address space: each run either
/// trains (the size is clamped by the data, as a batch larger than the dataset is) or stops with
/// one error line; never an abort (134) or a panic (101).
#[test]
fn absurd_argument_sizes_never_abort_or_panic() {
    let tmp = tempfile::tempdir().unwrap();
    let ex = example(tmp.path());
    let cases: [&[&str]; 12] = [
        &["--per_device_train_batch_size", "1000000000"],
        &["--per_device_eval_batch_size", "1000000000", "--eval_strategy", "steps", "--eval_steps", "1"],
        &["--gradient_accumulation_steps", "1000000000"],
        &["--per_device_train_batch_size", "1000000000", "--auto_find_batch_size"],
        &["--block_size", "1000000000"],
        &["--max_seq_length", "1000000000"],
        &["--warmup_steps", "1000000000000000000"],
        &["--num_train_epochs", "1e300"],
        &["--predict_with_generate", "--generation_max_length", "1000000000", "--eval_strategy", "steps", "--eval_steps", "1"],
        &["--predict_with_generate", "--generation_num_beams", "100000000", "--eval_strategy", "steps", "--eval_steps", "1"],
        &["--neftune_noise_alpha", "1e300"],
        &["--learning_rate", "1e300", "--weight_decay", "1e300"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let mut args: Vec<String> = train_args(&ex, &tmp.path().join(format!("o{i}")), &["--max_steps", "1"]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = limited(&refs);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(matches!(o.status.code(), Some(0 | 1)), "{extra:?}: {:?}\n{err}", o.status);
        assert!(!err.contains("panicked") && !err.contains("memory allocation"), "{extra:?}: {err}");
        if o.status.code() == Some(1) {
            assert_eq!(err.lines().filter(|l| l.starts_with("error:")).count(), 1, "{extra:?}: {err}");
        }
    }
}
