//! Dispatch cost of one 1 KiB message to the `noop` plugin through the engine,
//! in both isolation modes, on 1 and 2 threads, in the same run; then the
//! same handler written in Python and JavaScript (`noop_py`, `noop_js`,
//! built by `cargo xtask plugins`): component size, compile time, and
//! per-message latency in both modes.
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

fn plugin_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"));
    dir.join(format!("{name}.wasm"))
}

fn noop_path() -> PathBuf {
    plugin_path("noop")
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
    languages(&engine, n);
}

/// The noop handler in each language: what choosing one costs.
fn languages(engine: &Engine, n: usize) {
    println!();
    println!(
        "the noop handler per language, 1 thread (fresh: {} messages, reuse: {n})",
        n / 100
    );
    println!(
        "{:<11} {:>9} {:>11} {:>12} {:>12} {:>12} {:>12}",
        "language", "size KiB", "compile ms", "fresh p50 µs", "fresh p99 µs", "reuse p50 µs", "reuse p99 µs"
    );
    for (language, name) in [("Rust", "noop"), ("Python", "noop_py"), ("JavaScript", "noop_js")] {
        let path = plugin_path(name);
        let Ok(size) = std::fs::metadata(&path).map(|m| m.len()) else {
            println!(
                "{language:<11} {} is missing (cargo xtask plugins builds it)",
                path.display()
            );
            continue;
        };
        let load = |isolation| {
            let mut spec = PluginSpec::new(name, &path);
            spec.isolation = isolation;
            let started = Instant::now();
            let plugin = Arc::new(engine.load(spec).expect("load"));
            (plugin, started.elapsed())
        };
        // No compile cache here: each load compiles.
        let (fresh, compile) = load(Isolation::Fresh);
        let (reuse, _) = load(Isolation::Reuse);
        let few = (n / 100).max(20);
        run(&fresh, 1, few / 10 + 1);
        let f = run(&fresh, 1, few);
        run(&reuse, 1, n / 10);
        let r = run(&reuse, 1, n);
        println!(
            "{:<11} {:>9} {:>11.0} {:>12.1} {:>12.1} {:>12.2} {:>12.2}",
            language,
            size / 1024,
            compile.as_secs_f64() * 1e3,
            us(f.p50),
            us(f.p99),
            us(r.p50),
            us(r.p99)
        );
    }
    println!("bars: Python and JavaScript reuse p50 <= 50 µs");
}
