//! The CUDA sources of `kernels/`, embedded in the binary, and their compilation by NVRTC for the
//! device's architecture. Each file is compiled on its own with `kernels/common.cuh` prepended
//! (the kernels include no toolkit header, so NVRTC needs no include path). Compiled PTX is cached
//! in the user cache folder, keyed by the source, the architecture, the options and the NVRTC
//! version, so only the first start on a machine pays for compilation.

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
    ("cross_entropy", include_str!("../../../../kernels/cross_entropy.cu")),
    ("adamw", include_str!("../../../../kernels/adamw.cu")),
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

/// Compiles one kernel file for `arch` (for example `sm_90`); the error carries NVRTC's log.
pub fn compile(stem: &str, src: &str, arch: &str) -> Result<String> {
    if !nvrtc_present() {
        return Err(Error::Device(NVRTC_MISSING.into()));
    }
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture={arch}"));
    let opts = cudarc::nvrtc::CompileOptions { options, name: Some(format!("{stem}.cu")), ..Default::default() };
    match cudarc::nvrtc::compile_ptx_with_opts(format!("{COMMON}\n{src}"), opts) {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(cudarc::nvrtc::CompileError::CompileError { log, .. }) => {
            Err(Error::Device(format!("kernels/{stem}.cu does not compile for {arch}:\n{}", log.to_string_lossy().trim_end())))
        }
        Err(e) => Err(Error::Device(format!("kernels/{stem}.cu for {arch}: NVRTC failed: {e:?}"))),
    }
}

fn cache_path(stem: &str, src: &str, arch: &str, version: (i32, i32)) -> Option<PathBuf> {
    let mut h = Sha256::new();
    for part in [COMMON, src, arch, &OPTIONS.join(" "), &format!("nvrtc {version:?}")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    let hex: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    let dir = std::env::var_os("RUNTIME_KERNEL_CACHE_DIR").map(PathBuf::from).or_else(|| crate::data::cache::runtime_cache_dir().map(|d| d.join("kernels")))?;
    Some(dir.join(format!("{stem}-{arch}-{hex}.ptx")))
}

/// [`compile`] through the on-disk cache. A cache that cannot be read or written is skipped.
pub fn compile_cached(stem: &str, src: &str, arch: &str) -> Result<String> {
    let version = nvrtc_version()?;
    let path = cache_path(stem, src, arch, version);
    if let Some(ptx) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).filter(|p| p.contains(".entry")) {
        return Ok(ptx);
    }
    let ptx = compile(stem, src, arch)?;
    if let Some(path) = path {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) && std::fs::write(&tmp, &ptx).is_ok();
        if !written || std::fs::rename(&tmp, &path).is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(ptx)
}

/// One compiled file, for `runtime kernels`.
#[derive(Debug, serde::Serialize)]
pub struct CompileReport {
    pub file: String,
    pub arch: String,
    pub ptx_bytes: usize,
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
    let mut out = Vec::new();
    for arch in archs {
        for (stem, src) in SOURCES {
            let t = Instant::now();
            let ptx = compile(stem, src, arch)?;
            out.push(CompileReport {
                file: format!("kernels/{stem}.cu"),
                arch: arch.clone(),
                ptx_bytes: ptx.len(),
                seconds: t.elapsed().as_secs_f64(),
                kernels: entries(&ptx),
            });
        }
    }
    Ok(out)
}
