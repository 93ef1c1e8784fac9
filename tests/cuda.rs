//! The CUDA backend. On every machine: each kernel file compiles with NVRTC for sm_90 and sm_80
//! and exports every kernel the backend launches, the launches' block sizes and the shared
//! constants agree with the kernel sources, and asking for `cuda` where there is no GPU is
//! one clear error. On a machine with a GPU: every op against the CPU backend and whole training
//! steps (skipped, saying so, without one).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Says why a test skips, on the real stderr (the test harness captures `eprintln!`, so a
/// passing test's message would never be seen).
fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// The folder holding libnvrtc: `RUNTIME_CUDA_LIB_DIR`, or the `nvidia-cuda-nvrtc` wheel that
/// `.ci/run` installs under `target/cuda-wheels`.
fn nvrtc_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RUNTIME_CUDA_LIB_DIR") {
        return Some(PathBuf::from(d));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cuda-wheels/lib");
    std::fs::read_dir(root).ok()?.flatten().map(|py| py.path().join("site-packages/nvidia/cu13/lib")).find(|lib| lib.join("libnvrtc.so.13").is_file())
}

#[test]
fn every_kernel_compiles_with_nvrtc_for_sm90_and_sm80() {
    let Some(dir) = nvrtc_dir() else {
        assert!(
            std::env::var_os("RUNTIME_REQUIRE_NVRTC").is_none(),
            "RUNTIME_REQUIRE_NVRTC is set but no NVRTC was found (set RUNTIME_CUDA_LIB_DIR or run .ci/run)"
        );
        skip("no NVRTC library found (set RUNTIME_CUDA_LIB_DIR to a folder with libnvrtc.so.13, or run .ci/run)");
        return;
    };
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args(["kernels", "--arch", "sm_90", "--arch", "sm_80", "--json"])
        .env("LD_LIBRARY_PATH", ld)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "NVRTC compilation failed:\n{stderr}");
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let reports = reports.as_array().unwrap();
    let files: Vec<&str> = runtime::backend::cuda::kernels::SOURCES.iter().map(|(s, _)| *s).collect();
    for arch in ["sm_90", "sm_80"] {
        for f in &files {
            let r = reports.iter().find(|r| r["arch"] == arch && r["file"] == format!("kernels/{f}.cu"));
            assert!(
                r.is_some_and(|r| r["ptx_bytes"].as_u64().unwrap() > 0 && r["cubin_bytes"].as_u64().unwrap() > 0),
                "kernels/{f}.cu was not compiled to PTX and CUBIN for {arch}"
            );
        }
        let compiled: Vec<&str> =
            reports.iter().filter(|r| r["arch"] == arch).flat_map(|r| r["kernels"].as_array().unwrap()).map(|k| k.as_str().unwrap()).collect();
        let required = runtime::backend::cuda::required_kernels();
        for k in &required {
            assert!(compiled.contains(&k.as_str()), "the backend launches `{k}` but no kernel file exports it for {arch}");
        }
        // and the list is whole: every kernel name the backend's code spells out is on it
        for k in named_in_backend_sources(&compiled) {
            assert!(required.contains(&k), "the backend's code names kernel `{k}`, which `required_kernels` does not list");
        }
    }
}

/// The exported kernel names (of `compiled`) that appear as string literals in the CUDA
/// backend's sources: the kernels it launches by a name written out whole.
fn named_in_backend_sources(compiled: &[&str]) -> Vec<String> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let mut named = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let src = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for lit in src.split('"').skip(1).step_by(2) {
            if compiled.contains(&lit) {
                named.insert(lit.to_string());
            }
        }
    }
    assert!(named.len() > 40, "only {} kernel names found in {}", named.len(), dir.display());
    named.into_iter().collect()
}

