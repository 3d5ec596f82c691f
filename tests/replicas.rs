//! Several replicas of one config against one broker, sharing an
//! idempotency store, as a Deployment runs them: one SIGKILLed mid-stream
//! and another SIGTERMed, every message is handled and each effect stored
//! once. Effects are counted downstream, in a JetStream stream that keeps
//! one message per dedup id, and on a plain subscription that sees every
//! publish (duplicates included). Real brokers: nats-server with
//! JetStream, RabbitMQ, Redis.

use async_nats::jetstream;
use sluice_tests::daemon::Daemon;
use sluice_tests::nats::{self, Collected};
use sluice_tests::rabbit::{self, Rabbit};
use sluice_tests::{plugin, unique};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const N: usize = 10_000;
/// The keys fed twice (a producer's retry): 1,000 copies only the shared
/// store can recognise, far more than the publishes allowed beyond `N`.
const COPIED_EVERY: usize = 10;
const REPLICAS: usize = 3;
/// From the SIGKILL to the last effect stored: the dead replica's messages
/// come back after `ack_wait` (JetStream) or at once (RabbitMQ), wait out
/// its leases (`lease`, 3 s), then run on a survivor. Stated generously
/// for a loaded 2-core CI machine.
const TAKEOVER: Duration = Duration::from_secs(90);

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The effects of a run: a stream keeping one message per dedup id, and a
/// subscription that sees every publish.
struct Effects {
    stream: String,
    subject: String,
    collected: Collected,
}

impl Effects {
    fn new(rt: &tokio::runtime::Runtime, id: &str) -> Self {
        let subject = format!("{id}.effects");
        Self {
            stream: format!("EFFECTS_{id}"),
            collected: Collected::subscribe(rt, &subject),
            subject,
        }
    }

    /// The `[brokers.nats]` table the replicas publish their effects with.
    fn nats_table(&self) -> String {
        format!(
            "[brokers.nats]\nurl = \"{}\"\n{}",
            nats::url(),
            nats::stream_block(&self.stream, &self.subject)
        )
    }

    /// The record fixture publishing each payload to the effects subject.
    fn plugin_table(&self) -> String {
        format!(
            "[plugins.p]\npath = \"{}\"\nisolation = \"reuse\"\ntimeout = \"1s\"\npublish = [\"{s}\"]\nconfig = {{ to = \"{s}\", wait_ms = 2 }}\n",
            plugin("fixture_record").display(),
            s = self.subject
        )
    }

    fn stored(&self, rt: &tokio::runtime::Runtime) -> u64 {
        rt.block_on(nats::stored(&self.stream))
    }
}

/// The `N` keys `key(i)` in order, every [`COPIED_EVERY`]th one twice in a
/// row (the copy is another broker message with the same key).
fn keys_with_copies(key: impl Fn(usize) -> String) -> impl Iterator<Item = String> {
    (0..N).flat_map(move |i| {
        let k = key(i);
        let copies = if i % COPIED_EVERY == 0 { 2 } else { 1 };
        std::iter::repeat_n(k, copies)
    })
}

/// `config(i)` for replica `i`: each names itself.
fn replica_config(i: usize, config: &str) -> String {
    format!("instance_id = \"replica-{i}\"\n{config}")
}

