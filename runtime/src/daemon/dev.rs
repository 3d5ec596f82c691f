//! `sluice dev`: rebuilds plugins when their sources change — Rust crates
//! with cargo, Python folders (`app.py`) with componentize-py, JavaScript
//! folders (`app.js`) with the JS SDK's build script. The new `.wasm` is
//! then picked up by the ordinary hot reload, so a build that fails (or
//! produces a broken component) leaves the running version alone.

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

/// What a plugin's source folder is built with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Toolchain {
    Rust,
    Python,
    JavaScript,
}

fn toolchain(dir: &Path) -> Toolchain {
    if dir.join("Cargo.toml").is_file() {
        Toolchain::Rust
    } else if dir.join("app.py").is_file() {
        Toolchain::Python
    } else if dir.join("app.js").is_file() {
        Toolchain::JavaScript
    } else {
        Toolchain::Rust
    }
}

/// The plugin sources of `config`, by folder, with the `.wasm` files each
/// builds.
pub fn crates(config: &Config) -> BTreeMap<PathBuf, Vec<PathBuf>> {
    let mut out: BTreeMap<PathBuf, Vec<PathBuf>> = BTreeMap::new();
    for (name, plugin) in &config.plugins {
        match source_crate(plugin) {
            Some(dir) => out.entry(normalize(&dir)).or_default().push(plugin.path.clone()),
            None => tracing::warn!(
                plugin = %name,
                "no source crate found for {}; set `source` in [plugins.{name}] to have it rebuilt",
                plugin.path.display()
            ),
        }
    }
    out
}

/// The sluice checkout (holding `wit/` and the SDKs) around the current
/// folder or this program (`target/debug/sluice`), or `SLUICE_HOME`: where
/// `sluice new` and `sluice dev` find the SDKs and the WIT.
pub fn checkout() -> Option<PathBuf> {
    if let Some(home) = std::env::var_os("SLUICE_HOME") {
        return Some(PathBuf::from(home));
    }
    let mut starts = Vec::new();
    starts.extend(std::env::current_dir().ok());
    starts.extend(std::env::current_exe().ok());
    starts
        .iter()
        .flat_map(|s| s.ancestors())
        .find(|a| a.join("wit").is_dir() && a.join("sdk").is_dir())
        .map(Path::to_path_buf)
}

/// componentize-py: `SLUICE_COMPONENTIZE_PY`, the checkout's venv (made by
/// `cargo xtask plugins`), else the one on PATH.
fn componentize_py(home: &Path) -> std::ffi::OsString {
    if let Some(p) = std::env::var_os("SLUICE_COMPONENTIZE_PY") {
        return p;
    }
    let venv = home.join("target/py/bin/componentize-py");
    if venv.is_file() {
        return venv.into_os_string();
    }
    "componentize-py".into()
}

/// The command that builds the plugin in `dir` into `outputs` (its `.wasm`
/// files; one for a Python or JavaScript folder).
fn build_command(dir: &Path, outputs: &[PathBuf]) -> Result<tokio::process::Command, String> {
    let kind = toolchain(dir);
    if kind == Toolchain::Rust {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = tokio::process::Command::new(cargo);
        cmd.args(["build", "--target", "wasm32-wasip2", "--release", "--manifest-path"])
            .arg(dir.join("Cargo.toml"));
        return Ok(cmd);
    }
    let home =
        checkout().ok_or("cannot find the sluice checkout (wit/, sdk-python/, sdk-js/); set SLUICE_HOME to it")?;
    let [out] = outputs else {
        return Err(format!(
            "{} builds one plugin file, not {}",
            dir.display(),
            outputs.len()
        ));
    };
    let mut cmd;
    if kind == Toolchain::Python {
        cmd = tokio::process::Command::new(componentize_py(&home));
        cmd.arg("-d")
            .arg(home.join("wit"))
            .args(["-w", "batch-handler", "componentize", "app", "-p"])
            .arg(dir)
            .arg("-p")
            .arg(home.join("sdk-python"))
            .arg("-o")
            .arg(out)
            .env("PYTHONDONTWRITEBYTECODE", "1");
    } else {
        cmd = tokio::process::Command::new("node");
        cmd.arg(home.join("sdk-js/build.mjs")).arg(dir).arg(out);
    }
    Ok(cmd)
}

/// Builds the plugin in `dir`, the tool's output going to the terminal;
/// true if it built.
pub async fn build(dir: &Path, outputs: &[PathBuf]) -> bool {
    tracing::info!(source = %dir.display(), toolchain = ?toolchain(dir), "building plugin");
    let mut cmd = match build_command(dir, outputs) {
        Ok(cmd) => cmd,
        Err(why) => {
            tracing::error!(source = %dir.display(), "cannot build the plugin: {why}");
            return false;
        }
    };
    let status = cmd.stdin(Stdio::null()).kill_on_drop(true).status().await;
    match status {
        Ok(s) if s.success() => true,
        Ok(s) => {
            tracing::error!(source = %dir.display(), "plugin build failed ({s}); the running version keeps serving");
            false
        }
        Err(e) => {
            tracing::error!(source = %dir.display(), "cannot run the plugin's build tool: {e}");
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
    let crates = crates(config);
    if crates.keys().any(|dir| toolchain(dir) == Toolchain::Rust) {
        ensure_target().await;
    }
    for (dir, outputs) in &crates {
        build(dir, outputs).await;
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
            let watched = match toolchain(dir) {
                Toolchain::Rust => watcher.watch_file(&dir.join("Cargo.toml")).and_then(|()| {
                    let src = dir.join("src");
                    if src.is_dir() {
                        watcher.watch_tree(&src)
                    } else {
                        Ok(())
                    }
                }),
                // The whole folder: app.py / app.js and the modules beside it.
                Toolchain::Python | Toolchain::JavaScript => watcher.watch_tree(dir),
            };
            match watched {
                Ok(()) => tracing::info!(crate_dir = %dir.display(), "watching plugin sources"),
                Err(e) => tracing::warn!("{}", crate::error::Report(&e)),
            }
        }
        while let Some(paths) = changes.recv().await {
            for (dir, outputs) in &crates {
                let touched = match toolchain(dir) {
                    Toolchain::Rust => paths
                        .iter()
                        .any(|p| p.starts_with(dir.join("src")) || *p == dir.join("Cargo.toml")),
                    // Sources only: not the component written into the
                    // folder, nor bytecode caches.
                    Toolchain::Python | Toolchain::JavaScript => paths.iter().any(|p| {
                        p.starts_with(dir)
                            && p.extension().is_some_and(|e| e == "py" || e == "js" || e == "mjs")
                            && !p
                                .components()
                                .any(|c| c.as_os_str() == "__pycache__" || c.as_os_str() == "node_modules")
                    }),
                };
                if touched {
                    build(dir, outputs).await;
                }
            }
        }
    })
}
