//! `[brokers.rabbitmq]`: connection, and the exchanges, queues and bindings
//! sluice declares (created when missing, refused in words when an existing
//! one differs).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitConfig {
    /// `amqp://user:password@host:5672/vhost` (`%2f` is the vhost `/`);
    /// `amqps://` for TLS. Put secrets in `${ENV}`.
    #[serde(default = "default_url")]
    pub url: String,
    /// The exchange handler publishes go to; the published subject is the
    /// routing key. Default: the default exchange (`""`), which routes to
    /// the queue named by the routing key.
    #[serde(default)]
    pub publish_exchange: String,
    /// Connection name shown in the management UI.
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub exchanges: Vec<ExchangeConfig>,
    #[serde(default)]
    pub queues: Vec<QueueConfig>,
}

fn default_url() -> String {
    "amqp://guest:guest@127.0.0.1:5672/%2f".into()
}
fn default_name() -> String {
    "sluice".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeKind {
    #[default]
    Topic,
    Direct,
    Fanout,
    Headers,
}

impl ExchangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Headers => "headers",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeConfig {
    pub name: String,
    #[serde(default)]
    pub kind: ExchangeKind,
    #[serde(default = "yes")]
    pub durable: bool,
    /// Extra arguments (`alternate-exchange`, ...).
    #[serde(default)]
    pub arguments: BTreeMap<String, toml::Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    #[default]
    Classic,
    Quorum,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    pub name: String,
    #[serde(default = "yes")]
    pub durable: bool,
    #[serde(default)]
    pub queue_type: QueueType,
    /// `x-max-length`: messages kept at most.
    pub max_length: Option<i64>,
    /// `x-message-ttl`: messages older than this are dropped (or
    /// dead-lettered by RabbitMQ's own policy).
    #[serde(default, with = "crate::de::duration")]
    pub message_ttl: Option<Duration>,
    /// Other `x-` arguments, as RabbitMQ names them.
    #[serde(default)]
    pub arguments: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub bindings: Vec<BindingConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingConfig {
    pub exchange: String,
    /// Routing key or pattern (`order.#`, `*.created`); ignored by fanout
    /// and headers exchanges.
    #[serde(default)]
    pub routing_key: String,
    /// For headers exchanges: `x-match` and the header values.
    #[serde(default)]
    pub arguments: BTreeMap<String, toml::Value>,
}

fn yes() -> bool {
    true
}

/// How a RabbitMQ route retries a failed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RetryVia {
    /// Republished (with confirms) to a delay queue whose TTL expires it back
    /// into the work queue; the original is acked. Survives a crash and
    /// never blocks the queue.
    #[default]
    DelayQueue,
    /// Held unacked in the process and handed out again after the delay; a
    /// crash hands it back to RabbitMQ (redelivered at once).
    InProcess,
}

/// Consumer settings of a route.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub queue: String,
    pub prefetch: u16,
    pub retry_via: RetryVia,
    pub consumer_tag: String,
}
