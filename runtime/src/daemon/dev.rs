//! `sluice dev`: rebuilds plugin crates when their sources change. The new
//! `.wasm` is then picked up by the ordinary hot reload, so a build that
//! fails (or produces a broken component) leaves the running version alone.

use super::watch::{normalize, FileWatcher};
use crate::config::{Config, PluginConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::task::JoinHandle;

/// The crate that builds `plugin`: its `source` key, else the crate of the
/// workspace holding the `.wasm`'s `target` folder whose library has the
/// `.wasm`'s name (`order_processor.wasm` <- package `order-processor`).
pub fn source_crate(plugin: &PluginConfig) -> Option<PathBuf> {
    if let Some(source) = &plugin.source {
        return Some(source.clone());
    }
    let lib = plugin.path.file_stem()?.to_str()?.to_owned();
    let path = std::path::absolute(&plugin.path).ok()?;
    let root = path
        .ancestors()
        .find(|a| a.file_name().is_some_and(|n| n == "target"))?
        .parent()?;
    let mut candidates = vec![root.to_path_buf()];
    for dir in [root.to_path_buf(), root.join("plugins")] {
        candidates.extend(subdirs(&dir));
    }
    for dir in subdirs(&root.join("plugins")) {
        candidates.extend(subdirs(&dir));
    }
    candidates
        .into_iter()
        .find(|dir| library_name(dir).as_deref() == Some(lib.as_str()))
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// The library name a crate's build output carries, from its Cargo.toml.
fn library_name(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("Cargo.toml")).ok()?;
    let manifest: toml::Table = text.parse().ok()?;
    let lib = manifest.get("lib").and_then(|l| l.get("name")).and_then(|n| n.as_str());
    let package = manifest.get("package")?.get("name")?.as_str()?;
    Some(lib.unwrap_or(package).replace('-', "_"))
}

/// The plugin crates of `config`, by crate folder, with the plugins each builds.
pub fn crates(config: &Config) -> BTreeMap<PathBuf, Vec<String>> {
    let mut out: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for (name, plugin) in &config.plugins {
        match source_crate(plugin) {
            Some(dir) => out.entry(normalize(&dir)).or_default().push(name.clone()),
            None => tracing::warn!(
                plugin = %name,
                "no source crate found for {}; set `source` in [plugins.{name}] to have it rebuilt",
                plugin.path.display()
            ),
        }
    }
    out
}

/// Builds a plugin crate for wasm32-wasip2 (release), cargo's output going
/// to the terminal; true if it built.
pub async fn build(dir: &Path) -> bool {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    tracing::info!(crate_dir = %dir.display(), "building plugin");
    let status = tokio::process::Command::new(cargo)
        .args(["build", "--target", "wasm32-wasip2", "--release", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .status()
        .await;
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::error!(crate_dir = %dir.display(), "plugin build failed ({s}); the running version keeps serving");
            false
        }
        Err(e) => {
            tracing::error!(crate_dir = %dir.display(), "cannot run cargo: {e}");
            false
        }
    }
}

/// Adds the wasm32-wasip2 target through rustup when it is missing (a
/// toolchain without rustup is assumed to have it).
async fn ensure_target() {
    let installed = tokio::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .await;
    let Ok(out) = installed else {
        return;
    };
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        return;
    }
    tracing::info!("adding the wasm32-wasip2 target (rustup target add wasm32-wasip2)");
    let added = tokio::process::Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .status()
        .await;
    if !added.is_ok_and(|s| s.success()) {
        tracing::error!("cannot add the wasm32-wasip2 target; plugin builds will fail");
    }
}

/// Builds every plugin crate of `config` once (before the daemon starts).
pub async fn build_all(config: &Config) {
    ensure_target().await;
    for dir in crates(config).keys() {
        build(dir).await;
    }
}

/// Watches the plugin crates' sources and rebuilds a crate when they change.
pub fn spawn_rebuilder(config: &Config) -> JoinHandle<()> {
    let crates = crates(config);
    tokio::spawn(async move {
        let (mut watcher, mut changes) = match FileWatcher::new() {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("plugin sources are not watched: {}", crate::error::Report(&e));
                return;
            }
        };
        for dir in crates.keys() {
            let watched = watcher.watch_file(&dir.join("Cargo.toml")).and_then(|()| {
                let src = dir.join("src");
                if src.is_dir() {
                    watcher.watch_tree(&src)
                } else {
                    Ok(())
                }
            });
            match watched {
                Ok(()) => tracing::info!(crate_dir = %dir.display(), "watching plugin sources"),
                Err(e) => tracing::warn!("{}", crate::error::Report(&e)),
            }
        }
        while let Some(paths) = changes.recv().await {
            for dir in crates.keys() {
                let touched = paths
                    .iter()
                    .any(|p| p.starts_with(dir.join("src")) || *p == dir.join("Cargo.toml"));
                if touched {
                    build(dir).await;
                }
            }
        }
    })
}
