//! sluice against a native async-nats consumer, same server, same run:
//! core NATS (subscribe, nothing to ack) and JetStream (pull consumer, ack
//! each), with the `noop` plugin in both isolation modes and in `fresh`
//! with batches of 64 (one instance per batch). Prints msg/s and the ratio
//! sluice/native.
//!
//! `SLUICE_BENCH_NATS=core|jetstream` runs one part only,
//! `SLUICE_BENCH_MODES` some modes only (see `common::selected`).
//!
//! Needs nats-server with JetStream (`SLUICE_NATS_URL`, default
//! 127.0.0.1:4222). Run: `cargo xtask bench` or
//! `cargo bench -p sluice --bench nats`.

#[path = "common/mod.rs"]
mod common;
use common::{mode_plugin, noop, rate, selected, Cpu, Mode, MODES};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use sluice::brokers::nats::{ConsumerSettings, NatsBroker, NatsConfig};
use sluice::brokers::{Sink, Source};
use sluice::engine::{Engine, EngineSettings};
use sluice::pipeline::Route;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PAYLOAD: [u8; 100] = [b'x'; 100];
/// Workers of the sluice route (`SLUICE_BENCH_CONCURRENCY`, default 16).
fn concurrency() -> u32 {
    std::env::var("SLUICE_BENCH_CONCURRENCY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}

fn url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn publish_core(client: &async_nats::Client, subject: &str, n: usize) {
    for _ in 0..n {
        client
            .publish(subject.to_owned(), PAYLOAD.to_vec().into())
            .await
            .expect("publish");
    }
    client.flush().await.expect("flush");
}

async fn native_core(client: &async_nats::Client, subject: &str, n: usize) -> f64 {
    let mut sub = client.subscribe(subject.to_owned()).await.expect("subscribe");
    client.flush().await.expect("flush");
    let started = Instant::now();
    let publisher = {
        let (client, subject) = (client.clone(), subject.to_owned());
        tokio::spawn(async move { publish_core(&client, &subject, n).await })
    };
    for _ in 0..n {
        sub.next().await.expect("message");
    }
    let took = started.elapsed();
    let _ = publisher.await;
    rate(n, took)
}

/// Runs `route` until it has handled `n` messages, or made no progress for
/// a second (core NATS drops what a slow subscriber cannot take); returns
/// handled messages per second and how many were handled.
async fn run_route(route: Route, n: usize, feed: impl std::future::Future<Output = ()>) -> (f64, usize) {
    let route = Arc::new(route);
    let stop = CancellationToken::new();
    let workers = route.spawn(&stop);
    let started = Instant::now();
    feed.await;
    let (mut last, mut last_change) = (0usize, Instant::now());
    loop {
        let handled = route.status_view().handled as usize;
        if handled != last {
            (last, last_change) = (handled, Instant::now());
        }
        if handled >= n || last_change.elapsed() > Duration::from_secs(1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = last_change - started;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    (rate(last, took), last)
}

async fn sluice_core(broker: &NatsBroker, engine: &Engine, mode: &Mode, subject: &str, n: usize) -> (f64, usize) {
    let source: Arc<dyn Source> = Arc::new(broker.core_source(subject, None).await.expect("subscribe"));
    let mut route = Route::new(
        "core",
        source,
        "nats",
        Arc::new(broker.clone()) as Arc<dyn Sink>,
        mode_plugin(engine, mode),
    );
    route.concurrency = concurrency();
    route.batch = mode.batch;
    tokio::time::sleep(Duration::from_millis(50)).await;
    run_route(route, n, publish_core(&broker_client(broker), subject, n)).await
}

fn broker_client(_broker: &NatsBroker) -> async_nats::Client {
    CLIENT.get().expect("client").clone()
}

static CLIENT: std::sync::OnceLock<async_nats::Client> = std::sync::OnceLock::new();

async fn native_jetstream(js: &jetstream::Context, stream: &str, n: usize) -> f64 {
    let consumer = js
        .get_stream(stream)
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("native".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let mut messages = consumer.messages().await.expect("messages");
    for _ in 0..n {
        let m = messages.next().await.expect("message").expect("message");
        m.ack().await.expect("ack");
    }
    rate(n, started.elapsed())
}

async fn sluice_jetstream(
    broker: &NatsBroker,
    engine: &Engine,
    mode: &Mode,
    stream: &str,
    subject: &str,
    n: usize,
) -> (f64, usize) {
    let settings = ConsumerSettings {
        stream: stream.to_owned(),
        durable: format!("sluice-{}", mode.name.replace(' ', "-")),
        filter_subject: subject.to_owned(),
        ack_wait: Duration::from_secs(30),
        max_deliver: -1,
        max_ack_pending: 10_000,
    };
    let source: Arc<dyn Source> = Arc::new(broker.jetstream_source(&settings).await.expect("consumer"));
    let mut route = Route::new(
        "js",
        source,
        "jetstream",
        Arc::new(broker.clone()) as Arc<dyn Sink>,
        mode_plugin(engine, mode),
    );
    route.concurrency = concurrency();
    route.batch = mode.batch;
    run_route(route, n, async {}).await
}

fn main() {
    if !noop().is_file() {
        eprintln!("{} is missing: run `cargo xtask plugins`", noop().display());
        std::process::exit(2);
    }
    let n: usize = std::env::var("SLUICE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config: NatsConfig = toml::from_str(&format!("url = \"{}\"", url())).expect("config");
        let broker = match NatsBroker::connect(&config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}: the NATS bench needs nats-server with JetStream");
                std::process::exit(2);
            }
        };
        let client = async_nats::connect(url()).await.expect("connect");
        let _ = CLIENT.set(client.clone());
        let engine = Engine::new(EngineSettings {
            max_instances: 64,
            ..Default::default()
        })
        .expect("engine");
        let tag = format!("b{}", std::process::id());
        println!(
            "NATS, {n} messages of 100 B, sluice concurrency {}, noop plugin",
            concurrency()
        );
        println!("{:<10} {:<16} {:>12} {:>10}", "mode", "consumer", "msg/s", "vs native");

        let part = std::env::var("SLUICE_BENCH_NATS").unwrap_or_default();
        if part != "jetstream" {
            let native = native_core(&client, &format!("{tag}.native"), n).await;
            println!("{:<10} {:<16} {:>12.0} {:>10}", "core", "native", native, "1.00");
            for (i, mode) in MODES.iter().enumerate().filter(|(_, m)| selected(m)) {
                let (r, handled) = sluice_core(&broker, &engine, mode, &format!("{tag}.m{i}"), n).await;
                let dropped = if handled < n {
                    format!("  ({} dropped by the server: slow consumer)", n - handled)
                } else {
                    String::new()
                };
                println!(
                    "{:<10} {:<16} {:>12.0} {:>10.2}{dropped}",
                    "core",
                    format!("sluice {}", mode.name),
                    r,
                    r / native
                );
            }
        }
        if part == "core" {
            return;
        }

        let js = jetstream::new(client.clone());
        let stream = format!("BENCH_{tag}");
        let subject = format!("{tag}.js");
        js.create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            ..Default::default()
        })
        .await
        .expect("stream");
        // Acks awaited in chunks: the client bounds unacknowledged publishes.
        let mut acks = Vec::with_capacity(500);
        for i in 0..n {
            acks.push(
                js.publish(subject.clone(), PAYLOAD.to_vec().into())
                    .await
                    .expect("publish"),
            );
            if acks.len() == 500 || i + 1 == n {
                for a in acks.drain(..) {
                    a.await.expect("puback");
                }
            }
        }
        let before = Cpu::now("nats-server");
        let native = native_jetstream(&js, &stream, n).await;
        println!(
            "{:<10} {:<16} {:>12.0} {:>10}  {}",
            "jetstream",
            "native",
            native,
            "1.00",
            Cpu::now("nats-server").per_message(&before, n, "nats-server")
        );
        for mode in MODES.iter().filter(|m| selected(m)) {
            let before = Cpu::now("nats-server");
            let (r, _) = sluice_jetstream(&broker, &engine, mode, &stream, &subject, n).await;
            println!(
                "{:<10} {:<16} {:>12.0} {:>10.2}  {}",
                "jetstream",
                format!("sluice {}", mode.name),
                r,
                r / native,
                Cpu::now("nats-server").per_message(&before, n, "nats-server")
            );
        }
        let _ = js.delete_stream(&stream).await;
        println!("bars: reuse >= 0.9 (JetStream), >= 0.8 (core); fresh >= 0.5 (JetStream); fresh batch 64 >= 0.9");
    });
}
