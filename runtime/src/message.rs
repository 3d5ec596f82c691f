//! Broker-neutral message types shared by sources, sinks, the pipeline and the
//! engine.

use serde::{Deserialize, Serialize};

/// One header (name, value). Names keep their case; a name may repeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

impl Header {
    pub fn new(name: impl Into<String>, value: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            value: value.into(),
        }
    }
}

/// The header that names a message for de-duplication (JetStream's name;
/// the embedded broker honours it too). sluice stamps it on every publish.
pub const DEDUP_HEADER: &str = "Nats-Msg-Id";

/// The header that carries a record key where the message model has none:
/// a handler publishing to Kafka sets it (the sink makes it the record key),
/// and a dead letter of a keyed message keeps its key in it.
pub const KEY_HEADER: &str = "sluice-key";

/// Finds the first header called `name`, ignoring ASCII case.
pub fn find_header<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str())
}

/// A message as received from a broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Broker-native id (stream sequence, topic/partition/offset, ...).
    pub id: String,
    pub subject: String,
    pub key: Option<String>,
    pub headers: Vec<Header>,
    pub payload: Vec<u8>,
    /// 1-based delivery attempt.
    pub attempt: u32,
    /// Milliseconds since the Unix epoch; 0 if unknown.
    pub timestamp_ms: u64,
    pub reply_to: Option<String>,
}

impl Message {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// A message to be published: a handler's publish, a reply or a dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outbound {
    pub subject: String,
    pub headers: Vec<Header>,
    #[serde(with = "payload_text")]
    pub payload: Vec<u8>,
}

/// Payloads serialise as text when they are UTF-8 (readable JSON output of
/// `sluice invoke`) and as `{"base64": ...}` otherwise.
pub mod payload_text {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Text(String),
        Binary { base64: String },
    }

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Repr::Text(text.to_owned()).serialize(s),
            Err(_) => Repr::Binary {
                base64: base64::engine::general_purpose::STANDARD.encode(bytes),
            }
            .serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Text(text) => Ok(text.into_bytes()),
            Repr::Binary { base64 } => base64::engine::general_purpose::STANDARD
                .decode(base64)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// A random id of this process, fixed for its lifetime: part of ids that
/// must not repeat across restarts or replicas (core NATS message ids,
/// RabbitMQ delivery ids without a message id, lease owners).
pub fn process_nonce() -> &'static str {
    static NONCE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NONCE.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

static INSTANCE_ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// This replica's name (`instance_id` in the config; default the hostname
/// and the pid): in lease owners, logs and `sluice_instance_info`.
pub fn instance_id() -> &'static str {
    INSTANCE_ID.get_or_init(default_instance_id)
}

/// Names this replica; the first name given (or read) stays for the
/// process's life, as leases carry it.
pub fn set_instance_id(id: &str) {
    let _ = INSTANCE_ID.set(id.to_owned());
}

/// Whether `id` may name a replica (it goes into store keys and labels).
pub fn valid_instance_id(id: &str) -> bool {
    (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `<hostname>-<pid>`: distinct for replicas on one host and across pods.
fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let host = if host.is_empty() { "sluice".to_owned() } else { host };
    format!("{host}-{}", std::process::id())
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_instance_id_is_a_valid_one() {
        let id = default_instance_id();
        assert!(valid_instance_id(&id), "{id}");
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
        assert!(!valid_instance_id("") && !valid_instance_id("a b") && !valid_instance_id(&"a".repeat(129)));
    }
}
