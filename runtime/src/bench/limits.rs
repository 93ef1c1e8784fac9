//! What `runtime bench` refuses before it builds anything: flags the chosen benchmark would not
//! read, sizes whose products overflow, and runs that cannot fit in this machine's memory. Each is
//! one error line, where an allocation would abort the process.

use anyhow::{bail, Result};

/// The most tokens one step may hold (`batch x seq`, or `batch x (prompt + decode)`): the bound
/// every size of a model config has.
const MAX_TOKENS: u128 = 1 << 31;

/// The most layers the roofline account walks (each layer is a few dozen launches, accounted one
/// by one): far above any model's.
pub(super) const MAX_ROOFLINE_LAYERS: usize = 4096;

/// Refuses the flags in `flags` that are set (`true`): `what` does not read them.
pub(super) fn refuse_unused(what: &str, flags: &[(&str, bool)]) -> Result<()> {
    let set: Vec<&str> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
    if !set.is_empty() {
        bail!("{} {} not apply to {what}", set.join(", "), if set.len() == 1 { "does" } else { "do" });
    }
    Ok(())
}

/// `rows x per_row` tokens, refused beyond [`MAX_TOKENS`] (`what` names the product).
pub(super) fn tokens(rows: usize, per_row: Option<usize>, what: &str) -> Result<u128> {
    let n = per_row.map(|p| rows as u128 * p as u128).filter(|&n| n <= MAX_TOKENS);
    n.ok_or_else(|| anyhow::anyhow!("{what} is beyond any batch (at most {MAX_TOKENS} tokens a step)"))
}

/// Refuses a run that needs more than the memory available: `bytes`, a lower bound of what it
/// holds at once (`what` says of what).
pub(super) fn memory(bytes: u128, what: &str) -> Result<()> {
    if let Some(available) = crate::mem::host_memory_budget().filter(|&a| bytes > a) {
        let gib = |b: u128| b as f64 / (1u64 << 30) as f64;
        bail!("{what} needs at least {:.2} GiB; {:.2} GiB of memory is available", gib(bytes), gib(available));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_sizes_and_memory_are_refused_with_what_they_are() {
        assert!(refuse_unused("x", &[("--a", false)]).is_ok());
        let e = refuse_unused("the T5 benchmark", &[("--a", true), ("--b", false), ("--c", true)]).unwrap_err().to_string();
        assert_eq!(e, "--a, --c do not apply to the T5 benchmark");
        assert_eq!(tokens(8, Some(1024), "--batch x --seq").unwrap(), 8192);
        assert!(tokens(usize::MAX, Some(2), "--batch x --seq").unwrap_err().to_string().contains("--batch x --seq"));
        assert!(tokens(2, None, "--batch x (--prompt + --decode)").is_err());
        assert!(memory(1 << 20, "a step").is_ok());
        assert!(memory(u128::MAX, "a step").unwrap_err().to_string().starts_with("a step needs at least"));
    }
}
