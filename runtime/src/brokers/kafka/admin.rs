//! Cluster chores: checking the brokers answer, creating topics, moving a
//! stopped group's offsets, and reading a topic from the start (for
//! `sluice dlq`). librdkafka calls that block run off the async threads.

use super::config::{KafkaConfig, TopicConfig};
use super::{client_config, failed, KafkaSetupError};
use crate::brokers::BrokerError;
use crate::error::cause;
use crate::message::{Header, Outbound, KEY_HEADER};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);

fn consumer(config: &KafkaConfig, group: &str) -> Result<BaseConsumer, String> {
    let mut c = client_config(config);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c.create().map_err(|e| e.to_string())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f).await.map_err(|e| e.to_string())?
}

/// Fails with the reason when the cluster does not answer a metadata call.
pub async fn check_reachable(config: &KafkaConfig) -> Result<(), KafkaSetupError> {
    let c = config.clone();
    blocking(move || {
        let consumer = consumer(&c, "sluice-probe")?;
        consumer
            .fetch_metadata(None, TIMEOUT)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| KafkaSetupError::Unreachable {
        brokers: config.brokers.clone(),
        cause: cause(e),
    })
}

/// Partitions of `topic`, or none when it does not exist.
async fn partitions(config: &KafkaConfig, topic: &str) -> Result<Vec<i32>, String> {
    let (c, t) = (config.clone(), topic.to_owned());
    blocking(move || {
        let consumer = consumer(&c, "sluice-probe")?;
        // All topics: asking for one that does not exist can wait for the
        // full timeout on some brokers.
        let md = consumer.fetch_metadata(None, TIMEOUT).map_err(|e| e.to_string())?;
        Ok(md
            .topics()
            .iter()
            .filter(|mt| mt.name() == t && mt.error().is_none())
            .flat_map(|mt| mt.partitions().iter().map(|p| p.id()))
            .collect())
    })
    .await
}

/// Creates the topics that do not exist yet.
pub async fn create_topics(config: &KafkaConfig, topics: &[TopicConfig]) -> Result<(), KafkaSetupError> {
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> =
        client_config(config)
            .create()
            .map_err(|cause| KafkaSetupError::Client {
                what: "creating the admin client".into(),
                cause,
            })?;
    for t in topics {
        let existing = partitions(config, &t.name).await.map_err(|e| KafkaSetupError::Topic {
            topic: t.name.clone(),
            cause: cause(e),
        })?;
        if !existing.is_empty() {
            if existing.len() < t.partitions as usize {
                tracing::warn!(topic = %t.name, "topic has {} partitions, the config says {}", existing.len(), t.partitions);
            }
            continue;
        }
        let mut new = NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication_factor));
        for (k, v) in &t.config {
            new = new.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = admin
            .create_topics([&new], &opts)
            .await
            .map_err(|e| KafkaSetupError::Topic {
                topic: t.name.clone(),
                cause: cause(e),
            })?;
        for r in results {
            match r {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(KafkaSetupError::Topic {
                        topic,
                        cause: cause(rdkafka::error::KafkaError::AdminOp(code)),
                    })
                }
            }
        }
        tracing::info!(topic = %t.name, partitions = t.partitions, "Kafka topic created");
    }
    Ok(())
}

/// Where `reset-offsets` moves a group.
#[derive(Debug, Clone, Copy)]
pub enum ResetTo {
    Earliest,
    Latest,
    Offset(i64),
    /// Milliseconds since the Unix epoch: the first record at or after it.
    Time(i64),
}

