//! The embedded default end to end, against JetStream doing the same work
//! on the same machine in the same run: N messages published in batches
//! (each batch one durable commit, as `POST /v1/publish` with NDJSON does),
//! consumed, handled by the `noop` plugin and acknowledged durably; timed
//! from the first publish to the last acknowledgement. The baseline is a
//! native async-nats publisher (batches of PubAcks awaited) and pull
//! consumer (acking each message) on a file-storage stream.
//!
//! Needs nats-server with JetStream (`SLUICE_NATS_URL`, default
//! 127.0.0.1:4222). Run: `cargo xtask bench` or
//! `cargo bench -p sluice --bench embedded`.

#[path = "common/mod.rs"]
mod common;
use common::{env_or, mode_plugin, noop, rate, selected, Mode, MODES};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use sluice::brokers::embedded::EmbeddedBroker;
use sluice::brokers::{Sink, Source};
use sluice::engine::{Engine, EngineSettings};
use sluice::message::Outbound;
use sluice::pipeline::Route;
use sluice::subject::SubjectPattern;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PAYLOAD: [u8; 100] = [b'x'; 100];

fn url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// Publish → handle → durable ack on the embedded broker.
async fn embedded(engine: &Engine, mode: &Mode, n: usize, batch: usize, concurrency: u32) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = EmbeddedBroker::open(&dir.path().join("embedded.redb"), Duration::from_secs(60)).expect("broker");
    broker.declare_queue("bench", vec![SubjectPattern::parse("bench.in").expect("pattern")], None);
    let source: Arc<dyn Source> = Arc::new(broker.source("bench"));
    let sink: Arc<dyn Sink> = Arc::new(broker.clone());
    let mut route = Route::new("bench", source, "embedded", sink, mode_plugin(engine, mode));
    route.concurrency = concurrency;
    route.batch = mode.batch;
    let route = Arc::new(route);
    let stop = CancellationToken::new();
    let workers = route.spawn(&stop);
    let started = Instant::now();
    let publisher = {
        let broker = broker.clone();
        tokio::spawn(async move {
            let mut left = n;
            while left > 0 {
                let k = left.min(batch);
                let messages = (0..k)
                    .map(|_| Outbound {
                        subject: "bench.in".into(),
                        headers: Vec::new(),
                        payload: PAYLOAD.to_vec(),
                    })
                    .collect();
                broker.publish(messages).await.expect("publish");
                left -= k;
            }
        })
    };
    // Handled, and every removal committed (acks are queued for the next
    // group commit; the queue is empty once they are durable).
    let left = |b: &EmbeddedBroker| {
        b.queues()
            .iter()
            .find(|q| q.name == "bench")
            .map_or(usize::MAX, |q| q.messages + q.in_flight)
    };
    while (route.status_view().handled as usize) < n || left(&broker) > 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    let _ = publisher.await;
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    broker.close();
    rate(n, took)
}

/// Publish → consume → ack with the JetStream client, file storage.
async fn jetstream_native(js: &jetstream::Context, tag: &str, n: usize, batch: usize) -> f64 {
    let (stream, subject) = (format!("BENCH_EMB_{tag}"), format!("{tag}.emb"));
    let _ = js.delete_stream(&stream).await;
    let consumer = js
        .create_stream(jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![subject.clone()],
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("stream")
        .create_consumer(pull::Config {
            durable_name: Some("native".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let publisher = {
        let (js, subject) = (js.clone(), subject.clone());
        tokio::spawn(async move {
            let mut acks = Vec::with_capacity(batch);
            for i in 0..n {
                acks.push(
                    js.publish(subject.clone(), PAYLOAD.to_vec().into())
                        .await
                        .expect("publish"),
                );
                if acks.len() == batch || i + 1 == n {
                    for a in acks.drain(..) {
                        a.await.expect("puback");
                    }
                }
            }
        })
    };
    let mut messages = consumer.messages().await.expect("messages");
    for i in 0..n {
        let m = messages.next().await.expect("message").expect("message");
        if i + 1 == n {
            // The last one waits for the server's confirmation: every ack
            // before it has been processed too.
            m.double_ack().await.expect("ack");
        } else {
            m.ack().await.expect("ack");
        }
    }
    let took = started.elapsed();
    let _ = publisher.await;
    let _ = js.delete_stream(&stream).await;
    rate(n, took)
}

fn main() {
    if !noop().is_file() {
        eprintln!("{} is missing: run `cargo xtask plugins`", noop().display());
        std::process::exit(2);
    }
    let n: usize = env_or("SLUICE_BENCH_MESSAGES", 20_000);
    let batch: usize = env_or("SLUICE_BENCH_BATCH", 500);
    let concurrency: u32 = env_or("SLUICE_BENCH_CONCURRENCY", 16);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = match async_nats::connect(url()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("{e}: the embedded bench compares with nats-server with JetStream");
                std::process::exit(2);
            }
        };
        let js = jetstream::new(client);
        let engine = Engine::new(EngineSettings {
            max_instances: 64,
            ..Default::default()
        })
        .expect("engine");
        let tag = format!("b{}", std::process::id());
        println!(
            "publish -> handle -> durable ack, {n} messages of 100 B, batches of {batch}, sluice concurrency {concurrency}, noop plugin"
        );
        println!("{:<28} {:>12} {:>10}", "consumer", "msg/s", "vs JetStream");
        let native = jetstream_native(&js, &tag, n, batch).await;
        println!("{:<28} {:>12.0} {:>10}", "JetStream native (file)", native, "1.00");
        for mode in MODES.iter().filter(|m| selected(m)) {
            let r = embedded(&engine, mode, n, batch, concurrency).await;
            println!(
                "{:<28} {:>12.0} {:>10.2}",
                format!("sluice embedded, {}", mode.name),
                r,
                r / native
            );
        }
        println!("bar: embedded >= 0.5 of JetStream");
    });
}