/// Starts the replicas (`configs[i]` for replica `i`) on a prefilled input;
/// SIGKILLs replica 0 after a fifth of the effects and SIGTERMs replica 1
/// after half; checks that the rest is handled, each effect stored once.
fn three_replicas(rt: &tokio::runtime::Runtime, configs: &[String], effects: &Effects, route: &str) {
    let dirs: Vec<tempfile::TempDir> = (0..REPLICAS).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut replicas: Vec<Daemon> = dirs
        .iter()
        .zip(configs)
        .enumerate()
        .map(|(i, (dir, config))| Daemon::start(dir.path(), &replica_config(i, config)))
        .collect();
    let stored = || effects.stored(rt);
    replicas[2].wait_for("a fifth handled", Duration::from_secs(120), || {
        stored() >= (N / 5) as u64
    });
    replicas[0].kill();
    let killed_at = Instant::now();
    let at_kill = stored();
    replicas[2].wait_for("half handled", Duration::from_secs(120), || stored() >= (N / 2) as u64);
    let status = replicas[1].terminate();
    assert!(status.success(), "SIGTERM: {status}\n{}", replicas[1].log());
    let at_term = stored();
    replicas[2].wait_for("every effect stored", TAKEOVER, || stored() >= N as u64);
    let took_over = killed_at.elapsed();
    // Nothing left unsettled at the broker, as the survivor reports it.
    let lag = format!("sluice_route_lag{{route=\"{route}\"}}");
    replicas[2].wait_for("the lag back to 0", Duration::from_secs(30), || {
        replicas[2].metric_present(&lag) == Some(0.0)
    });
    let all = effects.collected.all();
    eprintln!(
        "{route}: killed at {at_kill}, stopped at {at_term}, all stored {took_over:?} after the kill, {} publishes",
        all.len()
    );
    assert!(
        at_kill < N as u64 && at_term < N as u64,
        "killed too late to prove anything"
    );
    assert!(took_over < TAKEOVER, "the survivors took {took_over:?}");
    assert_eq!(stored(), N as u64, "each effect stored once");
    let keys: BTreeSet<&str> = all.iter().map(|(payload, _)| payload.as_str()).collect();
    let ids: BTreeSet<&str> = all.iter().filter_map(|(_, id)| id.as_deref()).collect();
    assert_eq!(keys.len(), N, "every message handled");
    assert_eq!(ids.len(), N, "one dedup id per effect, whichever replica ran it");
    // Run twice only where the killed replica published and died before its
    // completion reached the store: at most what it had in flight (4
    // workers, 256 trailing acks). Every other duplicate delivery, and the
    // 1,000 copies the producer sent, were recognised by the shared store.
    assert!(
        all.len() <= N + 4 + 256,
        "{} publishes for {N} messages and {} copies",
        all.len(),
        N / COPIED_EVERY
    );
    // Each replica named itself in its leases.
    for (i, r) in replicas.iter().enumerate().skip(2) {
        let info = format!("sluice_instance_info{{instance_id=\"replica-{i}\",");
        assert!(r.metrics().contains(&info), "{}", r.metrics());
    }
}

/// A JetStream route sharing one durable consumer and a `nats-kv` bucket of
/// its own, as its tests configure, feed and remove it.
struct KvRoute {
    id: String,
    input: String,
    bucket: String,
}

impl KvRoute {
    fn new(id: &str) -> Self {
        Self {
            id: id.to_owned(),
            input: format!("IN_{id}"),
            bucket: format!("idem_{id}"),
        }
    }

    /// The config: the effects' NATS table, `plugin`, and the route `orders`
    /// with `ack_wait`, `lease` and the `extra` route lines.
    fn config(&self, effects: &Effects, plugin: &str, ack_wait: &str, lease: &str, extra: &str) -> String {
        let (id, input, bucket) = (&self.id, &self.input, &self.bucket);
        format!(
            r#"{nats}
[[brokers.nats.streams]]
name = "{input}"
subjects = ["{id}.in.>", "{id}.dlq"]
[stores]
nats_kv_bucket = "{bucket}"
{plugin}
[[routes]]
name = "orders"
plugin = "p"
source = {{ broker = "jetstream", stream = "{input}", subject = "{id}.in.>", consumer = "shared", ack_wait = "{ack_wait}" }}
dead_letter = {{ subject = "{id}.dlq" }}
{extra}
[routes.idempotency]
key = "header:Idempotency-Key"
lease = "{lease}"
store = "nats-kv"
"#,
            nats = effects.nats_table(),
        )
    }

    /// Publishes each key as a message's payload and `Idempotency-Key`,
    /// waiting for the PubAcks in chunks (the client bounds those pending).
    fn publish(&self, rt: &tokio::runtime::Runtime, keys: impl Iterator<Item = String>) {
        rt.block_on(async {
            let js = jetstream::new(async_nats::connect(nats::url()).await.unwrap());
            let mut acks = Vec::with_capacity(1000);
            for (i, key) in keys.enumerate() {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Idempotency-Key", key.as_str());
                acks.push(
                    js.publish_with_headers(format!("{}.in.{}", self.id, i % 10), headers, key.into())
                        .await
                        .unwrap(),
                );
                if acks.len() == 1000 {
                    for a in acks.drain(..) {
                        a.await.unwrap();
                    }
                }
            }
            for a in acks {
                a.await.unwrap();
            }
        });
    }

    /// Removes the input, the effects and the bucket.
    fn delete(&self, rt: &tokio::runtime::Runtime, effects: &Effects) {
        rt.block_on(async {
            let js = jetstream::new(async_nats::connect(nats::url()).await.unwrap());
            for s in [
                self.input.as_str(),
                effects.stream.as_str(),
                &format!("KV_{}", self.bucket),
            ] {
                let _ = js.delete_stream(s).await;
            }
        });
    }
}

