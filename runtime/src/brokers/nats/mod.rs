//! NATS: core subjects (at-most-once) and JetStream durable pull consumers,
//! a sink that waits for JetStream's PubAck where a stream covers the
//! subject, and request/reply for handlers. Knows nothing of WASM.

pub mod config;
mod core;
mod dead_letters;
mod jetstream;
pub mod spec;

pub use self::core::CoreSource;
pub use self::jetstream::JetStreamSource;
pub use config::{ConsumerSettings, NatsConfig, Retention, StreamConfig};
pub use dead_letters::StreamDeadLetters;
pub use spec::{CoreSourceSpec, JetStreamSourceSpec};

use super::{BoxFuture, BrokerError, Published, Sink};
use crate::error::{cause, Cause};
use crate::message::{Header, Outbound};
use crate::subject::SubjectPattern;
use async_nats::jetstream::stream;
use std::sync::Arc;
use std::time::Duration;

pub(crate) const NAME: &str = "nats";

pub(crate) fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BrokerError {
    BrokerError::failed(NAME, e)
}

#[derive(Debug, thiserror::Error)]
pub enum NatsSetupError {
    #[error("cannot connect to NATS at {url}")]
    Connect {
        url: String,
        #[source]
        cause: Cause,
    },
    #[error("NATS credentials {}", path.display())]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error("JetStream stream `{stream}`")]
    Stream {
        stream: String,
        #[source]
        cause: Cause,
    },
    #[error("JetStream consumer `{consumer}` on stream `{stream}`")]
    Consumer {
        stream: String,
        consumer: String,
        #[source]
        cause: Cause,
    },
    #[error("NATS subscription to `{subject}`")]
    Subscribe {
        subject: String,
        #[source]
        cause: Cause,
    },
}

/// A connection to NATS (reconnects by itself) and its JetStream context.
#[derive(Clone)]
pub struct NatsBroker {
    pub(crate) client: async_nats::Client,
    pub(crate) js: async_nats::jetstream::Context,
    /// Subjects stored by a declared stream (stream name, pattern): publishes
    /// to them wait for a PubAck.
    stream_subjects: Arc<Vec<(String, SubjectPattern)>>,
    request_timeout: Duration,
}

/// Headers as NATS carries them. A name or value NATS cannot carry is
/// refused here: async-nats asserts (panics) on them.
pub(crate) fn to_header_map(headers: &[Header]) -> Result<async_nats::HeaderMap, BrokerError> {
    let mut map = async_nats::HeaderMap::new();
    for h in headers {
        let shown = || crate::headers::shown(&h.name);
        if h.name.is_empty() {
            return Err(BrokerError::refused(NAME, "empty header name"));
        }
        let name = async_nats::HeaderName::try_from(h.name.as_str())
            .map_err(|_| BrokerError::refused(NAME, format!("header name {:?} is not valid for NATS", shown())))?;
        let value: async_nats::HeaderValue = h
            .value
            .parse()
            .map_err(|_| BrokerError::refused(NAME, format!("header {:?} has a value with CR or LF", shown())))?;
        map.append(name, value);
    }
    Ok(map)
}

/// A subject NATS accepts for a publish: no whitespace or control bytes,
/// no wildcards, no empty tokens.
fn check_publish_subject(subject: &str) -> Result<(), BrokerError> {
    if subject.chars().any(char::is_control) {
        return Err(BrokerError::refused(NAME, "subject contains a control character"));
    }
    crate::subject::validate_subject(subject).map_err(|e| BrokerError::refused(NAME, e.to_string()))
}

fn stored_outbound(m: async_nats::jetstream::message::StreamMessage) -> Outbound {
    Outbound {
        subject: m.subject.to_string(),
        headers: from_header_map(Some(&m.headers)),
        payload: m.payload.to_vec(),
    }
}

pub(crate) fn from_header_map(map: Option<&async_nats::HeaderMap>) -> Vec<Header> {
    let Some(map) = map else { return Vec::new() };
    let mut out = Vec::new();
    for (name, values) in map.iter() {
        for v in values {
            out.push(Header::new(name.to_string(), v.as_str()));
        }
    }
    out
}

