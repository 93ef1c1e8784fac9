//! Writing files so that a reader never sees half of one: `write_file` flushes to disk, and
//! `write_folder_atomically` builds a folder under a temporary name and renames it into place.
//! Also where the runtime's caches live. The bottom layer: it imports nothing of the crate but
//! the error type.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Reads a whole input file (a config, a dataset, a prompt list), refusing what is not a regular
/// file first: a FIFO would block the read forever and a device (`/dev/zero`) never end it.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        let what = if meta.is_dir() { "a folder" } else { "not a regular file" };
        return Err(Error::Invalid(format!("{}: {what}; expected a file to read", path.display())));
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// [`read_bytes`] as UTF-8 text.
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_bytes(path)?).map_err(|e| Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error())))
}

/// Writes `bytes` to `path` and flushes them to disk.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    if disk_full_injected(path) {
        // as a full disk does it: part of the file is written, then the write fails
        let _ = f.write_all(&bytes[..bytes.len() / 2]);
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::StorageFull)));
    }
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Writes a file through `fill`, which streams its bytes into the writer it is given (for files
/// too large to hold in memory at once); synced before returning, as [`write_file`].
pub fn write_file_streamed(path: &Path, fill: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let f = File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    if disk_full_injected(path) {
        // as a full disk does it: part of the file is written, then the write fails
        let _ = fill(&mut FullAfter { inner: &mut w, left: 4096 });
        let _ = w.flush();
        return Err(Error::io(path, std::io::Error::from(std::io::ErrorKind::StorageFull)));
    }
    fill(&mut w)?;
    let f = w.into_inner().map_err(|e| Error::io(path, e.into_error()))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// A writer that takes `left` bytes, then fails as a full disk (fault injection).
struct FullAfter<'a> {
    inner: &'a mut dyn Write,
    left: usize,
}

impl Write for FullAfter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::StorageFull));
        }
        let n = buf.len().min(self.left);
        self.left -= n;
        self.inner.write(&buf[..n])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The environment variable of the full-disk fault injection (for tests): every [`write_file`]
/// to a path containing its value fails as a full disk would, after writing half the bytes.
pub const FAULT_DISK_FULL: &str = "RUNTIME_FAULT_DISK_FULL";

fn disk_full_injected(path: &Path) -> bool {
    std::env::var(FAULT_DISK_FULL).is_ok_and(|pattern| !pattern.is_empty() && path.to_string_lossy().contains(&pattern))
}

/// The runtime's cache folder: `$XDG_CACHE_HOME/runtime`, else `~/.cache/runtime`.
pub fn runtime_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("runtime"))
}

/// Whether `dir` is a folder holding anything.
pub fn non_empty_dir(dir: &Path) -> Result<bool> {
    Ok(dir.is_dir() && std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.next().is_some())
}

/// Refuses an output folder that is, or holds, one of the folders a command reads (`inputs`:
/// what each is, and its path): replacing it would delete the input, with `--overwrite_output_dir`
/// as without. An output folder inside an input folder is fine (the input's files stay).
pub fn refuse_output_over_inputs(output_dir: &Path, inputs: &[(&str, &Path)]) -> Result<()> {
    let Ok(out) = std::fs::canonicalize(output_dir) else { return Ok(()) };
    for (what, input) in inputs {
        let src = std::fs::canonicalize(input).map_err(|e| Error::io(input, e))?;
        if src == out {
            return Err(Error::Invalid(format!("{}: the output folder is the {what} folder", output_dir.display())));
        }
        if src.starts_with(&out) {
            return Err(Error::Invalid(format!(
                "{}: the output folder holds the {what} folder {} (writing it would delete the {what}); choose another output folder",
                output_dir.display(),
                input.display()
            )));
        }
    }
    Ok(())
}

/// Builds a folder under a temporary sibling name with `fill`, then renames it to `dir`. On any
/// error the temporary folder is removed and `dir` is left as it was.
pub fn write_folder_atomically(dir: &Path, overwrite: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let occupied = non_empty_dir(dir)?;
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Invalid(format!("{}: exists and is not a folder", dir.display())));
    }
    if occupied && !overwrite {
        return Err(Error::Invalid(format!("{}: folder exists and is not empty (pass --overwrite_output_dir to replace it)", dir.display())));
    }
    let name = dir.file_name().ok_or_else(|| Error::Invalid(format!("{}: not a folder name", dir.display())))?.to_string_lossy().to_string();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let result = fill(&tmp).and_then(|()| {
        if dir.exists() {
            let old = parent.join(format!(".{name}.old-{}", std::process::id()));
            std::fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
            std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))?;
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
        }
    });
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// Checks that no object or mapping in `text` (`"json"` or `"yaml"`) repeats a key: both formats
/// leave a repeated key to the parser, which keeps the last value without a word. The error says
/// which key (and, for JSON, where).
pub fn check_unique_keys(text: &str, format: &str) -> std::result::Result<(), String> {
    match format {
        "yaml" => serde_yaml_ng::from_str::<UniqueKeys>(text).map(|_| ()).map_err(|e| e.to_string()),
        _ => serde_json::from_str::<UniqueKeys>(text).map(|_| ()).map_err(|e| e.to_string()),
    }
}

/// A value that only checks, as it is parsed, that no map repeats a key.
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any value")
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_none<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<UniqueKeys, D::Error> {
        serde::Deserialize::deserialize(d)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
        let mut seen = std::collections::HashSet::new();
        while let Some(key) = map.next_key::<serde_json::Value>()? {
            let name = key.as_str().map_or_else(|| key.to_string(), str::to_string);
            if !seen.insert(name.clone()) {
                return Err(serde::de::Error::custom(format!("the key `{name}` appears twice")));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }
}
