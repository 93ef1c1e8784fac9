//! Helpers shared by the end-to-end tests: reading reference fixtures and comparing tensors.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub mod cli;
pub mod trainer_case;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// A reference tensor: shape and values as f64 (integers included).
pub struct RefTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

impl RefTensor {
    pub fn f32s(&self) -> Vec<f32> {
        self.values.iter().map(|&v| v as f32).collect()
    }
    pub fn i32s(&self) -> Vec<i32> {
        self.values.iter().map(|&v| v as i32).collect()
    }
}

/// The parity batch stored in a reference file (`input_ids`, `attention_mask`, `labels`).
pub fn reference_batch(reference: &HashMap<String, RefTensor>) -> runtime::model::Batch {
    let ids = &reference["input_ids"];
    runtime::model::Batch {
        batch: ids.shape[0],
        seq: ids.shape[1],
        input_ids: ids.i32s(),
        attention_mask: Some(reference["attention_mask"].i32s()),
        labels: Some(reference["labels"].i32s()),
        ..Default::default()
    }
}

pub fn read_reference(path: &Path) -> HashMap<String, RefTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).expect("valid reference file");
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let d = view.data();
        let values: Vec<f64> = match view.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            Dtype::F64 => d.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect(),
            Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect(),
            other => panic!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(name, RefTensor { shape: view.shape().to_vec(), values });
    }
    out
}

/// `||a - b|| / ||b||` (absolute when `b` is zero).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x as f64) - (*y as f64)).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// Whether a final weight is an attention key bias (BART's `k_proj.bias`): a shift common to all
/// of a query's scores leaves the softmax unchanged, so its gradient is zero in exact arithmetic
/// and Adam turns each run's rounding noise into steps of up to the learning rate.
pub fn zero_gradient_weight(name: &str) -> bool {
    name.ends_with("k_proj.bias")
}

/// Two runs' values of a [`zero_gradient_weight`] from the same start: no further apart than
/// `steps` Adam steps of `lr` on each side.
pub fn assert_within_adam_steps(what: &str, ours: &[f32], theirs: &[f32], steps: f64, lr: f64) {
    let bound = 2.0 * steps * lr * 1.01;
    let apart = ours.iter().zip(theirs).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(apart as f64 <= bound, "{what}: apart by {apart}, more than Adam's steps allow");
}

pub fn assert_close(what: &str, ours: &[f32], reference: &[f32], tol: f64) {
    let e = rel_err(ours, reference);
    assert!(e <= tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
}

/// The plugin components (`plugins/` and the hostile ones in `tests/plugins/`), built once per
/// test binary with `cargo build --target wasm32-wasip2` into `target/wasm`; returns the folder
/// holding the `.wasm` files.
pub fn wasm_plugins() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let target = root.join("target/wasm");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            for manifest in ["plugins/Cargo.toml", "tests/plugins/Cargo.toml"] {
                let out = std::process::Command::new(&cargo)
                    .args(["build", "--release", "--quiet", "--target", "wasm32-wasip2", "--manifest-path"])
                    .arg(root.join(manifest))
                    .arg("--target-dir")
                    .arg(&target)
                    // the host build's flags (target-cpu) are not for wasm
                    .env_remove("RUSTFLAGS")
                    .env_remove("CARGO_ENCODED_RUSTFLAGS")
                    .output()
                    .expect("running cargo to build the plugins");
                assert!(
                    out.status.success(),
                    "building {manifest} for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            target.join("wasm32-wasip2/release")
        })
        .clone()
}
