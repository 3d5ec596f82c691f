//! The config file: TOML with `${ENV}` / `${ENV:-default}` interpolation.
//! Unknown keys and bad values are errors that name file, line and key.
//! Relative paths are taken relative to the config file's folder.

pub(crate) mod interpolate;
mod load;
mod locate;

pub use load::{load, load_unbuilt, parse_str, ConfigError};

pub use crate::brokers::{BrokerKind, BrokersConfig, SourceSpec};
use crate::brokers::{DeadLetterTarget, RouteContext, RouteUse};
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
    /// This replica's name, in lease owners, logs and `sluice_instance_info`
    /// (default: the hostname and the pid). Letters, digits, `.`, `_`, `-`.
    pub instance_id: Option<String>,
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

/// Shared stores used by several replicas.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoresConfig {
    /// `redis://host:port/db`, for `idempotency.store = "redis"`.
    pub redis_url: Option<String>,
    /// The JetStream key-value bucket of `idempotency.store = "nats-kv"`
    /// (on the `[brokers.nats]` server; created when missing). Default
    /// `sluice_idempotency`.
    pub nats_kv_bucket: Option<String>,
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
    /// For a `wasi:messaging` component: whether an `error` returned by its
    /// handler is retried (`retryable`) or dead-lettered at once
    /// (`permanent`).
    #[serde(default)]
    pub handler_error: crate::engine::HandlerErrorPolicy,
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

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Defaults to the source's broker.
    pub broker: Option<BrokerKind>,
    /// The subject; on brokers with queues, the queue (declared when
    /// missing) or, with `exchange`, the routing key.
    pub subject: String,
    /// On brokers with exchanges: publish dead letters to this exchange
    /// instead of straight to the queue named by `subject`.
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
    /// One message at a time per partition (the embedded broker has one),
    /// partitions in parallel.
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
    /// Shared by replicas: a JetStream key-value bucket on the
    /// `[brokers.nats]` server.
    #[serde(rename = "nats-kv")]
    NatsKv,
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
    /// `{ broker = "...", ... }`: the broker's own settings.
    pub source: SourceSpec,
    /// Name of a `[plugins.NAME]` table.
    pub plugin: String,
    /// Messages of this route handled at once.
    #[serde(default = "one")]
    pub concurrency: u32,
    /// Default: `partition` on brokers with partitions, `none` elsewhere.
    pub ordering: Option<Ordering>,
    /// Where the ordering key comes from: `header:NAME` or
    /// `json:/pointer`. Default: the broker's message key.
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
    /// Hand the plugin several messages per call (`handle-batch`, or one
    /// instance calling `handle` for each); none: one message per call.
    pub batch: Option<BatchConfig>,
}

/// `batch = { max_messages = 64, max_wait = "5ms", max_bytes = 1048576 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Most messages in one batch.
    #[serde(default = "default_batch_messages")]
    pub max_messages: u32,
    /// How long a batch waits for more messages once its first is in.
    #[serde(default = "default_batch_wait", with = "crate::de::duration")]
    pub max_wait: Duration,
    /// Most payload bytes in one batch (a message larger than this makes a
    /// batch of its own).
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: u64,
}

fn default_batch_messages() -> u32 {
    64
}
fn default_batch_wait() -> Duration {
    Duration::from_millis(5)
}
fn default_batch_bytes() -> u64 {
    4 << 20
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_messages: default_batch_messages(),
            max_wait: default_batch_wait(),
            max_bytes: default_batch_bytes(),
        }
    }
}

fn one() -> u32 {
    1
}

impl RouteConfig {
    pub fn ordering(&self) -> Ordering {
        self.ordering.unwrap_or(if self.source.partitioned() {
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

    /// The broker dead letters go to: the source's, unless it says.
    pub fn dead_letter_broker(&self) -> BrokerKind {
        self.dead_letter
            .as_ref()
            .and_then(|d| d.broker)
            .unwrap_or(self.source.kind())
    }

    /// The broker the handler's publishes go to.
    pub fn publish_broker(&self) -> BrokerKind {
        self.publish_broker.unwrap_or(self.source.kind())
    }

    /// The route as its brokers see it.
    pub fn broker_use(&self) -> RouteUse<'_> {
        RouteUse {
            context: RouteContext {
                name: &self.name,
                concurrency: self.concurrency,
                max_attempts: self.retry.max_attempts,
                unordered: self.ordering() == Ordering::None,
            },
            source: &self.source,
            dead_letter: DeadLetterTarget {
                broker: self.dead_letter_broker(),
                subject: self.dead_letter_subject(),
                exchange: self.dead_letter.as_ref().and_then(|d| d.exchange.as_deref()),
            },
            publish_broker: self.publish_broker(),
        }
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