/// A client on `config`'s server with its credentials, failing fast if the
/// server cannot be reached (also what a NATS key-value store connects with).
pub async fn connect_client(config: &NatsConfig) -> Result<async_nats::Client, NatsSetupError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None::<usize>)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                async_nats::Event::Disconnected => super::events::disconnected(NAME),
                other => tracing::debug!("NATS: {other}"),
            }
        });
    // An empty value (`${NATS_USER:-}`) means: not set.
    let set = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
    if let (Some(user), Some(password)) = (set(&config.user), set(&config.password)) {
        options = options.user_and_password(user, password);
    }
    if let Some(token) = set(&config.token) {
        options = options.token(token);
    }
    if let Some(seed) = set(&config.nkey_seed) {
        options = options.nkey(seed);
    }
    if let Some(path) = &config.credentials_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|cause| NatsSetupError::Credentials {
                path: path.clone(),
                cause,
            })?;
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    let client = options
        .connect(config.url.as_str())
        .await
        .map_err(|e| NatsSetupError::Connect {
            url: super::redact_url(&config.url),
            // The client's error may quote the URL, password and all.
            cause: cause(e.to_string().replace(&config.url, &super::redact_url(&config.url))),
        })?;
    Ok(client)
}

impl NatsBroker {
    /// Connects (failing fast if the server cannot be reached) and declares
    /// the configured streams.
    pub async fn connect(config: &NatsConfig) -> Result<Self, NatsSetupError> {
        let client = connect_client(config).await?;
        let js = async_nats::jetstream::new(client.clone());
        let mut stream_subjects = Vec::new();
        for s in &config.streams {
            declare_stream(&js, s).await?;
            for subject in &s.subjects {
                if let Ok(p) = SubjectPattern::parse(subject) {
                    stream_subjects.push((s.name.clone(), p));
                }
            }
        }
        Ok(Self {
            client,
            js,
            stream_subjects: Arc::new(stream_subjects),
            request_timeout: config.request_timeout,
        })
    }

