//! JetStream durable pull consumers: explicit ack after the outcome, `nak`
//! with the backoff delay for retries (the broker redelivers, so a retry
//! survives a crash), `in_progress` while a handler runs long, `term` once
//! the dead-lettered copy is stored.

use super::{failed, from_header_map, ConsumerSettings, NatsBroker, NatsSetupError};
use crate::brokers::{BoxFuture, BrokerError, Delivery, Source};
use crate::message::Message;
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::AckKind;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

pub struct JetStreamSource {
    broker: NatsBroker,
    consumer: Consumer<pull::Config>,
    messages: Mutex<Option<pull::Stream>>,
    settings: ConsumerSettings,
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
        let err = |reason: String| NatsSetupError::Consumer {
            stream: s.stream.clone(),
            consumer: s.durable.clone(),
            reason,
        };
        let stream = broker
            .js
            .get_stream(&s.stream)
            .await
            .map_err(|e| NatsSetupError::Stream {
                stream: s.stream.clone(),
                reason: format!("{e} (declare it under [[brokers.nats.streams]])"),
            })?;
        let wanted = consumer_config(s);
        let consumer: Consumer<pull::Config> = match stream.get_consumer::<pull::Config>(&s.durable).await {
            Ok(mut existing) => {
                let info = existing.info().await.map_err(|e| err(e.to_string()))?;
                let have = &info.config;
                let mut diffs = Vec::new();
                if have.filter_subject != wanted.filter_subject {
                    diffs.push(format!(
                        "filter_subject is {:?}, config says {:?}",
                        have.filter_subject, wanted.filter_subject
                    ));
                }
                if have.ack_wait != wanted.ack_wait {
                    diffs.push(format!(
                        "ack_wait is {:?}, config says {:?}",
                        have.ack_wait, wanted.ack_wait
                    ));
                }
                if have.max_deliver != wanted.max_deliver {
                    diffs.push(format!(
                        "max_deliver is {}, config says {}",
                        have.max_deliver, wanted.max_deliver
                    ));
                }
                if have.max_ack_pending != wanted.max_ack_pending {
                    diffs.push(format!(
                        "max_ack_pending is {}, config says {}",
                        have.max_ack_pending, wanted.max_ack_pending
                    ));
                }
                if !diffs.is_empty() {
                    return Err(err(format!(
                        "exists with other settings: {} (change the config, or delete the consumer)",
                        diffs.join("; ")
                    )));
                }
                existing
            }
            Err(_) => {
                let c = stream.create_consumer(wanted).await.map_err(|e| err(e.to_string()))?;
                tracing::info!(stream = %s.stream, consumer = %s.durable, "JetStream consumer created");
                c
            }
        };
        Ok(Self {
            broker,
            consumer,
            messages: Mutex::new(None),
            settings: s.clone(),
        })
    }

    async fn next_delivery(&self) -> Result<JetStreamDelivery, BrokerError> {
        let mut guard = self.messages.lock().await;
        loop {
            if guard.is_none() {
                *guard = Some(self.consumer.messages().await.map_err(failed)?);
            }
            let Some(stream) = guard.as_mut() else { continue };
            match stream.next().await {
                Some(Ok(m)) => return JetStreamDelivery::new(m, &self.settings),
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

impl Source for JetStreamSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }
}

pub struct JetStreamDelivery {
    message: Message,
    acker: Arc<async_nats::jetstream::message::Acker>,
    origin: String,
    /// Stops the in-progress heartbeat once settled (or dropped).
    keepalive: CancellationToken,
}

impl JetStreamDelivery {
    fn new(m: async_nats::jetstream::Message, s: &ConsumerSettings) -> Result<Self, BrokerError> {
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
        let keepalive = CancellationToken::new();
        // Tell the server we are still working well before ack_wait ends,
        // so a long handler is not redelivered to someone else meanwhile.
        let every = (s.ack_wait / 3).max(Duration::from_millis(100));
        let (ka, token) = (acker.clone(), keepalive.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tokio::time::sleep(every) => {
                        if let Err(e) = ka.ack_with(AckKind::Progress).await {
                            tracing::debug!("in-progress ack failed: {e}");
                        }
                    }
                }
            }
        });
        Ok(Self {
            origin: format!(
                "jetstream://{}/{}?seq={seq}&consumer={}",
                s.stream, message.subject, s.durable
            ),
            message,
            acker,
            keepalive,
        })
    }

    fn settle(&self, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.keepalive.cancel();
        let acker = self.acker.clone();
        Box::pin(async move { acker.double_ack_with(kind).await.map_err(failed) })
    }
}

impl Delivery for JetStreamDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        self.origin.clone()
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
        self.keepalive.cancel();
    }
}
