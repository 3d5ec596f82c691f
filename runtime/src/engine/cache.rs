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
    if let Err(why) = trusted(dir, &path) {
        // Compiled code is loaded without verification: only files this
        // user wrote into a folder only it can write to are trusted.
        tracing::warn!(path = %path.display(), "not using the cached component: {why}");
        let compiled = engine.precompile_component(bytes)?;
        // SAFETY: `compiled` was produced just now by this engine.
        return unsafe { Component::deserialize(engine, &compiled) };
    }
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

/// Checks that the cache folder (created 0700 when missing) and the cached
/// file, if any, belong to this user and are writable by no one else.
fn trusted(dir: &Path, path: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    for p in [dir, path] {
        let meta = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(_) if p == path => continue,
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        if meta.file_type().is_symlink() {
            return Err(format!("{} is a symbolic link", p.display()));
        }
        if meta.uid() != me {
            return Err(format!("{} belongs to another user (uid {})", p.display(), meta.uid()));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!("{} is writable by group or others", p.display()));
        }
    }
    Ok(())
}

fn store(dir: &Path, path: &Path, compiled: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(compiled)?;
    }
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn refuses_a_folder_others_can_write() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let file = dir.join("x.cwasm");
        trusted(&dir, &file).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(trusted(&dir, &file).unwrap_err().contains("writable"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(trusted(&dir, &file).is_err());
    }
}
