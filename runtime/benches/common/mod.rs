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
const BATCH_64: sluice::config::BatchConfig = sluice::config::BatchConfig {
    max_messages: 64,
    max_wait: Duration::from_millis(5),
    max_bytes: 4 << 20,
};

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
