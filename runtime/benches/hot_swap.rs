//! Hot swap latency: from a new `.wasm` landing on disk (renamed into place,
//! as a deploy does) to the first message handled by it, while messages
//! flow through the embedded broker of a `sluice run` (release build).
//!
//! Baseline, same run: compiling and instantiating the same component
//! in-process, the work a swap cannot avoid. Bar: swap latency <= 1 s.
//!
//! `cargo xtask bench` builds the plugins first; `SWAPS` (default 10) sets
//! the number of swaps.

mod common;

use common::env_or;
use sluice::engine::{Engine, EngineSettings, PluginSpec};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"sluice-fixture-version:";

fn stamp_version(original: &[u8], version: u32) -> Vec<u8> {
    let mut bytes = original.to_vec();
    let at = bytes
        .windows(MARKER.len())
        .position(|w| w == MARKER)
        .expect("the stamp fixture carries its version marker");
    let start = at + MARKER.len();
    bytes[start..start + 9].copy_from_slice(format!("{version:09}").as_bytes());
    bytes
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(dir: &Path, admin: &str) -> Daemon {
    let config = format!(
        r#"data_dir = "data"
[admin]
listen = "{admin}"

[plugins.stamp]
path = "stamp.wasm"
isolation = "reuse"
publish = ["stamped"]

[[routes]]
name = "work"
plugin = "stamp"
source = {{ broker = "embedded", subject = "work" }}

[[brokers.embedded.queues]]
name = "stamped"
subjects = ["stamped"]
max_len = 20
"#
    );
    std::fs::write(dir.join("sluice.toml"), config).expect("write config");
    let log = std::fs::File::create(dir.join("sluice.log")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "-c"])
        .arg(dir.join("sluice.toml"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start sluice");
    let daemon = Daemon(child);
    let started = Instant::now();
    loop {
        let ready = agent()
            .get(format!("http://{admin}/readyz"))
            .call()
            .is_ok_and(|r| r.status() == 200);
        if ready {
            return daemon;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "sluice did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Versions of the last messages the plugin handled.
fn recent_versions(agent: &ureq::Agent, admin: &str) -> Vec<u32> {
    let Ok(mut resp) = agent
        .get(format!("http://{admin}/v1/queues/stamped/messages?limit=20"))
        .call()
    else {
        return Vec::new();
    };
    let body = resp.body_mut().read_to_string().unwrap_or_default();
    let items: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    items
        .as_array()
        .map(|ms| {
            ms.iter()
                .filter_map(|m| {
                    m["headers"]
                        .as_array()?
                        .iter()
                        .find(|h| h["name"] == "plugin-version")?["value"]
                        .as_str()?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

fn deploy(path: &Path, bytes: &[u8]) {
    let aside = path.with_extension("wasm.tmp");
    std::fs::write(&aside, bytes).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn stamp_file() -> PathBuf {
    common::plugin_file("fixture_stamp.wasm")
}

fn main() {
    let swaps: u32 = env_or("SWAPS", 10);
    let original = std::fs::read(stamp_file()).expect("the stamp fixture is built (cargo xtask plugins)");
    println!(
        "hot swap: {} ({} KiB), {swaps} swaps",
        stamp_file().display(),
        original.len() / 1024
    );

    // Baseline: compile + instantiate in-process, no cache.
    let engine = Engine::new(EngineSettings::default()).expect("engine");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut compile = Vec::new();
    for version in 1000..1000 + swaps {
        let bytes = stamp_version(&original, version);
        let started = Instant::now();
        let plugin =
            sluice::engine::Plugin::from_bytes(&engine, PluginSpec::new("stamp", "stamp.wasm"), &bytes).expect("loads");
        runtime.block_on(plugin.probe()).expect("instantiates");
        compile.push(started.elapsed());
    }

    let dir = tempfile::tempdir().expect("temp dir");
    let wasm = dir.path().join("stamp.wasm");
    std::fs::write(&wasm, stamp_version(&original, 0)).expect("write plugin");
    let admin = format!("127.0.0.1:{}", free_port());
    let _daemon = start(dir.path(), &admin);

    // A steady flow of messages, one every millisecond or so.
    let flowing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (flowing, admin) = (flowing.clone(), admin.clone());
        std::thread::spawn(move || {
            let agent = agent();
            while flowing.load(Ordering::Relaxed) {
                let _ = agent.post(format!("http://{admin}/v1/publish/work")).send(&b"{}"[..]);
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };

    let agent = agent();
    let mut latencies = Vec::new();
    for version in 1..=swaps {
        std::thread::sleep(Duration::from_millis(500));
        let bytes = stamp_version(&original, version);
        let landed = Instant::now();
        deploy(&wasm, &bytes);
        loop {
            if recent_versions(&agent, &admin).contains(&version) {
                latencies.push(landed.elapsed());
                break;
            }
            assert!(
                landed.elapsed() < Duration::from_secs(30),
                "version {version} never served"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    flowing.store(false, Ordering::Relaxed);
    let _ = publisher.join();

    let compile_median = median(compile.clone());
    let swap_median = median(latencies.clone());
    let worst = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "  in-process compile + instantiate (baseline): median {:>7.1} ms",
        compile_median.as_secs_f64() * 1e3
    );
    println!(
        "  file landed -> first message on it:          median {:>7.1} ms, max {:>7.1} ms (ratio to baseline {:.2})",
        swap_median.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        swap_median.as_secs_f64() / compile_median.as_secs_f64()
    );
    println!(
        "  bar: <= 1000 ms: {}",
        if worst <= Duration::from_secs(1) {
            "met"
        } else {
            "NOT met"
        }
    );
}
