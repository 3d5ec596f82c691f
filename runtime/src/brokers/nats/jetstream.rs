//! JetStream durable pull consumers: explicit ack after the outcome, `nak`
//! with the backoff delay for retries (the broker redelivers, so a retry
//! survives a crash), `in_progress` while a handler runs long, `term` once
//! the dead-lettered copy is stored.

use super::{differ, failed, from_header_map, ConsumerSettings, NatsBroker, NatsSetupError};
use crate::brokers::events;
use crate::brokers::{AckDone, Backlog, BoxFuture, BrokerError, Delivery, Source};
use crate::error::{cause, Cause};
use crate::message::Message;
use async_nats::jetstream::consumer::{pull, AckPolicy, Consumer};
use async_nats::jetstream::AckKind;
use futures_util::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
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
    acks: AckQueue,
}

type AckResult = Result<(), BrokerError>;

type AckerRef = Arc<async_nats::jetstream::message::Acker>;

/// Acks written per turn of the ack task, at most.
const ACKS_AT_ONCE: usize = 256;

/// One settle on its way to the server, and who waits for it.
struct QueuedAck {
    acker: AckerRef,
    kind: AckKind,
    done: AckWaiter,
}

enum AckWaiter {
    /// A settle future awaits the result.
    Future(tokio::sync::oneshot::Sender<Result<(), BrokerError>>),
    /// Called on the ack task (`Delivery::ack_then`).
    Call(AckDone),
}

impl AckWaiter {
    fn tell(self, sent: Result<(), BrokerError>) {
        match self {
            // The settler may be gone (shut down): nothing to tell.
            Self::Future(tx) => {
                let _ = tx.send(sent);
            }
            // A panic there must not stop the acks of everyone else.
            Self::Call(then) => {
                if std::panic::catch_unwind(AssertUnwindSafe(|| then(sent))).is_err() {
                    tracing::error!("caught a panic after an ack");
                }
            }
        }
    }
}

/// The acks of a source's deliveries, written by one task. Each ack is a
/// publish; sent from the many tasks that settle, the client wrote nearly
/// each in its own socket write (a syscall here and a read on the server
/// per ack). One task sending what has queued, back to back, lets the
/// client write them together.
#[derive(Clone)]
struct AckQueue(tokio::sync::mpsc::UnboundedSender<QueuedAck>);

impl AckQueue {
    /// Starts the task; it ends once the source and its deliveries are gone.
    fn start() -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<QueuedAck>();
        tokio::spawn(async move {
            let mut queued = Vec::with_capacity(ACKS_AT_ONCE);
            // A panic in the client must not stop every later ack: the
            // waiters of that turn are dropped (told the ack failed, so
            // their messages come back) and the task goes on.
            while AssertUnwindSafe(Self::send_all(&mut rx, &mut queued))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("caught a panic while sending acks; their messages are redelivered");
                queued.clear();
            }
        });
        Self(tx)
    }

    /// Sends what queues, a turn at a time, until every sender is gone.
    async fn send_all(rx: &mut tokio::sync::mpsc::UnboundedReceiver<QueuedAck>, queued: &mut Vec<QueuedAck>) {
        while rx.recv_many(queued, ACKS_AT_ONCE).await > 0 {
            // Woken by the first ack: the tasks ready meanwhile (other
            // workers settling) add theirs first.
            tokio::task::yield_now().await;
            while queued.len() < ACKS_AT_ONCE {
                match rx.try_recv() {
                    Ok(ack) => queued.push(ack),
                    Err(_) => break,
                }
            }
            for ack in queued.drain(..) {
                let sent = ack.acker.ack_with(ack.kind).await.map_err(failed);
                ack.done.tell(sent);
            }
        }
    }

    /// Queues `kind` for `acker`; the future ends once it is written to the
    /// client (as `ack_with` did before).
    fn send(&self, acker: AckerRef, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        let (tx, sent) = tokio::sync::oneshot::channel();
        if let Err(refused) = self.queue(acker, kind, AckWaiter::Future(tx)) {
            return Box::pin(std::future::ready(Err(refused)));
        }
        Box::pin(async move { sent.await.unwrap_or_else(|_| Err(stopped())) })
    }

    fn queue(&self, acker: AckerRef, kind: AckKind, done: AckWaiter) -> Result<(), BrokerError> {
        self.0.send(QueuedAck { acker, kind, done }).map_err(|refused| {
            // The task ends only once every sender is gone; unreachable
            // while a delivery holds one, but told as a failure if it is.
            match refused.0.done {
                AckWaiter::Call(then) => then(Err(stopped())),
                AckWaiter::Future(_) => {}
            }
            stopped()
        })
    }
}