/// Moves `group`'s committed offsets on `topic` (every partition). The
/// group must have no running members, or they would overwrite it. Returns
/// (partition, new offset).
pub async fn reset_offsets(
    config: &KafkaConfig,
    group: &str,
    topic: &str,
    to: ResetTo,
) -> Result<Vec<(i32, i64)>, String> {
    let parts = partitions(config, topic).await?;
    if parts.is_empty() {
        return Err(format!("topic `{topic}` does not exist"));
    }
    let (c, g, t) = (config.clone(), group.to_owned(), topic.to_owned());
    blocking(move || {
        let consumer = consumer(&c, &g)?;
        let mut tpl = TopicPartitionList::new();
        for p in &parts {
            let offset = match to {
                ResetTo::Earliest => consumer.fetch_watermarks(&t, *p, TIMEOUT).map_err(|e| e.to_string())?.0,
                ResetTo::Latest => consumer.fetch_watermarks(&t, *p, TIMEOUT).map_err(|e| e.to_string())?.1,
                ResetTo::Offset(n) => n,
                ResetTo::Time(_) => 0,
            };
            tpl.add_partition_offset(&t, *p, Offset::Offset(offset))
                .map_err(|e| e.to_string())?;
        }
        if let ResetTo::Time(ms) = to {
            let mut times = TopicPartitionList::new();
            for p in &parts {
                times
                    .add_partition_offset(&t, *p, Offset::Offset(ms))
                    .map_err(|e| e.to_string())?;
            }
            let found = consumer.offsets_for_times(times, TIMEOUT).map_err(|e| e.to_string())?;
            for e in found.elements() {
                // No record at or after the time: the end of the partition.
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => {
                        consumer
                            .fetch_watermarks(&t, e.partition(), TIMEOUT)
                            .map_err(|e| e.to_string())?
                            .1
                    }
                };
                tpl.set_partition_offset(&t, e.partition(), Offset::Offset(offset))
                    .map_err(|e| e.to_string())?;
            }
        }
        consumer.commit(&tpl, CommitMode::Sync).map_err(|e| e.to_string())?;
        Ok(tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
            .collect())
    })
    .await
}

/// The sequence number `sluice dlq` shows for a record: its offset, with
/// the partition in the high bits (so one-partition topics show offsets).
pub fn seq_of(partition: i32, offset: i64) -> u64 {
    ((partition.max(0) as u64) << 48) | (offset.max(0) as u64)
}

/// The first `limit` records of `topic` (all partitions, from the
/// beginning): (seq, record with its key in the `sluice-key` header).
pub async fn read_topic(config: &KafkaConfig, topic: &str, limit: usize) -> Result<Vec<(u64, Outbound)>, BrokerError> {
    let parts = partitions(config, topic).await.map_err(failed)?;
    let (c, t) = (config.clone(), topic.to_owned());
    blocking(move || {
        let consumer = consumer(&c, "sluice-dlq-reader")?;
        let mut tpl = TopicPartitionList::new();
        let mut remaining = 0usize;
        let mut ends = std::collections::HashMap::new();
        for p in &parts {
            let (low, high) = consumer.fetch_watermarks(&t, *p, TIMEOUT).map_err(|e| e.to_string())?;
            if high > low {
                tpl.add_partition_offset(&t, *p, Offset::Offset(low))
                    .map_err(|e| e.to_string())?;
                ends.insert(*p, high);
                remaining += (high - low) as usize;
            }
        }
        let mut out = Vec::new();
        if remaining == 0 {
            return Ok(out);
        }
        consumer.assign(&tpl).map_err(|e| e.to_string())?;
        let deadline = std::time::Instant::now() + TIMEOUT * 3;
        while remaining > 0 && out.len() < limit && std::time::Instant::now() < deadline {
            let Some(m) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = m.map_err(|e| e.to_string())?;
            remaining -= 1;
            let mut headers = Vec::new();
            if let Some(key) = m.key() {
                headers.push(Header::new(KEY_HEADER, super::record::key_text(key)));
            }
            headers.extend(super::record::headers(&m));
            out.push((
                seq_of(m.partition(), m.offset()),
                Outbound {
                    subject: t.clone(),
                    headers,
                    payload: m.payload().unwrap_or_default().to_vec(),
                },
            ));
            if ends.get(&m.partition()).is_some_and(|end| m.offset() + 1 >= *end) {
                ends.remove(&m.partition());
                if ends.is_empty() {
                    break;
                }
            }
        }
        out.sort_by_key(|(seq, _)| *seq);
        Ok(out)
    })
    .await
    .map_err(failed)
}
