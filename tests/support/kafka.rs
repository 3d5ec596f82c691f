//! A plain Kafka client for the Kafka tests (`SLUICE_KAFKA_BROKERS`,
//! default 127.0.0.1:9092; `cargo xtask test` starts tansu, a
//! Kafka-protocol broker, when none is listening): topics, keyed produce,
//! reading a topic from the start, a group's committed offsets.

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

pub fn brokers() -> String {
    std::env::var("SLUICE_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn config(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers).set("log_level", "3");
    c
}

pub async fn create_topic(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = config(brokers).create().expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let r = admin
        .create_topics([&topic], &AdminOptions::new())
        .await
        .unwrap_or_else(|e| panic!("Kafka at {brokers} is needed (cargo xtask test starts tansu): {e}"));
    for t in r {
        t.unwrap_or_else(|(t, e)| panic!("creating {t}: {e}"));
    }
}

pub fn producer(brokers: &str) -> FutureProducer {
    config(brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer")
}

/// One record as read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: Vec<(String, String)>,
    pub payload: String,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// A record to send: partition (else by key), key, headers, payload.
pub type Input = (Option<i32>, Option<String>, Vec<(String, String)>, String);

/// Sends records and waits for all acks.
pub async fn produce(p: &FutureProducer, topic: &str, records: Vec<Input>) {
    let mut pending = Vec::new();
    for (partition, key, headers, payload) in &records {
        let mut hs = OwnedHeaders::new();
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut r: FutureRecord<'_, str, str> = FutureRecord::to(topic).payload(payload.as_str()).headers(hs);
        if let Some(k) = key {
            r = r.key(k.as_str());
        }
        if let Some(p) = partition {
            r = r.partition(*p);
        }
        pending.push(p.send(r, Duration::from_secs(30)));
        if pending.len() >= 500 {
            for f in pending.drain(..) {
                f.await.expect("produce");
            }
        }
    }
    for f in pending {
        f.await.expect("produce");
    }
}

/// Reads `topic` from the start until `n` records came or `timeout` passed.
pub fn read(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<Record> {
    let consumer: BaseConsumer = config(brokers)
        .set("group.id", format!("reader-{topic}-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning).unwrap();
        }
    }
    consumer.assign(&tpl).expect("assign");
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < n && started.elapsed() < timeout {
        let Some(m) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let Ok(m) = m else { continue };
        let headers = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| {
                        (
                            h.key.to_owned(),
                            String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            headers,
            payload: String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
        });
    }
    out
}

/// The committed offset of `group` per partition of `topic` (-1: none).
pub fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    try_committed(brokers, group, topic, partitions).expect("committed offsets")
}

/// The committed offsets, or the error (a broker just restarted).
pub fn try_committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Result<Vec<i64>, String> {
    let consumer: BaseConsumer = config(brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| e.to_string())?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let c = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    Ok((0..partitions)
        .map(|p| match c.find_partition(topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o,
            _ => -1,
        })
        .collect())
}

/// End offsets per partition.
pub fn ends(brokers: &str, topic: &str, partitions: i32) -> Vec<i64> {
    try_ends(brokers, topic, partitions).expect("watermarks")
}

/// End offsets per partition, or the error (a broker just restarted).
pub fn try_ends(brokers: &str, topic: &str, partitions: i32) -> Result<Vec<i64>, String> {
    let consumer: BaseConsumer = config(brokers)
        .set("group.id", "ends")
        .create()
        .map_err(|e| e.to_string())?;
    (0..partitions)
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|w| w.1)
                .map_err(|e| e.to_string())
        })
        .collect()
}

pub use super::nats::{Collected, Received};
