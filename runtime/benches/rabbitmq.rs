//! sluice against a native lapin consumer, same RabbitMQ, same run: a
//! durable queue prefilled with persistent messages, drained by (a) a lapin
//! consumer acking each message and (b) a sluice route with the `noop`
//! plugin, both with the same prefetch; sluice in both isolation modes.
//! Prints msg/s and the ratio sluice/native.
//!
//! Needs RabbitMQ (`SLUICE_AMQP_URL`, default guest@127.0.0.1:5672). Run:
//! `cargo xtask bench` or `cargo bench -p sluice --bench rabbitmq`.

#[path = "common/mod.rs"]
mod common;
use common::{env_or, mode_plugin, noop, rate, selected, Mode, MODES};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice::brokers::rabbitmq::{ConsumerSettings, RabbitBroker, RabbitConfig, RetryVia};
use sluice::brokers::{Sink, Source};
use sluice::engine::{Engine, EngineSettings};
use sluice::pipeline::Route;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PAYLOAD: [u8; 100] = [b'x'; 100];

/// Workers of the sluice route, acks in flight of the native consumer.
fn concurrency() -> usize {
    env_or("SLUICE_BENCH_CONCURRENCY", 16)
}

fn url() -> String {
    std::env::var("SLUICE_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A fresh durable queue holding `n` persistent messages.
async fn fill(ch: &Channel, queue: &str, n: usize) {
    let _ = ch.queue_delete(queue.into(), QueueDeleteOptions::default()).await;
    ch.queue_declare(queue.into(), QueueDeclareOptions::durable(), FieldTable::default())
        .await
        .expect("declare");
    let mut confirms = Vec::with_capacity(1000);
    for i in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &PAYLOAD,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
        if confirms.len() == 1000 || i + 1 == n {
            for c in confirms.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
}

async fn native(conn: &Connection, queue: &str, n: usize, prefetch: u16) -> f64 {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(prefetch, BasicQosOptions::default()).await.expect("qos");
    let started = Instant::now();
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "native".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    // Acks in flight for as many messages as sluice has workers: awaiting
    // each ack before taking the next would understate the native side.
    (&mut consumer)
        .take(n)
        .for_each_concurrent(concurrency(), |d| async move {
            let d = d.expect("delivery");
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        })
        .await;
    let took = started.elapsed();
    let _ = ch.close(200, "done".into()).await;
    rate(n, took)
}

async fn sluice(broker: &RabbitBroker, engine: &Engine, mode: &Mode, queue: &str, n: usize, prefetch: u16) -> f64 {
    let source: Arc<dyn Source> = Arc::new(broker.source(ConsumerSettings {
        queue: queue.to_owned(),
        prefetch,
        retry_via: RetryVia::DelayQueue,
        consumer_tag: format!("sluice-{}", mode.name.replace(' ', "-")),
    }));
    let mut route = Route::new(
        "bench",
        source,
        "rabbitmq",
        Arc::new(broker.sink()) as Arc<dyn Sink>,
        mode_plugin(engine, mode),
    );
    route.concurrency = u32::try_from(concurrency()).unwrap_or(16);
    if let Some(batch) = mode.batch {
        // A batch fills only when the prefetch window holds it: two workers
        // gathering batches, with a window of two batches.
        route.concurrency = 2;
        route.batch = Some(batch);
    }
    let route = Arc::new(route);
    let stop = CancellationToken::new();
    let started = Instant::now();
    let workers = route.spawn(&stop);
    while (route.status_view().handled as usize) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    rate(n, took)
}

fn main() {
    if !noop().is_file() {
        eprintln!("{} is missing: run `cargo xtask plugins`", noop().display());
        std::process::exit(2);
    }
    let n: usize = env_or("SLUICE_BENCH_MESSAGES", 20_000);
    let prefetch: u16 = env_or("SLUICE_BENCH_PREFETCH", 64);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config: RabbitConfig = toml::from_str(&format!("url = \"{}\"", url())).expect("config");
        let broker = match RabbitBroker::connect(&config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}: the RabbitMQ bench needs a RabbitMQ server");
                std::process::exit(2);
            }
        };
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let engine = Engine::new(EngineSettings {
            max_instances: 64,
            ..Default::default()
        })
        .expect("engine");
        let queue = format!("bench-{}", std::process::id());
        println!(
            "RabbitMQ, {n} persistent messages of 100 B, prefetch {prefetch}, concurrency {}, noop plugin",
            concurrency()
        );
        println!("{:<16} {:>12} {:>10}", "consumer", "msg/s", "vs native");
        fill(&ch, &queue, n).await;
        let base = native(&conn, &queue, n, prefetch).await;
        println!("{:<16} {:>12.0} {:>10}", "native lapin", base, "1.00");
        for mode in MODES.iter().filter(|m| selected(m)) {
            fill(&ch, &queue, n).await;
            let window = match mode.batch {
                Some(b) => prefetch.max(u16::try_from(b.max_messages * 2).unwrap_or(u16::MAX)),
                None => prefetch,
            };
            let r = sluice(&broker, &engine, mode, &queue, n, window).await;
            println!("{:<16} {:>12.0} {:>10.2}", format!("sluice {}", mode.name), r, r / base);
        }
        let _ = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        broker.close().await;
        println!("bars: reuse >= 0.9; fresh batch 64 (prefetch 128, 2 workers) >= 0.9");
    });
}
