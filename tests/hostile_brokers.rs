//! Attacks through real brokers: a plugin's output NATS or AMQP cannot
//! carry, a producer's reply address aimed at the server's own API, forged
//! retry and attempt headers, a Kafka header name that is not UTF-8. Each
//! message ends with a clear outcome and the consumer keeps serving.

use futures_util::StreamExt;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use sluice::brokers::embedded::{EmbeddedBroker, EmbeddedSource};
use sluice::brokers::{AckDone, BoxFuture, BrokerError, Delivery, Sink, Source};
use sluice::message::{Message, Outbound};
use sluice_tests::daemon::Daemon;
use sluice_tests::kafka::{self, Collected};
use sluice_tests::nats::url as nats_url;
use sluice_tests::rabbit::{self, Rabbit};
use sluice_tests::{metric_in, plugin, unique};
use std::sync::Arc;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The hostile plugin's table: its harmless publishes go to `ok`.
fn hostile_plugin(ok: &str) -> String {
    format!(
        "[plugins.p]\npath = \"{}\"\npublish = [\">\"]\ntimeout = \"2s\"\n[plugins.p.config]\nok = \"{ok}\"\n",
        plugin("fixture_hostile").display()
    )
}

/// The RabbitMQ route `r` of the hostile plugin on queue `work-<id>`,
/// dead letters to `dlq-<id>`.
fn rabbit_route(id: &str) -> String {
    format!(
        "[[routes]]\nname = \"r\"\nplugin = \"p\"\nsource = {{ broker = \"rabbitmq\", queue = \"work-{id}\" }}\ndead_letter = {{ subject = \"dlq-{id}\" }}\n"
    )
}

/// Reads `n` messages of a subscription (or fewer at the timeout).
async fn take(sub: &mut async_nats::Subscriber, n: usize, timeout: Duration) -> Vec<async_nats::Message> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, async {
        while out.len() < n {
            match sub.next().await {
                Some(m) => out.push(m),
                None => break,
            }
        }
    })
    .await;
    out
}

#[test]
fn nats_route_survives_bad_output_and_refuses_reply_addresses_aimed_at_the_server() {
    let id = unique();
    let stream = format!("S{id}");
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
{plugin}
[[routes]]
name = "r"
plugin = "p"
source = {{ broker = "nats", subject = "{id}.in" }}
concurrency = 2
dead_letter = {{ subject = "{id}.dlq" }}
"#,
        url = nats_url(),
        plugin = hostile_plugin(&format!("{id}.ok")),
    );
    let rt = rt();
    let client = rt.block_on(async { async_nats::connect(nats_url()).await.expect("nats-server is needed") });
    let js = rt.block_on(async { async_nats::jetstream::new(client.clone()) });
    rt.block_on(async {
        js.create_stream(async_nats::jetstream::stream::Config {
            name: stream.clone(),
            subjects: vec![format!("{id}.kept")],
            ..Default::default()
        })
        .await
        .unwrap();
    });
    let (mut dlq, mut ok) = rt.block_on(async {
        let dlq = client.subscribe(format!("{id}.dlq")).await.unwrap();
        let ok = client.subscribe(format!("{id}.ok")).await.unwrap();
        client.flush().await.unwrap();
        (dlq, ok)
    });
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    rt.block_on(async {
        // More attacks than workers: each one used to kill a worker.
        for attack in ["bad-header-name", "bad-header-name", "crlf-value", "bad-header-name"] {
            client.publish(format!("{id}.in"), attack.into()).await.unwrap();
        }
        let delete = format!("$JS.API.STREAM.DELETE.{stream}");
        client
            .publish_with_reply(format!("{id}.in"), delete, "reply".into())
            .await
            .unwrap();
        client
            .publish_with_reply(format!("{id}.in"), format!("{id}.dlq"), "reply".into())
            .await
            .unwrap();
        for _ in 0..3 {
            client.publish(format!("{id}.in"), "ok".into()).await.unwrap();
        }
        client.flush().await.unwrap();
    });
    let letters = rt.block_on(take(&mut dlq, 6, Duration::from_secs(30)));
    let oks = rt.block_on(take(&mut ok, 3, Duration::from_secs(30)));
    assert_eq!(oks.len(), 3, "the route stopped serving:\n{}", d.log());
    assert_eq!(letters.len(), 6, "{}", d.log());
    for letter in &letters {
        let h = letter.headers.as_ref().expect("headers");
        assert_eq!(
            h.get("sluice-error-kind").map(|v| v.as_str()),
            Some("invalid-publish"),
            "{letter:?}"
        );
    }
    // The stream a reply address named is still there.
    rt.block_on(async { js.get_stream(&stream).await.expect("the stream survives") });
    assert!(d.ready());
    let _ = rt.block_on(js.delete_stream(&stream));
}

