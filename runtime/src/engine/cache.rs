//! On-disk cache of compiled components, keyed by the component's content
//! hash and the engine's compatibility hash (wasmtime version, target and
//! settings), so a restart does not recompile.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::component::Component;

fn cache_path(engine: &wasmtime::Engine, dir: &Path, content_hash: &str) -> PathBuf {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    dir.join(format!("{content_hash}-{:016x}.cwasm", hasher.finish()))
}

/// Compiles `bytes`, or loads the result of an earlier compilation.
pub fn compile(
    engine: &wasmtime::Engine,
    bytes: &[u8],
    content_hash: &str,
    dir: Option<&Path>,
) -> wasmtime::Result<Component> {
    let Some(dir) = dir else {
        return Component::new(engine, bytes);
    };
    let path = cache_path(engine, dir, content_hash);
    if path.is_file() {
        // SAFETY: files in the cache folder are written only by `compile`
        // below from wasmtime's own `precompile_component` output; the folder
        // belongs to the daemon's data directory. A corrupt or foreign file
        // fails the header checks and is recompiled.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(component) => return Ok(component),
            Err(e) => {
                tracing::warn!(path = %path.display(), "discarding unusable cached component: {e}");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    if let Err(e) = store(dir, &path, &compiled) {
        tracing::warn!(path = %path.display(), "cannot cache the compiled component: {e}");
    }
    // SAFETY: `compiled` was produced just now by this engine.
    unsafe { Component::deserialize(engine, &compiled) }
}

fn store(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, compiled)?;
    std::fs::rename(&tmp, path)
}
