//! `runtime train` against `transformers.Trainer` (the fixture from
//! `tests/parity/make_trainer_fixtures.py`): the same initial Llama, data, and arguments (warmup +
//! cosine, weight decay, clipping, gradient accumulation or label smoothing, evaluation, sequential
//! sampling); the logged loss, gradient norm and learning rate of every step, the evaluation
//! losses, and the final weights must agree (measured: about 1e-7 relative; bound 1e-5).

mod common;

use std::collections::HashMap;
use std::process::Command;

use serde_json::Value;

fn flag(k: &str, v: &Value) -> Vec<String> {
    let v = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    vec![format!("--{k}"), v]
}

fn close(what: &str, ours: f64, theirs: f64, rel: f64) {
    assert!((ours - theirs).abs() <= rel * theirs.abs().max(1e-12), "{what}: runtime {ours} vs transformers {theirs}");
}

#[test]
fn runtime_train_matches_transformers_trainer() {
    let dir = common::fixtures().join("trainer");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    for (name, case) in refs["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        let mut args: Vec<String> = vec!["train".into(), "--disable_tqdm".into(), "--output_dir".into(), out.to_str().unwrap().into()];
        for (k, v) in case["args"].as_object().unwrap() {
            if k != "report_to" {
                args.extend(flag(k, v));
            }
        }
        for (k, v) in [("model_name_or_path", "init"), ("train_file", "data/train.jsonl"), ("validation_file", "data/validation.jsonl")] {
            args.extend(flag(k, &Value::String(dir.join(v).to_str().unwrap().into())));
        }
        let o = Command::new(env!("CARGO_BIN_EXE_runtime")).args(&args).output().unwrap();
        assert!(o.status.success(), "{name}: {}", String::from_utf8_lossy(&o.stderr));
        let state: Value = serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap()).unwrap();
        let ours = state["log_history"].as_array().unwrap();
        let theirs = case["log_history"].as_array().unwrap();
        let pick = |log: &[Value], key: &str| -> Vec<(u64, f64)> { log.iter().filter_map(|e| Some((e["step"].as_u64()?, e.get(key)?.as_f64()?))).collect() };
        let mut compared = 0;
        for (key, rel) in [("loss", 1e-5), ("grad_norm", 1e-5), ("learning_rate", 1e-9), ("eval_loss", 1e-5)] {
            let (a, b) = (pick(ours, key), pick(theirs, key));
            assert_eq!(a.iter().map(|x| x.0).collect::<Vec<_>>(), b.iter().map(|x| x.0).collect::<Vec<_>>(), "{name}: steps logging `{key}`");
            for ((step, x), (_, y)) in a.iter().zip(&b) {
                close(&format!("{name} step {step} {key}"), *x, *y, rel);
                compared += 1;
            }
        }
        assert!(compared >= 20, "{name}: only {compared} values compared");
        // final weights, tensor by tensor
        let final_ref = common::read_reference(&dir.join(format!("final_{name}.safetensors")));
        let theirs: HashMap<String, Vec<f32>> = final_ref.iter().map(|(k, v)| (k.clone(), v.f32s())).collect();
        let ours = common::read_reference(&out.join("model.safetensors"));
        assert_eq!(ours.len(), theirs.len(), "{name}: tensor count");
        for (k, v) in &ours {
            common::assert_close(&format!("{name} final {k}"), &v.f32s(), &theirs[k], 1e-5);
        }
    }
}

/// The callback events and their order (with the step each sees) match a recording of
/// `transformers.Trainer` over a run that logs, evaluates, saves, accumulates and crosses an epoch.
#[test]
fn callback_events_come_in_transformers_order() {
    use runtime::args::TrainingArguments;
    use runtime::train::callbacks::{Event, TrainerCallback, TrainerControl};
    use runtime::train::state::TrainerState;
    use std::sync::{Arc, Mutex};

    struct Recorder(Arc<Mutex<Vec<(String, u64)>>>);
    impl TrainerCallback for Recorder {
        fn on_event(
            &mut self,
            e: Event,
            _: &TrainingArguments,
            s: &TrainerState,
            _: &mut TrainerControl,
            _: Option<&mut serde_json::Map<String, Value>>,
        ) -> runtime::Result<()> {
            self.0.lock().unwrap().push((e.hf_name().to_string(), s.global_step));
            Ok(())
        }
    }
    let dir = common::fixtures().join("trainer");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut overrides: Vec<(String, Value)> =
        refs["events"]["args"].as_object().unwrap().iter().filter(|(k, _)| *k != "report_to").map(|(k, v)| (k.clone(), v.clone())).collect();
    for (k, v) in [
        ("model_name_or_path", dir.join("init")),
        ("train_file", dir.join("data/train.jsonl")),
        ("validation_file", dir.join("data/validation.jsonl")),
        ("output_dir", tmp.path().join("out")),
    ] {
        overrides.push((k.into(), Value::String(v.to_str().unwrap().into())));
    }
    overrides.push(("disable_tqdm".into(), Value::Bool(true)));
    let args = TrainingArguments::load(None, &overrides).unwrap();
    let mut trainer = runtime::train::trainer::Trainer::new(args).unwrap();
    let events = Arc::new(Mutex::new(Vec::new()));
    trainer.add_callback(Box::new(Recorder(events.clone())));
    trainer.train().unwrap();
    let ours = events.lock().unwrap().clone();
    let theirs: Vec<(String, u64)> =
        refs["events"]["events"].as_array().unwrap().iter().map(|e| (e[0].as_str().unwrap().to_string(), e[1].as_u64().unwrap())).collect();
    let fmt = |v: &[(String, u64)]| v.iter().map(|(n, s)| format!("{}@{s}", &n[3..])).collect::<Vec<_>>().join(" ");
    assert_eq!(fmt(&ours), fmt(&theirs));
}
