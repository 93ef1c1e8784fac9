//! `runtime train` on a T5 against `transformers.Seq2SeqTrainer` (the fixture from
//! `tests/parity/make_seq2seq_trainer_fixtures.py`): the same initial T5 v1.1, digit-reversal data
//! and arguments (warmup + cosine, weight decay, clipping, sequential sampling; plain, label
//! smoothing, gradient accumulation); the logged loss, gradient norm and learning rate of every
//! step, the evaluation losses and the final weights must agree, and `runtime predict` on the
//! trained model must generate what `Seq2SeqTrainer.predict` generated (`predict_with_generate`,
//! two beams).

mod common;

use std::path::Path;

use common::trainer_case::{flag, runtime, train_and_compare};
use serde_json::Value;

/// `runtime predict` with the case's generation settings on the trained model in `out`: the
/// generated ids of each example, by index.
fn predictions(dir: &Path, case: &Value, out: &Path) -> Vec<Vec<u64>> {
    let pred = out.join("predict");
    let mut args: Vec<String> = vec!["predict".into(), "--model".into(), out.to_str().unwrap().into()];
    args.extend(flag("test_file", &Value::String(dir.join("data/validation.jsonl").to_str().unwrap().into())));
    args.extend(flag("output_dir", &Value::String(pred.to_str().unwrap().into())));
    for k in ["generation_max_length", "generation_num_beams", "per_device_eval_batch_size"] {
        args.extend(flag(k, &case["args"][k]));
    }
    let o = runtime(&args);
    assert!(o.status.success(), "predict: {}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(pred.join("generated_predictions.jsonl")).unwrap();
    let mut rows: Vec<(u64, Vec<u64>)> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["index"].as_u64().unwrap(), v["prediction_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
        })
        .collect();
    rows.sort();
    rows.into_iter().map(|r| r.1).collect()
}

#[test]
fn runtime_train_matches_seq2seq_trainer() {
    let dir = common::fixtures().join("seq2seq_trainer");
    let refs: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let mut generated = 0;
    for (name, case) in refs["cases"].as_object().unwrap() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(name);
        train_and_compare(&dir, name, case, &out, 36);
        if let Some(expected) = case.get("predictions") {
            let expected: Vec<Vec<u64>> = serde_json::from_value(expected.clone()).unwrap();
            assert_eq!(predictions(&dir, case, &out), expected, "{name}: generated ids");
            generated += expected.len();
        }
    }
    assert!(generated >= 16, "only {generated} generated rows compared");
}
