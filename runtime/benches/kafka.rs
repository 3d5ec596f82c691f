//! sluice against a native rdkafka consumer, same cluster, same run: a
//! topic of 3 partitions prefilled with 100 B records, drained by (a) a
//! `StreamConsumer` committing like sluice does (the handled offsets of each
//! partition, asynchronously on an interval) and (b) a sluice route with the
//! `noop` plugin (partition ordering, 3 lanes), both isolation modes. Run
//! against tansu (`SLUICE_KAFKA_BROKERS`, default 127.0.0.1:9092; skipped
//! when none answers) and against rdkafka's in-process `MockCluster`, where
//! sluice's own overhead shows. Prints records/s and the ratio.
//!
//! Run: `cargo xtask bench` or `cargo bench -p sluice --bench kafka`.

#[path = "common/mod.rs"]
mod common;
use common::{env_or, mode_plugin, noop, rate, selected, Mode, MODES};

use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sluice::brokers::kafka::{ConsumerSettings, KafkaBroker, KafkaConfig, OffsetReset, TopicConfig};
use sluice::brokers::{Sink, Source};
use sluice::config::Ordering as RouteOrdering;
use sluice::engine::{Engine, EngineSettings};
use sluice::pipeline::Route;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PAYLOAD: [u8; 100] = [b'x'; 100];
const PARTITIONS: i32 = 3;

async fn fill(brokers: &str, topic: &str, n: usize) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("linger.ms", "20")
        .set("log_level", "3")
        .create()
        .expect("producer");
    let mut pending = Vec::with_capacity(2000);
    for i in 0..n {
        let key = format!("k{}", i % 1000);
        pending.push(
            producer
                .send_result(FutureRecord::to(topic).key(&key).payload(&PAYLOAD[..]))
                .expect("queue"),
        );
        if pending.len() == 2000 || i + 1 == n {
            for p in pending.drain(..) {
                let _ = p.await.expect("delivery").map_err(|(e, _)| panic!("produce: {e}"));
            }
        }
    }
}

/// tansu answers a fetch only after `fetch.wait.max.ms` (500 ms by
/// default) even when records are there: both consumers wait 5 ms instead.
const FETCH_WAIT_MS: &str = "5";

async fn native(brokers: &str, topic: &str, group: &str, n: usize) -> f64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("log_level", "3")
        .create()
        .expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribe");
    let mut next: HashMap<i32, i64> = HashMap::new();
    let mut last_commit = Instant::now();
    let mut stream = consumer.stream();
    // The clock starts at the first record: joining the group is not
    // consuming.
    let mut started = None;
    for _ in 0..n {
        let m = stream.next().await.expect("message").expect("message");
        let _ = started.get_or_insert_with(Instant::now);
        next.insert(m.partition(), m.offset() + 1);
        if last_commit.elapsed() >= Duration::from_secs(1) {
            let mut tpl = TopicPartitionList::new();
            for (p, o) in &next {
                let _ = tpl.add_partition_offset(topic, *p, Offset::Offset(*o));
            }
            let _ = consumer.commit(&tpl, CommitMode::Async);
            last_commit = Instant::now();
        }
    }
    rate(n - 1, started.map(|s| s.elapsed()).unwrap_or_default())
}