#[test]
fn three_jetstream_replicas_sharing_nats_kv_lose_nothing_when_one_is_killed_and_one_stopped() {
    let id = unique();
    let rt = rt();
    let effects = Effects::new(&rt, &id);
    let route = KvRoute::new(&id);
    let config = route.config(&effects, &effects.plugin_table(), "2s", "3s", "concurrency = 4");
    // Started once to declare the streams and the shared consumer, then
    // stopped: all N wait, so the kill lands mid-stream.
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(dir.path(), &config);
    assert!(first.terminate().success());
    route.publish(&rt, keys_with_copies(|i| format!("k-{i}")));
    three_replicas(&rt, &[config.clone(), config.clone(), config], &effects, "orders");
    route.delete(&rt, &effects);
}

#[test]
fn three_rabbitmq_replicas_sharing_redis_lose_nothing_when_one_is_killed_and_one_stopped() {
    let id = unique();
    let rt = rt();
    let effects = Effects::new(&rt, &id);
    let redis = std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let config = format!(
        r#"{nats}
[brokers.rabbitmq]
url = "{amqp}"
publish_exchange = "ex-{id}"
[[brokers.rabbitmq.exchanges]]
name = "ex-{id}"
kind = "topic"
[[brokers.rabbitmq.queues]]
name = "work-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "in.#" }}]
[stores]
redis_url = "{redis}"
{plugin}
[[routes]]
name = "orders"
plugin = "p"
source = {{ broker = "rabbitmq", queue = "work-{id}", prefetch = 32 }}
publish_broker = "nats"
dead_letter = {{ subject = "dlq-{id}" }}
concurrency = 4
[routes.idempotency]
key = "header:Idempotency-Key"
lease = "3s"
store = "redis"
"#,
        nats = effects.nats_table(),
        amqp = rabbit::url(),
        plugin = effects.plugin_table(),
    );
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(dir.path(), &config);
    assert!(first.terminate().success());
    let rabbit = rt.block_on(Rabbit::connect());
    rt.block_on(async {
        // Keys of this run only: Redis outlives the test.
        for key in keys_with_copies(|i| format!("{id}-k-{i}")) {
            rabbit
                .publish(
                    &format!("ex-{id}"),
                    "in.x",
                    &[("Idempotency-Key", &key)],
                    key.as_bytes(),
                )
                .await;
        }
    });
    three_replicas(&rt, &[config.clone(), config.clone(), config], &effects, "orders");
    rt.block_on(nats::delete_stream(&effects.stream));
    rt.block_on(rabbit.delete(&[&format!("work-{id}"), &format!("dlq-{id}")], &[&format!("ex-{id}")]));
}

/// Short sessions, so a killed member is expired within seconds, and the
/// incremental (cooperative) rebalance protocol: members keep their
/// partitions while others join or leave.
const GROUP_SETTINGS: &str = r#"[brokers.kafka.librdkafka]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
"partition.assignment.strategy" = "cooperative-sticky"
"#;

/// More replicas than partitions: the one left without a partition says so
/// after a session timeout and reports 0 partitions, and takes the
/// partition over when the other leaves. (librdkafka's mock cluster, as
/// below.)
#[test]
fn a_kafka_replica_holding_no_partition_says_so_and_takes_over_when_the_other_leaves() {
    let id = unique();
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    mock.create_topic(&format!("in-{id}"), 1, 1).unwrap();
    mock.create_topic(&format!("dlq-{id}"), 1, 1).unwrap();
    let config = format!(
        r#"[brokers.kafka]
brokers = "{brokers}"
{GROUP_SETTINGS}
[plugins.p]
path = "{wasm}"
[[routes]]
name = "orders"
plugin = "p"
source = {{ broker = "kafka", topics = ["in-{id}"], group = "g-{id}" }}
dead_letter = {{ subject = "dlq-{id}" }}
"#,
        wasm = plugin("noop").display(),
    );
    let partitions = "sluice_route_partitions{route=\"orders\"}";
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Daemon::start(dir_a.path(), &replica_config(0, &config));
    a.wait_for("replica 0 holding the partition", Duration::from_secs(60), || {
        a.metric_present(partitions) == Some(1.0)
    });
    let b = Daemon::start(dir_b.path(), &replica_config(1, &config));
    b.wait_for("replica 1 saying it is idle", Duration::from_secs(60), || {
        b.log()
            .contains("held no partition for longer than the session timeout")
    });
    assert_eq!(b.metric_present(partitions), Some(0.0));
    assert_eq!(a.metric_present(partitions), Some(1.0), "the holder kept it");
    assert!(a.terminate().success());
    b.wait_for("replica 1 taking the partition over", Duration::from_secs(60), || {
        b.metric_present(partitions) == Some(1.0) && b.log().contains("holds partitions again")
    });
    drop(mock);
}