#[test]
fn rabbitmq_route_refuses_an_overlong_routing_key_and_forged_attempt_counts() {
    let id = unique();
    let config = format!(
        r#"
[brokers.rabbitmq]
url = "{url}"
publish_exchange = "ex-{id}"

[[brokers.rabbitmq.exchanges]]
name = "ex-{id}"
kind = "topic"

[[brokers.rabbitmq.queues]]
name = "work-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "in.#" }}]

[[brokers.rabbitmq.queues]]
name = "ok-{id}"
bindings = [{{ exchange = "ex-{id}", routing_key = "ok.#" }}]
{plugin}
{route}[routes.retry]
max_attempts = 3
"#,
        url = rabbit::url(),
        plugin = hostile_plugin("ok.x"),
        route = rabbit_route(&id),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let exchange = format!("ex-{id}");
    rt.block_on(async {
        rabbit.publish(&exchange, "in.a", &[], b"long-subject").await;
        // Attempt counts a producer forged at the edge of i64.
        let mut forged = FieldTable::default();
        forged.insert(ShortString::from("x-sluice-attempt"), AMQPValue::LongLongInt(i64::MAX));
        let props = lapin::BasicProperties::default().with_headers(forged);
        rabbit.publish_with(&exchange, "in.b", props, b"ok").await;
        let mut death = FieldTable::default();
        death.insert(ShortString::from("count"), AMQPValue::LongLongInt(i64::MAX));
        let mut deaths = FieldTable::default();
        deaths.insert(
            ShortString::from("x-death"),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::FieldTable(death.clone()),
                AMQPValue::FieldTable(death),
            ])),
        );
        let props = lapin::BasicProperties::default().with_headers(deaths);
        rabbit.publish_with(&exchange, "in.c", props, b"ok").await;
    });
    let (letters, oks) = rt.block_on(async {
        let mut letters = Vec::new();
        let mut oks = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (letters.is_empty() || oks.len() < 2) && std::time::Instant::now() < deadline {
            letters.extend(rabbit.drain(&format!("dlq-{id}")).await);
            oks.extend(rabbit.drain(&format!("ok-{id}")).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Nothing more comes after (no late duplicate).
        tokio::time::sleep(Duration::from_millis(500)).await;
        letters.extend(rabbit.drain(&format!("dlq-{id}")).await);
        oks.extend(rabbit.drain(&format!("ok-{id}")).await);
        (letters, oks)
    });
    assert_eq!(letters.len(), 1, "{}", d.log());
    assert_eq!(
        letters[0].header("sluice-error-kind"),
        Some("invalid-publish"),
        "{:?}",
        letters[0]
    );
    assert!(letters[0].header("sluice-error").unwrap_or_default().contains("255"));
    assert_eq!(
        oks.len(),
        2,
        "forged attempt counts must still be handled:\n{}",
        d.log()
    );
    rt.block_on(rabbit.delete(
        &[&format!("work-{id}"), &format!("ok-{id}"), &format!("dlq-{id}")],
        &[&exchange],
    ));
}

/// Headers with a name that is not UTF-8, made through librdkafka itself
/// (rdkafka's safe API only takes `&str` names).
fn binary_named_headers() -> rdkafka::message::OwnedHeaders {
    use rdkafka::bindings as rdsys;
    let name = [0xffu8, 0xfe, b'k'];
    let value = b"v";
    // SAFETY: a fresh header list gets one header; both buffers outlive the
    // call, which copies them.
    unsafe {
        let raw = rdsys::rd_kafka_headers_new(1);
        rdsys::rd_kafka_header_add(
            raw,
            name.as_ptr().cast(),
            name.len() as isize,
            value.as_ptr().cast(),
            value.len() as isize,
        );
        // OwnedHeaders is a single non-null pointer to such a list, which it
        // frees on drop.
        assert_eq!(
            std::mem::size_of::<rdkafka::message::OwnedHeaders>(),
            std::mem::size_of::<*mut rdsys::rd_kafka_headers_t>()
        );
        std::mem::transmute::<*mut rdsys::rd_kafka_headers_t, rdkafka::message::OwnedHeaders>(raw)
    }
}

#[test]
fn kafka_consumer_survives_a_binary_header_name_and_ignores_forged_retry_headers() {
    use rdkafka::producer::FutureRecord;
    let brokers = kafka::brokers();
    let id = unique();
    let input = format!("in-{id}");
    let rt = rt();
    rt.block_on(kafka::create_topic(&brokers, &input, 1));
    let collected = Collected::subscribe(&rt, &format!("{id}.ok"));
    let config = format!(
        r#"
[brokers.kafka]
brokers = "{brokers}"
[brokers.nats]
url = "{nats}"
{plugin}
[[routes]]
name = "r"
plugin = "p"
source = {{ broker = "kafka", topics = ["{input}"], group = "g-{id}" }}
publish_broker = "nats"
"#,
        nats = nats_url(),
        plugin = hostile_plugin(&format!("{id}.ok")),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let producer = kafka::producer(&brokers);
    rt.block_on(async {
        let record: FutureRecord<'_, str, str> = FutureRecord::to(&input).payload("ok").headers(binary_named_headers());
        producer.send(record, Duration::from_secs(30)).await.expect("produce");
    });
    let forged = vec![
        ("sluice-retry-not-before".to_owned(), "9999999999999".to_owned()),
        ("sluice-retry-topic".to_owned(), "elsewhere".to_owned()),
        ("sluice-retry-attempt".to_owned(), "99".to_owned()),
    ];
    rt.block_on(kafka::produce(
        &producer,
        &input,
        vec![
            (Some(0), None, forged, "ok".into()),
            (Some(0), None, vec![], "ok".into()),
        ],
    ));
    d.wait_for("all three records handled", Duration::from_secs(60), || {
        collected.len() == 3
    });
    d.wait_for("the offsets committed", Duration::from_secs(30), || {
        kafka::try_committed(&brokers, &format!("g-{id}"), &input, 1).is_ok_and(|c| c == vec![3])
    });
    assert!(d.ready());
}

#[test]
fn a_jetstream_poison_message_with_a_producer_dedup_id_is_dead_lettered_into_its_own_stream() {
    // The dead-letter subject is stored by the source's own stream, whose
    // duplicate window would drop a copy carrying the original's id.
    let id = unique();
    let stream = format!("P{id}");
    let config = format!(
        r#"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "{stream}"
subjects = ["{id}.orders.>", "{id}.dlq"]

[plugins.orders]
path = "{wasm}"
publish = ["{id}.enriched.>"]

[[routes]]
name = "poison"
plugin = "orders"
source = {{ broker = "jetstream", stream = "{stream}", subject = "{id}.orders.>", ack_wait = "2s" }}
dead_letter = {{ subject = "{id}.dlq" }}
"#,
        url = nats_url(),
        wasm = plugin("order_processor").display(),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let js = rt.block_on(async { async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap()) });
    rt.block_on(async {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", "abc");
        js.publish_with_headers(format!("{id}.orders.created"), h, "not json".into())
            .await
            .unwrap()
            .await
            .unwrap();
    });
    let dead = || {
        rt.block_on(async {
            let mut s = js.get_stream(&stream).await.unwrap();
            let last = s.info().await.unwrap().state.last_sequence;
            let mut found = Vec::new();
            for seq in 1..=last {
                if let Ok(m) = s.get_raw_message(seq).await {
                    if m.subject.as_str() == format!("{id}.dlq") {
                        found.push(m);
                    }
                }
            }
            found
        })
    };
    d.wait_for("the dead letter in the stream", Duration::from_secs(30), || {
        !dead().is_empty()
    });
    let letter = &dead()[0];
    assert_eq!(
        letter.headers.get("sluice-original-msg-id").map(|v| v.as_str()),
        Some("abc")
    );
    assert_eq!(&letter.payload[..], b"not json");
    let _ = rt.block_on(js.delete_stream(&stream));
}

#[test]
fn a_forged_origin_on_a_rabbitmq_dead_letter_is_not_replayed_into_another_queue() {
    let id = unique();
    let config = format!(
        r#"
[brokers.rabbitmq]
url = "{url}"

[[brokers.rabbitmq.queues]]
name = "work-{id}"
{plugin}
{route}"#,
        url = rabbit::url(),
        plugin = hostile_plugin("ok.x"),
        route = rabbit_route(&id),
    );
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), &config);
    let rt = rt();
    let rabbit = rt.block_on(Rabbit::connect());
    let victim = format!("victim-{id}");
    rt.block_on(async {
        rabbit.declare_queue(&victim, FieldTable::default()).await;
        // Written straight to the dead-letter queue by someone who can.
        let forged = [
            ("sluice-origin", format!("rabbitmq://{victim}?routing_key=x&exchange=")),
            ("sluice-route", "r".to_owned()),
            ("sluice-error-kind", "permanent".to_owned()),
        ];
        let forged: Vec<(&str, &str)> = forged.iter().map(|(k, v)| (*k, v.as_str())).collect();
        rabbit.publish("", &format!("dlq-{id}"), &forged, b"injected").await;
    });
    let out = std::process::Command::new(sluice_tests::sluice_bin())
        .args([
            "dlq",
            "--admin",
            &d.admin,
            "--queue",
            &format!("dlq-{id}"),
            "replay",
            "--all",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no route"), "{out:?}");
    assert_eq!(
        rt.block_on(rabbit.count(&victim)),
        0,
        "replayed into a queue no route consumes"
    );
    rt.block_on(rabbit.delete(&[&format!("work-{id}"), &format!("dlq-{id}"), &victim], &[]));
}

#[test]
fn a_jetstream_route_whose_dead_letters_no_stream_keeps_refuses_to_start() {
    let id = unique();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            r#"data_dir = "{data}"
[admin]
listen = "127.0.0.1:{port}"
[brokers.nats]
url = "{url}"
[[brokers.nats.streams]]
name = "N{id}"
subjects = ["{id}.in"]
{plugin}
[[routes]]
name = "r"
plugin = "p"
source = {{ broker = "jetstream", stream = "N{id}", subject = "{id}.in" }}
dead_letter = {{ subject = "{id}.dlq" }}
"#,
            data = dir.path().join("data").display(),
            port = sluice_tests::daemon::free_port(),
            url = nats_url(),
            plugin = hostile_plugin("ok.x"),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(sluice_tests::sluice_bin())
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("sluice started with dead letters nothing keeps");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains(&format!("{id}.dlq")) && err.contains("no JetStream stream"),
        "{err}"
    );
    rt().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect(nats_url()).await.unwrap());
        let _ = js.delete_stream(format!("N{id}")).await;
    });
}

