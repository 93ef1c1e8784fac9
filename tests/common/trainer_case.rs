//! One case of a trainer parity fixture: `runtime train` with the arguments transformers' trainer
//! was given, then the logged loss, gradient norm and learning rate of every step, the evaluation
//! losses and the final weights compared with transformers'.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

/// `--k v` for one argument.
pub fn flag(k: &str, v: &Value) -> Vec<String> {
    let v = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    vec![format!("--{k}"), v]
}

pub fn runtime(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_runtime")).args(args).output().unwrap()
}

fn close(what: &str, ours: f64, theirs: f64, rel: f64) {
    assert!((ours - theirs).abs() <= rel * theirs.abs().max(1e-12), "{what}: runtime {ours} vs transformers {theirs}");
}

/// Trains case `name` of the fixture in `dir` (`init/` or the case's `init`, `data/`,
/// `final_<name>.safetensors`) into
/// `out` and compares; at least `min_compared` logged values must have been compared.
pub fn train_and_compare(dir: &Path, name: &str, case: &Value, out: &Path, min_compared: usize) {
    let mut args: Vec<String> = vec!["train".into(), "--disable_tqdm".into(), "--output_dir".into(), out.to_str().unwrap().into()];
    for (k, v) in case["args"].as_object().unwrap() {
        if k != "report_to" {
            args.extend(flag(k, v));
        }
    }
    // the initial model: `init/`, or the folder the case names
    let init = case.get("init").and_then(Value::as_str).unwrap_or("init");
    for (k, v) in [("model_name_or_path", init), ("train_file", "data/train.jsonl"), ("validation_file", "data/validation.jsonl")] {
        args.extend(flag(k, &Value::String(dir.join(v).to_str().unwrap().into())));
    }
    let o = runtime(&args);
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
    assert!(compared >= min_compared, "{name}: only {compared} values compared");
    // final weights, tensor by tensor (the reference holds each tensor once, as ours)
    let theirs = super::read_reference(&dir.join(format!("final_{name}.safetensors")));
    let ours = super::read_reference(&out.join("model.safetensors"));
    assert_eq!(ours.len(), theirs.len(), "{name}: tensor count");
    let steps = case["args"]["max_steps"].as_f64().unwrap_or(0.0);
    let lr = case["args"]["learning_rate"].as_f64().unwrap_or(0.0);
    for (k, v) in &ours {
        if super::zero_gradient_weight(k) {
            super::assert_within_adam_steps(&format!("{name} final {k}"), &v.f32s(), &theirs[k].f32s(), steps, lr);
            continue;
        }
        super::assert_close(&format!("{name} final {k}"), &v.f32s(), &theirs[k].f32s(), 1e-5);
    }
}
