//! Core NATS subscriptions: at-most-once. There is nothing to ack; a retry
//! is an in-process delayed redelivery (lost if the process stops), and a
//! dead letter is published to the dead-letter subject.

use super::{from_header_map, NatsBroker, NatsSetupError, NAME};
use crate::brokers::{BoxFuture, BrokerError, Delivery, Source};
use crate::error::cause;
use crate::message::{now_ms, Message};
use futures_util::{FutureExt, StreamExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// Retries waiting to be delivered again, at most.
const RETRY_BUFFER: usize = 10_000;

pub struct CoreSource {
    broker: NatsBroker,
    inner: Mutex<(async_nats::Subscriber, mpsc::Receiver<Message>)>,
    retry_tx: mpsc::Sender<Message>,
    next_id: AtomicU64,
}

impl CoreSource {
    pub(super) async fn subscribe(
        broker: NatsBroker,
        subject: &str,
        queue_group: Option<&str>,
    ) -> Result<Self, NatsSetupError> {
        let result = match queue_group {
            Some(group) => {
                broker
                    .client
                    .queue_subscribe(subject.to_owned(), group.to_owned())
                    .await
            }
            None => broker.client.subscribe(subject.to_owned()).await,
        };
        let subscriber = result.map_err(|e| NatsSetupError::Subscribe {
            subject: subject.to_owned(),
            cause: cause(e),
        })?;
        let (retry_tx, retry_rx) = mpsc::channel(RETRY_BUFFER);
        Ok(Self {
            broker,
            inner: Mutex::new((subscriber, retry_rx)),
            retry_tx,
            next_id: AtomicU64::new(1),
        })
    }

    async fn next_delivery(&self) -> Result<CoreDelivery, BrokerError> {
        let mut inner = self.inner.lock().await;
        let (subscriber, retries) = &mut *inner;
        let message = tokio::select! {
            Some(retry) = retries.recv() => retry,
            next = subscriber.next() => match next {
                Some(m) => self.message(m),
                None => return Err(BrokerError::Closed { broker: NAME }),
            },
        };
        Ok(self.delivery(message))
    }

    fn message(&self, m: async_nats::Message) -> Message {
        Message {
            // Unique across restarts and queue-group replicas.
            id: format!(
                "core-{}-{}",
                crate::message::process_nonce(),
                self.next_id.fetch_add(1, Ordering::Relaxed)
            ),
            subject: m.subject.to_string(),
            key: None,
            headers: from_header_map(m.headers.as_ref()),
            payload: m.payload.to_vec(),
            attempt: 1,
            timestamp_ms: now_ms(),
            reply_to: m.reply.map(|r| r.to_string()),
        }
    }

    fn delivery(&self, message: Message) -> CoreDelivery {
        CoreDelivery {
            message,
            retry_tx: self.retry_tx.clone(),
        }
    }
}

impl Source for CoreSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let Ok(mut inner) = self.inner.try_lock() else {
            return Vec::new();
        };
        let (subscriber, retries) = &mut *inner;
        let mut taken: Vec<Box<dyn Delivery>> = Vec::new();
        while taken.len() < max {
            let message = match retries.try_recv() {
                Ok(retry) => retry,
                Err(_) => match subscriber.next().now_or_never() {
                    Some(Some(m)) => self.message(m),
                    // Nothing at hand, or the end (`next` reports it).
                    _ => break,
                },
            };
            taken.push(Box::new(self.delivery(message)));
        }
        taken
    }

    fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }

    fn takes_one_at_a_time(&self) -> bool {
        true
    }
}

pub struct CoreDelivery {
    message: Message,
    retry_tx: mpsc::Sender<Message>,
}

impl Delivery for CoreDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        format!("nats://{}", self.message.subject)
    }

    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }

    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        let mut message = self.message;
        message.attempt += 1;
        let tx = self.retry_tx;
        Box::pin(async move {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if tx.send(message).await.is_err() {
                    tracing::warn!("a core NATS retry was dropped: the route stopped");
                }
            });
            Ok(())
        })
    }

    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        Box::pin(async { Ok(()) })
    }
}
