//! The CUDA sources of `kernels/`, embedded in the binary, and their compilation by NVRTC for the
//! device's architecture. Each file is compiled on its own with `kernels/common.cuh` prepended
//! (the kernels include no toolkit header, so NVRTC needs no include path). Compiled code is cached
//! in the user cache folder, keyed by the source, the architecture, the options and the NVRTC
//! version, so only the first start on a machine pays for compilation. The device code is
//! CUBIN for the exact architecture, so loading needs no JIT.

use std::ffi::c_int;
use std::path::PathBuf;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Prepended to every kernel file: bf16 conversions, reductions.
pub const COMMON: &str = include_str!("../../../../kernels/common.cuh");

/// `(file stem, source)` of every kernel file, in `kernels/`.
pub const SOURCES: &[(&str, &str)] = &[
    ("pointwise", include_str!("../../../../kernels/pointwise.cu")),
    ("reduce", include_str!("../../../../kernels/reduce.cu")),
    ("embedding", include_str!("../../../../kernels/embedding.cu")),
    ("norm", include_str!("../../../../kernels/norm.cu")),
    ("rope", include_str!("../../../../kernels/rope.cu")),
    ("attention", include_str!("../../../../kernels/attention.cu")),
    ("attention_tc", include_str!("../../../../kernels/attention_tc.cu")),
    ("cross_entropy", include_str!("../../../../kernels/cross_entropy.cu")),
    ("adamw", include_str!("../../../../kernels/adamw.cu")),
    ("dora", include_str!("../../../../kernels/dora.cu")),
    ("seq2seq", include_str!("../../../../kernels/seq2seq.cu")),
];

/// NVRTC options besides the architecture. No fast math: the kernels are compared with the CPU
/// backend to 1e-4, and AdamW keeps PyTorch's rounding.
const OPTIONS: &[&str] = &["-std=c++17", "--fmad=false"];

/// Whether the NVRTC library can be loaded (cudarc panics on first use when it cannot).
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library under its usual names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// The NVRTC library's version, `(major, minor)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_present() {
        return Err(Error::Device(NVRTC_MISSING.into()));
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: the library is present; the call writes two ints.
    unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| Error::Device(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

pub const NVRTC_MISSING: &str = "the NVRTC library (libnvrtc.so.13) was not found: install the CUDA 13 toolkit or the \
     `nvidia-cuda-nvrtc` wheel and put its lib folder on LD_LIBRARY_PATH";

/// The architecture name NVRTC takes for a compute capability, e.g. `(9, 0)` -> `sm_90`.
pub fn arch_name((major, minor): (i32, i32)) -> String {
    format!("sm_{major}{minor}")
}

/// One file compiled for one architecture: the PTX (its `.entry` lines name the kernels) and,
/// when asked for, the device code (CUBIN) that loads without the driver's JIT.
pub struct Compiled {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
}

/// Compiles one kernel file for `arch` (for example `sm_90`); the error carries NVRTC's log.
pub fn compile(stem: &str, src: &str, arch: &str, cubin: bool) -> Result<Compiled> {
    use cudarc::nvrtc::{result, sys};
    if !nvrtc_present() {
        return Err(Error::Device(NVRTC_MISSING.into()));
    }
    let fail = |what: &str, e: result::NvrtcError| Error::Device(format!("kernels/{stem}.cu for {arch}: {what}: {e:?}"));
    let source = std::ffi::CString::new(format!("{COMMON}\n{src}")).map_err(|_| Error::Device(format!("kernels/{stem}.cu holds a NUL byte")))?;
    let name = std::ffi::CString::new(format!("{stem}.cu")).expect("no NUL in a file stem");
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let prog = result::create_program(&source, Some(&name)).map_err(|e| fail("nvrtcCreateProgram", e))?;
    // SAFETY: `prog` is live until the destroy below; the buffers are sized by NVRTC's own
    // size queries.
    let out = unsafe {
        let compiled = result::compile_program(prog, &options);
        let log = || result::get_program_log(prog).map(|l| l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect::<Vec<u8>>()).unwrap_or_default();
        match compiled {
            Err(_) => Err(Error::Device(format!("kernels/{stem}.cu does not compile for {arch}:\n{}", String::from_utf8_lossy(&log()).trim_end()))),
            Ok(()) => (|| {
                let ptx = result::get_ptx(prog).map_err(|e| fail("nvrtcGetPTX", e))?;
                let ptx: Vec<u8> = ptx.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                let cubin = if cubin {
                    let mut size = 0usize;
                    sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| fail("nvrtcGetCUBINSize", e))?;
                    let mut buf = vec![0u8; size];
                    sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut std::ffi::c_char).result().map_err(|e| fail("nvrtcGetCUBIN", e))?;
                    Some(buf)
                } else {
                    None
                };
                Ok(Compiled { ptx: String::from_utf8_lossy(&ptx).into_owned(), cubin })
            })(),
        }
    };
    // SAFETY: created above, destroyed once.
    let _ = unsafe { result::destroy_program(prog) };
    out
}

