//! Helpers shared by the broker benches.

#![allow(dead_code)]

use sluice::config::Isolation;
use sluice::engine::{Engine, Plugin, PluginSpec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// An environment setting, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A built plugin file (`SLUICE_PLUGIN_DIR`, else the workspace's).
pub fn plugin_file(file: &str) -> PathBuf {
    std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"))
        .join(file)
}

/// The built `noop` plugin.
pub fn noop() -> PathBuf {
    plugin_file("noop.wasm")
}

/// `noop` loaded in `isolation`.
pub fn noop_plugin(engine: &Engine, isolation: Isolation) -> Arc<Plugin> {
    let mut spec = PluginSpec::new("noop", noop());
    spec.isolation = isolation;
    Arc::new(engine.load(spec).expect("load noop"))
}

/// The plugin a mode runs: `noop`, or `noop-batch` (which exports
/// `handle-batch`) for the modes that say so.
pub fn mode_plugin(engine: &Engine, mode: &Mode) -> Arc<Plugin> {
    if !mode.batch_export {
        return noop_plugin(engine, mode.isolation);
    }
    let mut spec = PluginSpec::new("noop-batch", plugin_file("noop_batch.wasm"));
    spec.isolation = mode.isolation;
    Arc::new(engine.load(spec).expect("load noop-batch (cargo xtask plugins)"))
}

/// Messages per second.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// CPU time (user + system) used so far by this process and by a local
/// broker process, read from `/proc` (Linux; zero elsewhere). On a 2-core
/// machine the broker's CPU per message is what a consumer competes with.
#[allow(dead_code)]
#[derive(Clone, Copy)]
pub struct Cpu {
    own: Duration,
    broker: Option<Duration>,
}

#[allow(dead_code)]
impl Cpu {
    /// Now, with the broker found by its process name (`nats-server`).
    pub fn now(broker: &str) -> Self {
        Self {
            own: proc_cpu("self"),
            broker: broker_pid(broker).map(|pid| proc_cpu(&pid)),
        }
    }

    /// "µs/msg: this process X, broker Y" since `before`, over `n` messages.
    pub fn per_message(&self, before: &Cpu, n: usize, broker: &str) -> String {
        let us = |a: Duration, b: Duration| a.saturating_sub(b).as_secs_f64() * 1e6 / n.max(1) as f64;
        let mut text = format!("CPU µs/msg: this process {:.1}", us(self.own, before.own));
        if let (Some(a), Some(b)) = (self.broker, before.broker) {
            text.push_str(&format!(", {broker} {:.1}", us(a, b)));
        }
        text
    }
}

/// utime + stime of `/proc/<pid>/stat`, in clock ticks of 10 ms.
fn proc_cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: state is the 3rd.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the name.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn broker_pid(name: &str) -> Option<String> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid = e.file_name().into_string().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim() == name).then_some(pid)
    })
}

/// How a bench runs sluice: isolation, and batches or not.
pub struct Mode {
    pub name: &'static str,
    pub isolation: Isolation,
    pub batch: Option<sluice::config::BatchConfig>,
    /// Runs `noop-batch`, whose `handle-batch` takes the batch in one call
    /// (else `noop`, called once per message on the batch's instance).
    pub batch_export: bool,
}

/// Batches of up to 64, gathered for up to 5 ms (the default wait).
const BATCH_64: sluice::config::BatchConfig = batch_of(64, Duration::from_millis(5));

/// The modes every broker bench compares with its native consumer.
pub const MODES: &[Mode] = &[
    Mode {
        name: "reuse",
        isolation: Isolation::Reuse,
        batch: None,
        batch_export: false,
    },
    Mode {
        name: "fresh",
        isolation: Isolation::Fresh,
        batch: None,
        batch_export: false,
    },
    Mode {
        name: "fresh batch 64",
        isolation: Isolation::Fresh,
        batch: Some(BATCH_64),
        batch_export: false,
    },
    Mode {
        name: "fresh handle-batch 64",
        isolation: Isolation::Fresh,
        batch: Some(BATCH_64),
        batch_export: true,
    },
];

/// Whether `mode` runs: `SLUICE_BENCH_MODES` (names, comma-separated, e.g.
/// `reuse,fresh batch 64`) picks some; unset, all run.
#[allow(dead_code)]
pub fn selected(mode: &Mode) -> bool {
    match std::env::var("SLUICE_BENCH_MODES") {
        Ok(names) => names.split(',').any(|n| n.trim() == mode.name),
        Err(_) => true,
    }
}

/// Batches of up to `max_messages`, gathered for up to `max_wait`.
pub const fn batch_of(max_messages: u32, max_wait: Duration) -> sluice::config::BatchConfig {
    sluice::config::BatchConfig {
        max_messages,
        max_wait,
        max_bytes: 4 << 20,
    }
}

/// Wall-clock nanoseconds: what the latency benches stamp into payloads.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The latencies (ns, sorted) of `n` stamped payloads arriving on `out`;
/// fewer if none comes for 10 s.
pub async fn arrivals(out: &mut async_nats::Subscriber, n: usize, consumer: &str) -> Vec<u64> {
    use futures_util::StreamExt;
    let mut latencies = Vec::with_capacity(n);
    while latencies.len() < n {
        let Ok(Some(m)) = tokio::time::timeout(Duration::from_secs(10), out.next()).await else {
            eprintln!("{consumer}: {} of {n} arrived", latencies.len());
            break;
        };
        let sent: u64 = std::str::from_utf8(&m.payload)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        latencies.push(now_ns().saturating_sub(sent));
    }
    latencies.sort_unstable();
    latencies
}

/// The `p` quantile of sorted nanoseconds, in ms.
pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as f64 / 1e6
}

/// The latency table: a header, then one row per consumer with what it
/// adds to the first (native) row.
pub struct LatencyTable {
    native: Option<[f64; 3]>,
}

impl LatencyTable {
    pub fn start() -> Self {
        println!(
            "{:<16} {:>9} {:>9} {:>9}   {:>22}",
            "consumer", "p50 ms", "p99 ms", "p99.9 ms", "added p50 / p99 / p99.9"
        );
        Self { native: None }
    }

    pub fn row(&mut self, consumer: &str, sorted: &[u64]) {
        let p = [
            percentile(sorted, 0.5),
            percentile(sorted, 0.99),
            percentile(sorted, 0.999),
        ];
        let native = *self.native.get_or_insert(p);
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3}   {:>6.3} / {:.3} / {:.3}",
            consumer,
            p[0],
            p[1],
            p[2],
            p[0] - native[0],
            p[1] - native[1],
            p[2] - native[2]
        );
    }

    pub fn end(self) {
        println!("bar: added p99 <= 1 ms at half load");
    }
}

pub mod daemon;
pub mod orders;
