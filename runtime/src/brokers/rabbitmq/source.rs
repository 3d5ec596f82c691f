//! Consuming a queue: `basic.qos` prefetch bounds what is in flight, each
//! delivery is acked once its outcome is durable, retries go through a delay
//! queue (or wait in the process), and a lost channel is re-opened.

use super::config::{ConsumerSettings, RetryVia};
use super::headers::{self, ATTEMPT, ROUTING_KEY};
use super::{disconnected, failed, reply_address, RabbitBroker, NAME};
use crate::brokers::{events, Backlog, BoxFuture, BrokerError, Delivery, Source};
use crate::message::Message;
use futures_util::{FutureExt, StreamExt};
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::Acker;
use lapin::{BasicProperties, Consumer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// Shortest delay queue: a zero-jitter retry still takes a trip through one.
const MIN_DELAY: Duration = Duration::from_millis(10);

struct Subscription {
    consumer: Option<Consumer>,
    /// The consumer's own channel: closing it hands back everything it
    /// holds unacked.
    channel: Option<lapin::Channel>,
    /// In-process retries whose delay has passed.
    due: mpsc::UnboundedReceiver<RabbitDelivery>,
}

pub struct RabbitSource {
    broker: RabbitBroker,
    settings: Arc<ConsumerSettings>,
    subscription: Mutex<Subscription>,
    due_tx: mpsc::UnboundedSender<RabbitDelivery>,
    /// Deliveries taken from the queue and not settled (RabbitMQ's ready
    /// count leaves them out).
    unsettled: Arc<AtomicU64>,
}

/// Counts a delivery as unsettled for its whole life.
struct Unsettled(Arc<AtomicU64>);

impl Unsettled {
    fn new(count: &Arc<AtomicU64>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count.clone())
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RabbitSource {
    pub(super) fn new(broker: RabbitBroker, settings: ConsumerSettings) -> Self {
        let (due_tx, due) = mpsc::unbounded_channel();
        Self {
            broker,
            settings: Arc::new(settings),
            subscription: Mutex::new(Subscription {
                consumer: None,
                channel: None,
                due,
            }),
            due_tx,
            unsettled: Arc::default(),
        }
    }

    async fn subscribe(&self) -> Result<(lapin::Channel, Consumer), BrokerError> {
        let (channel, _) = self.broker.channel().await?;
        channel
            .basic_qos(self.settings.prefetch, BasicQosOptions::default())
            .await
            .map_err(disconnected)?;
        let consumer = channel
            .basic_consume(
                self.settings.queue.as_str().into(),
                self.settings.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| failed(format!("cannot consume queue `{}`: {e}", self.settings.queue)))?;
        tracing::info!(queue = %self.settings.queue, prefetch = self.settings.prefetch, "RabbitMQ consumer started");
        Ok((channel, consumer))
    }

    async fn next_delivery(&self) -> Result<RabbitDelivery, BrokerError> {
        let mut sub = self.subscription.lock().await;
        if sub.consumer.is_none() {
            let (channel, consumer) = self.subscribe().await?;
            sub.channel = Some(channel);
            sub.consumer = Some(consumer);
        }
        let Subscription { consumer, due, .. } = &mut *sub;
        let Some(stream) = consumer.as_mut() else {
            return Err(failed("no consumer"));
        };
        let next = tokio::select! {
            retry = due.recv() => match retry {
                Some(d) => return Ok(d),
                None => return Err(BrokerError::Closed { broker: super::NAME }),
            },
            next = stream.next() => next,
        };
        match next {
            Some(Ok(d)) => {
                let mut delivery = RabbitDelivery::new(d, &self.settings, &self.broker, &self.due_tx);
                delivery.unsettled = Some(Unsettled::new(&self.unsettled));
                Ok(delivery)
            }
            Some(Err(e)) => {
                *consumer = None;
                Err(disconnected(format!("consumer of `{}`: {e}", self.settings.queue)))
            }
            None => {
                *consumer = None;
                Err(disconnected(format!(
                    "RabbitMQ cancelled the consumer of `{}` (queue deleted, or the channel closed)",
                    self.settings.queue
                )))
            }
        }
    }
}

impl Source for RabbitSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let Ok(mut sub) = self.subscription.try_lock() else {
            return Vec::new();
        };
        let Subscription { consumer, due, .. } = &mut *sub;
        let mut taken: Vec<Box<dyn Delivery>> = Vec::new();
        while taken.len() < max {
            if let Ok(d) = due.try_recv() {
                taken.push(Box::new(d));
                continue;
            }
            let Some(stream) = consumer.as_mut() else { break };
            let d = match stream.next().now_or_never() {
                Some(Some(Ok(d))) => d,
                // An error or a cancel: counted here (`next` would not see
                // it), and `next` subscribes again.
                Some(Some(Err(e))) => {
                    events::failed(NAME, "receive", &e, "; subscribing again");
                    *consumer = None;
                    break;
                }
                Some(None) => {
                    *consumer = None;
                    break;
                }
                None => break,
            };
            let mut delivery = RabbitDelivery::new(d, &self.settings, &self.broker, &self.due_tx);
            delivery.unsettled = Some(Unsettled::new(&self.unsettled));
            taken.push(Box::new(delivery));
        }
        taken
    }

    fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }

    /// The queue's ready messages (a passive declare, on a channel of its
    /// own) and the deliveries taken from it and not settled yet (RabbitMQ
    /// does not count those as ready). Prefetched messages not yet taken
    /// are in neither: at most `prefetch` fewer. RabbitMQ does not tell the
    /// age of the oldest (only its management API does).
    fn backlog(&self) -> BoxFuture<'_, Option<Backlog>> {
        Box::pin(async move {
            // Never a reconnect from here: the consumer's path does that.
            if !self.broker.is_connected() {
                return None;
            }
            let (channel, _) = self.broker.channel().await.ok()?;
            let options = lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let queue = channel
                .queue_declare(self.settings.queue.as_str().into(), options, FieldTable::default())
                .await;
            let _ = channel.close(200, "backlog read".into()).await;
            let ready = u64::from(queue.ok()?.message_count());
            Some(Backlog::count(
                ready.saturating_add(self.unsettled.load(Ordering::Relaxed)),
            ))
        })
    }

    /// Closes the consumer's channel: RabbitMQ requeues what it delivered to
    /// it and nobody took (prefetched), so another consumer gets it now.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut sub = self.subscription.lock().await;
            sub.consumer = None;
            if let Some(channel) = sub.channel.take() {
                if let Err(e) = channel.close(200, "route stopped".into()).await {
                    tracing::debug!(queue = %self.settings.queue, "closing the consumer channel: {e}");
                }
            }
        })
    }
}

