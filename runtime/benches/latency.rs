//! Added latency at half load: messages are published to a JetStream stream
//! at a fixed rate (half the maximum sluice reached on the same path in this
//! run, or `SLUICE_BENCH_RATE`), and each is republished to a core NATS
//! subject by the consumer; the time from publish to the republished copy
//! arriving gives p50 / p99 / p99.9. Consumers: a native async-nats pull
//! consumer that republishes then acks, and sluice with the `fixture_stamp`
//! plugin (which publishes its payload) in both isolation modes, and in
//! `fresh` with batches of up to 64 gathered for at most 1 ms.
//!
//! Needs nats-server with JetStream (`SLUICE_NATS_URL`, default
//! 127.0.0.1:4222). Run: `cargo xtask bench` or
//! `cargo bench -p sluice --bench latency`.

#[path = "common/mod.rs"]
mod common;
use common::{arrivals, batch_of, env_or, now_ns, plugin_file, LatencyTable};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use sluice::brokers::nats::{ConsumerSettings, NatsBroker, NatsConfig};
use sluice::brokers::{Sink, Source};
use sluice::config::Isolation;
use sluice::engine::{Engine, EngineSettings, PluginSpec};
use sluice::pipeline::Route;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The consumer under test, started on `stream` / `input`, republishing to
/// `output`; stopped by the token.
enum Consumer {
    Native,
    Sluice(Isolation),
    /// `fresh`, `batch = { max_messages = 64, max_wait = "1ms" }`.
    SluiceBatch,
}

impl Consumer {
    fn name(&self) -> String {
        match self {
            Consumer::Native => "native".into(),
            Consumer::Sluice(iso) => format!("sluice {}", iso.as_str()),
            Consumer::SluiceBatch => "sluice batch".into(),
        }
    }
}

struct Setup {
    client: async_nats::Client,
    js: jetstream::Context,
    broker: NatsBroker,
    engine: Engine,
    tag: String,
}

impl Setup {
    async fn stream(&self, name: &str, subject: &str) {
        let _ = self.js.delete_stream(name).await;
        self.js
            .create_stream(jetstream::stream::Config {
                name: name.to_owned(),
                subjects: vec![subject.to_owned()],
                ..Default::default()
            })
            .await
            .expect("stream");
    }

    /// Starts `consumer`; returns the stop token and its tasks.
    async fn start(
        &self,
        consumer: &Consumer,
        stream: &str,
        input: &str,
        output: &str,
    ) -> (CancellationToken, Vec<tokio::task::JoinHandle<()>>) {
        let stop = CancellationToken::new();
        match consumer {
            Consumer::Native => {
                let c = self
                    .js
                    .get_stream(stream)
                    .await
                    .expect("stream")
                    .create_consumer(pull::Config {
                        durable_name: Some("native".into()),
                        ..Default::default()
                    })
                    .await
                    .expect("consumer");
                let (client, output, token) = (self.client.clone(), output.to_owned(), stop.clone());
                let task = tokio::spawn(async move {
                    let mut messages = c.messages().await.expect("messages");
                    loop {
                        let m = tokio::select! {
                            _ = token.cancelled() => return,
                            m = messages.next() => m,
                        };
                        let Some(Ok(m)) = m else { return };
                        client
                            .publish(output.clone(), m.payload.clone())
                            .await
                            .expect("publish");
                        m.ack().await.expect("ack");
                    }
                });
                (stop, vec![task])
            }
            Consumer::Sluice(_) | Consumer::SluiceBatch => {
                let (iso, batch) = match consumer {
                    Consumer::Sluice(iso) => (*iso, None),
                    _ => (Isolation::Fresh, Some(batch_of(64, Duration::from_millis(1)))),
                };
                let settings = ConsumerSettings {
                    stream: stream.to_owned(),
                    durable: format!("sluice-{}", consumer.name().replace(' ', "-")),
                    filter_subject: input.to_owned(),
                    ack_wait: Duration::from_secs(30),
                    max_deliver: -1,
                    max_ack_pending: 10_000,
                };
                let source: Arc<dyn Source> =
                    Arc::new(self.broker.jetstream_source(&settings).await.expect("consumer"));
                let mut spec = PluginSpec::new("stamp", plugin_file("fixture_stamp.wasm"));
                spec.isolation = iso;
                spec.publish_allow = vec![">".into()];
                spec.settings.insert("to".into(), output.to_owned());
                let plugin = Arc::new(self.engine.load(spec).expect("load fixture_stamp"));
                let mut route = Route::new(
                    "latency",
                    source,
                    "jetstream",
                    Arc::new(self.broker.clone()) as Arc<dyn Sink>,
                    plugin,
                );
                route.concurrency = env_or("SLUICE_BENCH_CONCURRENCY", 16);
                route.batch = batch;
                let route = Arc::new(route);
                let workers = route.spawn(&stop);
                (stop, workers)
            }
        }
    }

