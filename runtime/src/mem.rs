//! The process's memory as the system counts it (Linux's `/proc/self/status`; NaN elsewhere): the
//! peak resident set, and resetting that peak so that a phase of a run can be measured alone; and
//! the memory a run may still take (`host_memory_budget`).

/// The peak resident set size of this process in MiB (`VmHWM`), NaN where unknown.
pub fn peak_rss_mib() -> f64 {
    status_mib("VmHWM:")
}

/// The resident set size now, in MiB (`VmRSS`), NaN where unknown.
pub fn rss_mib() -> f64 {
    status_mib("VmRSS:")
}

/// The value of `/proc/self/status`'s line `key` (in kB there), in MiB.
fn status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Starts a fresh peak: [`peak_rss_mib`] from now on is the peak since this call (Linux: writing
/// `5` to `/proc/self/clear_refs`). Returns whether it could.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Gives the memory the allocator holds free back to the system (glibc's `malloc_trim`), so that
/// what a finished phase (loading a model) freed does not stay in the resident set. Returns
/// whether anything was given back.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks the allocator's own free lists.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The host memory a run may use, in bytes: `RUNTIME_MEMORY_BUDGET_MB` when set (tests use it to
/// stand in for a small machine), else the system's available memory (`MemAvailable`), else
/// `None` (unknown).
pub fn host_memory_budget() -> Option<u128> {
    if let Some(mb) = std::env::var("RUNTIME_MEMORY_BUDGET_MB").ok().and_then(|v| v.trim().parse::<u128>().ok()) {
        return Some(mb << 20);
    }
    let field = |file: &str, key: &str| {
        std::fs::read_to_string(file).ok().and_then(|s| s.lines().find(|l| l.starts_with(key)).and_then(|l| l.split_whitespace().nth(1)?.parse::<u128>().ok()))
    };
    let available = field("/proc/meminfo", "MemAvailable:").map(|kb| kb << 10);
    // an address-space limit (`ulimit -v`) leaves less than that: its headroom above what this
    // process has mapped already
    let limits = std::fs::read_to_string("/proc/self/limits").ok();
    let cap =
        limits.as_deref().and_then(|s| s.lines().find(|l| l.starts_with("Max address space"))).and_then(|l| l.split_whitespace().nth(3)?.parse::<u128>().ok());
    let headroom = cap.map(|cap| cap.saturating_sub(field("/proc/self/status", "VmSize:").unwrap_or(0) << 10));
    match (available, headroom) {
        (Some(a), Some(h)) => Some(a.min(h)),
        (a, h) => a.or(h),
    }
}
