//! Tuning and watching runs: `report_to = ["tensorboard"]` event files against TensorBoard's own
//! reading (the fixture from `tests/parity/make_tensorboard_fixtures.py`), and `runtime
//! hp-search` on the addition example (the study's table, `best_run.json`, pruning, seeds,
//! continuing a study).

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use runtime::train::tensorboard::events::{read_events, read_records, ValueKind, What};
use runtime::train::tensorboard::tag_of;
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `runtime ARGS` from the repository root (the example's config holds relative paths).
fn runtime(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).current_dir(root()).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "runtime failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The settings of the fixture's run (as in the fixture script).
const SETTINGS: &[&str] = &[
    "--max_steps",
    "20",
    "--logging_steps",
    "5",
    "--logging_first_step",
    "true",
    "--eval_steps",
    "10",
    "--save_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--report_to",
    "tensorboard",
    "--disable_tqdm",
    "true",
];

type Scalars = BTreeMap<String, Vec<(i64, f32)>>;
type Texts = BTreeMap<String, Vec<(i64, String)>>;

/// Scalars and texts of an event file, as read by the runtime's reader (every CRC checked).
fn read_file(path: &Path) -> (Scalars, Texts, usize) {
    let events = read_events(path).unwrap();
    assert_eq!(events[0].what, Some(What::FileVersion("brain.Event:2".into())), "the first record is the file version");
    let (mut scalars, mut texts) = (Scalars::new(), BTreeMap::new());
    for e in &events[1..] {
        let Some(What::Summary(s)) = &e.what else { panic!("record at step {} is not a summary", e.step) };
        for v in &s.value {
            match &v.value {
                Some(ValueKind::SimpleValue(x)) => scalars.entry(v.tag.clone()).or_insert_with(Vec::new).push((e.step, *x)),
                Some(ValueKind::Tensor(t)) => {
                    let plugin = v.metadata.as_ref().and_then(|m| m.plugin_data.as_ref()).map(|p| p.plugin_name.as_str());
                    assert_eq!(plugin, Some("text"), "{}", v.tag);
                    texts.entry(v.tag.clone()).or_insert_with(Vec::new).push((e.step, String::from_utf8(t.string_val[0].clone()).unwrap()));
                }
                None => panic!("{}: no value", v.tag),
            }
        }
    }
    (scalars, texts, events.len())
}

/// Timing values differ from run to run; everything else is deterministic on the CPU.
fn is_timing(tag: &str) -> bool {
    ["runtime", "per_second"].iter().any(|t| tag.contains(t))
}

#[test]
fn event_files_read_as_tensorboard_reads_them() {
    let dir = common::fixtures().join("tensorboard");
    let reading: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reading.json")).unwrap()).unwrap();
    // 1. the committed file: the runtime's reader agrees with TensorBoard's, record for record
    let (scalars, texts, n) = read_file(&dir.join("events.out.tfevents.runtime"));
    assert_eq!(n as u64, reading["records"].as_u64().unwrap());
    let theirs: Scalars = reading["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, pts)| (tag.clone(), pts.as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32)).collect()))
        .collect();
    assert_eq!(scalars, theirs, "the runtime's reading of the fixture differs from TensorBoard's");
    assert!(theirs.contains_key("train/loss") && theirs.contains_key("eval/loss") && theirs.contains_key("train/learning_rate"));
    for (tag, pts) in reading["texts"].as_object().unwrap() {
        let ours = &texts[tag];
        let pts = pts.as_array().unwrap();
        assert_eq!(ours.len(), pts.len(), "{tag}");
        for (o, t) in ours.iter().zip(pts) {
            assert_eq!((o.0, o.1.as_str()), (t[0].as_i64().unwrap(), t[1].as_str().unwrap()), "{tag}");
        }
    }

    // 2. a fresh run writes the same records (wall times and timings aside)
    let tmp = tempfile::tempdir().unwrap();
    let (out, tb) = (tmp.path().join("out"), tmp.path().join("tb"));
    let mut args = vec!["train", "--config", "examples/addition/train.toml"];
    args.extend_from_slice(SETTINGS);
    args.extend_from_slice(&["--output_dir", out.to_str().unwrap(), "--logging_dir", tb.to_str().unwrap()]);
    ok(&runtime(&args));
    let files: Vec<PathBuf> = std::fs::read_dir(&tb).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let (fresh, fresh_texts, n_fresh) = read_file(&files[0]);
    assert_eq!(n_fresh, n);
    assert_eq!(fresh.keys().collect::<Vec<_>>(), theirs.keys().collect::<Vec<_>>());
    for (tag, pts) in &fresh {
        let steps: Vec<i64> = pts.iter().map(|p| p.0).collect();
        assert_eq!(steps, theirs[tag].iter().map(|p| p.0).collect::<Vec<_>>(), "{tag}: steps");
        if !is_timing(tag) {
            assert_eq!(pts, &theirs[tag], "{tag}: values");
        }
    }
    assert_eq!(fresh_texts["model_config/text_summary"], texts["model_config/text_summary"]);
    let strip = |s: &str| {
        let mut v: serde_json::Map<String, Value> = serde_json::from_str(s).unwrap();
        v.remove("output_dir");
        v.remove("logging_dir");
        v
    };
    // the run's arguments as text: every argument the fixture's run had, with the same value
    // (arguments added to the runtime since the fixture was made are new keys, not differences)
    let (ours, theirs) = (strip(&fresh_texts["args/text_summary"][0].1), strip(&texts["args/text_summary"][0].1));
    assert!(theirs.len() > 50);
    for (k, v) in &theirs {
        assert_eq!(ours.get(k), Some(v), "args text: `{k}`");
    }

    // 3. every log_history entry is there, at its step
    let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
    let mut count = 0;
    for entry in state["log_history"].as_array().unwrap() {
        let step = entry["step"].as_i64().unwrap();
        for (k, v) in entry.as_object().unwrap().iter().filter(|(k, _)| *k != "step") {
            let tag = tag_of(k);
            let want = v.as_f64().unwrap() as f32;
            assert!(fresh[&tag].iter().any(|&(s, x)| s == step && x == want), "{k} = {want} at step {step} is not in the event file as {tag}");
            count += 1;
        }
    }
    assert!(count >= 20, "only {count} logged values");

    // 4. a damaged file is refused with the record named
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    let bad = tmp.path().join("events.out.tfevents.bad");
    std::fs::write(&bad, &bytes).unwrap();
    let e = read_records(&bad).unwrap_err().to_string();
    assert!(e.contains("record") && (e.contains("CRC") || e.contains("truncated")), "{e}");
}

#[test]
fn report_to_names_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let base = ["train", "--config", "examples/addition/train.toml", "--max_steps", "1", "--output_dir", out.to_str().unwrap()];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--report_to", "[\"tensorboard\", \"wandb\"]"]);
    let o = runtime(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("report_to `wandb`") && err.contains("supported: tensorboard"), "{err}");
    assert!(!out.exists(), "nothing is written for a refused run");
    // a logging folder that cannot be made stops the run before step 1
    let blocker = tmp.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let mut args = base.to_vec();
    let tb = blocker.join("tb");
    args.extend_from_slice(&["--report_to", "tensorboard", "--logging_dir", tb.to_str().unwrap(), "--disable_tqdm", "true"]);
    let o = runtime(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("report_to tensorboard") && err.contains("tb"), "{err}");
    assert!(!out.join("model.safetensors").exists());
}