/// Kafka: three members of one consumer group, the killed one expired by
/// the group coordinator after `session.timeout.ms` and its partitions
/// handed to the survivors, as real Kafka does. The broker is librdkafka's
/// mock cluster, in this process, over real sockets: tansu, the test
/// broker, never expires a member killed without leaving, and with three
/// members its coordinator stops answering after the kill (seen with
/// tansu 0.6), so it cannot show a takeover.
#[test]
fn three_kafka_replicas_sharing_redis_lose_nothing_when_one_is_killed_and_one_stopped() {
    let id = unique();
    let rt = rt();
    let effects = Effects::new(&rt, &id);
    let mock = rdkafka::mocking::MockCluster::new(1).unwrap();
    let brokers = mock.bootstrap_servers();
    let input = format!("in-{id}");
    mock.create_topic(&input, 3, 1).unwrap();
    // The mock cluster has no CreateTopics: the dead-letter topic too.
    mock.create_topic(&format!("dlq-{id}"), 1, 1).unwrap();
    let redis = std::env::var("SLUICE_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let records = keys_with_copies(|i| format!("{id}-k-{i}"))
        .map(|key| {
            (
                None,
                Some(key.clone()),
                vec![("Idempotency-Key".to_owned(), key.clone())],
                key,
            )
        })
        .collect();
    rt.block_on(sluice_tests::kafka::produce(
        &sluice_tests::kafka::producer(&brokers),
        &input,
        records,
    ));
    let config = || {
        format!(
            r#"{nats}
[brokers.kafka]
brokers = "{brokers}"
{group}
[stores]
redis_url = "{redis}"
{plugin}
[[routes]]
name = "orders"
plugin = "p"
source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}
publish_broker = "nats"
dead_letter = {{ subject = "dlq-{id}" }}
concurrency = 3
[routes.idempotency]
key = "header:Idempotency-Key"
lease = "3s"
store = "redis"
"#,
            nats = effects.nats_table(),
            plugin = effects.plugin_table(),
            group = GROUP_SETTINGS,
        )
    };
    three_replicas(&rt, &[config(), config(), config()], &effects, "orders");
    drop(mock);
    rt.block_on(nats::delete_stream(&effects.stream));
}

/// A replica killed while it holds a key: the copy redelivered to another
/// replica waits for the dead one's lease in the shared store, then runs.
#[test]
fn a_key_held_by_a_killed_replica_runs_on_another_once_its_lease_expires() {
    let id = unique();
    let rt = rt();
    let effects = Effects::new(&rt, &id);
    let route = KvRoute::new(&id);
    let plugin = format!(
        "[plugins.p]\npath = \"{}\"\ntimeout = \"3s\"\npublish = [\"{out}\"]\nconfig = {{ to = \"{out}\", sleep_ms = 1500 }}",
        plugin("fixture_record").display(),
        out = effects.subject
    );
    let config = route.config(&effects, &plugin, "1s", "8s", "");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = Daemon::start(dir_a.path(), &replica_config(0, &config));
    let published = Instant::now();
    route.publish(&rt, std::iter::once("held".to_owned()));
    a.wait_for("replica 0 handling it", Duration::from_secs(30), || {
        a.metric("sluice_in_flight{route=\"orders\"}") == 1.0
    });
    let b = Daemon::start(dir_b.path(), &replica_config(1, &config));
    a.kill();
    b.wait_for("the effect, from replica 1", Duration::from_secs(60), || {
        effects.stored(&rt) == 1
    });
    let handled = published.elapsed();
    // Claimed after the publish, so the lease ran to at least 8 s after it.
    assert!(
        handled >= Duration::from_secs(8),
        "ran before the lease expired: {handled:?}"
    );
    assert!(
        b.metric("sluice_messages_total{route=\"orders\",outcome=\"retry\"}") >= 1.0,
        "replica 1 never found the lease: {}",
        b.metrics()
    );
    assert_eq!(effects.collected.len(), 1, "replica 0 died before publishing");
    route.delete(&rt, &effects);
}
