//! A route's `source` on core NATS and on JetStream, with their defaults.

use super::config::ConsumerSettings;
use crate::brokers::{Problem, RouteContext};
use serde::Deserialize;
use std::time::Duration;

/// Core NATS: at-most-once.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreSourceSpec {
    /// Subject pattern (`orders.>`).
    pub subject: String,
    /// Replicas in the same queue group share the messages.
    pub queue_group: Option<String>,
}

impl CoreSourceSpec {
    pub fn describe(&self) -> String {
        let group = self
            .queue_group
            .as_ref()
            .map(|g| format!(" (queue group {g})"))
            .unwrap_or_default();
        format!("nats {}{group}", self.subject)
    }
}

/// A JetStream durable pull consumer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamSourceSpec {
    /// The consumer's filter subject (`orders.>`).
    pub subject: String,
    /// The stream (declared under `[[brokers.nats.streams]]`, or existing).
    pub stream: String,
    /// Durable consumer name (default: the route name).
    pub consumer: Option<String>,
    /// Redelivery after this long without an ack (default 30 s).
    #[serde(default, with = "crate::de::duration")]
    pub ack_wait: Option<Duration>,
    /// Deliveries at most (default unlimited; sluice dead-letters after
    /// `retry.max_attempts`).
    pub max_deliver: Option<i64>,
    /// Unacknowledged messages at most (default 1000).
    pub max_ack_pending: Option<i64>,
}

impl JetStreamSourceSpec {
    pub fn settings(&self, route: &RouteContext) -> ConsumerSettings {
        ConsumerSettings {
            stream: self.stream.clone(),
            durable: self.consumer.clone().unwrap_or_else(|| route.name.to_owned()),
            filter_subject: self.subject.clone(),
            ack_wait: self.ack_wait.unwrap_or(Duration::from_secs(30)),
            max_deliver: self.max_deliver.unwrap_or(-1),
            max_ack_pending: self.max_ack_pending.unwrap_or(1000),
        }
    }

    pub fn validate(&self, route: &RouteContext) -> Result<(), Problem> {
        if let Some(max) = self.max_deliver {
            if max > 0 && max < i64::from(route.max_attempts) {
                return Err((
                    "source.max_deliver".into(),
                    format!(
                        "is below retry.max_attempts ({}): JetStream would stop redelivering before sluice dead-letters",
                        route.max_attempts
                    ),
                ));
            }
        }
        if self.max_ack_pending == Some(0) {
            return Err(("source.max_ack_pending".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}
