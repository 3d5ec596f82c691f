//! Dead letters kept in a Kafka topic. A topic is a log: replayed records
//! stay in it. A replay produces each to its origin topic, one of the
//! routes' topics (any topic when a route subscribes by pattern).

use super::KafkaBroker;
use crate::brokers::{BrokerError, DeadLetterError, DeadLetterStore, ReplayPick, SCAN_LIMIT};
use crate::future::BoxFuture;
use crate::message::Outbound;
use std::collections::BTreeSet;

pub struct KafkaDeadLetters {
    pub kafka: KafkaBroker,
    pub topic: String,
    pub topics: BTreeSet<String>,
    pub any_topic: bool,
}

impl DeadLetterStore for KafkaDeadLetters {
    fn name(&self) -> &str {
        &self.topic
    }

    fn letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Outbound)>, BrokerError>> {
        Box::pin(super::admin::read_topic(self.kafka.config(), &self.topic, limit))
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<Outbound>, BrokerError>> {
        Box::pin(crate::brokers::find_letter(self, seq, SCAN_LIMIT))
    }

    fn keeps_replayed(&self) -> bool {
        true
    }

    fn replay<'a>(&'a self, pick: &'a mut ReplayPick<'a>) -> BoxFuture<'a, Result<usize, DeadLetterError>> {
        Box::pin(async move {
            let selected = crate::brokers::picked(self, pick).await?;
            let mut moved = 0;
            for (seq, replay) in selected {
                let known = crate::brokers::origin_subject(&replay.origin)
                    .filter(|t| self.any_topic || self.topics.contains(*t))
                    .map(str::to_owned);
                let Some(topic) = known else {
                    return Err(DeadLetterError::NoOrigin {
                        seq,
                        origin: replay.origin,
                    });
                };
                let mut copy = replay.copy;
                copy.subject = topic;
                // The key travels in the sluice-key header, which the
                // producer turns back into the record key.
                self.kafka.produce(&copy).await?;
                moved += 1;
            }
            Ok(moved)
        })
    }
}
