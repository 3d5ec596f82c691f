//! RabbitMQ (AMQP 0-9-1): durable queues consumed with a prefetch, acks after
//! the outcome, retries through delay queues, publishes with publisher
//! confirms. Reconnects by itself. Knows nothing of WASM.

pub mod config;
mod dead_letters;
mod headers;
mod source;
pub mod spec;
mod stored;
mod topology;

pub use config::{ConsumerSettings, RabbitConfig, RetryVia};
pub use dead_letters::RabbitDeadLetters;
pub use source::RabbitSource;
pub use spec::RabbitSourceSpec;
pub use stored::{parse_origin, Letter};

/// For the fuzz targets: what sluice reads of a producer's header table.
#[doc(hidden)]
pub fn fuzz_inbound(table: &lapin::types::FieldTable) -> (Vec<crate::message::Header>, u32) {
    (headers::from_table(Some(table)), headers::attempt(Some(table), true))
}

use super::{BoxFuture, BrokerError, Published, Sink};
use crate::error::{cause, Cause};
use crate::message::Outbound;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

pub(crate) const NAME: &str = "rabbitmq";
/// AMQP delivery mode of a persistent message.
const PERSISTENT: u8 = 2;
/// The prefix of a reply address: the requester's queue and correlation id
/// travel together through the pipeline as one "subject".
const REPLY_PREFIX: &str = "amqp-reply:";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) fn failed(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BrokerError {
    BrokerError::failed(NAME, e)
}

fn disconnected(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BrokerError {
    BrokerError::disconnected(NAME, e)
}

#[derive(Debug, thiserror::Error)]
pub enum RabbitSetupError {
    #[error("cannot connect to RabbitMQ at {url}")]
    Connect {
        url: String,
        #[source]
        cause: Cause,
    },
    #[error("RabbitMQ {what} `{name}`")]
    Topology {
        what: &'static str,
        name: String,
        #[source]
        cause: Cause,
    },
}

/// The live connection and its publishing channel (in confirm mode).
struct Live {
    connection: Connection,
    publisher: Channel,
}

impl Live {
    fn usable(&self) -> bool {
        self.connection.status().connected() && self.publisher.status().connected()
    }
}

struct Shared {
    config: RabbitConfig,
    live: Mutex<Option<Arc<Live>>>,
    connected: AtomicBool,
    /// Delay queues declared on the current connection.
    delay_queues: std::sync::Mutex<HashSet<String>>,
    /// Work queues of the routes and dead-letter queues sluice declared.
    owned: std::sync::Mutex<HashSet<String>>,
    /// Bumped on every new connection (consumers notice and re-subscribe).
    generation: AtomicU64,
}

/// A RabbitMQ connection shared by a daemon's sources and sinks.
#[derive(Clone)]
pub struct RabbitBroker {
    shared: Arc<Shared>,
}

/// A sink on one exchange.
#[derive(Clone)]
pub struct RabbitSink {
    broker: RabbitBroker,
    exchange: String,
    /// Unroutable publishes are errors (dead letters must land somewhere).
    mandatory: bool,
}

/// The address a reply to an AMQP request goes to.
pub(crate) fn reply_address(reply_to: &str, correlation_id: Option<&str>) -> String {
    format!("{REPLY_PREFIX}{}|{reply_to}", correlation_id.unwrap_or_default())
}

fn parse_reply_address(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix(REPLY_PREFIX)?;
    let (correlation, queue) = rest.split_once('|')?;
    Some((queue, correlation))
}

impl RabbitBroker {
    /// Connects (failing fast when RabbitMQ cannot be reached, or when the
    /// declared topology conflicts with what exists).
    pub async fn connect(config: &RabbitConfig) -> Result<Self, RabbitSetupError> {
        let broker = Self {
            shared: Arc::new(Shared {
                config: config.clone(),
                live: Mutex::new(None),
                connected: AtomicBool::new(false),
                delay_queues: std::sync::Mutex::new(HashSet::new()),
                owned: std::sync::Mutex::new(HashSet::new()),
                generation: AtomicU64::new(0),
            }),
        };
        let mut guard = broker.shared.live.lock().await;
        let live = broker.open().await?;
        *guard = Some(Arc::new(live));
        drop(guard);
        Ok(broker)
    }

    async fn open(&self) -> Result<Live, RabbitSetupError> {
        let config = &self.shared.config;
        let connect_err = |cause: Cause| RabbitSetupError::Connect {
            url: super::redact_url(&config.url),
            cause,
        };
        let properties = ConnectionProperties::default().with_connection_name(config.name.as_str().into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&config.url, properties))
            .await
            .map_err(|_| connect_err(cause(format!("no answer within {CONNECT_TIMEOUT:?}"))))?
            .map_err(|e| connect_err(cause(e)))?;
        topology::declare(&connection, config).await?;
        let publisher = connection.create_channel().await.map_err(|e| connect_err(cause(e)))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| connect_err(cause(e)))?;
        if let Ok(mut d) = self.shared.delay_queues.lock() {
            d.clear();
        }
        self.shared.generation.fetch_add(1, Ordering::Relaxed);
        self.shared.connected.store(true, Ordering::Relaxed);
        tracing::info!(url = %super::redact_url(&config.url), "RabbitMQ connected");
        Ok(Live { connection, publisher })
    }

    /// The live connection, reconnecting once if it was lost.
    async fn live(&self) -> Result<Arc<Live>, BrokerError> {
        let mut guard = self.shared.live.lock().await;
        if let Some(live) = guard.as_ref() {
            if live.usable() {
                return Ok(live.clone());
            }
            if self.shared.connected.swap(false, Ordering::Relaxed) {
                super::events::disconnected(NAME);
            }
        }
        *guard = None;
        let live = Arc::new(self.open().await.map_err(disconnected)?);
        *guard = Some(live.clone());
        Ok(live)
    }

    /// A new channel on the live connection (for a consumer).
    pub(crate) async fn channel(&self) -> Result<(Channel, u64), BrokerError> {
        let live = self.live().await?;
        let channel = live.connection.create_channel().await.map_err(disconnected)?;
        Ok((channel, self.shared.generation.load(Ordering::Relaxed)))
    }

    pub fn is_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed)
    }

    /// A consumer on a declared (or existing) queue.
    pub fn source(&self, settings: ConsumerSettings) -> RabbitSource {
        if let Ok(mut owned) = self.shared.owned.lock() {
            owned.insert(settings.queue.clone());
        }
        RabbitSource::new(self.clone(), settings)
    }

    /// Handler publishes go to the configured exchange; one that no queue
    /// receives is returned, and counts as a failed publish (a confirm alone
    /// would report it stored).
    pub fn sink(&self) -> RabbitSink {
        RabbitSink {
            broker: self.clone(),
            exchange: self.shared.config.publish_exchange.clone(),
            mandatory: true,
        }
    }

    /// Dead letters go to `exchange` (the default exchange: the queue named
    /// by the subject), and must be routable.
    pub fn dead_letter_sink(&self, exchange: Option<&str>) -> RabbitSink {
        RabbitSink {
            broker: self.clone(),
            exchange: exchange.unwrap_or_default().to_owned(),
            mandatory: true,
        }
    }

    /// True for queues of the config, delay queues and dead-letter queues:
    /// never a reply destination.
    fn owns_queue(&self, queue: &str) -> bool {
        let configured = |name: &str| self.shared.config.queues.iter().any(|q| q.name == name);
        // `<queue>.retry.<ms>ms`: its messages expire into the work queue.
        let delay_queue_of_ours = queue
            .rsplit_once(".retry.")
            .is_some_and(|(base, ms)| ms.ends_with("ms") && (configured(base) || self.owned_queue(base)));
        configured(queue)
            || delay_queue_of_ours
            || self.shared.delay_queues.lock().is_ok_and(|d| d.contains(queue))
            || self.shared.owned.lock().is_ok_and(|o| o.contains(queue))
    }

    fn owned_queue(&self, queue: &str) -> bool {
        self.shared.owned.lock().is_ok_and(|o| o.contains(queue))
    }

    /// Declares a durable queue (dead-letter queues sluice owns).
    pub async fn declare_queue(&self, name: &str) -> Result<(), RabbitSetupError> {
        if let Ok(mut owned) = self.shared.owned.lock() {
            owned.insert(name.to_owned());
        }
        let live = self.live().await.map_err(|e| RabbitSetupError::Connect {
            url: super::redact_url(&self.shared.config.url),
            cause: cause(e),
        })?;
        topology::declare_plain_queue(&live.connection, name).await
    }

    /// Publishes with confirms: every message is sent, then every confirm
    /// awaited. A nack or an unroutable mandatory message is an error.
    pub(crate) async fn publish_confirmed(
        &self,
        messages: Vec<(String, String, BasicProperties, Vec<u8>)>,
        mandatory: bool,
    ) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let live = self.live().await?;
        let mut confirms = Vec::with_capacity(messages.len());
        for (exchange, routing_key, properties, payload) in messages {
            let confirm = live
                .publisher
                .basic_publish(
                    exchange.as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory,
                        immediate: false,
                    },
                    &payload,
                    properties,
                )
                .await
                .map_err(disconnected)?;
            confirms.push((exchange, routing_key, confirm));
        }
        for (exchange, routing_key, confirm) in confirms {
            match confirm.await.map_err(disconnected)? {
                Confirmation::Ack(None) | Confirmation::NotRequested => {}
                Confirmation::Ack(Some(_)) => {
                    return Err(failed(format!(
                        "nothing is bound to routing key `{routing_key}` on exchange `{}`: the message was returned",
                        display_exchange(&exchange)
                    )))
                }
                Confirmation::Nack(_) => {
                    return Err(failed(format!(
                        "RabbitMQ refused (nacked) a publish to `{}` / `{routing_key}`",
                        display_exchange(&exchange)
                    )))
                }
            }
        }
        Ok(())
    }

    /// Declares the delay queue for `delay` behind `queue` when not yet
    /// declared on this connection; returns its name.
    pub(crate) async fn delay_queue(&self, queue: &str, delay: Duration) -> Result<String, BrokerError> {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
        let name = format!("{queue}.retry.{ms}ms");
        let known = self
            .shared
            .delay_queues
            .lock()
            .map(|d| d.contains(&name))
            .unwrap_or(false);
        if !known {
            let live = self.live().await?;
            topology::declare_delay_queue(&live.connection, &name, queue, ms)
                .await
                .map_err(failed)?;
            if let Ok(mut d) = self.shared.delay_queues.lock() {
                d.insert(name.clone());
            }
        }
        Ok(name)
    }

    /// Closes the connection (unacked deliveries go back to their queues).
    pub async fn close(&self) {
        if let Some(live) = self.shared.live.lock().await.take() {
            let _ = live.connection.close(200, "sluice stopping".into()).await;
        }
        self.shared.connected.store(false, Ordering::Relaxed);
    }
}