pub struct RabbitDelivery {
    message: Message,
    /// Taken when settled; still here at drop: handed back (nack, requeue).
    acker: Option<Acker>,
    properties: BasicProperties,
    exchange: String,
    broker: RabbitBroker,
    settings: Arc<ConsumerSettings>,
    due_tx: mpsc::UnboundedSender<RabbitDelivery>,
    unsettled: Option<Unsettled>,
}

impl RabbitDelivery {
    fn new(
        d: lapin::message::Delivery,
        settings: &Arc<ConsumerSettings>,
        broker: &RabbitBroker,
        due_tx: &mpsc::UnboundedSender<RabbitDelivery>,
    ) -> Self {
        let p = &d.properties;
        let table = p.headers().as_ref();
        let subject = headers::raw(table, ROUTING_KEY).unwrap_or_else(|| d.routing_key.to_string());
        let message = Message {
            // Without a message id there is nothing stable across
            // redeliveries: the delivery tag tells messages apart within a
            // channel, the process nonce across restarts and replicas.
            id: p.message_id().as_ref().map(|m| m.to_string()).unwrap_or_else(|| {
                format!(
                    "{}:{}:{}",
                    settings.queue,
                    crate::message::process_nonce(),
                    d.delivery_tag
                )
            }),
            subject,
            key: None,
            headers: headers::from_table(table),
            attempt: headers::attempt(table, d.redelivered),
            timestamp_ms: p.timestamp().map(|s| s.saturating_mul(1000)).unwrap_or(0),
            reply_to: p
                .reply_to()
                .as_ref()
                .map(|r| reply_address(r.as_str(), p.correlation_id().as_ref().map(|c| c.as_str()))),
            payload: d.data,
        };
        Self {
            message,
            acker: Some(d.acker),
            properties: d.properties,
            exchange: d.exchange.to_string(),
            broker: broker.clone(),
            settings: settings.clone(),
            due_tx: due_tx.clone(),
            unsettled: None,
        }
    }

    fn take_acker(&mut self) -> Result<Acker, BrokerError> {
        self.acker.take().ok_or_else(|| failed("delivery already settled"))
    }

