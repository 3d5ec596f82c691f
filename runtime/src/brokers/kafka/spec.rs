//! A route's `source` on Kafka, with its defaults.

use super::config::{ConsumerSettings, OffsetReset};
use crate::brokers::{Problem, RouteContext};
use serde::Deserialize;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSourceSpec {
    /// Topic names, or regexes starting with `^`.
    pub topics: Vec<String>,
    /// The consumer group (default `sluice-<route>`).
    pub group: Option<String>,
    /// Where a group without a committed offset starts.
    pub offset_reset: Option<OffsetReset>,
    /// `group.instance.id`, for static membership.
    pub instance_id: Option<String>,
    /// Records received and not settled per partition before the partition
    /// is paused (default 5000); it resumes at half.
    pub max_in_flight_per_partition: Option<usize>,
    /// Records received and not settled across all partitions before the
    /// consumer stops taking more (default 20000).
    pub max_in_flight: Option<usize>,
    /// How long a revoke waits for the partition's work in flight.
    #[serde(default, with = "crate::de::duration")]
    pub revoke_timeout: Option<Duration>,
    /// With `ordering = "none"`: retry through the topics `<topic>.retry.N`
    /// (N = the attempt that failed) with a not-before header instead of in
    /// place, so a failing record does not hold up the ones after it (which
    /// then overtake it).
    pub retry_topics: Option<bool>,
}

impl KafkaSourceSpec {
    pub fn settings(&self, route: &RouteContext) -> ConsumerSettings {
        ConsumerSettings {
            topics: self.topics.clone(),
            group: self.group.clone().unwrap_or_else(|| format!("sluice-{}", route.name)),
            offset_reset: self.offset_reset.unwrap_or_default(),
            instance_id: self.instance_id.clone(),
            max_in_flight_per_partition: self.max_in_flight_per_partition.unwrap_or(5000),
            max_in_flight: self.max_in_flight.unwrap_or(20_000),
            revoke_timeout: self.revoke_timeout.unwrap_or(Duration::from_secs(30)),
            retry_levels: match self.retry_topics {
                Some(true) => route.max_attempts.saturating_sub(1),
                _ => 0,
            },
        }
    }

    pub fn describe(settings: &ConsumerSettings) -> String {
        let retries = if settings.retry_levels > 0 {
            ", retry topics"
        } else {
            ""
        };
        format!(
            "kafka {} (group {}{retries})",
            settings.topics.join(","),
            settings.group
        )
    }

    pub fn validate(&self, route: &RouteContext) -> Result<(), Problem> {
        if self.topics.is_empty() {
            return Err(("source.topics".into(), "names no topic".into()));
        }
        if self.max_in_flight_per_partition == Some(0) {
            return Err(("source.max_in_flight_per_partition".into(), "must be at least 1".into()));
        }
        if self.max_in_flight == Some(0) {
            return Err(("source.max_in_flight".into(), "must be at least 1".into()));
        }
        if self.retry_topics == Some(true) {
            if !route.unordered {
                return Err((
                    "source.retry_topics".into(),
                    "needs `ordering = \"none\"`: records after a failing one overtake it while it waits in a retry topic".into(),
                ));
            }
            if self.topics.iter().any(|t| t.starts_with('^')) {
                return Err((
                    "source.retry_topics".into(),
                    "needs topic names, not regexes (the retry topics are named after them)".into(),
                ));
            }
        }
        Ok(())
    }
}
