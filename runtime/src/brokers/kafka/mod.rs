//! Kafka (librdkafka via rdkafka): consumer groups with manual commits of
//! the contiguous handled prefix per partition, a partition left unread
//! while its records in flight are at a bound, rebalances that wait for in-flight work,
//! an idempotent producer (`acks=all`) for publishes and dead letters.
//! Knows nothing of WASM.

pub mod admin;
pub mod config;
mod dead_letters;
mod offsets;
pub mod record;
mod retry;

/// For the fuzz targets: the retry headers of a record on a normal topic
/// and on a retry topic.
#[doc(hidden)]
pub fn fuzz_retry_headers(msg: &mut crate::message::Message) {
    let mut on_retry_topic = msg.clone();
    on_retry_topic.subject = retry::retry_topic(&msg.subject, 1);
    retry::scrub(&mut on_retry_topic, true);
    let _ = retry::restore(&mut on_retry_topic);
    retry::scrub(msg, false);
    assert!(retry::restore(msg).is_none() || retry::retried_topic(&msg.subject).is_some());
}
mod source;
pub mod spec;

pub use config::{ConsumerSettings, KafkaConfig, OffsetReset, TopicConfig};
pub use dead_letters::KafkaDeadLetters;
pub use retry::retry_topic;
pub use source::KafkaSource;
pub use spec::KafkaSourceSpec;

use super::{BoxFuture, BrokerError, Published, Sink};
use crate::error::Cause;
use crate::message::{Outbound, KEY_HEADER};
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub(crate) const NAME: &str = "kafka";
/// How long a produce may wait in librdkafka's queue before it is an error.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BrokerError {
    BrokerError::failed(NAME, e)
}

#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("Kafka client: {what}")]
    Client {
        what: String,
        #[source]
        cause: rdkafka::error::KafkaError,
    },
    #[error("cannot start the Kafka consumer thread")]
    Thread(#[source] Cause),
    #[error("Kafka at {brokers}")]
    Unreachable {
        brokers: String,
        #[source]
        cause: Cause,
    },
    #[error("Kafka topic `{topic}`")]
    Topic {
        topic: String,
        #[source]
        cause: Cause,
    },
}

/// A Kafka cluster: the shared producer, and the sources of the daemon (to
/// commit and leave their groups at shutdown).
#[derive(Clone)]
pub struct KafkaBroker {
    config: Arc<KafkaConfig>,
    producer: FutureProducer,
    sources: Arc<Mutex<Vec<Arc<source::Shared>>>>,
    /// Topics known to exist (checked or created once).
    known_topics: Arc<Mutex<HashSet<String>>>,
    /// One topic check or creation at a time.
    creating: Arc<tokio::sync::Mutex<()>>,
}

/// The client settings common to consumers, producer and admin client.
pub(crate) fn client_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", &config.client_id)
        .set("log_level", "4");
    // An empty value (`${KAFKA_PASSWORD:-}`) means: not set.
    let set = |c: &mut ClientConfig, key: &str, v: &Option<String>| {
        if let Some(v) = v.as_deref().filter(|v| !v.is_empty()) {
            c.set(key, v);
        }
    };
    set(&mut c, "security.protocol", &config.security_protocol);
    set(&mut c, "sasl.mechanism", &config.sasl_mechanism);
    set(&mut c, "sasl.username", &config.sasl_username);
    set(&mut c, "sasl.password", &config.sasl_password);
    set(&mut c, "ssl.ca.location", &config.ssl_ca_location);
    for (k, v) in &config.librdkafka {
        c.set(k, v);
    }
    c
}