/// A broker adapter whose acks panic the first time for each message: the
/// stand-in for a client bug (none of the real clients can be made to
/// panic on purpose). The wrapped source is the real embedded broker.
struct PanickyAcks {
    inner: EmbeddedSource,
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

struct PanickyDelivery {
    inner: Box<dyn Delivery>,
    panic: bool,
}

impl Delivery for PanickyDelivery {
    fn message(&self) -> &Message {
        self.inner.message()
    }
    fn origin(&self) -> String {
        self.inner.origin()
    }
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.ack()
    }
    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.retry(delay)
    }
    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.inner.dead_lettered()
    }
    fn ack_then(self: Box<Self>, then: AckDone) {
        assert!(!self.panic, "the adapter panics while acking");
        self.inner.ack_then(then)
    }
}

impl Source for PanickyAcks {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async {
            let inner = self.inner.next().await?;
            let first = self.seen.lock().unwrap().insert(inner.message().id.clone());
            Ok(Box::new(PanickyDelivery { inner, panic: first }) as Box<dyn Delivery>)
        })
    }
}

#[test]
fn a_panic_while_acking_redelivers_the_message_and_the_route_keeps_serving() {
    const MESSAGES: usize = 20;
    let rt = rt();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let broker = EmbeddedBroker::open(&dir.path().join("b.redb"), Duration::from_secs(60)).unwrap();
        let patterns = |p: &str| vec![sluice::subject::SubjectPattern::parse(p).unwrap()];
        broker.declare_queue("work", patterns("work"), None);
        let messages = (0..MESSAGES)
            .map(|i| Outbound {
                subject: "work".into(),
                headers: Vec::new(),
                payload: i.to_string().into_bytes(),
            })
            .collect();
        broker.publish(messages).await.unwrap();
        let engine = sluice::engine::Engine::new(sluice::engine::EngineSettings::default()).unwrap();
        let noop = Arc::new(
            engine
                .load(sluice::engine::PluginSpec::new("noop", plugin("noop")))
                .unwrap(),
        );
        let source: Arc<dyn Source> = Arc::new(PanickyAcks {
            inner: broker.source("work"),
            seen: Default::default(),
        });
        let sink: Arc<dyn Sink> = Arc::new(broker.clone());
        let mut route = sluice::pipeline::Route::new("r", source, "embedded", sink, noop);
        route.concurrency = 2;
        let route = Arc::new(route);
        let stop = tokio_util::sync::CancellationToken::new();
        let workers = route.spawn(&stop);
        let drained = tokio::time::timeout(Duration::from_secs(20), async {
            while broker.queues().iter().any(|q| q.name == "work" && q.messages > 0) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        stop.cancel();
        for w in workers {
            w.await.unwrap();
        }
        assert!(drained.is_ok(), "the queue was not drained: {:?}", broker.queues());
        let metrics = route.metrics.encode();
        let series = |name: &str| metric_in(&metrics, name).unwrap_or_else(|| panic!("no series {name} in\n{metrics}"));
        // Each message's first ack panicked, was counted and handed the
        // message back; the second went through.
        assert_eq!(series("sluice_worker_panics_total{route=\"r\"}"), MESSAGES as f64);
        assert_eq!(series("sluice_in_flight{route=\"r\"}"), 0.0);
        broker.close();
    });
}
