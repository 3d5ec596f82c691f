//! Added latency at half load on Kafka: records are produced at a fixed rate
//! (half of what sluice `fresh` drains from a prefilled topic in this run,
//! or `SLUICE_BENCH_RATE`) to a topic of 3 partitions, and each is
//! republished by the consumer to a core NATS subject; the time from
//! produce to the copy arriving gives p50 / p99 / p99.9. Consumers: a native
//! rdkafka `StreamConsumer` that publishes each payload to NATS and stores
//! its offset (committed every 200 ms), and sluice (`fixture_stamp`,
//! partition ordering, 3 lanes, publishes to NATS) in `fresh`, `reuse` and
//! `fresh` with batches of up to 64 gathered for at most 1 ms.
//!
//! Runs on rdkafka's in-process `MockCluster` (where the broker adds next to
//! nothing) and on a Kafka-protocol broker (`SLUICE_KAFKA_BROKERS`, default
//! 127.0.0.1:9092; skipped when none answers); needs nats-server
//! (`SLUICE_NATS_URL`). Run:
//! `cargo bench -p sluice --bench latency_kafka`.

#[path = "common/mod.rs"]
mod common;
use common::{arrivals, batch_of, env_or, now_ns, plugin_file, LatencyTable};

use futures_util::StreamExt;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice::brokers::kafka::{ConsumerSettings, KafkaBroker, KafkaConfig, OffsetReset, TopicConfig};
use sluice::brokers::nats::{NatsBroker, NatsConfig};
use sluice::brokers::{Sink, Source};
use sluice::config::{Isolation, Ordering as RouteOrdering};
use sluice::engine::{Engine, EngineSettings, PluginSpec};
use sluice::pipeline::Route;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 3;
/// Both consumers ask the broker to answer a fetch within 5 ms.
const FETCH_WAIT_MS: &str = "5";

#[derive(Clone, Copy)]
enum Consumer {
    Native,
    Sluice(Isolation),
    SluiceBatch,
}

impl Consumer {
    fn name(self) -> String {
        match self {
            Consumer::Native => "native".into(),
            Consumer::Sluice(iso) => format!("sluice {}", iso.as_str()),
            Consumer::SluiceBatch => "sluice batch".into(),
        }
    }
}

struct Setup {
    brokers: String,
    kafka_config: KafkaConfig,
    kafka: KafkaBroker,
    nats: NatsBroker,
    client: async_nats::Client,
    engine: Engine,
    producer: FutureProducer,
    tag: String,
    mock: Option<&'static MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

impl Setup {
    async fn topic(&self, name: &str) {
        if let Some(mock) = self.mock {
            mock.create_topic(name, PARTITIONS, 1).expect("mock topic");
            return;
        }
        let t = TopicConfig {
            name: name.to_owned(),
            partitions: PARTITIONS,
            replication_factor: 1,
            config: Default::default(),
        };
        sluice::brokers::kafka::admin::create_topics(&self.kafka_config, &[t])
            .await
            .expect("topic");
    }

