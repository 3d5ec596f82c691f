//! Key-ordered routes in parallel: the same 1,000 messages over 100 keys
//! through the whole pipeline on the embedded broker (durable queue, plugin,
//! publishes, acks), with `concurrency = 1` and `concurrency = 8`, in one
//! run. The handler waits 2 ms per message like a call to another service.
//!
//! Run: `cargo xtask bench` (builds the fixture) or
//! `cargo bench -p sluice --bench ordering`.

use sluice::brokers::embedded::EmbeddedBroker;
use sluice::brokers::{Sink, Source};
use sluice::config::Ordering;
use sluice::engine::{Engine, EngineSettings, PluginSpec};
use sluice::keys::KeySource;
use sluice::message::{Header, Outbound};
use sluice::pipeline::Route;
use sluice::subject::SubjectPattern;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const MESSAGES: usize = 1_000;
const KEYS: usize = 100;
const WAIT_MS: &str = "2";

fn fixture() -> PathBuf {
    std::env::var_os("SLUICE_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/wasm32-wasip2/release"))
        .join("fixture_record.wasm")
}

async fn run(engine: &Engine, concurrency: u32) -> Duration {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = EmbeddedBroker::open(&dir.path().join("embedded.redb"), Duration::from_secs(60)).expect("broker");
    let pattern = |p: &str| vec![SubjectPattern::parse(p).expect("pattern")];
    broker.declare_queue("bench", pattern("bench.in"), None);
    broker.declare_queue("recorded", pattern("recorded"), None);
    let messages: Vec<Outbound> = (0..MESSAGES)
        .map(|i| Outbound {
            subject: "bench.in".into(),
            headers: vec![Header::new("k", format!("key-{}", i % KEYS))],
            payload: i.to_string().into_bytes(),
        })
        .collect();
    for chunk in messages.chunks(500) {
        broker.publish(chunk.to_vec()).await.expect("prefill");
    }

    let mut spec = PluginSpec::new("record", fixture());
    spec.publish_allow = vec!["recorded".into()];
    spec.settings.insert("wait_ms".into(), WAIT_MS.into());
    let plugin = Arc::new(engine.load(spec).expect("load fixture_record"));
    let sink: Arc<dyn Sink> = Arc::new(broker.clone());
    let source: Arc<dyn Source> = Arc::new(broker.source("bench"));
    let mut route = Route::new("bench", source, "embedded", sink, plugin);
    route.concurrency = concurrency;
    route.ordering = Ordering::Key;
    route.ordering_key = KeySource::Header("k".into());
    let route = Arc::new(route);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let workers = route.spawn(&stop);
    loop {
        let recorded = broker
            .queues()
            .iter()
            .find(|q| q.name == "recorded")
            .map_or(0, |q| q.messages);
        if recorded >= MESSAGES {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    broker.close();
    took
}

fn main() {
    if !fixture().is_file() {
        eprintln!("{} is missing: run `cargo xtask plugins`", fixture().display());
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let engine = Engine::new(EngineSettings {
        max_instances: 64,
        ..Default::default()
    })
    .expect("engine");
    println!("ordering = \"key\": {MESSAGES} messages over {KEYS} keys, handler waits {WAIT_MS} ms each");
    let one = rt.block_on(run(&engine, 1));
    let eight = rt.block_on(run(&engine, 8));
    let rate = |d: Duration| MESSAGES as f64 / d.as_secs_f64();
    println!(
        "concurrency 1: {:>8.0} ms  {:>8.0} msg/s",
        one.as_secs_f64() * 1e3,
        rate(one)
    );
    println!(
        "concurrency 8: {:>8.0} ms  {:>8.0} msg/s",
        eight.as_secs_f64() * 1e3,
        rate(eight)
    );
    println!("speed-up 8 vs 1: {:.1}x", one.as_secs_f64() / eight.as_secs_f64());
}