impl KafkaBroker {
    /// Builds the producer, checks that the cluster answers, and creates the
    /// configured topics that are missing.
    pub async fn connect(config: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        let mut pc = client_config(config);
        pc.set("enable.idempotence", "true")
            .set("acks", "all")
            // Workers wait for each acknowledgement: a short linger lets
            // the records of several workers share one request.
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        // The operator's own settings win.
        for (k, v) in &config.librdkafka {
            pc.set(k, v);
        }
        let producer: FutureProducer = pc.create().map_err(|cause| KafkaSetupError::Client {
            what: "creating the producer".into(),
            cause,
        })?;
        admin::check_reachable(config).await?;
        admin::create_topics(config, &config.topics).await?;
        Ok(Self {
            config: Arc::new(config.clone()),
            producer,
            sources: Arc::new(Mutex::new(Vec::new())),
            known_topics: Arc::new(Mutex::new(config.topics.iter().map(|t| t.name.clone()).collect())),
            creating: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// A consumer-group member on the route's topics.
    pub fn source(&self, settings: ConsumerSettings) -> Result<KafkaSource, KafkaSetupError> {
        // Failed records are produced to retry topics through this broker.
        let retry = (settings.retry_levels > 0).then(|| self.clone());
        let source = KafkaSource::start(&self.config, settings, retry)?;
        if let Ok(mut s) = self.sources.lock() {
            s.push(source.shared());
        }
        Ok(source)
    }

    /// Makes sure `topic` exists (dead-letter topics sluice writes to).
    pub async fn ensure_topic(&self, topic: &str) -> Result<(), KafkaSetupError> {
        let known = self.known_topics.lock().map(|k| k.contains(topic)).unwrap_or(false);
        if known {
            return Ok(());
        }
        let _one_at_a_time = self.creating.lock().await;
        if self.known_topics.lock().map(|k| k.contains(topic)).unwrap_or(false) {
            return Ok(());
        }
        let t = TopicConfig {
            name: topic.to_owned(),
            partitions: self.config.default_partitions,
            replication_factor: 1,
            config: Default::default(),
        };
        admin::create_topics(&self.config, &[t]).await?;
        if let Ok(mut k) = self.known_topics.lock() {
            k.insert(topic.to_owned());
        }
        Ok(())
    }

    /// Produces one record and waits for the broker's acknowledgement
    /// (`acks=all`). The `sluice-key` header, if any, becomes the key.
    /// What Kafka (or librdkafka, which unwraps a NUL in a header name)
    /// would refuse of `m`.
    fn check(m: &Outbound) -> Result<(), BrokerError> {
        record::check_topic(&m.subject).map_err(|why| BrokerError::refused(NAME, why))?;
        if let Some(h) = m.headers.iter().find(|h| h.name.contains('\0')) {
            return Err(BrokerError::refused(
                NAME,
                format!("header name {:?} contains NUL", crate::headers::shown(&h.name)),
            ));
        }
        Ok(())
    }

    pub async fn produce(&self, m: &Outbound) -> Result<(), BrokerError> {
        Self::check(m)?;
        if self.config.create_topics {
            self.ensure_topic(&m.subject).await.map_err(failed)?;
        }
        let key = crate::message::find_header(&m.headers, KEY_HEADER).map(record::key_bytes);
        let mut headers = OwnedHeaders::new_with_capacity(m.headers.len());
        for h in m.headers.iter().filter(|h| !h.name.eq_ignore_ascii_case(KEY_HEADER)) {
            headers = headers.insert(KafkaHeader {
                key: &h.name,
                value: Some(h.value.as_bytes()),
            });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&m.subject).payload(&m.payload[..]).headers(headers);
        if let Some(k) = &key {
            record = record.key(&k[..]);
        }
        self.producer
            .send(record, PRODUCE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(e, _)| {
                let why = format!("producing to `{}`: {e}", m.subject);
                // What the broker will refuse every time: dead-letter it.
                match e.rdkafka_error_code() {
                    Some(
                        RDKafkaErrorCode::MessageSizeTooLarge
                        | RDKafkaErrorCode::InvalidTopic
                        | RDKafkaErrorCode::InvalidMessage
                        | RDKafkaErrorCode::InvalidRecord,
                    ) => BrokerError::refused(NAME, why),
                    _ => failed(why),
                }
            })
    }

    /// Commits what each source has handled and leaves the groups.
    pub fn close(&self) {
        let sources = self
            .sources
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        for s in sources {
            s.close();
        }
    }
}

impl Sink for KafkaBroker {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(async move {
            // Checked first (nothing of a batch is sent if one is refused),
            // sent together, then every acknowledgement awaited.
            for m in &messages {
                Self::check(m)?;
            }
            let sends = messages.iter().map(|m| self.produce(m));
            for r in futures_util::future::join_all(sends).await {
                r?;
            }
            Ok(Published::default())
        })
    }
}
