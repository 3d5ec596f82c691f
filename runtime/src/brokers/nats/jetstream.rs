//! JetStream durable pull consumers: explicit ack after the outcome, `nak`
//! with the backoff delay for retries (the broker redelivers, so a retry
//! survives a crash), `in_progress` while a handler runs long, `term` once
//! the dead-lettered copy is stored.

use super::{differ, failed, from_header_map, ConsumerSettings, NatsBroker, NatsSetupError};
use crate::brokers::events;
use crate::brokers::{Backlog, BoxFuture, BrokerError, Delivery, Source};
use crate::error::{cause, Cause};
use crate::message::Message;
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::AckKind;
use futures_util::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

pub struct JetStreamSource {
    broker: NatsBroker,
    consumer: Consumer<pull::Config>,
    messages: Mutex<Option<pull::Stream>>,
    names: Arc<(String, String)>,
    in_flight: Arc<InFlight>,
}

type AckerRef = Arc<async_nats::jetstream::message::Acker>;

/// Deliveries being handled, so one task per source can send `in_progress`
/// for those that run long (a task per message would cost more than the
/// message).
#[derive(Default)]
struct InFlight {
    entries: std::sync::Mutex<HashMap<u64, (AckerRef, Instant)>>,
    next: AtomicU64,
}

impl InFlight {
    fn add(&self, acker: AckerRef) -> u64 {
        let id = self.next.fetch_add(1, AtomicOrdering::Relaxed);
        if let Ok(mut e) = self.entries.lock() {
            e.insert(id, (acker, Instant::now()));
        }
        id
    }

    fn remove(&self, id: u64) {
        if let Ok(mut e) = self.entries.lock() {
            e.remove(&id);
        }
    }

    /// Every `every`, tells the server that deliveries older than `every`
    /// are still being worked on; ends with the source.
    fn start_keepalive(this: &Arc<Self>, every: Duration) {
        let weak = Arc::downgrade(this);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(this) = weak.upgrade() else { return };
                let long: Vec<AckerRef> = match this.entries.lock() {
                    Ok(e) => e
                        .values()
                        .filter(|(_, since)| since.elapsed() >= every)
                        .map(|(a, _)| a.clone())
                        .collect(),
                    Err(_) => return,
                };
                drop(this);
                for acker in long {
                    if let Err(e) = acker.ack_with(AckKind::Progress).await {
                        events::failed(super::NAME, "progress", &*e, "");
                    }
                }
            }
        });
    }
}

fn consumer_config(s: &ConsumerSettings) -> pull::Config {
    pull::Config {
        durable_name: Some(s.durable.clone()),
        filter_subject: s.filter_subject.clone(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: s.ack_wait,
        max_deliver: s.max_deliver,
        max_ack_pending: s.max_ack_pending,
        ..Default::default()
    }
}

impl JetStreamSource {
    pub(super) async fn open(broker: NatsBroker, s: &ConsumerSettings) -> Result<Self, NatsSetupError> {
        let err = |cause: Cause| NatsSetupError::Consumer {
            stream: s.stream.clone(),
            consumer: s.durable.clone(),
            cause,
        };
        let stream = broker
            .js
            .get_stream(&s.stream)
            .await
            .map_err(|e| NatsSetupError::Stream {
                stream: s.stream.clone(),
                cause: cause(format!("{e} (declare it under [[brokers.nats.streams]])")),
            })?;
        let wanted = consumer_config(s);
        let consumer: Consumer<pull::Config> = match stream.get_consumer::<pull::Config>(&s.durable).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| err(cause(e)))?;
                let have = &info.config;
                let mut diffs = Vec::new();
                differ(
                    &mut diffs,
                    "filter_subject",
                    &have.filter_subject,
                    &wanted.filter_subject,
                );
                differ(&mut diffs, "ack_wait", &have.ack_wait, &wanted.ack_wait);
                differ(&mut diffs, "max_deliver", &have.max_deliver, &wanted.max_deliver);
                differ(
                    &mut diffs,
                    "max_ack_pending",
                    &have.max_ack_pending,
                    &wanted.max_ack_pending,
                );
                if !diffs.is_empty() {
                    return Err(err(cause(format!(
                        "exists with other settings: {} (change the config, or delete the consumer)",
                        diffs.join("; ")
                    ))));
                }
                existing
            }
            Err(_) => {
                let c = stream.create_consumer(wanted).await.map_err(|e| err(cause(e)))?;
                tracing::info!(stream = %s.stream, consumer = %s.durable, "JetStream consumer created");
                c
            }
        };
        let in_flight = Arc::new(InFlight::default());
        InFlight::start_keepalive(&in_flight, (s.ack_wait / 3).max(Duration::from_millis(100)));
        Ok(Self {
            broker,
            consumer,
            messages: Mutex::new(None),
            names: Arc::new((s.stream.clone(), s.durable.clone())),
            in_flight,
        })
    }

    async fn next_delivery(&self) -> Result<JetStreamDelivery, BrokerError> {
        let m = self.next_message().await?;
        // Built outside the lock, so other workers can take the next one.
        JetStreamDelivery::new(m, &self.names, &self.in_flight)
    }

    async fn next_message(&self) -> Result<async_nats::jetstream::Message, BrokerError> {
        let mut guard = self.messages.lock().await;
        loop {
            if guard.is_none() {
                *guard = Some(self.consumer.messages().await.map_err(failed)?);
            }
            let Some(stream) = guard.as_mut() else { continue };
            match stream.next().await {
                Some(Ok(m)) => return Ok(m),
                Some(Err(e)) => {
                    // Missed heartbeats after a server restart and the like:
                    // start a fresh pull on the next call.
                    *guard = None;
                    return Err(failed(e));
                }
                None => *guard = None,
            }
        }
    }
}

