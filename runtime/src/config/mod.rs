//! The config file: TOML with `${ENV}` / `${ENV:-default}` interpolation.
//! Unknown keys and bad values are errors that name file, line and key.
//! Relative paths are taken relative to the config file's folder.


pub(crate) mod interpolate;
mod load;
mod locate;

pub use load::{load, load_unbuilt, parse_str, ConfigError};

pub use crate::engine::Isolation;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the embedded broker, idempotency records and the compiled-plugin
    /// cache live.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// How long SIGTERM waits for in-flight messages before giving up.
    #[serde(default = "default_grace", with = "crate::de::duration")]
    pub shutdown_grace: Duration,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub engine: EngineConfig,
    #[serde(default)]
    pub brokers: BrokersConfig,
    #[serde(default)]
    pub stores: StoresConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The file this came from; set by the loader.
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".sluice")
}
fn default_grace() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin HTTP API (`/healthz`, `/readyz`, `/metrics`,
    /// `/v1/publish/{subject}`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Bearer token every endpoint except `/healthz` and `/readyz` (and
    /// `/metrics` unless `metrics_auth`) requires. Empty: none.
    #[serde(default)]
    pub token: Option<String>,
    /// Require the token for `/metrics` too.
    #[serde(default)]
    pub metrics_auth: bool,
    /// Listen on a non-loopback address without a token (anyone who reaches
    /// the port can publish and replay). Off: such a config refuses to start.
    #[serde(default)]
    pub insecure: bool,
    /// Host names (with port) requests may be addressed to besides the listen
    /// address and, on loopback, `localhost`: a defence against DNS
    /// rebinding. E.g. `["sluice.internal:9595"]`.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            token: None,
            metrics_auth: false,
            insecure: false,
            allowed_hosts: Vec::new(),
        }
    }
}

impl AdminConfig {
    /// The token, if one is set (an empty `${SLUICE_ADMIN_TOKEN:-}` is none).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().filter(|t| !t.is_empty())
    }
}

pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9595))
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineConfig {
    /// Instances that can exist at once across all plugins (pool slots).
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Keep compiled plugins on disk so a restart does not recompile.
    #[serde(default = "yes")]
    pub cache: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_instances: default_max_instances(),
            cache: true,
        }
    }
}

fn default_max_instances() -> u32 {
    256
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokersConfig {
    #[serde(default)]
    pub embedded: EmbeddedConfig,
    /// NATS and JetStream; routes with `broker = "nats"` or `"jetstream"`
    /// need it.
    pub nats: Option<crate::brokers::nats::NatsConfig>,
    /// RabbitMQ; routes with `broker = "rabbitmq"` need it.
    pub rabbitmq: Option<crate::brokers::rabbitmq::RabbitConfig>,
    /// Kafka; routes with `broker = "kafka"` need it.
    pub kafka: Option<crate::brokers::kafka::KafkaConfig>,
}

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

/// Shared stores used by several replicas.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresConfig {
    /// `redis://host:port/db`, for `idempotency.store = "redis"`.
    pub redis_url: Option<String>,
}

/// Export of message spans.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/HTTP endpoint of an OpenTelemetry collector
    /// (`http://collector:4318`); spans go to `<endpoint>/v1/traces` as
    /// JSON. Unset or empty: no export.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: default_service_name(),
        }
    }
}

fn default_service_name() -> String {
    "sluice".into()
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The component (`.wasm`) file.
    pub path: PathBuf,
    #[serde(default)]
    pub isolation: Isolation,
    /// Linear memory cap per instance, in MiB.
    #[serde(default = "default_memory_mb")]
    pub max_memory_mb: u64,
    /// Deadline for one message.
    #[serde(default = "default_timeout", with = "crate::de::duration")]
    pub timeout: Duration,
    /// Optional CPU budget per message, in wasmtime fuel units.
    pub fuel: Option<u64>,
    /// With `isolation = "reuse"`: messages an instance handles before it is
    /// replaced.
    #[serde(default = "default_reuse_max")]
    pub reuse_max_messages: u32,
    /// Subject patterns the plugin may `publish` to. Empty: none.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Subject patterns the plugin may send `request`s to. Empty: none.
    #[serde(default)]
    pub request: Vec<String>,
    /// Settings the plugin reads with `config(key)`.
    #[serde(default)]
    pub config: BTreeMap<String, toml::Value>,
    /// The plugin's source crate, rebuilt on change by `sluice dev`. When
    /// unset, `sluice dev` looks for the crate that builds `path`.
    pub source: Option<PathBuf>,
}

