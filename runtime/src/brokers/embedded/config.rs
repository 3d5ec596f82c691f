//! `[brokers.embedded]`: the queues beyond those the routes declare.

use serde::Deserialize;
use std::time::Duration;

/// The embedded broker is always there; routes' queues and dead-letter queues
/// are declared from the routes. Extra queues catch other subjects (e.g. the
/// handlers' outputs) so they can be read back.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
    /// Publishes with the same `Nats-Msg-Id` within this window are stored
    /// once (as JetStream does).
    #[serde(default = "default_duplicate_window", with = "crate::de::duration")]
    pub duplicate_window: Duration,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            queues: Vec::new(),
            duplicate_window: default_duplicate_window(),
        }
    }
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    /// Subject patterns bound to this queue (`enriched.>`).
    pub subjects: Vec<String>,
    /// Keep at most this many messages; the oldest are dropped beyond it.
    pub max_len: Option<u64>,
}