    /// Messages per second `consumer` drains from a prefilled stream.
    async fn max_rate(&self, consumer: &Consumer, n: usize) -> f64 {
        let (stream, input, output) = (
            format!("LAT_MAX_{}", self.tag),
            format!("{}.max.in", self.tag),
            format!("{}.max.out", self.tag),
        );
        self.stream(&stream, &input).await;
        let mut acks = Vec::new();
        for _ in 0..n {
            acks.push(self.js.publish(input.clone(), "0".into()).await.expect("publish"));
            if acks.len() == 500 {
                for a in acks.drain(..) {
                    a.await.expect("puback");
                }
            }
        }
        for a in acks {
            a.await.expect("puback");
        }
        let mut out = self.client.subscribe(output.clone()).await.expect("subscribe");
        self.client.flush().await.expect("flush");
        let started = Instant::now();
        let (stop, tasks) = self.start(consumer, &stream, &input, &output).await;
        for _ in 0..n {
            out.next().await.expect("output");
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.js.delete_stream(&stream).await;
        rate
    }

    /// Latencies (ns) of `rate` msg/s for `seconds`.
    async fn latencies(&self, consumer: &Consumer, rate: f64, seconds: f64) -> Vec<u64> {
        let name = consumer.name().replace(' ', "_");
        let (stream, input, output) = (
            format!("LAT_{}_{name}", self.tag),
            format!("{}.{name}.in", self.tag),
            format!("{}.{name}.out", self.tag),
        );
        self.stream(&stream, &input).await;
        let mut out = self.client.subscribe(output.clone()).await.expect("subscribe");
        self.client.flush().await.expect("flush");
        let (stop, tasks) = self.start(consumer, &stream, &input, &output).await;
        let n = (rate * seconds) as usize;
        let publisher = {
            let (js, input) = (self.js.clone(), input.clone());
            tokio::spawn(async move {
                let started = Instant::now();
                let mut pending = Vec::new();
                for i in 0..n {
                    // Sent on schedule (no burst to catch up after a stall).
                    let due = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    pending.push(
                        js.publish(input.clone(), now_ns().to_string().into())
                            .await
                            .expect("publish"),
                    );
                    if pending.len() == 256 {
                        for a in pending.drain(..) {
                            a.await.expect("puback");
                        }
                    }
                }
                for a in pending {
                    a.await.expect("puback");
                }
            })
        };
        let latencies = arrivals(&mut out, n, &consumer.name()).await;
        let _ = publisher.await;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        let _ = self.js.delete_stream(&stream).await;
        latencies
    }
}

fn main() {
    if !plugin_file("fixture_stamp.wasm").is_file() {
        eprintln!("fixture_stamp.wasm is missing: run `cargo xtask plugins`");
        std::process::exit(2);
    }
    let seconds: f64 = env_or("SLUICE_BENCH_SECONDS", 5.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config: NatsConfig = toml::from_str(&format!("url = \"{}\"", url())).expect("config");
        let broker = match NatsBroker::connect(&config).await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{e}: the latency bench needs nats-server with JetStream");
                std::process::exit(2);
            }
        };
        let client = async_nats::connect(url()).await.expect("connect");
        let setup = Setup {
            js: jetstream::new(client.clone()),
            client,
            broker,
            engine: Engine::new(EngineSettings {
                max_instances: 64,
                ..Default::default()
            })
            .expect("engine"),
            tag: format!("l{}", std::process::id()),
        };
        let rate = match std::env::var("SLUICE_BENCH_RATE").ok().and_then(|r| r.parse::<f64>().ok()) {
            Some(r) => r,
            None => setup.max_rate(&Consumer::Sluice(Isolation::Fresh), 20_000).await / 2.0,
        };
        println!(
            "JetStream publish -> consumer -> core NATS republish, {rate:.0} msg/s for {seconds} s (half of sluice fresh's maximum unless SLUICE_BENCH_RATE)"
        );
        let mut table = LatencyTable::start();
        for consumer in [
            Consumer::Native,
            Consumer::Sluice(Isolation::Fresh),
            Consumer::Sluice(Isolation::Reuse),
            Consumer::SluiceBatch,
        ] {
            let l = setup.latencies(&consumer, rate, seconds).await;
            table.row(&consumer.name(), &l);
        }
        table.end();
    });
}