impl JetStreamSource {
    /// When the oldest unacked message was stored: everything up to the
    /// ack floor is acked, so the first message of the consumer's subjects
    /// after it is not (one lookup on the stream).
    async fn oldest_unacked(&self, info: &async_nats::jetstream::consumer::Info) -> Option<u64> {
        let subject = match info.config.filter_subject.as_str() {
            "" => ">",
            one => one,
        };
        let stream = self.broker.js.get_stream_no_info(&self.names.0).await.ok()?;
        let first = stream
            .raw_message_builder()
            .sequence(info.ack_floor.stream_sequence.saturating_add(1))
            .next_by_subject(subject)
            .send()
            .await
            .ok()?;
        u64::try_from(first.time.unix_timestamp_nanos() / 1_000_000).ok()
    }
}

impl Source for JetStreamSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let mut taken = Vec::new();
        {
            let Ok(mut guard) = self.messages.try_lock() else {
                return Vec::new();
            };
            let Some(stream) = guard.as_mut() else {
                return Vec::new();
            };
            while taken.len() < max {
                match stream.next().now_or_never() {
                    Some(Some(Ok(m))) => taken.push(m),
                    // An error or the end: `next` starts a fresh pull and
                    // reports it.
                    Some(Some(Err(_))) | Some(None) => {
                        *guard = None;
                        break;
                    }
                    None => break,
                }
            }
        }
        taken
            .into_iter()
            .filter_map(|m| match JetStreamDelivery::new(m, &self.names, &self.in_flight) {
                Ok(d) => Some(Box::new(d) as Box<dyn Delivery>),
                // Never acked: the server delivers it again after `ack_wait`.
                Err(e) => {
                    events::failed(super::NAME, "receive", &e, ": left for redelivery");
                    None
                }
            })
            .collect()
    }

    fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }

    /// The durable consumer's pending (not yet delivered) and ack-pending
    /// (delivered, not acked) counts, from the server, and the publish time
    /// of the first message past its ack floor.
    fn backlog(&self) -> BoxFuture<'_, Option<Backlog>> {
        Box::pin(async move {
            let info = self.consumer.get_info().await.ok()?;
            let messages = info.num_pending.saturating_add(info.num_ack_pending as u64);
            let oldest_ms = if messages == 0 {
                None
            } else {
                self.oldest_unacked(&info).await
            };
            Some(Backlog { messages, oldest_ms })
        })
    }
}

pub struct JetStreamDelivery {
    message: Message,
    acker: AckerRef,
    /// Stream and consumer, for `origin()` (formatted only when needed).
    names: Arc<(String, String)>,
    /// Its entry in the source's in-flight set (for `in_progress` acks).
    in_flight: Arc<InFlight>,
    id: u64,
}

impl JetStreamDelivery {
    fn new(
        m: async_nats::jetstream::Message,
        names: &Arc<(String, String)>,
        in_flight: &Arc<InFlight>,
    ) -> Result<Self, BrokerError> {
        let (attempt, seq, published_ms) = {
            let info = m.info().map_err(|e| failed(format!("not a JetStream message: {e}")))?;
            let ms = info.published.unix_timestamp_nanos() / 1_000_000;
            (
                u32::try_from(info.delivered.max(1)).unwrap_or(u32::MAX),
                info.stream_sequence,
                u64::try_from(ms).unwrap_or(0),
            )
        };
        let (msg, acker) = m.split();
        let message = Message {
            id: seq.to_string(),
            subject: msg.subject.to_string(),
            key: None,
            headers: from_header_map(msg.headers.as_ref()),
            payload: msg.payload.to_vec(),
            attempt,
            timestamp_ms: published_ms,
            // The reply subject of a JetStream message is its ack subject.
            reply_to: None,
        };
        let acker = Arc::new(acker);
        let id = in_flight.add(acker.clone());
        Ok(Self {
            names: names.clone(),
            message,
            acker,
            in_flight: in_flight.clone(),
            id,
        })
    }

    fn settle(&self, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.in_flight.remove(self.id);
        let acker = self.acker.clone();
        // A plain ack is a publish on the same connection; waiting for the
        // server's confirmation (double ack) would cost a round trip per
        // message, and a lost ack only means a redelivery, which the
        // idempotency gate absorbs.
        Box::pin(async move { acker.ack_with(kind).await.map_err(failed) })
    }
}

impl Delivery for JetStreamDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        let (stream, consumer) = &*self.names;
        format!(
            "jetstream://{stream}/{}?seq={}&consumer={consumer}",
            self.message.subject, self.message.id
        )
    }

    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(AckKind::Ack)
    }

    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(AckKind::Nak(Some(delay)))
    }

    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle(AckKind::Term)
    }
}

impl Drop for JetStreamDelivery {
    fn drop(&mut self) {
        // Unsettled: JetStream redelivers it after ack_wait.
        self.in_flight.remove(self.id);
    }
}
