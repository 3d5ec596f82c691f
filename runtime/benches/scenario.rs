//! The shipped order-events scenario against the consumer a user would
//! write by hand, same broker, same run, same messages.
//!
//! A backlog of N orders (each with an `Idempotency-Key`) is drained by:
//! - `hand-written`: the loop a user writes without sluice, with the shipped
//!   route's concurrency: receive, parse the order, build the enriched
//!   event, publish it and wait for the broker's confirmation, ack;
//! - `sluice <store>`: the release daemon on the shipped config, running the
//!   shipped `order-processor`, with the idempotency store as shipped
//!   (`file`) and as `memory`;
//! - `sluice no gate`: the same config without `[routes.idempotency]`.
//!
//! Timed from the first enriched event to the Nth (start-up excluded).
//!
//! The RabbitMQ part purges the shipped queues (`AMQP_URL`, default
//! guest@127.0.0.1:5672). The JetStream part deletes and recreates the shipped streams (ORDERS,
//! ENRICHED, DEAD_LETTERS): run it against a test server. Needs
//! nats-server with JetStream (`SLUICE_NATS_URL`, default 127.0.0.1:4222).
//! The Kafka part runs on rdkafka's MockCluster and, when a broker listens
//! at `SLUICE_KAFKA_BROKERS` (default 127.0.0.1:9092, e.g. tansu), on it
//! too (`SLUICE_BENCH_SCENARIOS=kafka-broker`).
//! Run: `cargo bench -p sluice --bench scenario` (`SLUICE_BENCH_MESSAGES`,
//! default 10,000; `SLUICE_BENCH_LIVE_RATE=N` runs only the JetStream live
//! feed, at N orders/s).

#[path = "common/mod.rs"]
mod common;
use common::daemon::{edited, shipped_config, Daemon};
use common::orders::{enrich, order};
use common::{env_or, percentile, plugin_file, rate};
use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use std::time::{Duration, Instant};

/// The shipped route's concurrency (`config/nats.toml`), which the
/// hand-written consumer uses too.
const CONCURRENCY: usize = 4;
/// Longest wait for the next output before a run is declared stuck.
const STALL: Duration = Duration::from_secs(30);
/// The batch setting of the shipped configs' order routes.
const BATCH: &str = "batch = { max_messages = 64, max_wait = \"2ms\" }\n";

fn nats_url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// The shipped config's variants: as shipped (`file` store, batches),
/// `memory` store, no idempotency gate, and one message per call.
fn variants(shipped: &str, gate: &str, batch: &str) -> Vec<(&'static str, String)> {
    let memory = if shipped.contains("store = \"file\"\n") {
        edited(shipped, "store = \"file\"\n", "store = \"memory\"\n")
    } else {
        edited(shipped, gate, &format!("{gate}store = \"memory\"\n"))
    };
    vec![
        ("sluice file", shipped.to_owned()),
        ("sluice memory", memory),
        // No key: the gate asks no store.
        ("sluice no gate", edited(shipped, gate, "key = \"none\"\n")),
        ("sluice file 1/call", edited(shipped, batch, "")),
    ]
}