    async fn produce(&self, topic: &str, payload: String) {
        let key = payload.clone();
        self.producer
            .send(
                FutureRecord::to(topic).key(&key).payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    fn start(
        &self,
        consumer: Consumer,
        topic: &str,
        output: &str,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let stop = CancellationToken::new();
        let group = format!("{}-{}", self.tag, consumer.name().replace(' ', "-"));
        match consumer {
            Consumer::Native => {
                let c: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &self.brokers)
                    .set("fetch.wait.max.ms", FETCH_WAIT_MS)
                    .set("group.id", &group)
                    .set("enable.auto.commit", "true")
                    .set("auto.commit.interval.ms", "200")
                    .set("enable.auto.offset.store", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("log_level", "3")
                    .create()
                    .expect("consumer");
                c.subscribe(&[topic]).expect("subscribe");
                let (client, output, token) = (self.client.clone(), output.to_owned(), stop.clone());
                let task = tokio::spawn(async move {
                    let mut stream = c.stream();
                    loop {
                        let m = tokio::select! {
                            _ = token.cancelled() => return,
                            m = stream.next() => m,
                        };
                        let Some(Ok(m)) = m else { return };
                        let payload = m.payload().unwrap_or_default().to_vec();
                        client.publish(output.clone(), payload.into()).await.expect("publish");
                        client.flush().await.expect("flush");
                        let _ = c.store_offset_from_message(&m);
                    }
                });
                (stop, vec![task])
            }
            Consumer::Sluice(_) | Consumer::SluiceBatch => {
                let (iso, batch) = match consumer {
                    Consumer::Sluice(iso) => (iso, None),
                    _ => (Isolation::Fresh, Some(batch_of(64, Duration::from_millis(1)))),
                };
                let source: Arc<dyn Source> = Arc::new(
                    self.kafka
                        .source(ConsumerSettings {
                            topics: vec![topic.to_owned()],
                            group,
                            offset_reset: OffsetReset::Earliest,
                            instance_id: None,
                            max_in_flight_per_partition: 5000,
                            max_in_flight: usize::MAX,
                            revoke_timeout: Duration::from_secs(5),
                            retry_levels: 0,
                        })
                        .expect("source"),
                );
                let mut spec = PluginSpec::new("stamp", plugin_file("fixture_stamp.wasm"));
                spec.isolation = iso;
                spec.publish_allow = vec![">".into()];
                spec.settings.insert("to".into(), output.to_owned());
                let plugin = Arc::new(self.engine.load(spec).expect("load fixture_stamp"));
                let mut route = Route::new(
                    "latency",
                    source,
                    "kafka",
                    Arc::new(self.nats.clone()) as Arc<dyn Sink>,
                    plugin,
                );
                route.concurrency = PARTITIONS as u32;
                route.ordering = RouteOrdering::Partition;
                route.batch = batch;
                let route = Arc::new(route);
                (stop.clone(), route.spawn(&stop))
            }
        }
    }

    /// Records per second `consumer` drains from a prefilled topic.
    async fn max_rate(&self, consumer: Consumer, n: usize) -> f64 {
        let (topic, output) = (format!("{}-max", self.tag), format!("{}.max.out", self.tag));
        self.topic(&topic).await;
        let mut pending = Vec::new();
        for i in 0..n {
            let payload = i.to_string();
            pending.push(
                self.producer
                    .send_result(FutureRecord::to(&topic).key(&payload).payload(&payload))
                    .expect("queue"),
            );
            if pending.len() == 2000 || i + 1 == n {
                for p in pending.drain(..) {
                    let _ = p.await.expect("delivery").map_err(|(e, _)| panic!("produce: {e}"));
                }
            }
        }
        let mut out = self.client.subscribe(output.clone()).await.expect("subscribe");
        self.client.flush().await.expect("flush");
        let (stop, tasks) = self.start(consumer, &topic, &output);
        // The clock starts at the first copy: joining the group is not
        // consuming.
        out.next().await.expect("output");
        let started = Instant::now();
        for _ in 1..n {
            out.next().await.expect("output");
        }
        let rate = (n - 1) as f64 / started.elapsed().as_secs_f64();
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        rate
    }

    /// Latencies (ns) at `rate` records/s for `seconds`.
    async fn latencies(&self, consumer: Consumer, rate: f64, seconds: f64) -> Vec<u64> {
        let name = consumer.name().replace(' ', "-");
        let (topic, output) = (format!("{}-{name}", self.tag), format!("{}.{name}.out", self.tag));
        self.topic(&topic).await;
        let mut out = self.client.subscribe(output.clone()).await.expect("subscribe");
        self.client.flush().await.expect("flush");
        let (stop, tasks) = self.start(consumer, &topic, &output);
        // Warm-up: the consumer has joined its group once a first record
        // comes through.
        self.produce(&topic, "warm-up".into()).await;
        out.next().await.expect("warm-up copy");
        let n = (rate * seconds) as usize;
        let publisher = {
            let (producer, topic) = (self.producer.clone(), topic.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut pending = Vec::new();
                for i in 0..n {
                    // Sent on schedule (no burst to catch up after a stall).
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    let payload = now_ns().to_string();
                    pending.push(
                        producer
                            .send_result(FutureRecord::to(&topic).key(&payload).payload(&payload))
                            .expect("queue"),
                    );
                    if pending.len() == 256 {
                        for p in pending.drain(..) {
                            let _ = p.await;
                        }
                    }
                }
                for p in pending {
                    let _ = p.await;
                }
            })
        };
        let latencies = arrivals(&mut out, n, &consumer.name()).await;
        let _ = publisher.await;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        latencies
    }
}

fn main() {
    if !plugin_file("fixture_stamp.wasm").is_file() {
        eprintln!("fixture_stamp.wasm is missing: run `cargo xtask plugins`");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mock: &'static MockCluster<'static, rdkafka::producer::DefaultProducerContext> =
            Box::leak(Box::new(MockCluster::new(1).expect("mock cluster")));
        run("mock", mock.bootstrap_servers(), Some(mock)).await;
        let brokers = std::env::var("SLUICE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        run("tansu", brokers, None).await;
    });
}

async fn run(
    cluster: &str,
    brokers: String,
    mock: Option<&'static MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
) {
    let seconds: f64 = env_or("SLUICE_BENCH_SECONDS", 5.0);
    let nats_url = std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    {
        let kafka_config: KafkaConfig = toml::from_str(&format!(
            "brokers = \"{brokers}\"\n[librdkafka]\n\"fetch.wait.max.ms\" = \"{FETCH_WAIT_MS}\""
        ))
        .expect("config");
        let kafka = match KafkaBroker::connect(&kafka_config).await {
            Ok(b) => b,
            Err(e) => {
                println!("{cluster}: skipped: {e}");
                return;
            }
        };
        let nats_config: NatsConfig = toml::from_str(&format!("url = \"{nats_url}\"")).expect("config");
        let nats = match NatsBroker::connect(&nats_config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}: the Kafka latency bench republishes to nats-server");
                std::process::exit(2);
            }
        };
        let setup = Setup {
            producer: ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("linger.ms", "0")
                .set("log_level", "3")
                .create()
                .expect("producer"),
            brokers,
            kafka_config,
            kafka,
            nats,
            client: async_nats::connect(&nats_url).await.expect("connect"),
            engine: Engine::new(EngineSettings {
                max_instances: 64,
                ..Default::default()
            })
            .expect("engine"),
            tag: format!("lat{}x{}", std::process::id(), sluice::message::now_ms() % 1_000_000),
            mock,
        };
        let rate = match std::env::var("SLUICE_BENCH_RATE")
            .ok()
            .and_then(|r| r.parse::<f64>().ok())
        {
            Some(r) => r,
            None => setup.max_rate(Consumer::Sluice(Isolation::Fresh), 20_000).await / 2.0,
        };
        println!(
            "{cluster}: Kafka produce -> consumer -> core NATS republish, {rate:.0} records/s for {seconds} s over {PARTITIONS} partitions (half of sluice fresh's maximum unless SLUICE_BENCH_RATE)"
        );
        let mut table = LatencyTable::start();
        for consumer in [
            Consumer::Native,
            Consumer::Sluice(Isolation::Fresh),
            Consumer::Sluice(Isolation::Reuse),
            Consumer::SluiceBatch,
        ] {
            let l = setup.latencies(consumer, rate, seconds).await;
            table.row(&consumer.name(), &l);
        }
        table.end();
        let k = setup.kafka.clone();
        let _ = tokio::task::spawn_blocking(move || k.close()).await;
    }
}