fn stopped() -> BrokerError {
    failed("the ack task has stopped")
}

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
            acks: AckQueue::start(),
        })
    }

    async fn next_delivery(&self) -> Result<JetStreamDelivery, BrokerError> {
        let m = self.next_message().await?;
        // Built outside the lock, so other workers can take the next one.
        JetStreamDelivery::new(m, self)
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
                    // An error (counted here: `next` would not see it) or
                    // the end: `next` starts a fresh pull.
                    Some(Some(Err(e))) => {
                        events::failed(super::NAME, "receive", &e, "; starting a fresh pull");
                        *guard = None;
                        break;
                    }
                    Some(None) => {
                        *guard = None;
                        break;
                    }
                    None => break,
                }
            }
        }
        taken
            .into_iter()
            .filter_map(|m| match JetStreamDelivery::new(m, self) {
                Ok(d) => Some(Box::new(d) as Box<dyn Delivery>),
                // Never acked: the server delivers it again after `ack_wait`.
                Err(e) => {
                    events::failed(super::NAME, "receive", &e, ": left for redelivery");
                    None
                }
            })
            .collect()
    }

    /// Queues every ack at once; one wake-up when the last is written.
    fn ack_many(&self, deliveries: Vec<Box<dyn Delivery>>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        let n = deliveries.len();
        let results: Arc<std::sync::Mutex<Vec<Option<AckResult>>>> =
            Arc::new(std::sync::Mutex::new((0..n).map(|_| None).collect()));
        let left = Arc::new(std::sync::atomic::AtomicUsize::new(n));
        let (all_done, written) = tokio::sync::oneshot::channel::<()>();
        let all_done = Arc::new(std::sync::Mutex::new(Some(all_done)));
        for (i, d) in deliveries.into_iter().enumerate() {
            let (results, left, all_done) = (results.clone(), left.clone(), all_done.clone());
            let then: AckDone = Box::new(move |sent| {
                if let Ok(mut r) = results.lock() {
                    r[i] = Some(sent);
                }
                if left.fetch_sub(1, AtomicOrdering::AcqRel) == 1 {
                    if let Some(tx) = all_done.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(());
                    }
                }
            });
            match (d as Box<dyn std::any::Any + Send>).downcast::<JetStreamDelivery>() {
                Ok(js) => js.ack_then(then),
                // Not this source's (cannot happen): dropped unsettled,
                // i.e. handed back, and reported as not acked.
                Err(_) => then(Err(failed("a delivery of another source"))),
            }
        }
        Box::pin(async move {
            if n > 0 {
                let _ = written.await;
            }
            let mut results = results.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
            results.resize_with(n, || None);
            results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| Err(stopped())))
                .collect()
        })
    }

    fn is_connected(&self) -> bool {
        self.broker.is_connected()
    }

    fn takes_one_at_a_time(&self) -> bool {
        true
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
    acks: AckQueue,
    id: u64,
}

impl JetStreamDelivery {
    fn new(m: async_nats::jetstream::Message, source: &JetStreamSource) -> Result<Self, BrokerError> {
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
        let id = source.in_flight.add(acker.clone());
        Ok(Self {
            names: source.names.clone(),
            message,
            acker,
            in_flight: source.in_flight.clone(),
            acks: source.acks.clone(),
            id,
        })
    }

    fn settle(&self, kind: AckKind) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.in_flight.remove(self.id);
        // A plain ack is a publish on the same connection; waiting for the
        // server's confirmation (double ack) would cost a round trip per
        // message, and a lost ack only means a redelivery, which the
        // idempotency gate absorbs.
        self.acks.send(self.acker.clone(), kind)
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

    fn ack_then(self: Box<Self>, then: AckDone) {
        self.in_flight.remove(self.id);
        let _ = self.acks.queue(self.acker.clone(), AckKind::Ack, AckWaiter::Call(then));
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
