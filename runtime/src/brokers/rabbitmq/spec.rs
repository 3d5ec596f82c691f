//! A route's `source` on RabbitMQ, with its defaults.

use super::config::{ConsumerSettings, RetryVia};
use crate::brokers::{Problem, RouteContext};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitSourceSpec {
    /// The queue to consume (declared under `[[brokers.rabbitmq.queues]]`,
    /// or existing); bind it to exchanges there.
    pub queue: String,
    /// Unacked deliveries at most (`basic.qos`); default twice the route's
    /// concurrency.
    pub prefetch: Option<u16>,
    /// `delay_queue` (default) or `in_process`.
    pub retry_via: Option<RetryVia>,
}

impl RabbitSourceSpec {
    pub fn settings(&self, route: &RouteContext) -> ConsumerSettings {
        ConsumerSettings {
            queue: self.queue.clone(),
            prefetch: self.prefetch.unwrap_or_else(|| {
                u16::try_from(route.concurrency.saturating_mul(2))
                    .unwrap_or(u16::MAX)
                    .max(2)
            }),
            retry_via: self.retry_via.unwrap_or_default(),
            consumer_tag: format!("sluice-{}", route.name),
        }
    }

    pub fn describe(settings: &ConsumerSettings) -> String {
        let via = match settings.retry_via {
            RetryVia::DelayQueue => "delay queues",
            RetryVia::InProcess => "in process",
        };
        format!(
            "rabbitmq queue {} (prefetch {}, retries {via})",
            settings.queue, settings.prefetch
        )
    }

    pub fn validate(&self, _route: &RouteContext) -> Result<(), Problem> {
        if self.prefetch == Some(0) {
            return Err(("source.prefetch".into(), "must be at least 1".into()));
        }
        Ok(())
    }
}
