//! Dispatch cost of one 1 KiB message to the `noop` plugin through the engine,
//! in both isolation modes, on 1 and 2 threads, in the same run.
//!
//! Run: `cargo xtask bench` (builds the plugin) or
//! `cargo bench -p sluice --bench dispatch` after building `noop` for
//! wasm32-wasip2. Set `SLUICE_BENCH_MESSAGES` to change the sample size.

use sluice::config::Isolation;
use sluice::engine::{Engine, EngineSettings, Outcome, Plugin, PluginSpec};
use sluice::message::{Header, Message};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn noop_path() -> PathBuf {
    let dir = std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"));
    dir.join("noop.wasm")
}

fn message() -> Message {
    Message {
        id: "42".into(),
        subject: "bench.noop".into(),
        key: None,
        headers: vec![Header::new("content-type", "application/octet-stream")],
        payload: vec![7u8; 1024],
        attempt: 1,
        timestamp_ms: 0,
        reply_to: None,
    }
}

struct Stats {
    p50: Duration,
    p99: Duration,
    wall_per_msg: Duration,
}

/// Runs `per_thread` messages on each of `threads` OS threads (one
/// single-threaded runtime each) and returns latency percentiles and the wall
/// time per message.
fn run(plugin: &Arc<Plugin>, threads: usize, per_thread: usize) -> Stats {
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let plugin = plugin.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let msg = message();
                    let mut samples = Vec::with_capacity(per_thread);
                    for _ in 0..per_thread {
                        let t = Instant::now();
                        let inv = plugin.invoke("bench", &msg).await;
                        samples.push(t.elapsed());
                        assert!(matches!(inv.outcome, Outcome::Ok { .. }), "{:?}", inv.outcome);
                    }
                    samples
                })
            })
        })
        .collect();
    let mut all: Vec<Duration> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("bench thread"))
        .collect();
    let wall = started.elapsed();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Stats {
        p50: pct(0.50),
        p99: pct(0.99),
        wall_per_msg: wall / u32::try_from(all.len()).unwrap_or(u32::MAX),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let path = noop_path();
    if !path.is_file() {
        eprintln!(
            "{} is missing: build it with `cargo build --target wasm32-wasip2 --release -p noop`",
            path.display()
        );
        std::process::exit(2);
    }
    let n: usize = std::env::var("SLUICE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let engine = Engine::new(EngineSettings {
        max_instances: 64,
        ..Default::default()
    })
    .expect("engine");
    let load = |isolation| {
        let mut spec = PluginSpec::new("noop", &path);
        spec.isolation = isolation;
        Arc::new(engine.load(spec).expect("load noop"))
    };
    let fresh = load(Isolation::Fresh);
    let reuse = load(Isolation::Reuse);

    println!("dispatch of a 1 KiB message to noop, {n} messages per thread");
    println!(
        "noop imports {} interfaces: {}",
        fresh.imports().len(),
        fresh.imports().join(" ")
    );
    println!(
        "{:<7} {:>7} {:>10} {:>10} {:>14}",
        "mode", "threads", "p50 µs", "p99 µs", "wall µs/msg"
    );
    let mut p50 = std::collections::HashMap::new();
    for threads in [1usize, 2] {
        for (name, plugin) in [("fresh", &fresh), ("reuse", &reuse)] {
            run(plugin, threads, n / 10); // warm-up: pool slots, caches, branch predictors
            let s = run(plugin, threads, n);
            println!(
                "{:<7} {:>7} {:>10.2} {:>10.2} {:>14.2}",
                name,
                threads,
                us(s.p50),
                us(s.p99),
                us(s.wall_per_msg)
            );
            p50.insert((name, threads), us(s.p50));
        }
    }
    for threads in [1usize, 2] {
        println!(
            "ratio fresh/reuse p50 on {threads} thread(s): {:.1}x",
            p50[&("fresh", threads)] / p50[&("reuse", threads)]
        );
    }
    println!("bars: fresh p50 <= 10 µs on 1 thread; reuse p50 <= 2 µs");
}