/// A short trial on the addition example: 20 steps, evaluated at 10 and 20 on 64 examples.
fn search(dir: &Path, space: &str, extra: &[&str]) -> Output {
    let val = dir.join("val.jsonl");
    if !val.exists() {
        let text = std::fs::read_to_string(root().join("examples/addition/validation.jsonl")).unwrap();
        std::fs::write(&val, text.lines().take(64).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    }
    let space_path = dir.join(format!("space-{}.toml", space.len()));
    std::fs::write(&space_path, space).unwrap();
    let mut args = vec!["hp-search", "--config", "examples/addition/train.toml", "--space", space_path.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--max_steps",
        "20",
        "--eval_steps",
        "10",
        "--save_steps",
        "10",
        "--logging_steps",
        "10",
        "--per_device_eval_batch_size",
        "64",
        "--disable_tqdm",
        "true",
        "--validation_file",
    ]);
    let val = val.to_str().unwrap().to_string();
    args.push(&val);
    runtime(&args)
}

fn trials(study: &Path) -> Vec<Value> {
    std::fs::read_to_string(study.join("trials.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// The lines of a search's output that report a finished trial.
fn trial_lines(stdout: &str) -> Vec<String> {
    stdout.lines().filter(|l| l.strip_prefix("trial ").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))).map(str::to_string).collect()
}

#[test]
fn a_grid_search_prunes_the_hopeless_trials_and_continues_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("study");
    // in name order the last parameter varies fastest: trials 0-2 learn, trials 3-5 cannot; the
    // pruner acts once 3 trials are complete
    let space = "[learning_rate]\ntype = \"categorical\"\nchoices = [3e-3, 1e-7]\n[warmup_steps]\ntype = \"int\"\nlow = 0\nhigh = 4\nstep = 2\n";
    // (hp-search's own flags first: the first run setting starts the overrides)
    let common = ["--sampler", "grid", "--pruner_startup_trials", "3", "--output_dir", study.to_str().unwrap()];
    let mut first = common.to_vec();
    first.extend_from_slice(&["--n_trials", "4", "--report_to", "tensorboard"]);
    let out = ok(&search(tmp.path(), space, &first));
    assert_eq!(trial_lines(&out).len(), 4, "{out}");
    assert_eq!(trials(&study).len(), 4);
    // the same command with more trials runs only the new ones
    let mut all = common.to_vec();
    all.extend_from_slice(&["--n_trials", "6", "--report_to", "tensorboard"]);
    let out = ok(&search(tmp.path(), space, &all));
    let lines = trial_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[0].starts_with("trial 4 ") && lines[1].starts_with("trial 5 "), "{lines:?}");
    let table = trials(&study);
    assert_eq!(table.len(), 6);
    for (i, t) in table.iter().enumerate() {
        assert_eq!(t["number"], i);
        let lr = t["params"]["learning_rate"].as_f64().unwrap();
        assert_eq!(lr, if i < 3 { 3e-3 } else { 1e-7 }, "trial {i}");
        assert_eq!(t["params"]["warmup_steps"], [0, 2, 4][i % 3], "trial {i}");
        let values = t["intermediate_values"].as_array().unwrap();
        if i < 3 {
            assert_eq!(t["state"], "complete", "trial {i}: {t}");
            assert_eq!(values.len(), 2, "trial {i}: evaluated at steps 10 and 20");
            assert_eq!(t["objective"], values[1][1], "the objective is the last evaluation's");
        } else {
            // worse than the median of the complete trials at the first evaluation
            assert_eq!(t["state"], "pruned", "trial {i}: {t}");
            assert_eq!(values.len(), 1, "trial {i}: stopped at its first evaluation");
            assert_eq!(values[0][0], 10);
            let state: Value = serde_json::from_str(&std::fs::read_to_string(study.join(format!("run-{i}/trainer_state.json"))).unwrap()).unwrap();
            assert_eq!(state["global_step"], 10, "trial {i} stopped training at step 10");
        }
        let runs = study.join(format!("run-{i}/runs"));
        assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 1, "trial {i} has its own TensorBoard folder");
    }
    let best: Value = serde_json::from_str(&std::fs::read_to_string(study.join("best_run.json")).unwrap()).unwrap();
    let objectives: Vec<f64> = table[..3].iter().map(|t| t["objective"].as_f64().unwrap()).collect();
    let min = objectives.iter().copied().fold(f64::INFINITY, f64::min);
    assert_eq!(best["objective"].as_f64().unwrap(), min);
    let id: usize = best["run_id"].as_str().unwrap().parse().unwrap();
    assert_eq!(table[id]["objective"].as_f64().unwrap(), min);
    assert_eq!(best["hyperparameters"], table[id]["params"]);
    assert!(out.contains("best: trial"), "{out}");
    // finished: the same command runs nothing; other settings are refused
    let out = ok(&search(tmp.path(), space, &all));
    assert!(trial_lines(&out).is_empty(), "{out}");
    assert_eq!(trials(&study), table);
    let o = search(tmp.path(), "[learning_rate]\ntype = \"categorical\"\nchoices = [1e-3]\n", &all);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("another `space`"), "{err}");
}