fn default_memory_mb() -> u64 {
    64
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_reuse_max() -> u32 {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Embedded,
    /// Core NATS: at-most-once.
    Nats,
    /// A JetStream durable pull consumer.
    Jetstream,
    /// A RabbitMQ queue.
    Rabbitmq,
    /// Kafka topics, through a consumer group.
    Kafka,
}

impl BrokerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Nats => "nats",
            Self::Jetstream => "jetstream",
            Self::Rabbitmq => "rabbitmq",
            Self::Kafka => "kafka",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(default = "default_broker")]
    pub broker: BrokerKind,
    /// Subject pattern (`orders.>`); for JetStream, the consumer's filter.
    /// Not used by RabbitMQ (see `queue`).
    #[serde(default)]
    pub subject: String,
    /// Core NATS: replicas in the same queue group share the messages.
    pub queue_group: Option<String>,
    /// JetStream: the stream (declared under `[[brokers.nats.streams]]` or
    /// existing).
    pub stream: Option<String>,
    /// JetStream: durable consumer name (default: the route name).
    pub consumer: Option<String>,
    /// JetStream: redelivery after this long without an ack.
    #[serde(default, with = "crate::de::duration")]
    pub ack_wait: Option<Duration>,
    /// JetStream: deliveries at most (default unlimited; sluice dead-letters
    /// after `retry.max_attempts`).
    pub max_deliver: Option<i64>,
    /// JetStream: unacknowledged messages at most.
    pub max_ack_pending: Option<i64>,
    /// RabbitMQ: the queue to consume (declared under
    /// `[[brokers.rabbitmq.queues]]`, or existing).
    pub queue: Option<String>,
    /// RabbitMQ: unacked deliveries at most (`basic.qos`); default twice the
    /// route's concurrency.
    pub prefetch: Option<u16>,
    /// RabbitMQ: `delay_queue` (default) or `in_process`.
    pub retry_via: Option<crate::brokers::rabbitmq::RetryVia>,
    /// Kafka: topic names, or regexes starting with `^`.
    pub topics: Option<Vec<String>>,
    /// Kafka: the consumer group (default `sluice-<route>`).
    pub group: Option<String>,
    /// Kafka: where a group without a committed offset starts.
    pub offset_reset: Option<crate::brokers::kafka::OffsetReset>,
    /// Kafka: `group.instance.id`, for static membership.
    pub instance_id: Option<String>,
    /// Kafka: records received and not settled per partition before the
    /// partition is paused (default 5000); it resumes at half.
    pub max_in_flight_per_partition: Option<usize>,
    /// Kafka: records received and not settled across all partitions before
    /// the consumer stops taking more (default 20000).
    pub max_in_flight: Option<usize>,
    /// Kafka: how long a revoke waits for the partition's work in flight.
    #[serde(default, with = "crate::de::duration")]
    pub revoke_timeout: Option<Duration>,
    /// Kafka, with `ordering = "none"`: retry through the topics
    /// `<topic>.retry.N` (N = the attempt that failed) with a not-before
    /// header instead of in place, so a failing record does not hold up the
    /// ones after it (which then overtake it).
    pub retry_topics: Option<bool>,
}

