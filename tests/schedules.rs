//! Learning-rate schedules against transformers' `get_scheduler`, step by step, from the fixture
//! `tests/fixtures/schedules.json` (made by `tests/parity/make_schedule_fixtures.py`).

mod common;

use runtime::train::schedule::{warmup_steps, Schedule, SchedulerType};
use serde_json::{json, Map, Value};

#[test]
fn every_schedule_matches_transformers() {
    let text = std::fs::read_to_string(common::fixtures().join("schedules.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases = v["cases"].as_array().unwrap();
    let mut kinds = std::collections::HashSet::new();
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let kind = SchedulerType::parse(name).unwrap();
        kinds.insert(name);
        let kwargs = c["kwargs"].as_object().unwrap();
        let s =
            Schedule::new(kind, c["learning_rate"].as_f64().unwrap(), c["warmup_steps"].as_u64().unwrap(), c["max_steps"].as_u64().unwrap(), kwargs).unwrap();
        for (step, want) in c["lrs"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr(step as u64);
            assert!((got - want).abs() <= 1e-12 * want.abs().max(1e-12), "{name} {kwargs:?} step {step}: {got} vs transformers {want}");
        }
    }
    assert_eq!(kinds.len(), runtime::train::schedule::SCHEDULER_NAMES.len(), "every scheduler type has a fixture");
}

#[test]
fn warmup_below_one_is_a_ratio() {
    assert_eq!(warmup_steps(0.1, 95), 10);
    assert_eq!(warmup_steps(5.0, 95), 5);
    assert_eq!(warmup_steps(0.0, 95), 0);
}

#[test]
fn bad_scheduler_arguments_are_named() {
    let kw = |v: Value| -> Map<String, Value> { v.as_object().unwrap().clone() };
    let err = |kind: &str, v: Value| Schedule::new(SchedulerType::parse(kind).unwrap(), 1e-3, 5, 50, &kw(v)).unwrap_err().to_string();
    assert!(SchedulerType::parse("cosin").unwrap_err().to_string().contains("cosine"));
    assert!(err("linear", json!({"num_cycles": 2})).contains("num_cycles"));
    assert!(err("cosine_with_min_lr", json!({})).contains("min_lr"));
    assert!(err("cosine_with_min_lr", json!({"min_lr": 1e-4, "min_lr_rate": 0.1})).contains("only one"));
    assert!(err("warmup_stable_decay", json!({})).contains("num_decay_steps"));
    assert!(err("warmup_stable_decay", json!({"num_decay_steps": 60})).contains("exceed"));
    assert!(err("warmup_stable_decay", json!({"num_decay_steps": 6, "decay_type": "exp"})).contains("decay_type"));
    assert!(err("polynomial", json!({"lr_end": 1.0})).contains("lr_end"));
    assert!(err("cosine", json!({"num_cycles": "many"})).contains("num_cycles"));
}
