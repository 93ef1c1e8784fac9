//! The CUDA kernels executed on the CPU, on every machine: `tests/emulation/*.cpp` include the
//! real `kernels/*.cu` (the source text NVRTC compiles) and run them with a C++ compiler and a
//! shim that gives every CUDA thread its own host thread, with barriers, warp shuffles and the
//! tensor-core primitives (`mma.sync`, `ldmatrix`, deferred `cp.async`) emulated. Outputs are
//! compared with C++ ports of the CPU backend's ops and with f64 references. This is what checks
//! the kernels' logic where there is no GPU; `runtime cuda-check` does the same on a GPU.
//!
//! Needs a C++20 compiler (`CXX`, else `c++`); without one the tests say SKIPPED, unless
//! `RUNTIME_REQUIRE_CXX` is set (as `.ci/run` does), which makes that a failure.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Compiles `tests/emulation/{name}.cpp` into the target folder; `None` (after saying SKIPPED)
/// when no C++ compiler is available and none is required.
fn build(name: &str) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out_dir = root().join("target/emulation");
    std::fs::create_dir_all(&out_dir).unwrap();
    let exe = out_dir.join(name);
    let src = root().join(format!("tests/emulation/{name}.cpp"));
    let res = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-I"])
        .arg(root().join("kernels"))
        .arg("-I")
        .arg(root().join("tests/emulation"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output();
    let out = match res {
        Ok(out) => out,
        Err(e) => {
            assert!(std::env::var_os("RUNTIME_REQUIRE_CXX").is_none(), "RUNTIME_REQUIRE_CXX is set but `{cxx}` could not run: {e}");
            let _ = writeln!(std::io::stderr(), "SKIPPED: no C++ compiler (`{cxx}`: {e}); set CXX to a C++20 compiler to run the kernel emulation");
            return None;
        }
    };
    // a compiler that runs but fails is a real failure: the kernels or the harness do not build
    assert!(out.status.success(), "{cxx} failed on {}:\n{}", src.display(), String::from_utf8_lossy(&out.stderr));
    Some(exe)
}

/// Runs an emulation binary and returns its output, asserting success and the pass line.
fn run(exe: &Path, args: &[&str]) -> String {
    let out = Command::new(exe).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("all passed"), "{} {args:?} failed:\n{text}{}", exe.display(), String::from_utf8_lossy(&out.stderr));
    text
}

/// Every kernel file but the tensor-core attention: pointwise, reductions, embedding, norms,
/// RoPE, the fused loss and statistics, AdamW, decoding and the FMA attention (f32 and bf16).
#[test]
fn kernels_match_the_cpu_backend_when_emulated() {
    let Some(exe) = build("kernels") else { return };
    let out = run(&exe, &[]);
    // every group ran
    for what in ["attention f32 d32", "attention f32 d128", "attention bf16 d64", "dora norm"] {
        assert!(out.contains(what), "no `{what}` case in the output:\n{out}");
    }
}

/// The encoder-decoder kernels (`kernels/seq2seq.cu`): attention with a bias (self and cross,
/// causal or not, padding, dropout, a sequence with no visible key, more keys and head columns
/// than a block has threads) forward and backward against f64, T5's position bias bitwise
/// against the CPU's loops, the gated, exact and ReLU activations.
#[test]
fn seq2seq_kernels_match_f64_when_emulated() {
    let Some(exe) = build("seq2seq") else { return };
    let out = run(&exe, &[]);
    for what in [
        "encoder self (bias, padding): dk",
        "decoder self (bias, causal, dropout): dv",
        "a dead row",
        "head dim 130): dbias",
        "position bias backward",
        "exact gelu backward",
    ] {
        assert!(out.contains(what), "no `{what}` case in the output:\n{out}");
    }
}

/// The tensor-core attention (head dims 64 and 128) against f64 and the FMA kernels, on the
/// cases that cover padding holes, a fully masked sequence, a sequence shorter than a tile, an
/// unpadded one that is not a tile multiple, and dout rounded to bf16; shared memory must see no
/// bank conflicts (the swizzle).
#[test]
fn tensor_core_attention_matches_f64_when_emulated() {
    let Some(exe) = build("attention_tc") else { return };
    for (cases, dout) in [("0,5,6,13", "f32"), ("10", "f32"), ("3", "bf16")] {
        let out = run(&exe, &[cases, dout]);
        assert!(out.contains("bank-conflicted 0;"), "bank conflicts in the tensor-core kernels:\n{out}");
    }
}
