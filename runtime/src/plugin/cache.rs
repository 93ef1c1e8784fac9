//! Compiled components, cached on disk by the hash of the component's bytes and the engine's
//! compatibility hash, so the second start of a plugin skips compilation. Each cache file ends
//! with the SHA-256 of its contents and is checked before use; a damaged or stale file is
//! recompiled and replaced. The folder is `$RUNTIME_PLUGIN_CACHE_DIR`, else
//! `$XDG_CACHE_HOME/runtime/plugins` (or `~/.cache/runtime/plugins`); caching is skipped when
//! neither can be found or written.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("RUNTIME_PLUGIN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    Some(crate::files::runtime_cache_dir()?.join("plugins"))
}

fn key(engine: &Engine, wasm: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let mut s = Sha256::new();
    s.update(b"runtime plugin component v1\0");
    s.update(h.finish().to_le_bytes());
    s.update(wasm);
    hex::encode(s.finalize())
}

/// The compiled component and whether it came from the cache.
pub fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, bool)> {
    let Some(dir) = default_dir() else { return Ok((Component::new(engine, wasm)?, false)) };
    let path = dir.join(format!("{}.cwasm", key(engine, wasm)));
    if let Ok(bytes) = std::fs::read(&path) {
        if bytes.len() > 32 {
            let (body, sum) = bytes.split_at(bytes.len() - 32);
            if Sha256::digest(body).as_slice() == sum {
                // SAFETY: the bytes are what `Component::serialize` wrote for this engine
                // configuration (the file name carries the engine's compatibility hash) and
                // their checksum matches, so they are not damaged.
                if let Ok(c) = unsafe { Component::deserialize(engine, body) } {
                    return Ok((c, true));
                }
            }
        }
        tracing::warn!("{}: damaged plugin cache entry; recompiling", path.display());
    }
    let component = Component::new(engine, wasm)?;
    if let Ok(mut bytes) = component.serialize() {
        let sum = Sha256::digest(&bytes);
        bytes.extend_from_slice(&sum);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let written = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&tmp, &bytes)).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!("{}: plugin cache not written: {e}", path.display());
        }
    }
    Ok((component, false))
}