fn cache_path(stem: &str, src: &str, arch: &str, version: (i32, i32)) -> Option<PathBuf> {
    let mut h = Sha256::new();
    for part in [COMMON, src, arch, &OPTIONS.join(" "), &format!("nvrtc {version:?}")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hex: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = std::env::var_os("RUNTIME_KERNEL_CACHE_DIR").map(PathBuf::from).or_else(|| crate::files::runtime_cache_dir().map(|d| d.join("kernels")))?;
    Some(dir.join(format!("{stem}-{arch}-{hex}")))
}

/// Writes `bytes` to `path` through a temporary file and a rename (a reader sees all or nothing).
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> bool {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let ok = path.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, bytes).is_ok() && std::fs::rename(&tmp, path).is_ok();
    if !ok {
        let _ = std::fs::remove_file(&tmp);
    }
    ok
}

/// One file's kernels for one architecture, as [`compile_cached`] found or made them.
pub struct CachedModule {
    pub names: Vec<String>,
    pub cubin: Vec<u8>,
    /// Whether the entry came from the cache (otherwise NVRTC compiled it just now).
    pub from_cache: bool,
}

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A cache entry's kernel names, if the entry is complete and its device code matches the digest
/// recorded beside the names (a damaged entry counts as missing and is rebuilt).
fn read_entry(base: &std::path::Path) -> Option<(Vec<String>, Vec<u8>)> {
    let names = std::fs::read_to_string(base.with_extension("names")).ok()?;
    let cubin = std::fs::read(base.with_extension("cubin")).ok()?;
    let mut lines = names.lines();
    let recorded = lines.next()?.strip_prefix("sha256 ")?;
    let names: Vec<String> = lines.map(str::to_string).collect();
    (!names.is_empty() && !cubin.is_empty() && recorded == digest(&cubin)).then_some((names, cubin))
}

/// The kernel names and device code of one file for `arch`, through the on-disk cache (a cache
/// that cannot be read or written is skipped; `fresh` skips reading it).
pub fn compile_cached(stem: &str, src: &str, arch: &str, fresh: bool) -> Result<CachedModule> {
    let version = nvrtc_version()?;
    let base = cache_path(stem, src, arch, version);
    if let Some((names, cubin)) = base.as_deref().filter(|_| !fresh).and_then(read_entry) {
        return Ok(CachedModule { names, cubin, from_cache: true });
    }
    let c = compile(stem, src, arch, true)?;
    let names = entries(&c.ptx);
    let cubin = c.cubin.unwrap_or_default();
    if let Some(base) = base {
        // the names (with the device code's digest) last: an entry counts only once both files
        // are complete
        if write_atomically(&base.with_extension("cubin"), &cubin) {
            write_atomically(&base.with_extension("names"), format!("sha256 {}\n{}", digest(&cubin), names.join("\n")).as_bytes());
        }
    }
    Ok(CachedModule { names, cubin, from_cache: false })
}

/// One file of [`warm_cache`].
#[derive(Debug, serde::Serialize)]
pub struct CacheReport {
    pub file: String,
    pub arch: String,
    /// Whether a sound cache entry was there already.
    pub cached: bool,
    pub kernels: usize,
    pub seconds: f64,
}

/// `runtime kernels --cache`: fills the kernel cache for each architecture (as the CUDA backend's
/// start would), so that a GPU job starts without compiling; damaged entries are rebuilt.
pub fn warm_cache(archs: &[String]) -> Result<Vec<CacheReport>> {
    per_file(archs, |stem, src, arch, t| {
        let m = compile_cached(stem, src, arch, false)?;
        Ok(CacheReport {
            file: format!("kernels/{stem}.cu"),
            arch: arch.into(),
            cached: m.from_cache,
            kernels: m.names.len(),
            seconds: t.elapsed().as_secs_f64(),
        })
    })
}

/// `f(stem, source, arch, start)` for every kernel file and architecture, in order; stops at the
/// first error.
fn per_file<T>(archs: &[String], mut f: impl FnMut(&str, &str, &str, Instant) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for arch in archs {
        for (stem, src) in SOURCES {
            out.push(f(stem, src, arch, Instant::now())?);
        }
    }
    Ok(out)
}

