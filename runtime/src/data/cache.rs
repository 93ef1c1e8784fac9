//! The on-disk tokenization cache: a dataset's examples are stored once, keyed by the SHA-256 of
//! the data file, the tokenizer's files and the settings that shape the examples, so a second run
//! (or a resume) skips tokenization. Entries are safetensors files written under a temporary name
//! and renamed, with the SHA-256 of their contents in their metadata: an unreadable entry is
//! ignored and rebuilt, and one whose contents do not match the checksum is rebuilt with a
//! warning. `overwrite_cache` (run_clm.py's name) forces a rebuild.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use super::dataset::{load_examples, Example, RecordKind};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};

/// `$RUNTIME_CACHE_DIR`, else `$XDG_CACHE_HOME/runtime/tokenized`, else
/// `~/.cache/runtime/tokenized`.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RUNTIME_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    Some(crate::files::runtime_cache_dir()?.join("tokenized"))
}

fn key(path: &Path, tok: &Tokenizer, block_size: Option<usize>, max_seq_length: Option<usize>) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"runtime tokenized examples v1\0");
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(crate::files::read_bytes(path)?);
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
        h.update(f.as_bytes());
        h.update(std::fs::read(tok.dir.join(f)).unwrap_or_default());
    }
    h.update(format!("{block_size:?} {max_seq_length:?}").as_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn kind_name(k: RecordKind) -> &'static str {
    match k {
        RecordKind::Text => "text",
        RecordKind::PromptCompletion => "prompt_completion",
        RecordKind::Messages => "messages",
    }
}

/// The SHA-256 of an entry's tensors' bytes, in order (stored in its metadata as `sha256`).
fn checksum(tensors: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for t in tensors {
        h.update((t.len() as u64).to_le_bytes());
        h.update(t);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an entry cannot be used: unreadable (ignored quietly, as a missing one), or readable but
/// with contents that do not match its checksum (said in the log).
enum Unusable {
    Unreadable,
    Altered,
}

fn read(file: &Path) -> std::result::Result<(RecordKind, Vec<Example>), Unusable> {
    read_checked(file).ok_or(Unusable::Unreadable)?
}

fn read_checked(file: &Path) -> Option<std::result::Result<(RecordKind, Vec<Example>), Unusable>> {
    let bytes = std::fs::read(file).ok()?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).ok()?;
    let stored = meta.metadata().as_ref()?.get("sha256")?.clone();
    let st = safetensors::SafeTensors::deserialize(&bytes).ok()?;
    let data = |name: &str| st.tensor(name).ok().map(|t| t.data());
    if checksum(&[data("input_ids")?, data("labels")?, data("lengths")?]) != stored {
        return Some(Err(Unusable::Altered));
    }
    let kind = match meta.metadata().as_ref()?.get("kind")?.as_str() {
        "text" => RecordKind::Text,
        "prompt_completion" => RecordKind::PromptCompletion,
        "messages" => RecordKind::Messages,
        _ => return None,
    };
    let u32s =
        |name: &str| -> Option<Vec<u32>> { Some(st.tensor(name).ok()?.data().chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()) };
    let (ids, labels, lengths) = (u32s("input_ids")?, u32s("labels")?, u32s("lengths")?);
    if ids.len() != labels.len() || lengths.iter().map(|&l| l as usize).sum::<usize>() != ids.len() {
        return None;
    }
    let mut out = Vec::with_capacity(lengths.len());
    let mut off = 0;
    for &l in &lengths {
        let l = l as usize;
        out.push(Example { input_ids: ids[off..off + l].to_vec(), labels: labels[off..off + l].iter().map(|&x| x as i32).collect() });
        off += l;
    }
    Some(Ok((kind, out)))
}

fn view(b: &[u8], dtype: Dtype) -> Result<TensorView<'_>> {
    TensorView::new(dtype, vec![b.len() / 4], b).map_err(|e| Error::Invalid(e.to_string()))
}

fn write(file: &Path, kind: RecordKind, examples: &[Example]) -> Result<()> {
    let le = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    let (mut ids, mut labels, mut lengths) = (Vec::new(), Vec::new(), Vec::new());
    for e in examples {
        e.input_ids.iter().for_each(|&x| le(&mut ids, x));
        e.labels.iter().for_each(|&x| le(&mut labels, x as u32));
        le(&mut lengths, e.input_ids.len() as u32);
    }
    let tensors = vec![("input_ids", view(&ids, Dtype::U32)?), ("labels", view(&labels, Dtype::I32)?), ("lengths", view(&lengths, Dtype::U32)?)];
    let sum = checksum(&[&ids, &labels, &lengths]);
    let meta = Some([("kind".to_string(), kind_name(kind).to_string()), ("sha256".to_string(), sum)].into());
    let bytes = safetensors::serialize(tensors, meta).map_err(|e| Error::Invalid(e.to_string()))?;
    let dir = file.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let tmp = file.with_extension(format!("partial-{}", std::process::id()));
    crate::files::write_file(&tmp, &bytes)?;
    std::fs::rename(&tmp, file).map_err(|e| Error::io(file, e))
}

/// What [`load_examples`] returns, from the cache in `dir` when an entry exists (and `overwrite`
/// is off), else computed and stored. Returns whether the cache answered. Failing to write the
/// cache is a logged warning, never an error: the examples are still right.
pub fn load_examples_cached(
    path: &Path,
    tok: &Tokenizer,
    block_size: Option<usize>,
    max_seq_length: Option<usize>,
    dir: Option<&Path>,
    overwrite: bool,
) -> Result<(RecordKind, Vec<Example>, bool)> {
    let Some(dir) = dir else {
        let (k, e) = load_examples(path, tok, block_size, max_seq_length)?;
        return Ok((k, e, false));
    };
    let file = dir.join(format!("{}.safetensors", key(path, tok, block_size, max_seq_length)?));
    if !overwrite {
        match read(&file) {
            Ok((k, e)) => return Ok((k, e, true)),
            Err(Unusable::Altered) => tracing::warn!("{}: the cached tokenization does not match its checksum; rebuilding it", file.display()),
            Err(Unusable::Unreadable) => {}
        }
    }
    let (k, e) = load_examples(path, tok, block_size, max_seq_length)?;
    if let Err(err) = write(&file, k, &e) {
        tracing::warn!("could not cache the tokenized {}: {err}", path.display());
    }
    Ok((k, e, false))
}