    /// Sends what is buffered (acks, publishes) and closes the connection:
    /// at shutdown, after the routes have settled their messages.
    pub async fn close(&self) {
        if let Err(e) = self.client.flush().await {
            super::events::failed(NAME, "flush", &e, " (before closing)");
        }
        if let Err(e) = self.client.drain().await {
            tracing::debug!("NATS: drain: {e}");
        }
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A core subscription (with a queue group, replicas share the load).
    pub async fn core_source(&self, subject: &str, queue_group: Option<&str>) -> Result<CoreSource, NatsSetupError> {
        CoreSource::subscribe(self.clone(), subject, queue_group).await
    }

    /// A durable pull consumer, created when missing, verified when present.
    pub async fn jetstream_source(&self, settings: &ConsumerSettings) -> Result<JetStreamSource, NatsSetupError> {
        JetStreamSource::open(self.clone(), settings).await
    }

    fn stored_by_stream(&self, subject: &str) -> bool {
        self.stream_for(subject).is_some()
    }

    /// The declared stream that stores `subject`, if any.
    pub fn stream_for(&self, subject: &str) -> Option<&str> {
        self.stream_subjects
            .iter()
            .find(|(_, p)| p.matches(subject))
            .map(|(name, _)| name.as_str())
    }

    /// True if a stream stores `subject`: a declared one, or one the server
    /// already has.
    pub async fn is_stored(&self, subject: &str) -> bool {
        self.stored_by_stream(subject) || self.js.stream_by_subject(subject).await.is_ok()
    }

    /// Messages of `stream` on `subject`, oldest first: (sequence, message).
    pub async fn stored(&self, stream: &str, subject: &str, limit: usize) -> Result<Vec<(u64, Outbound)>, BrokerError> {
        let mut s = self.js.get_stream(stream).await.map_err(failed)?;
        let state = s.info().await.map_err(failed)?.state.clone();
        let mut out = Vec::new();
        if state.messages == 0 {
            return Ok(out);
        }
        for seq in state.first_sequence..=state.last_sequence {
            if out.len() >= limit {
                break;
            }
            // Deleted sequences leave gaps.
            if let Ok(m) = s.get_raw_message(seq).await {
                if m.subject.as_str() == subject {
                    out.push((seq, stored_outbound(m)));
                }
            }
        }
        Ok(out)
    }

    /// One message of `stream`, if it is on `subject`.
    pub async fn stored_one(&self, stream: &str, subject: &str, seq: u64) -> Result<Option<Outbound>, BrokerError> {
        let s = self.js.get_stream(stream).await.map_err(failed)?;
        Ok(s.get_raw_message(seq)
            .await
            .ok()
            .filter(|m| m.subject.as_str() == subject)
            .map(stored_outbound))
    }

    /// Deletes one message of `stream`.
    pub async fn delete_stored(&self, stream: &str, seq: u64) -> Result<(), BrokerError> {
        let s = self.js.get_stream(stream).await.map_err(failed)?;
        s.delete_message(seq).await.map_err(failed)?;
        Ok(())
    }

    /// What NATS would refuse of `m`, before anything of its batch is sent
    /// (a batch is all or nothing as far as it can be).
    fn check(&self, m: &Outbound, max_payload: usize) -> Result<async_nats::HeaderMap, BrokerError> {
        check_publish_subject(&m.subject)?;
        let headers = to_header_map(&m.headers)?;
        // The server's limit covers headers and payload.
        let header_bytes: usize = m.headers.iter().map(|h| h.name.len() + h.value.len() + 4).sum();
        let size = m.payload.len().saturating_add(header_bytes);
        if max_payload > 0 && size > max_payload {
            return Err(BrokerError::refused(
                NAME,
                format!("message of {size} bytes is above the server's max_payload of {max_payload}"),
            ));
        }
        Ok(headers)
    }

    /// Sends one message: to JetStream where a declared stream stores the
    /// subject (its PubAck to await: `Some`), else on core NATS (`None`;
    /// the caller flushes).
    async fn send_one(
        &self,
        m: Outbound,
        headers: async_nats::HeaderMap,
    ) -> Result<Option<async_nats::jetstream::context::PublishAckFuture>, BrokerError> {
        if self.stored_by_stream(&m.subject) {
            let ack = self
                .js
                .publish_with_headers(m.subject, headers, m.payload.into())
                .await
                .map_err(failed)?;
            Ok(Some(ack))
        } else {
            self.client
                .publish_with_headers(m.subject, headers, m.payload.into())
                .await
                .map_err(|e| match e.kind() {
                    async_nats::client::PublishErrorKind::MaxPayloadExceeded => {
                        BrokerError::refused(NAME, e.to_string())
                    }
                    _ => failed(e),
                })?;
            Ok(None)
        }
    }

    /// Sends a request and waits up to `timeout` (capped by the configured
    /// request timeout).
    pub async fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, crate::request::RequestError> {
        use crate::request::RequestError;
        let timeout = timeout.min(self.request_timeout);
        match tokio::time::timeout(timeout, self.client.request(subject.to_owned(), payload.into())).await {
            Err(_) => Err(RequestError::Timeout),
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Err(RequestError::Timeout),
            Ok(Err(e)) => Err(RequestError::Failed(cause(e))),
            Ok(Ok(reply)) => Ok(reply.payload.to_vec()),
        }
    }
}

/// A sink whose every message must be stored by a JetStream stream (PubAck),
/// declared or not: dead letters of JetStream routes, whose originals are
/// termed once the copy is confirmed. A subject no stream stores is an
/// error (the original is redelivered), never a silent core publish.
pub struct ConfirmedSink {
    broker: NatsBroker,
}

impl NatsBroker {
    pub fn confirmed_sink(&self) -> ConfirmedSink {
        ConfirmedSink { broker: self.clone() }
    }
}

impl Sink for ConfirmedSink {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(async move {
            let mut published = Published::default();
            let max_payload = self.broker.client.server_info().max_payload;
            let checked = messages
                .into_iter()
                .map(|m| self.broker.check(&m, max_payload).map(|h| (m, h)))
                .collect::<Result<Vec<_>, _>>()?;
            for (m, headers) in checked {
                let subject = m.subject.clone();
                let ack = self
                    .broker
                    .js
                    .publish_with_headers(m.subject, headers, m.payload.into())
                    .await
                    .map_err(failed)?
                    .await
                    .map_err(|e| {
                        failed(format!(
                            "no JetStream stream confirmed the message on `{subject}` (declare a stream that stores it): {e}"
                        ))
                    })?;
                published.duplicates += usize::from(ack.duplicate);
            }
            Ok(published)
        })
    }
}

