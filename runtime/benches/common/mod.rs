//! Helpers shared by the broker benches.

#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

/// An environment setting, else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The built `noop` plugin (`SLUICE_PLUGIN_DIR`, else the workspace's).
pub fn noop() -> PathBuf {
    std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"))
        .join("noop.wasm")
}

/// Messages per second.
pub fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}
