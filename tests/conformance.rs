//! The broker adapter contract (`brokers/mod.rs`), written once and run
//! against every adapter over its real broker: embedded, core NATS,
//! JetStream, RabbitMQ and Kafka. Adapters are built through the one broker
//! table, as the daemon builds them. A broker that cannot keep a guarantee
//! declares it (`Guarantees`) and the declared behaviour is checked instead.
//!
//! Each adapter runs the whole contract in one test, in order, on names of
//! its own: ack is final; a dropped delivery is handed back; retry-after
//! redelivers no earlier than asked with attempt + 1; dead-letter-then-ack
//! leaves one copy with its `sluice-*` headers and the original bytes, which
//! `sluice dlq` lists, shows and replays; a sink reports a duplicate as a
//! duplicate; a source closed with a delivery in flight loses nothing.

use sluice::brokers::{Backlog, BrokerKind, Brokers};
use sluice::brokers::{BrokersConfig, DeadLetterTarget, Delivery, RouteContext, RouteUse, Sink, Source, SourceSpec};
use sluice::dlq::{DeadLetters, Filter};
use sluice::engine::FailureKind;
use sluice::message::{find_header, Header, Outbound, DEDUP_HEADER};
use sluice::pipeline::dead_letter;
use sluice_tests::nats::url as nats_url;
use sluice_tests::{kafka, rabbit, unique};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest wait for a delivery that must come (a Kafka group join on the
/// test broker takes seconds).
const ARRIVES: Duration = Duration::from_secs(30);
/// A retry's delay: not a step of any broker's delay ladder, so rounding
/// down would show.
const RETRY_DELAY: Duration = Duration::from_millis(550);
const ROUTE: &str = "conformance";

struct Case {
    brokers: String,
    source: String,
    /// Where the sink publishes for the source to receive.
    input: String,
    dead_letter: String,
}

#[derive(serde::Deserialize)]
struct SourceOnly {
    source: SourceSpec,
}

/// The adapter under test, built through the broker table.
struct Adapter {
    brokers: Brokers,
    kind: BrokerKind,
    spec: SourceSpec,
    dead_letter: String,
    input: String,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    dead_letter_sink: Arc<dyn Sink>,
    _dir: tempfile::TempDir,
}

impl Adapter {
    fn route_use(&self) -> RouteUse<'_> {
        route_use(&self.spec, &self.dead_letter)
    }

    async fn open(case: Case) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config: BrokersConfig = toml::from_str(&case.brokers).expect("brokers config");
        let spec = toml::from_str::<SourceOnly>(&format!("source = {}", case.source))
            .expect("source spec")
            .source;
        let uses = route_use(&spec, &case.dead_letter);
        let brokers = Brokers::open(&config, dir.path(), std::slice::from_ref(&uses))
            .await
            .expect("brokers open");
        let kind = spec.kind();
        let sink = brokers.sink(kind).expect("sink");
        let dead_letter_sink = brokers.dead_letter_sink(&uses).await.expect("dead-letter sink");
        let (source, _) = brokers.source(&uses).await.expect("source");
        drop(uses);
        Self {
            brokers,
            kind,
            spec,
            dead_letter: case.dead_letter,
            input: case.input,
            source,
            sink,
            dead_letter_sink,
            _dir: dir,
        }
    }

    async fn publish(&self, payload: &[u8], headers: Vec<Header>) -> usize {
        let m = Outbound {
            subject: self.input.clone(),
            headers,
            payload: payload.to_vec(),
        };
        self.sink.publish(vec![m]).await.expect("publish").duplicates
    }

    /// The next delivery, begun as the pipeline begins it.
    async fn next(&self, within: Duration) -> Option<Box<dyn Delivery>> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.source.next()).await {
                Err(_) => return None,
                Ok(Err(e)) => panic!("{:?}: source failed: {e}", self.kind),
                Ok(Ok(d)) if d.begin() => return Some(d),
                Ok(Ok(_)) => continue,
            }
        }
    }

    async fn expect(&self, payload: &[u8], what: &str) -> Box<dyn Delivery> {
        let d = self
            .next(ARRIVES)
            .await
            .unwrap_or_else(|| panic!("{:?}: {what}: nothing arrived", self.kind));
        assert_eq!(
            d.message().payload,
            payload,
            "{:?}: {what}: another message arrived first",
            self.kind
        );
        d
    }

    /// Asks the source for its backlog until `ok` holds (brokers count
    /// asynchronously); panics with the last answer after a while.
    async fn backlog_reaches(&self, ok: impl Fn(Backlog) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.source.backlog().await;
            if n.is_some_and(&ok) {
                return;
            }
            assert!(Instant::now() < deadline, "{:?}: backlog {what}: {n:?}", self.kind);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes `n` deliveries with `Source::ready` (what is at hand, no
    /// wait), asking again until they arrived; panics after a while.
    async fn ready_reaches(&self, n: usize) -> Vec<Box<dyn Delivery>> {
        let deadline = Instant::now() + ARRIVES;
        let mut taken: Vec<Box<dyn Delivery>> = Vec::new();
        while taken.len() < n {
            let got = self.source.ready(n - taken.len());
            assert!(got.len() <= n - taken.len(), "{:?}: more than asked", self.kind);
            taken.extend(got.into_iter().filter(|d| d.begin()));
            assert!(
                Instant::now() < deadline,
                "{:?}: {} of {n} at hand",
                self.kind,
                taken.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        taken
    }

    fn dead_letters(&self) -> Option<DeadLetters> {
        let stores = self.brokers.dead_letter_stores(&[self.route_use()]);
        stores.get(&self.dead_letter).cloned().map(DeadLetters)
    }

    async fn reopen_source(&mut self) {
        self.source.close().await;
        let (source, _) = self.brokers.source(&self.route_use()).await.expect("source again");
        self.source = source;
    }
}

fn route_use<'a>(spec: &'a SourceSpec, dead_letter: &str) -> RouteUse<'a> {
    RouteUse {
        context: RouteContext {
            name: ROUTE,
            concurrency: 1,
            max_attempts: 5,
            unordered: true,
        },
        source: spec,
        dead_letter: DeadLetterTarget {
            broker: spec.kind(),
            subject: dead_letter.to_owned(),
            exchange: None,
        },
        publish_broker: spec.kind(),
    }
}

/// Binary, with a NUL and a non-UTF-8 byte: adapters carry bytes.
fn bytes(step: &str) -> Vec<u8> {
    let mut b = vec![0xff, 0x00];
    b.extend_from_slice(step.as_bytes());
    b
}

async fn contract(case: Case) {
    let mut a = Adapter::open(case).await;
    let guarantees = a.kind.guarantees();
    let kind = a.kind;

    // Delivered with its bytes and headers, attempt 1; an ack is final.
    a.publish(&bytes("a"), vec![Header::new("x-conformance", "a")]).await;
    let d = a.expect(&bytes("a"), "first message").await;
    assert_eq!(d.message().attempt, 1, "{kind:?}");
    assert_eq!(d.message().header("x-conformance"), Some("a"), "{kind:?}: header lost");
    d.ack().await.expect("ack");
    a.publish(&bytes("b"), vec![]).await;
    let d = a
        .expect(&bytes("b"), "after an ack, the next message (not the acked one again)")
        .await;

    // Dropped unsettled: handed back and delivered again.
    drop(d);
    if guarantees.redelivers {
        let d = a.expect(&bytes("b"), "a dropped delivery, handed back").await;
        d.ack().await.expect("ack");
    }

    // Retry after a delay: no earlier, attempt + 1.
    a.publish(&bytes("c"), vec![]).await;
    let d = a.expect(&bytes("c"), "a message to retry").await;
    let asked = Instant::now();
    d.retry(RETRY_DELAY).await.expect("retry");
    let d = a.expect(&bytes("c"), "the retried message").await;
    let waited = asked.elapsed();
    assert!(
        waited >= RETRY_DELAY,
        "{kind:?}: redelivered after {waited:?}, asked {RETRY_DELAY:?}"
    );
    assert_eq!(d.message().attempt, 2, "{kind:?}: attempt after a retry");
    d.ack().await.expect("ack");

    // Dead-lettered: the copy is confirmed, then the original dropped.
    a.publish(&bytes("d"), vec![Header::new("x-conformance", "d")]).await;
    let d = a.expect(&bytes("d"), "a message to dead-letter").await;
    // The copy the pipeline makes, through the adapter's own dead-letter sink.
    let copy = dead_letter::copy(
        d.message(),
        &a.dead_letter,
        dead_letter::FailureContext {
            kind: FailureKind::Permanent,
            reason: "conformance",
            route: ROUTE,
            plugin_name: "p",
            plugin_hash: "00",
            origin: d.origin(),
            dedup_id: format!("{}:dlq", unique()),
        },
    );
    a.dead_letter_sink
        .publish(vec![copy])
        .await
        .expect("dead letter stored");
    d.dead_lettered().await.expect("dead_lettered");
    a.publish(&bytes("e"), vec![]).await;
    a.expect(&bytes("e"), "after dead-lettering, the next message")
        .await
        .ack()
        .await
        .expect("ack");

    match a.dead_letters() {
        // Core NATS keeps nothing: declared at-most-once, no store.
        None => assert!(!guarantees.redelivers, "{kind:?}: no dead-letter store"),
        Some(store) => {
            let listed = store.list(100).await.expect("list");
            assert_eq!(listed.len(), 1, "{kind:?}: exactly one dead letter: {listed:?}");
            let letter = &listed[0];
            assert_eq!(
                (letter.kind.as_str(), letter.route.as_str()),
                ("permanent", ROUTE),
                "{kind:?}"
            );
            let shown = store.get(letter.seq).await.expect("show").expect("the letter");
            assert_eq!(shown.payload, bytes("d"), "{kind:?}: original bytes");
            for name in dead_letter::FAILURE_HEADERS.iter().chain(&["x-conformance"]) {
                assert!(find_header(&shown.headers, name).is_some(), "{kind:?}: {name} lost");
            }
            assert_eq!(find_header(&shown.headers, "x-conformance"), Some("d"), "{kind:?}");
            assert_eq!(
                find_header(&shown.headers, "sluice-error"),
                Some("conformance"),
                "{kind:?}"
            );
            let replayed = store
                .replay(&Filter {
                    all: true,
                    ..Filter::default()
                })
                .await
                .expect("replay");
            assert_eq!(replayed, 1, "{kind:?}");
            let d = a.expect(&bytes("d"), "the replayed dead letter").await;
            assert_eq!(d.message().header("sluice-replays"), Some("1"), "{kind:?}");
            assert_eq!(
                d.message().header("sluice-error"),
                None,
                "{kind:?}: failure headers kept"
            );
            assert_eq!(d.message().header("x-conformance"), Some("d"), "{kind:?}");
            d.ack().await.expect("ack");
            let left = store.list(100).await.expect("list").len();
            let expected = usize::from(store.0.keeps_replayed());
            assert_eq!(left, expected, "{kind:?}: dead letters after the replay");
        }
    }

    // Duplicates: reported as such where the broker drops them.
    let id = unique();
    let first = a
        .publish(&bytes("f1"), vec![Header::new(DEDUP_HEADER, id.clone())])
        .await;
    let second = a.publish(&bytes("f2"), vec![Header::new(DEDUP_HEADER, id)]).await;
    assert_eq!(first, 0, "{kind:?}");
    a.expect(&bytes("f1"), "the first of two with one dedup id")
        .await
        .ack()
        .await
        .expect("ack");
    if guarantees.drops_duplicates {
        assert_eq!(second, 1, "{kind:?}: a duplicate not reported");
    } else {
        assert_eq!(second, 0, "{kind:?}");
        a.expect(&bytes("f2"), "the second, on a broker that keeps both")
            .await
            .ack()
            .await
            .expect("ack");
    }
    a.publish(&bytes("g"), vec![]).await;
    a.expect(&bytes("g"), "after the duplicates, the next message")
        .await
        .ack()
        .await
        .expect("ack");

    // Backlog: a delivery taken and not settled counts (so do messages not
    // delivered yet, but a consumer's prefetch may hide those); settled,
    // it drains to 0. None only where the broker keeps nothing.
    // Where the broker tells the oldest one's age, it is the first
    // message's publish time (give or take the clocks' second).
    let lagging = ["l1", "l2", "l3"];
    let published_ms = now_ms();
    for p in lagging {
        a.publish(&bytes(p), vec![]).await;
    }
    let first = a.expect(&bytes("l1"), "a message counted in the backlog").await;
    if guarantees.redelivers {
        a.backlog_reaches(
            |b| {
                (1..=3).contains(&b.messages)
                    && match b.oldest_ms {
                        Some(at) => guarantees.tells_oldest && at + 1_000 >= published_ms && at <= now_ms() + 1_000,
                        None => !guarantees.tells_oldest,
                    }
            },
            "one of three taken, unsettled, the first one the oldest",
        )
        .await;
    } else {
        assert_eq!(
            a.source.backlog().await,
            None,
            "{kind:?}: a backlog where nothing is kept"
        );
    }
    first.ack().await.expect("ack");
    // What the source has at hand comes in one go (how a batch fills), in
    // order, each once, never more than asked.
    let rest = a.ready_reaches(lagging.len() - 1).await;
    let payloads: Vec<&[u8]> = rest.iter().map(|d| d.message().payload.as_slice()).collect();
    assert_eq!(payloads, [bytes("l2"), bytes("l3")], "{kind:?}: taken at once");
    // And acked at once (a batch's successes): settled, as the backlog
    // draining to 0 shows below.
    for result in a.source.ack_many(rest).await {
        result.expect("ack_many");
    }
    if guarantees.redelivers {
        a.backlog_reaches(|b| b.messages == 0 && b.oldest_ms.is_none(), "all settled")
            .await;
    }

    // Closed with a delivery in flight: nothing lost.
    a.publish(&bytes("h"), vec![]).await;
    let d = a.expect(&bytes("h"), "a message in flight at close").await;
    a.source.close().await;
    drop(d);
    a.reopen_source().await;
    if guarantees.redelivers {
        a.expect(&bytes("h"), "the in-flight message, after the source reopened")
            .await
            .ack()
            .await
            .expect("ack");
    }
    a.source.close().await;
    a.brokers.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded() {
    let u = unique();
    contract(Case {
        brokers: String::new(),
        source: format!("{{ subject = \"conf.{u}.in\" }}"),
        input: format!("conf.{u}.in"),
        dead_letter: format!("conf.{u}.dlq"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn core_nats() {
    let u = unique();
    contract(Case {
        brokers: format!("[nats]\nurl = \"{}\"\n", nats_url()),
        source: format!("{{ broker = \"nats\", subject = \"conf.{u}.in\" }}"),
        input: format!("conf.{u}.in"),
        dead_letter: format!("conf.{u}.dlq"),
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream() {
    let u = unique();
    let stream = format!("CONF_{}", u.replace(['-', '.'], "_"));
    contract(Case {
        brokers: format!(
            "[nats]\nurl = \"{}\"\n[[nats.streams]]\nname = \"{stream}\"\nsubjects = [\"conf.{u}.>\"]\n",
            nats_url()
        ),
        source: format!(
            "{{ broker = \"jetstream\", stream = \"{stream}\", subject = \"conf.{u}.in\", ack_wait = \"1s\" }}"
        ),
        input: format!("conf.{u}.in"),
        dead_letter: format!("conf.{u}.dlq"),
    })
    .await;
    let client = async_nats::connect(nats_url()).await.expect("nats");
    let _ = async_nats::jetstream::new(client).delete_stream(&stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq() {
    let u = unique();
    let queue = format!("conf-{u}");
    let dead_letter = format!("conf-{u}-dlq");
    contract(Case {
        brokers: format!(
            "[rabbitmq]\nurl = \"{}\"\n[[rabbitmq.queues]]\nname = \"{queue}\"\n",
            rabbit::url()
        ),
        source: format!("{{ broker = \"rabbitmq\", queue = \"{queue}\" }}"),
        input: queue.clone(),
        dead_letter: dead_letter.clone(),
    })
    .await;
    let r = rabbit::Rabbit::connect().await;
    r.delete(&[&queue, &dead_letter], &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka() {
    let u = unique();
    let topic = format!("conf-{u}");
    contract(Case {
        brokers: format!(
            "[kafka]\nbrokers = \"{}\"\n[[kafka.topics]]\nname = \"{topic}\"\n",
            kafka::brokers()
        ),
        source: format!("{{ broker = \"kafka\", topics = [\"{topic}\"] }}"),
        input: topic.clone(),
        dead_letter: format!("{topic}-dlq"),
    })
    .await;
}

#[test]
fn each_brokers_source_settings_are_checked_by_its_own_spec() {
    // Each broker folder deserialises its own route-source spec; errors keep
    // the config's file:line: key.
    let err = |text: &str| {
        sluice::config::parse_str(text, std::path::Path::new("conf/test.toml"))
            .expect_err("a bad source is refused")
            .to_string()
    };
    let route = |source: &str| format!("[[routes]]\nname = \"r\"\nplugin = \"p\"\n{source}\n");
    let e = err(&route(
        "source = { broker = \"kafka\", topics = [\"t\"], queue = \"q\" }",
    ));
    assert!(e.starts_with("conf/test.toml:4: key `routes.0.source"), "{e}");
    assert!(e.contains("unknown field `queue`"), "{e}");
    let e = err(&route(
        "[routes.source]\nbroker = \"jetstream\"\nsubject = \"a.>\"\nack_wait = \"soon\"",
    ));
    assert!(e.starts_with("conf/test.toml:7: key `routes.0.source.ack_wait`"), "{e}");
    let e = err(&route("source = { broker = \"jetstream\", subject = \"a.>\" }"));
    assert!(e.contains("missing field `stream`"), "{e}");
    let e = err(&route("source = { broker = \"mqtt\", subject = \"a\" }"));
    assert!(
        e.contains("key `routes.0.source.broker`") && e.contains("unknown broker `mqtt`"),
        "{e}"
    );
    // No broker: the embedded one, which has no queues.
    let e = err(&route("source = { queue = \"q\" }"));
    assert!(e.contains("unknown field `queue`"), "{e}");
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
