//! The GPU commands of the command line: `runtime kernels` (compile every kernel with NVRTC, or
//! fill the kernel cache) and `runtime cuda-check` (the CUDA backend against the CPU, or the
//! kernels' timings), printing tables or JSON.

use crate::error::{Error, Result};
use crate::tools::cuda_check::Check;

fn json_of<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Invalid(e.to_string()))
}

/// `runtime kernels --arch A ... [--cache] [--json]`.
pub fn kernels(arch: &[String], cache: bool, json: bool) -> Result<()> {
    if cache {
        let reports = crate::backend::cuda::kernels::warm_cache(arch)?;
        if json {
            println!("{}", json_of(&reports)?);
        } else {
            for r in &reports {
                let how = if r.cached { "cached" } else { "compiled" };
                println!("{:<26} {:<6} {:>4} kernels  {how:<8}  {:.2} s", r.file, r.arch, r.kernels, r.seconds);
            }
        }
        return Ok(());
    }
    let reports = crate::backend::cuda::kernels::compile_all(arch)?;
    if json {
        println!("{}", json_of(&reports)?);
    } else {
        let (major, minor) = crate::backend::cuda::kernels::nvrtc_version()?;
        println!("NVRTC {major}.{minor}");
        for r in &reports {
            println!(
                "{:<26} {:<6} {:>4} kernels {:>8} bytes of PTX {:>8} bytes of CUBIN  {:.2} s",
                r.file,
                r.arch,
                r.kernels.len(),
                r.ptx_bytes,
                r.cubin_bytes,
                r.seconds
            );
        }
    }
    Ok(())
}

/// The holds `RUNTIME_CUDA_HOLDS` sets (`on`, `copies` or `off`), for the CPU model of the bf16
/// mode; an unknown value is the CUDA backend's error.
fn holds_set() -> Result<&'static str> {
    let value = std::env::var(crate::backend::cuda::HOLDS_ENV).ok();
    crate::backend::cuda::holds_setting(value.as_deref())
}

/// Prints the checks as a table (with the CPU model's error of the same check beside each, where
/// `model` has it) or as JSON; an error when any fails.
fn report(title: &str, checks: &[Check], model: Option<&[Check]>, json: bool) -> Result<()> {
    let failed = checks.iter().filter(|c| !c.pass).count();
    if json {
        println!("{}", json_of(&checks)?);
    } else {
        println!("{title}");
        // the CPU model's column: its error for the same check (blank where it has none)
        let predicted = |c: &Check| match model {
            None => String::new(),
            Some(m) => {
                let e = m.iter().find(|m| m.op == c.op && m.case == c.case && m.output == c.output).map(|m| format!("{:.2e}", m.rel_err));
                format!(" {} |", e.unwrap_or_default())
            }
        };
        let (head, rule) = if model.is_some() { (" CPU model |", "---|") } else { ("", "") };
        println!("| op | case | output | rel. error |{head} limit | |\n|---|---|---|---|{rule}---|---|");
        for c in checks {
            let verdict = if c.pass { "ok" } else { "FAIL" };
            println!("| {} | {} | {} | {:.2e} |{} {:.0e} | {verdict} |", c.op, c.case, c.output, c.rel_err, predicted(c), c.limit);
        }
    }
    if failed > 0 {
        return Err(Error::Device(format!("{failed} of {} checks failed", checks.len())));
    }
    Ok(())
}

/// `runtime cuda-check --model [--json]`: the bf16 checks on the CPU model of the bf16 mode
/// (`backend::bf16_model`), on any machine; an error when any check fails.
pub fn model_check(json: bool) -> Result<()> {
    let holds = holds_set()?;
    let checks = crate::tools::cuda_check::model_parity(holds == "on")?;
    let title = format!("the CPU model of CUDA's bf16 mode, holds {holds}");
    report(&title, &checks, None, json)
}

/// `runtime cuda-check [--bf16] [--json] [--bench]`: an error when any check fails.
pub fn cuda_check(bf16: bool, json: bool, bench: bool) -> Result<()> {
    let cuda = crate::backend::cuda::Cuda::new(0, bf16)?;
    if bench {
        let timings = crate::tools::kernel_bench::kernel_bench(&cuda)?;
        if json {
            println!("{}", json_of(&timings)?);
        } else {
            for t in &timings {
                println!("{:<18} {:<28} {:8.3} ms  {:8.1} {}", t.kernel, t.case, t.ms, t.rate, t.unit);
            }
        }
        return Ok(());
    }
    // a part that stops with an error is one failed row, and the rows before it are still printed
    let mut checks = Vec::new();
    let mut part = |name: &str, rows: Result<Vec<Check>>| match rows {
        Ok(rows) => checks.extend(rows),
        Err(e) => checks.push(Check {
            op: name.into(),
            case: "stopped by an error".into(),
            output: e.to_string().replace('|', "/").replace('\n', " "),
            rel_err: f64::NAN,
            limit: 0.0,
            pass: false,
        }),
    };
    part("every op", crate::tools::cuda_check::op_parity(&cuda));
    part("training steps", crate::tools::cuda_check::step_parity(&cuda));
    // the encoder-decoder kernels, with the decoder-only step's limits
    part("encoder-decoder", crate::tools::seq2seq::device_parity(&cuda, bf16));
    let info = cuda.info();
    let mode = if bf16 { format!("bf16, holds {}", cuda.holds()) } else { "f32".into() };
    let title = format!("{} (compute capability {}.{}), {mode}", info.name, info.compute_capability.0, info.compute_capability.1);
    // in bf16, the same checks on the CPU model of the mode: a row far above the model's error is
    // the kernels', not the rounding's
    let model = if bf16 && !json { crate::tools::cuda_check::model_parity(cuda.holds() == "on").ok() } else { None };
    report(&title, &checks, model.as_deref(), json)
}