    async fn ack_with(acker: Acker) -> Result<(), BrokerError> {
        match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            // The channel died first: RabbitMQ redelivers the message, and
            // acking its tag on another channel would ack a stranger.
            Ok(false) => Err(disconnected(
                "the channel closed before the ack; RabbitMQ redelivers the message",
            )),
            Err(e) => Err(disconnected(e)),
        }
    }

    /// The message as it goes to the delay queue: same properties
    /// (persistence included), its next attempt and routing key recorded.
    fn delayed_properties(&self) -> BasicProperties {
        let mut table = self.properties.headers().clone().unwrap_or_default();
        table.insert(
            ATTEMPT.into(),
            AMQPValue::LongLongInt(i64::from(self.message.attempt.saturating_add(1))),
        );
        table.insert(
            ROUTING_KEY.into(),
            AMQPValue::LongString(LongString::from(self.message.subject.as_bytes())),
        );
        self.properties.clone().with_headers(table)
    }

    async fn retry_via_delay_queue(mut self, delay: Duration) -> Result<(), BrokerError> {
        let delay = quantize(delay.max(MIN_DELAY));
        let queue = self.broker.delay_queue(&self.settings.queue, delay).await?;
        let copy = (
            String::new(),
            queue,
            self.delayed_properties(),
            std::mem::take(&mut self.message.payload),
        );
        // Confirmed before the original is acked: a crash in between leaves
        // two copies (the gate absorbs it), never none.
        let published = self.broker.publish_confirmed(vec![copy], true).await;
        let acker = self.take_acker()?;
        match published {
            Ok(()) => Self::ack_with(acker).await,
            Err(e) => {
                let _ = acker.nack(requeue()).await;
                Err(e)
            }
        }
    }
}

fn requeue() -> BasicNackOptions {
    BasicNackOptions {
        multiple: false,
        requeue: true,
    }
}

/// Rounds a delay up to a ladder of ten steps per decade (1, 1.2, 1.5, 2,
/// 2.5, 3, 4, 5, 6, 8), so that a jittered backoff needs a bounded number of
/// delay queues. Up, never down: a retry is never redelivered earlier than
/// asked (the adapter contract); it is at most a third later.
pub fn quantize(delay: Duration) -> Duration {
    const LADDER: [f64; 11] = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0];
    let ms = delay.as_secs_f64() * 1000.0;
    if ms < 1.0 {
        return Duration::from_millis(1);
    }
    let decade = 10f64.powf(ms.log10().floor());
    let mantissa = ms / decade;
    // A hair of tolerance so that a ladder value itself (whose mantissa
    // float division may put just above it) stays where it is.
    let step = LADDER
        .iter()
        .copied()
        .find(|step| *step >= mantissa - 1e-9)
        .unwrap_or(10.0);
    let quantized = Duration::from_millis((step * decade).round() as u64);
    quantized.max(Duration::from_millis(ms.ceil() as u64))
}

impl Delivery for RabbitDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        format!(
            "rabbitmq://{}?routing_key={}&exchange={}",
            self.settings.queue, self.message.subject, self.exchange
        )
    }

    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        let acker = self.take_acker();
        Box::pin(async move { Self::ack_with(acker?).await })
    }

    fn retry(mut self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        match self.settings.retry_via {
            RetryVia::DelayQueue => Box::pin(async move { (*self).retry_via_delay_queue(delay).await }),
            RetryVia::InProcess => {
                // Held unacked (it keeps its prefetch slot) and handed out
                // again once the delay has passed.
                self.message.attempt = self.message.attempt.saturating_add(1);
                let due = self.due_tx.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    // A closed source drops it: RabbitMQ gets it back.
                    let _ = due.send(*self);
                });
                Box::pin(async { Ok(()) })
            }
        }
    }

    fn dead_lettered(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        let acker = self.take_acker();
        Box::pin(async move { Self::ack_with(acker?).await })
    }
}

impl Drop for RabbitDelivery {
    fn drop(&mut self) {
        // Unsettled (shutdown, or a settle that failed): hand it back now
        // rather than when the channel closes.
        let Some(acker) = self.acker.take() else { return };
        if !acker.usable() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = acker.nack(requeue()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_keeps_ladder_values_and_bounds_error() {
        for ms in [10u64, 100, 200, 1000, 2000, 4000, 30_000] {
            assert_eq!(quantize(Duration::from_millis(ms)), Duration::from_millis(ms), "{ms}");
        }
        for ms in 11..100_000u64 {
            let q = quantize(Duration::from_millis(ms)).as_millis() as f64;
            assert!(q >= ms as f64, "{ms} -> {q}: earlier than asked");
            let err = (q - ms as f64) / ms as f64;
            assert!(err <= 0.34, "{ms} -> {q}");
        }
    }
}
