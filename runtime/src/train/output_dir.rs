//! The output folder's safety: one run at a time (an advisory lock naming the holder's PID), what
//! an earlier run left half-done cleaned at the start and said in one line, the folder checked for
//! writability and free space before step 1, and checkpoints deleted by renaming them to a
//! hidden name first, so a kill mid-deletion never leaves a half-deleted `checkpoint-N`.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The lock file's name: hidden, and ignored when the folder's emptiness is judged.
pub const LOCK_FILE: &str = ".runtime.lock";

/// Whether `name` (an entry of the output folder) is the runtime's own bookkeeping: the lock, or
/// a hidden staging or deleting folder (`.<name>.partial-<pid>`, `.old-`, `.deleting-`).
pub fn is_bookkeeping(name: &str) -> bool {
    name == LOCK_FILE || (name.starts_with('.') && [".partial-", ".old-", ".deleting-"].iter().any(|m| name.contains(m)))
}

/// Whether `dir` holds anything but the runtime's bookkeeping.
pub fn occupied(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries.flatten().any(|e| !is_bookkeeping(&e.file_name().to_string_lossy())))
}

/// Takes the output folder's advisory lock (held while the returned file is open) and writes this
/// process's PID into it; an error naming the holder's PID when another run has it.
pub fn lock(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = File::options().read(true).write(true).create(true).truncate(false).open(&path).map_err(|e| Error::io(&path, e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            let holder = holder.trim();
            let who = if holder.is_empty() { "another process".to_string() } else { format!("another run (PID {holder})") };
            return Err(Error::Invalid(format!("{}: in use by {who}; two runs must not share an output_dir", dir.display())));
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
    }
    f.set_len(0).and_then(|()| f.rewind()).and_then(|()| write!(f, "{}", std::process::id())).map_err(|e| Error::io(&path, e))?;
    Ok(f)
}

/// Removes what an earlier run left half-done in `dir` (staging folders of checkpoints and of the
/// final output, folders being deleted, and `checkpoint-N` folders without `trainer_state.json`,
/// which are half-deleted), and says so in one line. Call with the lock held.
pub fn clean_leftovers(dir: &Path) -> Result<()> {
    let mut removed = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let half_deleted = name.strip_prefix("checkpoint-").is_some_and(|n| n.parse::<u64>().is_ok()) && !e.path().join("trainer_state.json").is_file();
        if (name != LOCK_FILE && is_bookkeeping(&name)) || (half_deleted && e.path().is_dir()) {
            remove(&e.path())?;
            removed.push(name);
        }
    }
    if !removed.is_empty() {
        removed.sort();
        tracing::warn!("{}: removed what an earlier run left half-done: {}", dir.display(), removed.join(", "));
    }
    Ok(())
}

/// Deletes a folder (or file) by renaming it to a hidden `.deleting-` name first, so that a kill
/// midway leaves it under that name (cleaned at the next start), never half-deleted in place.
pub fn remove(path: &Path) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let doomed = if is_bookkeeping(&name) {
        path.to_path_buf()
    } else {
        let hidden = path.with_file_name(format!(".{name}.deleting-{}", std::process::id()));
        std::fs::rename(path, &hidden).map_err(|e| Error::io(path, e))?;
        hidden
    };
    let result = if doomed.is_dir() { std::fs::remove_dir_all(&doomed) } else { std::fs::remove_file(&doomed) };
    result.map_err(|e| Error::io(&doomed, e))
}

/// Checks before step 1 that `dir` can be written (a probe file is created and removed) and has
/// room for `needed` bytes (one checkpoint and the final model), so a run is not trained and
/// then lost at its first save.
pub fn preflight(dir: &Path, needed: u64) -> Result<()> {
    let probe = dir.join(format!(".write-probe.partial-{}", std::process::id()));
    crate::files::write_file(&probe, b"probe").map_err(|e| Error::Invalid(format!("output_dir is not writable: {e}")))?;
    std::fs::remove_file(&probe).map_err(|e| Error::io(&probe, e))?;
    let free = fs4::available_space(dir).map_err(|e| Error::io(dir, e))?;
    if free < needed {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        return Err(Error::Invalid(format!(
            "{}: {:.1} MiB free, but a checkpoint and the final model need {:.1} MiB; free some space or choose another output_dir",
            dir.display(),
            mib(free),
            mib(needed)
        )));
    }
    Ok(())
}

/// The `checkpoint-N` folders in `dir`, oldest first.
pub fn checkpoint_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<u64>().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}