fn display_exchange(exchange: &str) -> &str {
    if exchange.is_empty() {
        "(default exchange)"
    } else {
        exchange
    }
}

/// Properties of a message sluice publishes: persistent, with headers.
fn outbound_properties(headers: &[crate::message::Header]) -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_headers(headers::to_table(headers))
}

/// AMQP short strings (routing keys, header names, correlation ids) hold at
/// most 255 bytes.
const MAX_SHORT_STRING: usize = 255;

fn short_string(what: &str, text: &str) -> Result<(), BrokerError> {
    if text.len() > MAX_SHORT_STRING {
        return Err(BrokerError::refused(
            NAME,
            format!(
                "{what} {:?}... is {} bytes; AMQP allows {MAX_SHORT_STRING}",
                crate::headers::shown(text),
                text.len()
            ),
        ));
    }
    Ok(())
}

impl RabbitSink {
    fn frame(&self, m: Outbound) -> Result<(String, String, BasicProperties, Vec<u8>), BrokerError> {
        for h in &m.headers {
            short_string("header name", &h.name)?;
        }
        let properties = outbound_properties(&m.headers);
        match parse_reply_address(&m.subject) {
            Some((queue, correlation)) => {
                short_string("reply queue", queue)?;
                short_string("correlation id", correlation)?;
                // A request names its reply queue: it must not make sluice
                // write into the queues sluice itself consumes or owns.
                if self.broker.owns_queue(queue) {
                    return Err(BrokerError::refused(
                        NAME,
                        format!(
                            "reply queue {:?} is a work, delay or dead-letter queue of this daemon",
                            crate::headers::shown(queue)
                        ),
                    ));
                }
                let mut properties = properties;
                if !correlation.is_empty() {
                    properties = properties.with_correlation_id(correlation.into());
                }
                Ok((String::new(), queue.to_owned(), properties, m.payload))
            }
            None => {
                short_string("routing key", &m.subject)?;
                Ok((self.exchange.clone(), m.subject, properties, m.payload))
            }
        }
    }
}

impl Sink for RabbitSink {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(async move {
            let frames = messages.into_iter().map(|m| self.frame(m)).collect::<Result<_, _>>()?;
            self.broker.publish_confirmed(frames, self.mandatory).await?;
            Ok(Published::default())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password() {
        use crate::brokers::redact_url;
        assert_eq!(
            redact_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
    }

    #[test]
    fn reply_address_round_trips() {
        let a = reply_address("amq.gen-1", Some("c-7"));
        assert_eq!(parse_reply_address(&a), Some(("amq.gen-1", "c-7")));
        assert_eq!(parse_reply_address("orders.created"), None);
    }
}