fn redis_url() -> String {
    std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The JetStream config with the stores replicas share: `nats-kv` (on the
/// same server) and Redis (`SLUICE_REDIS_URL`; the row is left out when
/// nothing listens there).
fn shared_stores(shipped: &str) -> Vec<(&'static str, String)> {
    let lease = "lease = \"90s\"\n";
    let store = |s: &str| edited(shipped, lease, &format!("{lease}store = \"{s}\"\n"));
    let mut rows = vec![("sluice nats-kv", store("nats-kv"))];
    let url = redis_url();
    let reachable = url
        .strip_prefix("redis://")
        .and_then(|a| a.split('/').next())
        .and_then(|a| std::net::TcpStream::connect(a).ok())
        .is_some();
    if reachable {
        rows.push((
            "sluice redis",
            format!("{}\n[stores]\nredis_url = \"{url}\"\n", store("redis")),
        ));
    } else {
        eprintln!("no Redis at {url}: the redis row is left out");
    }
    rows
}

/// Waits for `n` outputs on `out` (items `is_output` accepts); the time
/// from the first to the last.
async fn first_to_last<S>(
    out: &mut S,
    n: usize,
    is_output: impl Fn(&S::Item) -> bool,
    mut alive: impl FnMut(),
) -> Duration
where
    S: futures_util::Stream + Unpin,
{
    let mut first = None;
    for seen in 0..n {
        let deadline = Instant::now() + STALL;
        loop {
            alive();
            match tokio::time::timeout(Duration::from_millis(500), out.next()).await {
                Ok(Some(item)) if is_output(&item) => break,
                Ok(_) => panic!("the output stream failed or closed"),
                Err(_) if Instant::now() > deadline => panic!("stuck after {seen} of {n} outputs"),
                Err(_) => {}
            }
        }
        first.get_or_insert_with(Instant::now);
    }
    first.map_or(Duration::ZERO, |f| f.elapsed())
}

/// Waits for `n` messages on a NATS subscription; first to last.
async fn drained(out: &mut async_nats::Subscriber, n: usize, alive: impl FnMut()) -> Duration {
    first_to_last(out, n, |_| true, alive).await
}

/// Rounds of every row, interleaved (`SLUICE_BENCH_ROUNDS`, default 3):
/// the machine's noise moves whole runs, so each row's median is compared.
fn rounds() -> usize {
    env_or("SLUICE_BENCH_ROUNDS", 3).max(1)
}

/// Rates per consumer over the rounds; printed as medians with their
/// range, and the ratio of medians to the first row.
struct Table {
    title: String,
    rows: Vec<(String, Vec<f64>)>,
}

impl Table {
    fn start(broker: &str, n: usize) -> Self {
        Self {
            title: format!(
                "{broker}: {n} orders, shipped config, order-processor, {} rounds",
                rounds()
            ),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, consumer: &str, rate: f64) {
        match self.rows.iter_mut().find(|(name, _)| name == consumer) {
            Some((_, rates)) => rates.push(rate),
            None => self.rows.push((consumer.to_owned(), vec![rate])),
        }
    }

    fn print(mut self) -> Vec<(String, f64)> {
        println!("\n{}", self.title);
        let first = self.rows.first().map(|(name, _)| name.clone()).unwrap_or_default();
        println!(
            "{:<20} {:>10} {:>18} {:>10}",
            "consumer",
            "median/s",
            "range",
            format!("vs {first}")
        );
        let mut medians = Vec::new();
        for (name, rates) in &mut self.rows {
            rates.sort_by(f64::total_cmp);
            let median = rates[rates.len() / 2];
            medians.push((name.clone(), median));
            let base = medians[0].1;
            println!(
                "{name:<20} {median:>10.0} {:>18} {:>10.2}",
                format!("{:.0}-{:.0}", rates[0], rates[rates.len() - 1]),
                median / base
            );
        }
        medians
    }
}

mod jetstream_scenario {
    use super::*;

    const STREAMS: [(&str, &str); 3] = [
        ("ORDERS", "orders.>"),
        ("ENRICHED", "enriched.>"),
        ("DEAD_LETTERS", "dlq.>"),
    ];
    /// As `config/nats.toml` declares them (the daemon checks).
    const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

    async fn fresh_streams(js: &jetstream::Context) {
        // The `nats-kv` store's bucket, recreated by the daemon.
        let _ = js.delete_stream("KV_sluice_idempotency").await;
        for (name, subject) in STREAMS {
            let _ = js.delete_stream(name).await;
            js.create_stream(jetstream::stream::Config {
                name: name.into(),
                subjects: vec![subject.into()],
                max_age: if name == "DEAD_LETTERS" { Duration::ZERO } else { WEEK },
                ..Default::default()
            })
            .await
            .expect("create stream");
        }
    }

    async fn backlog(js: &jetstream::Context, tag: &str, n: usize) {
        let mut acks = Vec::with_capacity(1000);
        for i in 0..n {
            let (payload, key) = order(tag, i);
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Idempotency-Key", key.as_str());
            acks.push(
                js.publish_with_headers("orders.created", headers, payload.into())
                    .await
                    .expect("publish"),
            );
            if acks.len() == 1000 || i + 1 == n {
                for a in acks.drain(..) {
                    a.await.expect("puback");
                }
            }
        }
    }

    /// What a user writes with async-nats: a durable pull consumer; per
    /// message, the order-processor's work, a publish awaited for its
    /// PubAck (with a `Nats-Msg-Id`, as sluice sends), then `ack()`.
    async fn hand_written(js: jetstream::Context, stop: tokio_util::sync::CancellationToken) {
        let consumer = js
            .get_stream("ORDERS")
            .await
            .expect("stream")
            .create_consumer(pull::Config {
                durable_name: Some("hand-written".into()),
                filter_subject: "orders.>".into(),
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .expect("consumer");
        let messages = consumer.messages().await.expect("messages");
        let work = messages.for_each_concurrent(CONCURRENCY, |m| {
            let js = js.clone();
            async move {
                let Ok(m) = m else { return };
                let info = m.info().expect("jetstream message");
                let id = info.stream_sequence.to_string();
                let attempt = u32::try_from(info.delivered).unwrap_or(u32::MAX);
                match enrich(&m.payload, &m.subject, &id, attempt) {
                    Ok((subject, payload)) => {
                        let mut headers = async_nats::HeaderMap::new();
                        headers.insert("Nats-Msg-Id", format!("orders:{id}").as_str());
                        let confirmed = match js.publish_with_headers(subject, headers, payload.into()).await {
                            Ok(ack) => ack.await.is_ok(),
                            Err(_) => false,
                        };
                        if confirmed {
                            let _ = m.ack().await;
                        }
                    }
                    Err(_) => {
                        let _ = m.ack_with(jetstream::AckKind::Term).await;
                    }
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = stop.cancelled() => {}
        }
    }

    /// Orders fed live at `per_sec`, `count` of them: the latency (ns,
    /// sorted) from each publish to its enriched event. 100 orders first
    /// warm the consumer up (not counted).
    async fn fed(
        js: &jetstream::Context,
        client: &async_nats::Client,
        tag: &str,
        per_sec: f64,
        count: usize,
        mut alive: impl FnMut(),
    ) -> Vec<u64> {
        let mut out = client.subscribe("enriched.orders.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        backlog(js, &format!("{tag}w"), 100).await;
        let _ = drained(&mut out, 100, &mut alive).await;
        let sent: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; count]));
        let publisher = {
            let (js, sent, tag) = (js.clone(), sent.clone(), tag.to_owned());
            tokio::spawn(async move {
                let start = Instant::now();
                for i in 0..count {
                    tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / per_sec)).into()).await;
                    let (payload, key) = order(&tag, i);
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Idempotency-Key", key.as_str());
                    if let Ok(mut s) = sent.lock() {
                        s[i] = Some(Instant::now());
                    }
                    let ack = js
                        .publish_with_headers("orders.created", headers, payload.into())
                        .await
                        .expect("publish");
                    tokio::spawn(async move { ack.await.expect("puback") });
                }
            })
        };
        let prefix = format!("o-{tag}-");
        let mut latencies = Vec::with_capacity(count);
        let mut latencies_at = Vec::with_capacity(count);
        let mut last = Instant::now();
        while latencies.len() < count {
            alive();
            assert!(
                last.elapsed() < STALL,
                "{} of {count} fed orders came out",
                latencies.len()
            );
            let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), out.next()).await else {
                continue;
            };
            let now = Instant::now();
            last = now;
            let index = serde_json::from_slice::<serde_json::Value>(&m.payload)
                .ok()
                .and_then(|v| v["order_id"].as_str()?.strip_prefix(&prefix)?.parse::<usize>().ok());
            let at = index.and_then(|i| sent.lock().ok()?.get(i).copied().flatten());
            if let Some(at) = at {
                latencies.push(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX));
                latencies_at.push((at, now - at));
            }
        }
        let _ = publisher.await;
        if std::env::var_os("SLUICE_BENCH_LIVE_WORST").is_some() {
            worst(&sent, &latencies_at);
        }
        latencies.sort_unstable();
        latencies
    }

    /// Diagnostics (`SLUICE_BENCH_LIVE_WORST`): the latency's worst moments,
    /// as the max per 100 ms window of publish time, for windows above 5 ms.
    fn worst(sent: &Mutex<Vec<Option<Instant>>>, latencies_at: &[(Instant, Duration)]) {
        let Some(start) = sent.lock().ok().and_then(|s| s.iter().flatten().min().copied()) else {
            return;
        };
        let mut windows: std::collections::BTreeMap<u128, (Duration, usize)> = Default::default();
        for (at, l) in latencies_at {
            let w = windows.entry((*at - start).as_millis() / 100).or_default();
            w.0 = w.0.max(*l);
            w.1 += 1;
        }
        for (w, (max, n)) in windows {
            if max > Duration::from_millis(5) {
                eprintln!(
                    "  t={:>5} ms: max {:>6.2} ms over {n}",
                    w * 100,
                    max.as_secs_f64() * 1000.0
                );
            }
        }
    }

    /// The live feed at half of sluice's measured rate: the hand-written
    /// consumer, then sluice as shipped.
    async fn live(js: &jetstream::Context, client: &async_nats::Client, shipped: &str, per_sec: f64) {
        let count = ((per_sec * 3.0) as usize).max(1000);
        println!("\nJetStream fed live at {per_sec:.0} orders/s (half of sluice's median), {count} orders: publish -> enriched event");
        println!("{:<20} {:>9} {:>9} {:>9}", "consumer", "p50 ms", "p99 ms", "p99.9 ms");
        let tag = format!("l{}", std::process::id());
        let row = |name: &str, l: &[u64]| {
            println!(
                "{name:<20} {:>9.2} {:>9.2} {:>9.2}",
                percentile(l, 0.5),
                percentile(l, 0.99),
                percentile(l, 0.999)
            );
        };
        fresh_streams(js).await;
        let stop = tokio_util::sync::CancellationToken::new();
        let consumer = tokio::spawn(hand_written(js.clone(), stop.clone()));
        let l = fed(js, client, &format!("{tag}h"), per_sec, count, || {}).await;
        stop.cancel();
        let _ = consumer.await;
        row("hand-written", &l);
        fresh_streams(js).await;
        let mut daemon = Daemon::start(shipped, &[("NATS_URL", nats_url())]);
        let l = fed(js, client, &format!("{tag}s"), per_sec, count, || daemon.check_alive()).await;
        drop(daemon);
        row("sluice (as shipped)", &l);
        println!("bar: p99 <= 10 ms end to end");
    }

    /// 1, 2 and 3 replicas of the shipped config sharing the `nats-kv`
    /// store and one durable consumer, started first; the orders are
    /// published while they run (on one machine: the cost of coordination,
    /// not scaling).
    pub async fn replicas(n: usize) {
        let Ok(client) = async_nats::connect(nats_url()).await else {
            return;
        };
        let js = jetstream::new(client.clone());
        let shipped = shipped_config("nats.toml");
        let config = edited(&shipped, "lease = \"90s\"\n", "lease = \"90s\"\nstore = \"nats-kv\"\n");
        let mut table = Table::start("JetStream, replicas sharing the nats-kv store", n);
        for round in 0..rounds() {
            for k in 1..=3 {
                fresh_streams(&js).await;
                let mut daemons: Vec<Daemon> = (0..k)
                    .map(|_| Daemon::start(&config, &[("NATS_URL", nats_url())]))
                    .collect();
                for d in &mut daemons {
                    d.ready().await;
                }
                let mut out = client.subscribe("enriched.orders.>").await.expect("subscribe");
                client.flush().await.expect("flush");
                let feed = {
                    let (js, tag) = (js.clone(), format!("rep{}r{round}k{k}", std::process::id()));
                    tokio::spawn(async move { backlog(&js, &tag, n).await })
                };
                let took = drained(&mut out, n, || daemons.iter_mut().for_each(Daemon::check_alive)).await;
                feed.await.expect("feed");
                table.row(&format!("{k} replica{}", if k > 1 { "s" } else { "" }), rate(n, took));
            }
        }
        table.print();
        println!("(one 2-core machine: more replicas share the same cores)");
    }

    pub async fn run(n: usize) {
        let client = match async_nats::connect(nats_url()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("JetStream scenario skipped: {e}");
                return;
            }
        };
        let js = jetstream::new(client.clone());
        let shipped = shipped_config("nats.toml");
        // Only the live feed, at a given rate (orders/s): for tuning.
        if let Some(per_sec) = std::env::var("SLUICE_BENCH_LIVE_RATE")
            .ok()
            .and_then(|r| r.parse().ok())
        {
            live(&js, &client, &shipped, per_sec).await;
            return;
        }
        let mut table = Table::start("JetStream", n);
        for round in 0..rounds() {
            let tag = format!("s{}r{round}", std::process::id());

            fresh_streams(&js).await;
            backlog(&js, &format!("{tag}h"), n).await;
            let mut out = client.subscribe("enriched.orders.>").await.expect("subscribe");
            client.flush().await.expect("flush");
            let stop = tokio_util::sync::CancellationToken::new();
            let consumer = tokio::spawn(hand_written(js.clone(), stop.clone()));
            let took = drained(&mut out, n, || {}).await;
            stop.cancel();
            let _ = consumer.await;
            table.row("hand-written", rate(n, took));

            let mut rows = variants(&shipped, "key = \"header:Idempotency-Key\"\n", BATCH);
            rows.extend(shared_stores(&shipped));
            for (i, (name, config)) in rows.into_iter().enumerate() {
                fresh_streams(&js).await;
                backlog(&js, &format!("{tag}v{i}"), n).await;
                let mut out = client.subscribe("enriched.orders.>").await.expect("subscribe");
                client.flush().await.expect("flush");
                let mut daemon = Daemon::start(&config, &[("NATS_URL", nats_url())]);
                let took = drained(&mut out, n, || daemon.check_alive()).await;
                if let Some(mean) = daemon.mean_batch("orders") {
                    eprintln!("{name}: {mean:.1} messages per batch on average");
                }
                drop(daemon);
                table.row(name, rate(n, took));
            }
        }
        let medians = table.print();
        if let Some((_, rate)) = medians.iter().find(|(name, _)| name == "sluice file") {
            live(&js, &client, &shipped, rate / 2.0).await;
        }
    }
}