async fn sluice(broker: &KafkaBroker, engine: &Engine, mode: &Mode, topic: &str, group: &str, n: usize) -> f64 {
    let source: Arc<dyn Source> = Arc::new(
        broker
            .source(ConsumerSettings {
                topics: vec![topic.to_owned()],
                group: group.to_owned(),
                offset_reset: OffsetReset::Earliest,
                instance_id: None,
                max_in_flight_per_partition: env_or("SLUICE_BENCH_MAX_IN_FLIGHT", 5000),
                max_in_flight: usize::MAX,
                revoke_timeout: Duration::from_secs(5),
                retry_levels: 0,
            })
            .expect("source"),
    );
    let mut route = Route::new(
        "bench",
        source,
        "kafka",
        Arc::new(broker.clone()) as Arc<dyn Sink>,
        mode_plugin(engine, mode),
    );
    route.concurrency = PARTITIONS as u32;
    route.batch = mode.batch;
    route.ordering = RouteOrdering::Partition;
    let route = Arc::new(route);
    let stop = CancellationToken::new();
    let workers = route.spawn(&stop);
    while route.status_view().handled == 0 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let started = Instant::now();
    while (route.status_view().handled as usize) < n {
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let took = started.elapsed();
    stop.cancel();
    for w in workers {
        let _ = w.await;
    }
    rate(n - 1, took)
}

/// Creates the topics on the mock cluster when given, else through the
/// cluster's admin API.
async fn compare(
    name: &str,
    brokers: &str,
    engine: &Engine,
    n: usize,
    mock: Option<&MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
) {
    let config: KafkaConfig = toml::from_str(&format!(
        "brokers = \"{brokers}\"\n[librdkafka]\n\"fetch.wait.max.ms\" = \"{FETCH_WAIT_MS}\""
    ))
    .expect("config");
    let broker = match KafkaBroker::connect(&config).await {
        Ok(b) => b,
        Err(e) => {
            println!("{name:<8} skipped: {e}");
            return;
        }
    };
    let tag = format!("bench{}x{}", std::process::id(), sluice::message::now_ms() % 1_000_000);
    let topic = |what: &str| format!("{tag}-{what}");
    let mode_topic = |i: usize| format!("m{i}");
    let whats: Vec<String> = std::iter::once("native".to_owned())
        .chain((0..MODES.len()).map(mode_topic))
        .collect();
    for what in &whats {
        match mock {
            Some(m) => m.create_topic(&topic(what), PARTITIONS, 1).expect("mock topic"),
            None => {
                let t = TopicConfig {
                    name: topic(what),
                    partitions: PARTITIONS,
                    replication_factor: 1,
                    config: Default::default(),
                };
                sluice::brokers::kafka::admin::create_topics(&config, &[t])
                    .await
                    .expect("topic");
            }
        }
        fill(brokers, &topic(what), n).await;
    }
    let base = native(brokers, &topic("native"), &format!("{tag}-native"), n).await;
    println!("{name:<8} {:<16} {:>12.0} {:>10}", "native rdkafka", base, "1.00");
    for (i, mode) in MODES.iter().enumerate().filter(|(_, m)| selected(m)) {
        let t = topic(&mode_topic(i));
        let r = sluice(&broker, engine, mode, &t, &format!("{tag}-{}", mode_topic(i)), n).await;
        println!(
            "{name:<8} {:<16} {:>12.0} {:>10.2}",
            format!("sluice {}", mode.name),
            r,
            r / base
        );
    }
    let b = broker.clone();
    let _ = tokio::task::spawn_blocking(move || b.close()).await;
}

fn main() {
    if !noop().is_file() {
        eprintln!("{} is missing: run `cargo xtask plugins`", noop().display());
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let engine = Engine::new(EngineSettings {
            max_instances: 64,
            ..Default::default()
        })
        .expect("engine");
        println!("Kafka, records of 100 B over {PARTITIONS} partitions, noop plugin, sluice partition ordering");
        println!(
            "{:<8} {:<16} {:>12} {:>10}",
            "cluster", "consumer", "records/s", "vs native"
        );
        let mock = MockCluster::new(1).expect("mock cluster");
        let mock_servers = mock.bootstrap_servers();
        compare(
            "mock",
            &mock_servers,
            &engine,
            env_or("SLUICE_BENCH_MOCK_RECORDS", 100_000),
            Some(&mock),
        )
        .await;
        let tansu = std::env::var("SLUICE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        compare("tansu", &tansu, &engine, env_or("SLUICE_BENCH_RECORDS", 20_000), None).await;
        println!("bars: reuse >= 0.9; fresh batch 64 >= 0.9, on both");
    });
}