/// One compiled file, for `runtime kernels`.
#[derive(Debug, serde::Serialize)]
pub struct CompileReport {
    pub file: String,
    pub arch: String,
    pub ptx_bytes: usize,
    /// The device code NVRTC produced for the architecture (what the runtime loads).
    pub cubin_bytes: usize,
    pub seconds: f64,
    pub kernels: Vec<String>,
}

/// The names of the `.entry` points of a PTX module.
pub fn entries(ptx: &str) -> Vec<String> {
    ptx.lines().filter_map(|l| l.split(".entry").nth(1)).map(|rest| rest.trim().trim_end_matches('(').trim().to_string()).collect()
}

/// Compiles every kernel file for every architecture given (no cache): the check that runs in
/// the test suite on machines without a GPU. Stops at the first file that does not compile.
pub fn compile_all(archs: &[String]) -> Result<Vec<CompileReport>> {
    per_file(archs, |stem, src, arch, t| {
        let c = compile(stem, src, arch, true)?;
        Ok(CompileReport {
            file: format!("kernels/{stem}.cu"),
            arch: arch.into(),
            ptx_bytes: c.ptx.len(),
            cubin_bytes: c.cubin.as_ref().map_or(0, Vec::len),
            seconds: t.elapsed().as_secs_f64(),
            kernels: entries(&c.ptx),
        })
    })
}

/// Every kernel name this backend launches (the test suite checks that the compiled modules
/// export each of them, so a renamed kernel fails on machines without a GPU too).
pub fn required_kernels() -> Vec<String> {
    let mut names: Vec<String> = [
        "fill_f32",
        "scale_f32",
        "add_f32",
        "add_cols_f32",
        "dropout_f32",
        "take_cols_f32",
        "cast_f32_bf16",
        "cast_f32_bf16_rows",
        "cast_bf16_f32",
        "gelu_fwd",
        "gelu_fwd_x16",
        "gelu_bwd",
        "gelu_bwd_x16",
        "swiglu_fwd",
        "swiglu_fwd_x16",
        "swiglu_bwd",
        "swiglu_bwd_x16",
        "swiglu_bwd_bf16",
        "swiglu_bwd_bf16_x16",
        "swiglu_bwd_bf16_d16",
        "swiglu_bwd_bf16_x16_d16",
        "colsum_partials",
        "colsum_cast_partials",
        "gelu_bwd_colsum_cast_partials",
        "gelu_bwd_colsum_cast_partials_x16",
        "gelu_bwd_colsum_cast_partials_d16",
        "gelu_bwd_colsum_cast_partials_x16_d16",
        "layernorm_bwd_fused",
        "layernorm_bwd_fused_d16",
        "rmsnorm_bwd_fused",
        "rmsnorm_bwd_fused_d16",
        "reduce_partials",
        "sum_squares_partial",
        "sum_squares_multi_partial",
        "fill_multi_f32",
        "embedding_fwd",
        "embedding_bwd",
        "layernorm_fwd",
        "layernorm_bwd_dx",
        "layernorm_bwd_params",
        "rmsnorm_fwd",
        "rmsnorm_bwd_dx",
        "rmsnorm_bwd_params",
        "rope",
        "attention_bwd_delta",
        "attention_bwd_delta_o16",
        "attention_bwd_delta_d16_o16",
        "kv_append",
        "attention_decode",
        "cross_entropy",
        "cross_entropy_bf16",
        "cross_entropy_bf16_staged",
        "token_stats",
        "token_stats_bwd",
        "adamw_multi",
        "dora_norm",
        "dora_fwd",
        "dora_grads",
        "dora_dmag",
        // the encoder-decoder models' kernels (seq2seq.rs)
        "relu_fwd",
        "relu_bwd",
        "gelu_erf_fwd",
        "gelu_erf_bwd",
        "geglu_fwd",
        "geglu_bwd",
        "position_bias_fwd",
        "position_bias_bwd",
        "biased_attention_fwd",
        "biased_attention_bwd_rows",
        "biased_attention_bwd_keys",
        "biased_attention_bias_grad",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.extend(["attention_bwd_dkdvq_tc_d64".to_string(), "attention_bwd_dkdvq_tc_d128".to_string()]);
    for k in ["attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"] {
        for ty in ["f32", "bf16", "tc"] {
            for d in ["d32", "d64", "d128"] {
                if ty != "tc" || d != "d32" {
                    names.push(format!("{k}_{ty}_{d}"));
                }
                // the dropout variants (training with attention dropout) are tiled FMA kernels
                if ty != "tc" {
                    names.push(format!("{k}_drop_{ty}_{d}"));
                }
            }
        }
    }
    names
}
