//! Project automation: `cargo xtask run | test | bench | plugins`.
//!
//! - `run`: adds the wasm32-wasip2 target if missing, builds the example
//!   plugins and the daemon, and runs it on `config/sluice.toml`.
//! - `test`: everything the tests need, then the whole suite.
//! - `bench`: the dispatch benchmark (release).
//! - `plugins`: only builds the plugins.

mod services;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let task = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match task.as_str() {
        "run" => run(&root, &rest),
        "test" => test(&root, &rest),
        "bench" => bench(&root, &rest),
        "plugins" => plugins(&root),
        _ => {
            eprintln!("usage: cargo xtask <run|test|bench|plugins> [args...]");
            eprintln!("  run      build the plugins and the daemon, run it on config/sluice.toml");
            eprintln!("  test     install what the tests need, then run the whole suite");
            eprintln!("  bench    run the benchmarks (release build)");
            eprintln!("  plugins  build the example and fixture plugins for {WASM_TARGET}");
            std::process::exit(2);
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn status(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

/// Adds the wasm32-wasip2 target through rustup when it is not installed.
fn ensure_wasm_target() -> Result<()> {
    let installed = Command::new("rustup").args(["target", "list", "--installed"]).output();
    match installed {
        Ok(out) if out.status.success() => {
            if !String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == WASM_TARGET)
            {
                eprintln!("xtask: adding the {WASM_TARGET} target");
                status(Command::new("rustup").args(["target", "add", WASM_TARGET]))?;
            }
            Ok(())
        }
        // No rustup: assume the toolchain was installed with the target.
        _ => {
            eprintln!("xtask: rustup not found; assuming the {WASM_TARGET} target is installed");
            Ok(())
        }
    }
}

/// Package names of every plugin crate under plugins/ (examples and fixtures).
fn plugin_packages(root: &Path) -> Result<Vec<String>> {
    let mut manifests = Vec::new();
    for dir in ["plugins", "plugins/fixtures"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let manifest = entry.path().join("Cargo.toml");
            if manifest.is_file() {
                manifests.push(manifest);
            }
        }
    }
    manifests.sort();
    let mut names = Vec::new();
    for manifest in manifests {
        let text = std::fs::read_to_string(&manifest).with_context(|| format!("reading {}", manifest.display()))?;
        let name = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("name = ").map(|n| n.trim_matches('"').to_owned()))
            .with_context(|| format!("no package name in {}", manifest.display()))?;
        names.push(name);
    }
    Ok(names)
}

fn plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", WASM_TARGET]);
    for p in plugin_packages(root)? {
        cmd.args(["-p", &p]);
    }
    status(&mut cmd)
}

fn plugin_dir(root: &Path) -> PathBuf {
    target_dir(root).join(WASM_TARGET).join("release")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn run(root: &Path, args: &[String]) -> Result<()> {
    plugins(root)?;
    status(cargo().args(["build", "-p", "sluice"]))?;
    let bin = target_dir(root).join("debug/sluice");
    let mut cmd = Command::new(&bin);
    if args.is_empty() {
        cmd.args(["run", "--config", "config/sluice.toml"]);
    } else {
        cmd.args(args);
    }
    cmd.env("SLUICE_PLUGIN_DIR", plugin_dir(root));
    eprintln!("xtask: starting sluice (admin API on 127.0.0.1:9595; Ctrl-C stops it)");
    status(&mut cmd)
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    services::ensure_redis()?;
    services::ensure_nats(root)?;
    services::ensure_rabbitmq()?;
    let tansu = services::ensure_kafka(root)?;
    plugins(root)?;
    status(cargo().args(["build", "-p", "sluice"]))?;
    let mut cmd = cargo();
    // Every test binary runs even after a failure: one run shows them all.
    cmd.args(["test", "--workspace", "--no-fail-fast"]);
    for p in plugin_packages(root)? {
        cmd.args(["--exclude", &p]);
    }
    let skipped = target_dir(root).join("skipped-tests.txt");
    let _ = std::fs::remove_file(&skipped);
    cmd.args(args)
        .env("SLUICE_PLUGIN_DIR", plugin_dir(root))
        .env("SLUICE_BIN", target_dir(root).join("debug/sluice"))
        .env("SLUICE_TANSU_BIN", tansu)
        .env("SLUICE_SKIPPED_FILE", &skipped);
    let result = status(&mut cmd);
    // A skipped test passes; say which were, after everything else.
    if let Ok(text) = std::fs::read_to_string(&skipped) {
        eprintln!(
            "\nxtask: {} test(s) skipped their checks:\n{text}",
            text.lines().count()
        );
    }
    result
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    plugins(root)?;
    status(
        cargo()
            .args([
                "bench", "-p", "sluice", "--bench", "dispatch", "--bench", "ordering", "--bench", "nats", "--bench",
                "rabbitmq", "--bench", "kafka", "--bench", "hot_swap",
            ])
            .args(args)
            .env("SLUICE_PLUGIN_DIR", plugin_dir(root)),
    )
}
