//! `runtime train` against `transformers.Trainer` (the fixture from
//! `tests/parity/make_trainer_fixtures.py`): the same initial Llama, data, and arguments (warmup +
//! cosine, weight decay, clipping, gradient accumulation or label smoothing, evaluation, sequential
//! sampling); the logged loss, gradient norm and learning rate of every step, the evaluation
//! losses, and the final weights must agree (measured: about 1e-7 relative; bound 1e-5).

mod common;

use serde_json::Value;

#[test]
fn runtime_train_matches_transformers_trainer() {
    let dir = common::fixtures().join("trainer");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    for (name, case) in refs["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        common::trainer_case::train_and_compare(&dir, name, case, &tmp.path().join(name), 20);
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