#[test]
fn the_same_seed_gives_the_same_study_and_failed_trials_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let space = "[learning_rate]\ntype = \"float\"\nlow = 1e-3\nhigh = 1e-2\nlog = true\n[weight_decay]\ntype = \"float\"\nlow = 0.0\nhigh = 0.1\n";
    let run = |name: &str, seed: &str| {
        let dir = tmp.path().join(name);
        let args =
            ["--n_trials", "4", "--sampler", "tpe", "--sampler_startup_trials", "2", "--pruner", "none", "--seed", seed, "--output_dir", dir.to_str().unwrap()];
        ok(&search(tmp.path(), space, &args));
        trials(&dir).into_iter().map(|t| (t["state"].clone(), t["params"].clone(), t["objective"].clone())).collect::<Vec<_>>()
    };
    let a = run("a", "5");
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|t| t.0 == "complete"), "{a:?}");
    assert_eq!(a, run("b", "5"), "the same seed gives the same trials");
    let c = run("c", "6");
    assert!(a.iter().zip(&c).all(|(x, y)| x.1 != y.1), "another seed gives other parameters");

    // a trial whose settings are refused fails alone, with its error, and the search goes on
    let study = tmp.path().join("failing");
    let space = "[lr_scheduler_type]\ntype = \"categorical\"\nchoices = [\"no_such_schedule\", \"linear\"]\n";
    let out = ok(&search(tmp.path(), space, &["--n_trials", "2", "--sampler", "grid", "--output_dir", study.to_str().unwrap()]));
    let t = trials(&study);
    assert_eq!(t[0]["state"], "failed", "{out}");
    assert!(t[0]["error"].as_str().unwrap().contains("no_such_schedule"), "{}", t[0]);
    assert_eq!(t[0]["objective"], Value::Null);
    assert_eq!(t[1]["state"], "complete");
    let best: Value = serde_json::from_str(&std::fs::read_to_string(study.join("best_run.json")).unwrap()).unwrap();
    assert_eq!(best["run_id"], "1");
}

#[test]
fn bad_searches_are_one_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let study = tmp.path().join("s");
    let cases: &[(&str, &[&str], &str)] = &[
        ("[learning_rat]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n", &[], "did you mean `learning_rate`"),
        ("[learning_rate]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n", &["--sampler", "grid"], "continuous float"),
        ("[learning_rate]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n", &["--direction", "up"], "--direction `up`"),
        ("[learning_rate]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n", &["--eval_strategy", "no", "--load_best_model_at_end", "false"], "set eval_strategy"),
        ("[plugins.0.options.gamma]\ntype = \"float\"\nlow = 0.1\nhigh = 0.2\n", &[], "`plugins` is not in the run config"),
        ("[output_dir]\ntype = \"categorical\"\nchoices = [\"a\", \"b\"]\n", &[], "set by the search"),
    ];
    for (space, extra, want) in cases {
        let mut args = vec!["--output_dir", study.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = search(tmp.path(), space, &args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{space} {extra:?}: {err}");
        assert!(!study.join("trials.jsonl").exists(), "{space}: no trial ran");
    }
}