impl Sink for NatsBroker {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(async move {
            let mut core = false;
            let mut published = Published::default();
            let max_payload = self.client.server_info().max_payload;
            let checked = messages
                .into_iter()
                .map(|m| self.check(&m, max_payload).map(|h| (m, h)))
                .collect::<Result<Vec<_>, _>>()?;
            // All sent first, then every PubAck awaited: a batch's
            // publishes cost one round trip, not one each. JetStream stores
            // them in the order sent.
            let mut acks = Vec::new();
            for (m, headers) in checked {
                match self.send_one(m, headers).await? {
                    Some(ack) => acks.push(ack),
                    None => core = true,
                }
            }
            for ack in acks {
                published.duplicates += usize::from(ack.await.map_err(failed)?.duplicate);
            }
            if core {
                // Core NATS has no confirm; a flush at least means the
                // server has the bytes.
                self.client.flush().await.map_err(failed)?;
            }
            Ok(published)
        })
    }
}

impl crate::request::Requester for NatsBroker {
    fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, crate::request::RequestError>> {
        let this = self.clone();
        let subject = subject.to_owned();
        Box::pin(async move { NatsBroker::request(&this, &subject, payload, timeout).await })
    }
}

/// Notes a setting of an existing stream or consumer that differs from the
/// config, in words for the operator.
pub(crate) fn differ<T: PartialEq + std::fmt::Debug>(diffs: &mut Vec<String>, what: &str, have: &T, want: &T) {
    if have != want {
        diffs.push(format!("{what} is {have:?}, config says {want:?}"));
    }
}

fn stream_config(s: &StreamConfig) -> stream::Config {
    stream::Config {
        name: s.name.clone(),
        subjects: s.subjects.clone(),
        retention: match s.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::Interest => stream::RetentionPolicy::Interest,
            Retention::Workqueue => stream::RetentionPolicy::WorkQueue,
        },
        max_messages: s.max_messages.unwrap_or(-1),
        max_age: s.max_age.unwrap_or_default(),
        duplicate_window: s.duplicate_window,
        ..Default::default()
    }
}

/// Creates the stream if missing; if present, checks that it matches.
async fn declare_stream(js: &async_nats::jetstream::Context, s: &StreamConfig) -> Result<(), NatsSetupError> {
    let err = |cause: Cause| NatsSetupError::Stream {
        stream: s.name.clone(),
        cause,
    };
    let wanted = stream_config(s);
    match js.get_stream(&s.name).await {
        Ok(mut existing) => {
            let info = existing.info().await.map_err(|e| err(cause(e)))?;
            let have = &info.config;
            let mut diffs = Vec::new();
            let (mut a, mut b) = (have.subjects.clone(), wanted.subjects.clone());
            a.sort();
            b.sort();
            differ(&mut diffs, "subjects", &a, &b);
            differ(&mut diffs, "retention", &have.retention, &wanted.retention);
            differ(&mut diffs, "max_messages", &have.max_messages, &wanted.max_messages);
            differ(&mut diffs, "max_age", &have.max_age, &wanted.max_age);
            if diffs.is_empty() {
                Ok(())
            } else {
                Err(err(cause(format!(
                    "exists with other settings: {} (change the config, or update/delete the stream)",
                    diffs.join("; ")
                ))))
            }
        }
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            js.create_stream(wanted).await.map_err(|e| err(cause(e)))?;
            tracing::info!(stream = %s.name, "JetStream stream created");
            Ok(())
        }
        Err(e) => Err(err(cause(e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_hide_credentials() {
        use crate::brokers::redact_url;
        assert_eq!(redact_url("nats://u:secret@h:4222"), "nats://u:***@h:4222");
        assert_eq!(redact_url("tls://tok@a:1,nats://b:2"), "tls://***@a:1,nats://b:2");
        assert_eq!(redact_url("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn headers_nats_cannot_carry_are_refused_not_panicked() {
        for (name, value) in [
            ("bad name", "v"),
            ("", "v"),
            ("ok", "a\r\nb"),
            ("colon:", "v"),
            ("é", "v"),
        ] {
            let r = to_header_map(&[Header::new(name, value)]);
            assert!(matches!(r, Err(BrokerError::Refused { .. })), "{name:?} {value:?}");
        }
        assert!(to_header_map(&[Header::new("Idempotency-Key", "a b")]).is_ok());
    }
}