mod rabbitmq_scenario {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
        ConfirmSelectOptions, QueuePurgeOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    /// As `config/rabbitmq.toml` declares them.
    const EXCHANGE: &str = "events";
    const INPUT: &str = "order-notifications";
    const OUTPUT: &str = "enriched-orders";
    /// The shipped route's prefetch.
    const PREFETCH: u16 = 16;

    fn url() -> String {
        std::env::var("SLUICE_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
    }

    async fn confirm_channel(conn: &Connection) -> Channel {
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        ch
    }

    async fn purge(ch: &Channel) {
        for q in [INPUT, OUTPUT] {
            ch.queue_purge(q.into(), QueuePurgeOptions::default())
                .await
                .expect("purge (the daemon declared the queues)");
        }
    }

    async fn backlog(ch: &Channel, tag: &str, n: usize) {
        let mut confirms = Vec::with_capacity(1000);
        for i in 0..n {
            let (payload, key) = order(tag, i);
            let mut headers = FieldTable::default();
            headers.insert(
                ShortString::from("Idempotency-Key"),
                AMQPValue::LongString(LongString::from(key.into_bytes())),
            );
            confirms.push(
                ch.basic_publish(
                    EXCHANGE.into(),
                    "order.created".into(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2).with_headers(headers),
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

    /// Waits for `n` enriched events on the output queue; first to last.
    async fn drained(conn: &Connection, n: usize, alive: impl FnMut()) -> Duration {
        let ch = conn.create_channel().await.expect("channel");
        let mut out = ch
            .basic_consume(
                OUTPUT.into(),
                "scenario-count".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume output");
        let took = first_to_last(&mut out, n, Result::is_ok, alive).await;
        let _ = ch.close(200, "done".into()).await;
        took
    }

    /// What a user writes with lapin: consume with the shipped prefetch,
    /// four deliveries at once; per delivery, the order-processor's work, a
    /// persistent publish awaited for its publisher confirm, then `ack`.
    async fn hand_written(conn: Connection, stop: tokio_util::sync::CancellationToken) {
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await.expect("qos");
        let publisher = confirm_channel(&conn).await;
        let consumer = ch
            .basic_consume(
                INPUT.into(),
                "hand-written".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let work = consumer.for_each_concurrent(CONCURRENCY, |d| {
            let publisher = publisher.clone();
            async move {
                let Ok(d) = d else { return };
                let id = d.delivery_tag.to_string();
                let attempt = if d.redelivered { 2 } else { 1 };
                match enrich(&d.data, d.routing_key.as_str(), &id, attempt) {
                    Ok((subject, payload)) => {
                        let confirmed = match publisher
                            .basic_publish(
                                EXCHANGE.into(),
                                subject.as_str().into(),
                                BasicPublishOptions::default(),
                                &payload,
                                BasicProperties::default().with_delivery_mode(2),
                            )
                            .await
                        {
                            Ok(confirm) => confirm.await.is_ok_and(|c| c.is_ack()),
                            Err(_) => false,
                        };
                        if confirmed {
                            let _ = d.acker.ack(BasicAckOptions::default()).await;
                        }
                    }
                    Err(_) => {
                        let _ = d.acker.reject(BasicRejectOptions { requeue: false }).await;
                    }
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = stop.cancelled() => {}
        }
        let _ = ch.close(200, "done".into()).await;
    }

    pub async fn run(n: usize) {
        let conn = match Connection::connect(&url(), ConnectionProperties::default()).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("RabbitMQ scenario skipped: {e}");
                return;
            }
        };
        let shipped = shipped_config("rabbitmq.toml");
        let env = [("AMQP_URL", url())];
        // The daemon declares the shipped topology; the hand-written
        // consumer uses it as it is.
        {
            let mut daemon = Daemon::start(&shipped, &env);
            let started = Instant::now();
            while ureq::get(&format!("http://{}/readyz", daemon.admin)).call().is_err() {
                daemon.check_alive();
                assert!(started.elapsed() < STALL, "sluice not ready:\n{}", daemon.log());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let ch = confirm_channel(&conn).await;
        let mut table = Table::start("RabbitMQ", n);
        for round in 0..rounds() {
            let tag = format!("r{}r{round}", std::process::id());

            purge(&ch).await;
            backlog(&ch, &format!("{tag}h"), n).await;
            let stop = tokio_util::sync::CancellationToken::new();
            let worker_conn = Connection::connect(&url(), ConnectionProperties::default())
                .await
                .expect("connect");
            let consumer = tokio::spawn(hand_written(worker_conn, stop.clone()));
            let took = drained(&conn, n, || {}).await;
            stop.cancel();
            let _ = consumer.await;
            table.row("hand-written", rate(n, took));

            let gate = "key = \"header:Idempotency-Key\"\n";
            let variants = vec![
                ("sluice file", shipped.clone()),
                (
                    "sluice memory",
                    edited(&shipped, gate, &format!("{gate}store = \"memory\"\n")),
                ),
                ("sluice no gate", edited(&shipped, gate, "key = \"none\"\n")),
                ("sluice file 1/call", edited(&shipped, BATCH, "")),
            ];
            for (i, (name, config)) in variants.into_iter().enumerate() {
                purge(&ch).await;
                backlog(&ch, &format!("{tag}v{i}"), n).await;
                let mut daemon = Daemon::start(&config, &env);
                let took = drained(&conn, n, || daemon.check_alive()).await;
                drop(daemon);
                table.row(name, rate(n, took));
            }
        }
        table.print();
    }
}

mod kafka_scenario {
    use super::*;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
    use rdkafka::message::{Header as KafkaHeader, Message as _, OwnedHeaders};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

    /// As `config/kafka.toml` declares it.
    const INPUT: &str = "orders";
    const PARTITIONS: i32 = 3;
    const OUTPUT: &str = "enriched.orders.created";
    /// The shipped route's concurrency.
    const KAFKA_CONCURRENCY: usize = 8;

    fn producer(brokers: &str) -> FutureProducer {
        // As sluice's producer: idempotent, every replica's ack.
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("log_level", "3")
            .create()
            .expect("producer")
    }

    async fn backlog(producer: &FutureProducer, input: &str, tag: &str, n: usize) {
        let mut pending = Vec::with_capacity(2000);
        for i in 0..n {
            let (payload, key) = order(tag, i);
            let headers = OwnedHeaders::new().insert(KafkaHeader {
                key: "Idempotency-Key",
                value: Some(key.as_str()),
            });
            pending.push(
                producer
                    .send_result(FutureRecord::to(input).key(&key).payload(&payload).headers(headers))
                    .expect("queue"),
            );
            if pending.len() == 2000 || i + 1 == n {
                for p in pending.drain(..) {
                    let _ = p.await.expect("delivery").map_err(|(e, _)| panic!("produce: {e}"));
                }
            }
        }
    }

    /// Records in the output topic (the sum of its high watermarks).
    fn produced(producer: &FutureProducer) -> i64 {
        let client = producer.client();
        let Ok(meta) = client.fetch_metadata(Some(OUTPUT), Duration::from_secs(5)) else {
            return 0;
        };
        meta.topics()
            .iter()
            .flat_map(|t| t.partitions())
            .filter_map(|p| client.fetch_watermarks(OUTPUT, p.id(), Duration::from_secs(5)).ok())
            .map(|(_, high)| high)
            .sum()
    }

    /// Waits for `n` records in the output topic beyond the `base` it held
    /// before; first to last.
    async fn drained(producer: &FutureProducer, base: i64, n: usize, mut alive: impl FnMut()) -> Duration {
        let (mut first, mut last) = (None, (0, Instant::now()));
        loop {
            let seen = usize::try_from(produced(producer) - base).unwrap_or(0);
            if seen > 0 {
                first.get_or_insert_with(Instant::now);
            }
            if seen >= n {
                return first.map_or(Duration::ZERO, |f| f.elapsed());
            }
            if seen != last.0 {
                last = (seen, Instant::now());
            }
            alive();
            assert!(last.1.elapsed() < STALL, "stuck at {seen} of {n} outputs");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// What a user writes with rdkafka: a `StreamConsumer`, the shipped
    /// route's concurrency (records of all partitions at once, no ordering
    /// kept); per record, the order-processor's work, a produce awaited for
    /// its delivery report, then `commit_message` (async). (Commits of one
    /// partition can then go out of order: a crash may skip a record. sluice
    /// commits only what is settled below every pending record.)
    async fn hand_written(
        brokers: String,
        input: String,
        group: String,
        at_once: usize,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("log_level", "3")
            .create()
            .expect("consumer");
        consumer.subscribe(&[input.as_str()]).expect("subscribe");
        let producer = producer(&brokers);
        let work = consumer.stream().for_each_concurrent(at_once, |m| {
            let (producer, consumer) = (&producer, &consumer);
            async move {
                let Ok(m) = m else { return };
                let id = format!("{}-{}", m.partition(), m.offset());
                let enriched = enrich(m.payload().unwrap_or_default(), m.topic(), &id, 1);
                let done = match enriched {
                    Ok((subject, payload)) => {
                        let record = FutureRecord::to(&subject)
                            .key(m.key().unwrap_or_default())
                            .payload(&payload);
                        producer.send(record, Duration::from_secs(30)).await.is_ok()
                    }
                    // Malformed: skipped (a real loop would dead-letter it).
                    Err(_) => true,
                };
                if done {
                    let _ = consumer.commit_message(&m, CommitMode::Async);
                }
            }
        });
        tokio::select! {
            _ = work => {}
            _ = stop.cancelled() => {}
        }
    }

    /// The hand-written consumer on `input` until `n` outputs past `base`
    /// came out; first to last.
    async fn hand_written_drains(
        brokers: &str,
        input: &str,
        group: &str,
        at_once: usize,
        producer: &FutureProducer,
        base: i64,
        n: usize,
    ) -> Duration {
        let stop = tokio_util::sync::CancellationToken::new();
        let consumer = tokio::spawn(hand_written(
            brokers.to_owned(),
            input.to_owned(),
            group.to_owned(),
            at_once,
            stop.clone(),
        ));
        let took = drained(producer, base, n, || {}).await;
        stop.cancel();
        let _ = consumer.await;
        took
    }

    /// One run on its own mock cluster (so no run sees another's records).
    async fn on_fresh_cluster<F, Fut>(tag: &str, n: usize, run: F) -> f64
    where
        F: FnOnce(String, FutureProducer) -> Fut,
        Fut: std::future::Future<Output = Duration>,
    {
        let mock = MockCluster::new(1).expect("mock cluster");
        mock.create_topic(INPUT, PARTITIONS, 1).expect("topic");
        mock.create_topic(OUTPUT, 1, 1).expect("topic");
        mock.create_topic("dlq.orders", 1, 1).expect("topic");
        let brokers = mock.bootstrap_servers();
        let producer = producer(&brokers);
        backlog(&producer, INPUT, tag, n).await;
        let took = run(brokers, producer).await;
        drop(mock);
        rate(n, took)
    }

    /// The shipped config with an idempotency gate on `store`.
    fn with_gate(shipped: &str, store: &str) -> String {
        let gate = "[routes.idempotency]\nkey = \"header:Idempotency-Key\"\n";
        let anchor = "[routes.retry]\n";
        // With batches, the lease must outlast a batch's deadline.
        edited(
            shipped,
            anchor,
            &format!("{gate}store = \"{store}\"\nlease = \"90s\"\n\n{anchor}"),
        )
    }

    /// The sluice rows: as shipped, with a `file` and a `memory` gate, and
    /// one message per call.
    fn sluice_rows(shipped: &str) -> [(&'static str, String); 4] {
        [
            ("sluice (as shipped)", shipped.to_owned()),
            ("sluice file", with_gate(shipped, "file")),
            ("sluice memory", with_gate(shipped, "memory")),
            ("sluice 1/call", edited(shipped, BATCH, "")),
        ]
    }

    /// The same on a real Kafka-protocol broker (`SLUICE_KAFKA_BROKERS`,
    /// default 127.0.0.1:9092, e.g. tansu; skipped when none listens).
    /// Each run reads a topic of its own; outputs are counted as the
    /// output topic's growth. At most `SLUICE_BENCH_BROKER_MESSAGES`
    /// (default 1,000) orders per run: tansu 0.6 here stopped serving a
    /// consumer (no record within 30 s) in runs of 3,000 and 10,000.
    pub async fn run_on_broker(n: usize) {
        let n = n.min(env_or("SLUICE_BENCH_BROKER_MESSAGES", 1_000));
        let brokers = std::env::var("SLUICE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
        if std::net::TcpStream::connect(&brokers).is_err() {
            eprintln!("no Kafka broker at {brokers}: the broker table is left out");
            return;
        }
        let admin: sluice::brokers::kafka::KafkaConfig =
            toml::from_str(&format!("brokers = \"{brokers}\"")).expect("config");
        let topic = |name: &str, partitions: i32| sluice::brokers::kafka::TopicConfig {
            name: name.into(),
            partitions,
            replication_factor: 1,
            config: Default::default(),
        };
        sluice::brokers::kafka::admin::create_topics(&admin, &[topic(OUTPUT, 1), topic("dlq.orders", 1)])
            .await
            .expect("topics");
        let producer = producer(&brokers);
        let shipped = shipped_config("kafka.toml");
        let mut table = Table::start(&format!("Kafka ({brokers})"), n);
        for round in 0..rounds() {
            let tag = format!("k{}r{round}", std::process::id());
            let mut runs: Vec<(&str, Option<String>)> = vec![("hand-written", None), ("hand-written x256", None)];
            for (name, config) in sluice_rows(&shipped) {
                runs.push((name, Some(config)));
            }
            for (i, (name, config)) in runs.into_iter().enumerate() {
                let input = format!("orders-{tag}-{i}");
                sluice::brokers::kafka::admin::create_topics(&admin, &[topic(&input, PARTITIONS)])
                    .await
                    .expect("input topic");
                backlog(&producer, &input, &format!("{tag}v{i}"), n).await;
                let base = produced(&producer);
                let took = match config {
                    None => {
                        let at_once = if name.ends_with("x256") { 256 } else { KAFKA_CONCURRENCY };
                        let group = format!("hand-{input}");
                        hand_written_drains(&brokers, &input, &group, at_once, &producer, base, n).await
                    }
                    Some(config) => {
                        let config = edited(&config, "name = \"orders\"\n", &format!("name = \"{input}\"\n"));
                        let config = edited(
                            &config,
                            "topics = [\"orders\"], group = \"sluice-orders\"",
                            &format!("topics = [\"{input}\"], group = \"sluice-{input}\""),
                        );
                        let mut daemon = Daemon::start(&config, &[("KAFKA_BROKERS", brokers.clone())]);
                        drained(&producer, base, n, || daemon.check_alive()).await
                    }
                };
                table.row(name, rate(n, took));
            }
        }
        table.print();
    }

    /// 1, 2 and 3 replicas of the shipped config in one consumer group on
    /// a mock cluster; the orders are produced once every replica holds
    /// partitions (3 partitions).
    pub async fn replicas(n: usize) {
        let shipped = shipped_config("kafka.toml");
        let mut table = Table::start("Kafka (rdkafka MockCluster), replicas in one group", n);
        for round in 0..rounds() {
            for k in 1..=3 {
                let tag = format!("krep{}r{round}k{k}", std::process::id());
                let mock = MockCluster::new(1).expect("mock cluster");
                mock.create_topic(INPUT, PARTITIONS, 1).expect("topic");
                mock.create_topic(OUTPUT, 1, 1).expect("topic");
                mock.create_topic("dlq.orders", 1, 1).expect("topic");
                let brokers = mock.bootstrap_servers();
                let producer = producer(&brokers);
                let mut daemons: Vec<Daemon> = (0..k)
                    .map(|_| Daemon::start(&shipped, &[("KAFKA_BROKERS", brokers.clone())]))
                    .collect();
                let joined = Instant::now();
                loop {
                    daemons.iter_mut().for_each(Daemon::check_alive);
                    let held: f64 = daemons
                        .iter()
                        .map(|d| d.metric("sluice_route_partitions", "orders").unwrap_or(0.0))
                        .sum();
                    let everyone = daemons
                        .iter()
                        .all(|d| d.metric("sluice_route_partitions", "orders").unwrap_or(0.0) > 0.0);
                    if everyone && held >= f64::from(PARTITIONS) {
                        break;
                    }
                    assert!(joined.elapsed() < Duration::from_secs(120), "the group never settled");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                backlog(&producer, INPUT, &tag, n).await;
                let took = drained(&producer, 0, n, || daemons.iter_mut().for_each(Daemon::check_alive)).await;
                drop(daemons);
                drop(mock);
                table.row(&format!("{k} replica{}", if k > 1 { "s" } else { "" }), rate(n, took));
            }
        }
        table.print();
        println!("(one 2-core machine; the first output may come while the backlog is still being produced)");
    }

    pub async fn run(n: usize) {
        let shipped = shipped_config("kafka.toml");
        let mut table = Table::start("Kafka (rdkafka MockCluster)", n);
        for round in 0..rounds() {
            let tag = format!("k{}r{round}", std::process::id());
            // With the route's concurrency, and with many more records in
            // flight (each produce waits out `linger.ms`).
            for (name, at_once) in [("hand-written", KAFKA_CONCURRENCY), ("hand-written x256", 256)] {
                let r = on_fresh_cluster(&format!("{tag}h{at_once}"), n, |brokers, producer| async move {
                    hand_written_drains(&brokers, INPUT, "hand-written", at_once, &producer, 0, n).await
                })
                .await;
                table.row(name, r);
            }
            for (i, (name, config)) in sluice_rows(&shipped).into_iter().enumerate() {
                let r = on_fresh_cluster(&format!("{tag}v{i}"), n, |brokers, producer| async move {
                    let mut daemon = Daemon::start(&config, &[("KAFKA_BROKERS", brokers)]);
                    drained(&producer, 0, n, || daemon.check_alive()).await
                })
                .await;
                table.row(name, r);
            }
        }

        table.print();
        println!("(the shipped Kafka config has no idempotency gate; the file and memory rows add one)");
    }
}

mod embedded_scenario {
    use super::*;

    /// The `i`..`j` orders of run `tag` as an NDJSON body for `POST /v1/publish`.
    fn ndjson(tag: &str, range: std::ops::Range<usize>) -> String {
        let mut body = String::new();
        for i in range {
            let (payload, key) = order(tag, i);
            let line = serde_json::json!({
                "subject": "orders.created",
                "headers": [{"name": "Idempotency-Key", "value": key}],
                "payload": String::from_utf8(payload).expect("utf-8"),
            });
            body.push_str(&line.to_string());
            body.push('\n');
        }
        body
    }

    fn get(url: &str) -> Option<serde_json::Value> {
        let text = ureq::get(url).call().ok()?.body_mut().read_to_string().ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Messages stored in the `enriched` queue.
    fn enriched(admin: &str) -> usize {
        get(&format!("http://{admin}/v1/queues"))
            .and_then(|q| {
                q.as_array()?
                    .iter()
                    .find(|q| q["name"] == "enriched")
                    .and_then(|q| q["messages"].as_u64())
            })
            .map_or(0, |n| n as usize)
    }

    /// The daemon on the shipped `config/sluice.toml` (and its variants):
    /// orders published over HTTP in commits of 1,000, until all N enriched
    /// events are stored. Timed from the first publish.
    pub async fn run(n: usize) -> Vec<(String, f64)> {
        let shipped = shipped_config("sluice.toml");
        let mut table = Table::start("embedded (published over HTTP in commits of 1,000)", n);
        let variants = variants(&shipped, "key = \"header:Idempotency-Key\"\n", BATCH);
        for round in 0..rounds() {
            let tag = format!("e{}r{round}", std::process::id());
            for (i, (name, config)) in variants.iter().enumerate() {
                let mut daemon = Daemon::start(config, &[]);
                let admin = daemon.admin.clone();
                let ready = Instant::now();
                while ureq::get(&format!("http://{admin}/readyz")).call().is_err() {
                    daemon.check_alive();
                    assert!(ready.elapsed() < STALL, "sluice not ready:\n{}", daemon.log());
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let run_tag = format!("{tag}v{i}");
                let started = Instant::now();
                let publisher = {
                    let (admin, run_tag) = (admin.clone(), run_tag.clone());
                    tokio::task::spawn_blocking(move || {
                        for from in (0..n).step_by(1000) {
                            ureq::post(&format!("http://{admin}/v1/publish"))
                                .header("Content-Type", "application/x-ndjson")
                                .send(ndjson(&run_tag, from..(from + 1000).min(n)))
                                .expect("publish");
                        }
                    })
                };
                let mut last = (0, Instant::now());
                loop {
                    let seen = enriched(&admin);
                    if seen >= n {
                        break;
                    }
                    if seen != last.0 {
                        last = (seen, Instant::now());
                    }
                    daemon.check_alive();
                    assert!(last.1.elapsed() < STALL, "stuck at {seen} of {n}:\n{}", daemon.log());
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let took = started.elapsed();
                publisher.await.expect("publisher");
                drop(daemon);
                let r = rate(n, took);
                table.row(name, r);
            }
        }
        let medians = table.print();
        println!("bar: >= 5,000 msg/s with the shipped config");
        medians
    }
}

fn main() {
    if !plugin_file("order_processor.wasm").is_file() {
        eprintln!("order_processor.wasm is missing: run `cargo xtask plugins`");
        std::process::exit(2);
    }
    let n: usize = env_or("SLUICE_BENCH_MESSAGES", 10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let only = std::env::var("SLUICE_BENCH_SCENARIOS").unwrap_or_default();
        let wanted = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
        if wanted("jetstream") {
            jetstream_scenario::run(n).await;
        }
        if wanted("rabbitmq") {
            rabbitmq_scenario::run(n).await;
        }
        if wanted("kafka") {
            kafka_scenario::run(n).await;
        }
        if wanted("kafka-broker") {
            kafka_scenario::run_on_broker(n).await;
        }
        if wanted("replicas") {
            jetstream_scenario::replicas(n).await;
            kafka_scenario::replicas(n).await;
        }
        if wanted("embedded") {
            embedded_scenario::run(n).await;
        }
    });
}
