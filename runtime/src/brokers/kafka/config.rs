//! `[brokers.kafka]`: bootstrap servers, security, librdkafka pass-through
//! and topics to create.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`: `host:port`, comma-separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    pub sasl_username: Option<String>,
    /// Use `${ENV}` rather than writing it here.
    pub sasl_password: Option<String>,
    /// CA certificate file for TLS.
    pub ssl_ca_location: Option<String>,
    /// How often the handled prefix of each partition is committed (also
    /// at revoke and shutdown).
    #[serde(default = "default_commit_interval", with = "crate::de::duration")]
    pub commit_interval: Duration,
    /// Any librdkafka property, for consumers and producer alike
    /// (`"partition.assignment.strategy" = "cooperative-sticky"`, ...).
    #[serde(default)]
    pub librdkafka: BTreeMap<String, String>,
    /// Topics to create when missing.
    #[serde(default)]
    pub topics: Vec<TopicConfig>,
    /// Create a topic sluice publishes to (handler publishes, dead letters)
    /// when it does not exist, with `default_partitions`.
    #[serde(default = "yes")]
    pub create_topics: bool,
    #[serde(default = "one")]
    pub default_partitions: i32,
}

fn yes() -> bool {
    true
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_client_id() -> String {
    "sluice".into()
}
fn default_commit_interval() -> Duration {
    Duration::from_secs(1)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    #[serde(default = "one")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Topic configs (`retention.ms`, `cleanup.policy`, ...).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

fn one() -> i32 {
    1
}

/// Where a consumer group without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    #[default]
    Earliest,
    Latest,
}

impl OffsetReset {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Earliest => "earliest",
            Self::Latest => "latest",
        }
    }
}

/// Consumer settings of a route.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Names, or regexes starting with `^`.
    pub topics: Vec<String>,
    pub group: String,
    pub offset_reset: OffsetReset,
    /// `group.instance.id`: static membership (a restart within the session
    /// timeout keeps the partitions without a rebalance).
    pub instance_id: Option<String>,
    /// Records received and not settled per partition before the partition
    /// is paused.
    pub max_in_flight_per_partition: usize,
    /// Records received and not settled across all partitions before the
    /// consumer stops taking more (librdkafka keeps its own bounded prefetch).
    pub max_in_flight: usize,
    /// How long a revoke waits for the partition's records in flight.
    pub revoke_timeout: Duration,
    /// Retry topics per topic (`<topic>.retry.1` ..), 0 for retries in
    /// place: a failed record is produced to the next one with a not-before
    /// time, and its offset settles.
    pub retry_levels: u32,
}
