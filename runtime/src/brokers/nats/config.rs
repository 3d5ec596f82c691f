//! `[brokers.nats]`: connection, credentials and JetStream streams.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs, comma-separated (`nats://127.0.0.1:4222`).
    #[serde(default = "default_url")]
    pub url: String,
    /// Connection name shown by the server.
    #[serde(default = "default_name")]
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (`SU...`); use `${ENV}` rather than writing it here.
    pub nkey_seed: Option<String>,
    /// A `.creds` file (JWT + seed).
    pub credentials_file: Option<PathBuf>,
    /// Require TLS; `tls_ca_file` adds a root certificate.
    #[serde(default)]
    pub tls_required: bool,
    pub tls_ca_file: Option<PathBuf>,
    /// How long a request from a handler's `request` waits at most.
    #[serde(default = "default_request_timeout", with = "crate::de::duration")]
    pub request_timeout: Duration,
    /// JetStream streams to create when missing and verify when present.
    #[serde(default)]
    pub streams: Vec<StreamConfig>,
}

fn default_url() -> String {
    "nats://127.0.0.1:4222".into()
}
fn default_name() -> String {
    "sluice".into()
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Retention {
    #[default]
    Limits,
    Interest,
    Workqueue,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    pub name: String,
    pub subjects: Vec<String>,
    #[serde(default)]
    pub retention: Retention,
    /// Keep at most this many messages (none: unlimited).
    pub max_messages: Option<i64>,
    /// Drop messages older than this (none: never).
    #[serde(default, with = "crate::de::duration")]
    pub max_age: Option<Duration>,
    /// Publishes with the same `Nats-Msg-Id` within this window are stored once.
    #[serde(default = "default_duplicate_window", with = "crate::de::duration")]
    pub duplicate_window: Duration,
}

fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}

/// JetStream consumer settings of a route.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    pub stream: String,
    pub durable: String,
    pub filter_subject: String,
    pub ack_wait: Duration,
    /// -1: unlimited (sluice dead-letters after `max_attempts`).
    pub max_deliver: i64,
    pub max_ack_pending: i64,
}
