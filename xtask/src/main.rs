//! Project automation: `cargo xtask run | test | bench | plugins`.
//!
//! - `run`: adds the wasm32-wasip2 target if missing, builds the example
//!   plugins and the daemon, and runs it on `config/sluice.toml`.
//! - `test`: everything the tests need, then the whole suite.
//! - `bench`: every benchmark in `runtime/benches` (release).
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
    rust_plugins(root)?;
    python_plugins(root)?;
    js_plugins(root)
}

fn rust_plugins(root: &Path) -> Result<()> {
    ensure_wasm_target()?;
    let mut cmd = cargo();
    cmd.args(["build", "--release", "--target", WASM_TARGET]);
    for p in plugin_packages(root)? {
        cmd.args(["-p", &p]);
    }
    status(&mut cmd)
}

/// The componentize-py the Python plugins are built with (pinned: the
/// bindings it generates are part of what a plugin is).
const COMPONENTIZE_PY: &str = "componentize-py==0.25.0";

/// Folders under plugins/ (and plugins/fixtures/) holding `app_file`.
fn plugin_dirs_with(root: &Path, app_file: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for parent in ["plugins", "plugins/fixtures"] {
        let Ok(entries) = std::fs::read_dir(root.join(parent)) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.path().join(app_file).is_file() {
                dirs.push(entry.path());
            }
        }
    }
    dirs.sort();
    dirs
}

/// Where a plugin built from folder `dir` goes, named like a Rust one:
/// `order-processor-py` -> `order_processor_py.wasm`; and whether it is
/// older than any of `sources`.
fn plugin_output(root: &Path, dir: &Path, sources: &[PathBuf]) -> Result<(PathBuf, bool)> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().replace('-', "_"))
        .context("plugin folder name")?;
    let out = plugin_dir(root).join(format!("{name}.wasm"));
    let built = std::fs::metadata(&out).and_then(|m| m.modified()).ok();
    let stale = built.is_none() || built < newest(sources);
    Ok((out, stale))
}

/// The JS build tools (componentize-js, esbuild) in sdk-js/node_modules,
/// installed from sdk-js/package-lock.json when missing or older.
fn js_tools(root: &Path) -> Result<PathBuf> {
    let sdk = root.join("sdk-js");
    let stamp = sdk.join("node_modules/.package-lock.json");
    let lock_time = std::fs::metadata(sdk.join("package-lock.json")).and_then(|m| m.modified())?;
    let installed = std::fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    if installed.is_none_or(|t| t < lock_time) {
        eprintln!(
            "xtask: installing the JavaScript build tools (npm ci in {})",
            sdk.display()
        );
        status(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&sdk),
        )?;
    }
    Ok(sdk.join("build.mjs"))
}

/// Each JavaScript plugin (`app.js` + the JS SDK), bundled and built with
/// componentize-js into the plugin folder. Rebuilt only when a source changed.
fn js_plugins(root: &Path) -> Result<()> {
    let dirs = plugin_dirs_with(root, "app.js");
    if dirs.is_empty() {
        return Ok(());
    }
    let build = js_tools(root)?;
    let sources = |dir: &Path| {
        vec![
            dir.to_owned(),
            root.join("sdk-js/index.js"),
            root.join("sdk-js/build.mjs"),
            // A new version of the build tools rebuilds every plugin.
            root.join("sdk-js/package-lock.json"),
            root.join("wit"),
        ]
    };
    std::fs::create_dir_all(plugin_dir(root))?;
    for dir in dirs {
        let (out, stale) = plugin_output(root, &dir, &sources(&dir))?;
        if !stale {
            continue;
        }
        eprintln!("xtask: building the JavaScript plugin {}", dir.display());
        status(Command::new("node").arg(&build).arg(&dir).arg(&out))?;
    }
    Ok(())
}

/// The Python and JavaScript plugins' own tests, against their SDK's test
/// host (plain `python3` and `node`, no component involved).
fn guest_tests(root: &Path) -> Result<()> {
    for dir in plugin_dirs_with(root, "app.py") {
        let has_tests = std::fs::read_dir(&dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("test_"));
        if has_tests {
            let path = std::env::join_paths([root.join("sdk-python"), dir.clone()])?;
            status(
                Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
                    .args(["-m", "unittest", "discover", "-s"])
                    .arg(&dir)
                    .env("PYTHONPATH", path)
                    .env("PYTHONDONTWRITEBYTECODE", "1"),
            )?;
        }
    }
    for dir in plugin_dirs_with(root, "app.js") {
        let has_tests = std::fs::read_dir(&dir)?
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".test.js"));
        if has_tests {
            status(Command::new("node").arg(root.join("sdk-js/test.mjs")).arg(&dir))?;
        }
    }
    Ok(())
}

/// A venv under target/ with componentize-py, made on first use.
fn componentize_py(root: &Path) -> Result<PathBuf> {
    let venv = target_dir(root).join("py");
    let bin = venv.join("bin/componentize-py");
    let stamp = venv.join(".installed");
    if bin.is_file() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == COMPONENTIZE_PY) {
        return Ok(bin);
    }
    eprintln!("xtask: installing {COMPONENTIZE_PY} into {}", venv.display());
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    status(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
    status(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        "--disable-pip-version-check",
        COMPONENTIZE_PY,
    ]))?;
    std::fs::write(&stamp, COMPONENTIZE_PY)?;
    Ok(bin)
}

/// The newest modification time of the files under `dirs`.
fn newest(dirs: &[PathBuf]) -> Option<std::time::SystemTime> {
    let mut newest = None;
    let mut stack: Vec<PathBuf> = dirs.to_vec();
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "__pycache__" || n == "node_modules")
            {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&path) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = meta.modified() {
            newest = newest.max(Some(m));
        }
    }
    newest
}

/// Each Python plugin (`app.py` + the Python SDK) as a component in the
/// plugin folder. Rebuilt only when a source changed.
fn python_plugins(root: &Path) -> Result<()> {
    let dirs = plugin_dirs_with(root, "app.py");
    if dirs.is_empty() {
        return Ok(());
    }
    let componentize = componentize_py(root)?;
    let (sdk, wit) = (root.join("sdk-python"), root.join("wit"));
    std::fs::create_dir_all(plugin_dir(root))?;
    for dir in dirs {
        let stamp = target_dir(root).join("py/.installed");
        let (out, stale) = plugin_output(root, &dir, &[dir.clone(), sdk.clone(), wit.clone(), stamp])?;
        if !stale {
            continue;
        }
        eprintln!("xtask: building the Python plugin {}", dir.display());
        status(
            Command::new(&componentize)
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .arg("-d")
                .arg(&wit)
                .args(["-w", "batch-handler", "componentize", "app", "-p"])
                .arg(&dir)
                .arg("-p")
                .arg(&sdk)
                .arg("-o")
                .arg(&out),
        )?;
    }
    Ok(())
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
    // The quick start needs no Python: only the Rust examples.
    rust_plugins(root)?;
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
    services::ensure_guest_tools()?;
    plugins(root)?;
    guest_tests(root)?;
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
                "bench",
                "-p",
                "sluice",
                "--bench",
                "dispatch",
                "--bench",
                "ordering",
                "--bench",
                "nats",
                "--bench",
                "embedded",
                "--bench",
                "rabbitmq",
                "--bench",
                "kafka",
                "--bench",
                "hot_swap",
                "--bench",
                "latency",
                "--bench",
                "latency_kafka",
                "--bench",
                "scenario",
            ])
            .args(args)
            .env("SLUICE_PLUGIN_DIR", plugin_dir(root)),
    )
}