/// `runtime kernels --cache` fills the kernel cache the CUDA backend starts from; a second run
/// finds every entry, and an entry whose device code was damaged is compiled again and repaired.
#[test]
fn the_kernel_cache_is_filled_reused_and_repaired() {
    let Some(dir) = nvrtc_dir() else {
        assert!(std::env::var_os("RUNTIME_REQUIRE_NVRTC").is_none(), "RUNTIME_REQUIRE_NVRTC is set but no NVRTC was found");
        skip("no NVRTC library found (the kernel cache test needs it)");
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let warm = || -> Vec<(String, bool)> {
        let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
            .args(["kernels", "--cache", "--arch", "sm_80", "--json"])
            .env("LD_LIBRARY_PATH", &dir)
            .env("RUNTIME_KERNEL_CACHE_DIR", cache.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "kernels --cache failed: {}", String::from_utf8_lossy(&out.stderr));
        let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        reports.as_array().unwrap().iter().map(|r| (r["file"].as_str().unwrap().to_string(), r["cached"].as_bool().unwrap())).collect()
    };
    let first = warm();
    assert_eq!(first.len(), runtime::backend::cuda::kernels::SOURCES.len());
    assert!(first.iter().all(|(_, cached)| !cached), "an empty cache holds nothing: {first:?}");
    assert!(warm().iter().all(|(_, cached)| *cached), "the second run compiles again");
    // flip bytes in the middle of one file's device code
    let entry = std::fs::read_dir(cache.path())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("rope-sm_80-") && p.extension().is_some_and(|x| x == "cubin"))
        .expect("a cache entry for kernels/rope.cu");
    let mut bytes = std::fs::read(&entry).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid..mid + 8].iter_mut().for_each(|b| *b ^= 0xff);
    std::fs::write(&entry, bytes).unwrap();
    let repaired = warm();
    for (file, cached) in &repaired {
        assert_eq!(*cached, file != "kernels/rope.cu", "{file}: a damaged entry is rebuilt, the others are reused");
    }
    assert!(warm().iter().all(|(_, cached)| *cached), "the rebuilt entry is sound");
}