fn default_broker() -> BrokerKind {
    BrokerKind::Embedded
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Defaults to the source's broker.
    pub broker: Option<BrokerKind>,
    /// The subject; on RabbitMQ the routing key (with the default exchange:
    /// the queue, which sluice declares when missing).
    pub subject: String,
    /// RabbitMQ: publish dead letters to this exchange instead of straight
    /// to the queue named by `subject`.
    pub exchange: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// A random delay between 0 and the computed backoff.
    #[default]
    Full,
    None,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in all, the first included; then the message is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    #[serde(default = "default_initial_backoff", with = "crate::de::duration")]
    pub initial_backoff: Duration,
    #[serde(default = "default_max_backoff", with = "crate::de::duration")]
    pub max_backoff: Duration,
    #[serde(default = "default_multiplier")]
    pub multiplier: f64,
    #[serde(default)]
    pub jitter: Jitter,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
            multiplier: default_multiplier(),
            jitter: Jitter::Full,
        }
    }
}

fn default_max_attempts() -> u32 {
    5
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(200)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}
fn default_multiplier() -> f64 {
    2.0
}

/// Whether a failure of some kind is retried or dead-lettered at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureAction {
    Retry,
    DeadLetter,
}

/// Per-route treatment of host-detected failures.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailureMapping {
    #[serde(default = "retry")]
    pub trap: FailureAction,
    #[serde(default = "retry")]
    pub timeout: FailureAction,
    #[serde(default = "retry")]
    pub memory: FailureAction,
}

impl Default for FailureMapping {
    fn default() -> Self {
        Self {
            trap: FailureAction::Retry,
            timeout: FailureAction::Retry,
            memory: FailureAction::Retry,
        }
    }
}

fn retry() -> FailureAction {
    FailureAction::Retry
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Ordering {
    /// Up to `concurrency` messages at once, in any order; retries are
    /// broker-native delayed redeliveries.
    #[default]
    None,
    /// One message at a time per key, different keys in parallel; retries
    /// wait in place so a key's order holds.
    Key,
    /// One message at a time per partition (Kafka; the embedded broker
    /// has one partition), partitions in parallel.
    Partition,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GateStore {
    Memory,
    /// An embedded file in `data_dir`; survives restarts.
    #[default]
    File,
    /// Shared by replicas; needs `[stores] redis_url`.
    Redis,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// `header:NAME`, `json:/pointer`, `id` (broker-native id) or `none`.
    pub key: crate::keys::KeySource,
    /// How long a handled key is remembered.
    #[serde(default = "default_ttl", with = "crate::de::duration")]
    pub ttl: Duration,
    /// How long a worker holds a key while handling it; a crashed worker's
    /// key frees up after this. Must exceed the plugin's timeout.
    #[serde(default = "default_lease", with = "crate::de::duration")]
    pub lease: Duration,
    #[serde(default)]
    pub store: GateStore,
}

fn default_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_lease() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    pub source: SourceConfig,
    /// Name of a `[plugins.NAME]` table.
    pub plugin: String,
    /// Messages of this route handled at once.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Default: `partition` on Kafka, `none` elsewhere.
    pub ordering: Option<Ordering>,
    /// Where the ordering key comes from when the broker has none:
    /// `header:NAME` or `json:/pointer`. Default: the broker's message key.
    pub key: Option<crate::keys::KeySource>,
    pub idempotency: Option<IdempotencyConfig>,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub on_failure: FailureMapping,
    /// Where exhausted and permanent failures go. Default: the subject
    /// `dlq.<route>` on the source's broker.
    pub dead_letter: Option<DeadLetterConfig>,
    /// The broker the handler's publishes go to. Default: the source's.
    pub publish_broker: Option<BrokerKind>,
}

fn one() -> u32 {
    1
}

impl RouteConfig {
    pub fn ordering(&self) -> Ordering {
        self.ordering.unwrap_or(if self.source.broker == BrokerKind::Kafka {
            Ordering::Partition
        } else {
            Ordering::None
        })
    }

    pub fn dead_letter_subject(&self) -> String {
        self.dead_letter
            .as_ref()
            .map(|d| d.subject.clone())
            .unwrap_or_else(|| format!("dlq.{}", self.name))
    }
}

impl PluginConfig {
    /// Plugin settings as strings, as the `config` host call returns them.
    pub fn settings(&self) -> BTreeMap<String, String> {
        self.config
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                (k.clone(), text)
            })
            .collect()
    }
}