#[test]
fn asking_for_cuda_without_a_gpu_is_one_clear_error() {
    if runtime::backend::cuda::probe(0).is_ok() {
        skip("this machine has a CUDA device");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, r#"{"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 64}"#).unwrap();
    for args in [
        vec!["bench".to_string(), "--device".into(), "cuda".into(), "--steps".into(), "1".into()],
        vec![
            "train".into(),
            "--config_name".into(),
            cfg.display().to_string(),
            "--device".into(),
            "cuda".into(),
            "--output_dir".into(),
            dir.path().join("out").display().to_string(),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_runtime")).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded without a GPU");
        assert!(stderr.contains("no CUDA device/driver found") || stderr.contains("was not found"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: one error line expected: {stderr}");
    }
    // `auto` (the default) falls back to the CPU
    let out = Command::new(env!("CARGO_BIN_EXE_runtime"))
        .args([
            "bench",
            "--device",
            "auto",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--n_layer",
            "1",
            "--hidden",
            "32",
            "--n_head",
            "2",
            "--vocab",
            "64",
            "--seq",
            "16",
            "--batch",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["device"], "cpu");
}

/// `runtime cuda-check --model` runs the bf16 checks on the CPU model of the bf16 mode on any
/// machine, with the holds `RUNTIME_CUDA_HOLDS` sets (an unknown value is one error line).
#[test]
fn the_bf16_checks_run_on_the_cpu_model_without_a_gpu() {
    let run =
        |holds: &str| Command::new(env!("CARGO_BIN_EXE_runtime")).args(["cuda-check", "--model", "--json"]).env("RUNTIME_CUDA_HOLDS", holds).output().unwrap();
    for holds in ["on", "copies"] {
        let out = run(holds);
        assert!(out.status.success(), "{holds}: {}", String::from_utf8_lossy(&out.stderr));
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        for op in ["training step", "training curve", "training step (bf16 product outputs)", "encoder-decoder pass"] {
            assert!(rows.iter().any(|r| r["op"] == op), "{holds}: no {op} row");
        }
        assert!(rows.iter().all(|r| r["pass"] == true), "{holds}");
        assert!(rows.iter().any(|r| r["output"] == "gradients (L2)" && r["rel_err"].as_f64().unwrap() > 0.0), "{holds}: the gradients by norm, rounded");
    }
    let out = run("sometimes");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("RUNTIME_CUDA_HOLDS") && !stderr.contains("panicked") && stderr.trim().lines().count() == 1, "{stderr}");
}

#[test]
fn cuda_ops_and_training_steps_match_the_cpu_backend() {
    if let Err(why) = runtime::backend::cuda::probe(0) {
        skip(&format!("the GPU parity test needs a CUDA device: {why}"));
        return;
    }
    for bf16 in [false, true] {
        let cuda = runtime::backend::cuda::Cuda::new(0, bf16).unwrap();
        let mut checks = runtime::tools::cuda_check::op_parity(&cuda).unwrap();
        checks.extend(runtime::tools::cuda_check::step_parity(&cuda).unwrap());
        let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
        assert!(failed.is_empty(), "bf16 {bf16}: {failed:#?}");
    }
}

/// Every kernel the backend launches by a name written out whole, with a block of constant size,
/// runs with the threads its `__launch_bounds__` names (more fails to launch; fewer breaks the
/// block reductions sized by that number), and the constants the backend shares with the kernels
/// agree: a name both define (`const ADAMW_CHUNK` and `#define ADAMW_CHUNK`) has one value, the
/// fused norm backward's width and the column sums' rows per block are the kernels'. Read from
/// the sources: no GPU and no NVRTC needed.
#[test]
fn launch_blocks_and_shared_constants_agree_with_the_kernels() {
    use runtime::backend::cuda::kernels::{COMMON, SOURCES};
    use std::collections::HashMap;
    let cu: Vec<&str> = std::iter::once(COMMON).chain(SOURCES.iter().map(|s| s.1)).collect();
    // `#define NAME 123` (a trailing comment allowed) of the kernels
    let mut defines = HashMap::new();
    for line in cu.iter().flat_map(|s| s.lines()) {
        let mut w = line.split("//").next().unwrap().split_whitespace();
        if let (Some("#define"), Some(name), Some(v), None) = (w.next(), w.next(), w.next(), w.next()) {
            if let Ok(v) = v.parse::<u64>() {
                defines.insert(name.to_string(), v);
            }
        }
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let rust: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    // `const NAME: T = 123;` of the backend
    let mut consts = HashMap::new();
    for line in rust.iter().flat_map(|s| s.lines()) {
        let Some((_, rest)) = line.split_once("const ") else { continue };
        let Some((name, rest)) = rest.split_once(':') else { continue };
        let Some(v) = rest.split_once('=').and_then(|(_, v)| v.trim().strip_suffix(';')) else { continue };
        if let Ok(v) = v.trim().parse::<u64>() {
            consts.insert(name.trim().to_string(), v);
        }
    }
    for (name, v) in &consts {
        if let Some(k) = defines.get(name) {
            assert_eq!(v, k, "`{name}` is {v} in the CUDA backend and {k} in the kernels");
        }
    }
    let value = |t: &str, table: &HashMap<String, u64>| t.trim().parse::<u64>().ok().or_else(|| table.get(t.trim()).copied());
    assert_eq!(runtime::backend::NORM_FUSED_WIDTH as u64, defines["NORM_FUSED_COLS"] * defines["NORM_THREADS"], "NORM_FUSED_WIDTH");
    assert_eq!(runtime::backend::REDUCE_BLOCK_ROWS as u64, defines["RR_ROWS"], "REDUCE_BLOCK_ROWS");

    // `__launch_bounds__(N) name(` of the kernels (names built by a macro are left out)
    let mut bounds = HashMap::new();
    for src in &cu {
        for piece in src.split("__launch_bounds__(").skip(1) {
            let (arg, rest) = piece.split_once(')').unwrap();
            let name: String = rest.trim_start().chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == '#').collect();
            if let (Some(n), false) = (value(arg.split(',').next().unwrap(), &defines), name.contains('#')) {
                bounds.insert(name, n);
            }
        }
    }
    // `launch("name", grid, (x, y, z), ..`, `launch_shared(..)` and `launch_n("name", ..)` (block
    // 256) of the backend: the threads of each block of constant size
    let mut checked = 0;
    for src in &rust {
        for (call, piece) in ["launch(\"", "launch_shared(\"", "launch_n(\""].iter().flat_map(|c| src.split(c).skip(1).map(move |p| (*c, p))) {
            let (name, rest) = piece.split_once('"').unwrap();
            let threads = if call == "launch_n(\"" {
                Some(256)
            } else {
                // skip the grid (the argument up to the first comma outside parentheses)
                let (mut depth, mut at) = (0i32, None);
                for (i, ch) in rest.char_indices().skip(1) {
                    match ch {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        ',' if depth == 0 => {
                            at = Some(i);
                            break;
                        }
                        _ => {}
                    }
                }
                let block = rest[at.unwrap() + 1..].trim_start();
                let dims = block.strip_prefix('(').and_then(|b| b.split_once(')')).map(|(d, _)| d);
                dims.and_then(|d| d.split(',').map(|t| value(t, &consts)).product::<Option<u64>>())
            };
            if let (Some(t), Some(b)) = (threads, bounds.get(name)) {
                assert_eq!(t, *b, "the backend launches `{name}` with {t} threads per block; its __launch_bounds__ is {b}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} launches were checked against their kernels' bounds");
}
