//! The pipeline joins a broker source to a plugin:
//! source -> invoke -> policy -> settle, with `concurrency` workers per route.
//!
//! The invariant kept here: a message is acked only after its outcome is
//! durable — the handler's publishes confirmed by their broker, or its
//! dead-lettered copy confirmed. Any failure on that path leaves the message
//! unacked, so the broker delivers it again.

pub mod dead_letter;

pub mod policy;
pub mod trace;

use crate::brokers::{BrokerError, Delivery, Published, Sink, Source};
use crate::config::Ordering as RouteOrdering;
use crate::engine::{FailureKind, Invocation, Outcome, Plugin, PluginSlot};
use crate::idempotency::{Claim, IdempotencyStore};
use crate::keys::KeySource;
use crate::message::{Header, Message, Outbound, DEDUP_HEADER};
use crate::metrics::{Metrics, RouteFailure, RouteLabel, RouteMetrics, RouteOutput};
use futures_util::FutureExt as _;
use policy::{FailureDecision, Policy};
use serde::Serialize;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Pause after a source error before asking again.
const SOURCE_ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Delay before redelivery when settling failed (e.g. a publish was refused).
const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Bounds of the wait before asking again for a key another worker holds:
/// its lease may end long after the handling does.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(50);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(1);
/// Header on a replayed dead letter: how often it was replayed. Part of the
/// publish dedup ids, so a replay's publishes are not taken for duplicates.
pub const REPLAYS_HEADER: &str = "sluice-replays";
/// Deliveries waiting per ordering lane beyond the one being handled.
const LANE_BUFFER: usize = 1;

/// Counters shown on the status page.
#[derive(Default)]
pub struct RouteStatus {
    pub handled: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub in_flight: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

/// Whether a route's workers run: a route that should serve and has no
/// worker left cannot (`/readyz` says so).
#[derive(Default)]
pub struct Liveness {
    workers: AtomicU64,
    spawned: std::sync::atomic::AtomicBool,
    stopping: std::sync::atomic::AtomicBool,
}

impl Liveness {
    /// Spawned, not being stopped, and no worker task left.
    pub fn stalled(&self) -> bool {
        self.spawned.load(Ordering::Relaxed)
            && !self.stopping.load(Ordering::Relaxed)
            && self.workers.load(Ordering::Relaxed) == 0
    }

    /// The route is being stopped on purpose (shutdown, reload).
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
}

/// Counts one worker task for as long as it lives, however it ends.
struct WorkerAlive(Arc<Liveness>);

impl WorkerAlive {
    fn new(liveness: &Arc<Liveness>) -> Self {
        liveness.workers.fetch_add(1, Ordering::Relaxed);
        Self(liveness.clone())
    }
}

impl Drop for WorkerAlive {
    fn drop(&mut self) {
        self.0.workers.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStatusView {
    pub handled: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub last_error: Option<String>,
}

impl RouteStatus {
    pub fn view(&self) -> RouteStatusView {
        RouteStatusView {
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn set_error(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(crate::engine::bounded(error));
        }
    }
}

/// The idempotency gate of a route.
pub struct Gate {
    pub key: KeySource,
    pub store: Arc<dyn IdempotencyStore>,
    pub ttl: Duration,
    pub lease: Duration,
}

/// One configured route, ready to run.
pub struct Route {
    pub name: String,
    /// Shown on the status page (`embedded orders.>`).
    pub source_description: String,
    /// The broker messages come from (its `broker` name).
    pub source_broker: &'static str,
    pub source: Arc<dyn Source>,
    /// Where handler publishes and replies go.
    pub sink: Arc<dyn Sink>,
    pub dead_letter_sink: Arc<dyn Sink>,
    pub dead_letter_subject: String,
    /// The broker the dead letters go to (`embedded`, `nats`...).
    pub dead_letter_broker: &'static str,
    /// The plugin version new messages run on; swapped by a hot reload.
    pub plugin: Arc<PluginSlot>,
    pub policy: Policy,
    pub concurrency: u32,
    pub ordering: RouteOrdering,
    /// Where the ordering key comes from (with `ordering = "key"`).
    pub ordering_key: KeySource,
    pub gate: Option<Gate>,
    /// Subjects a producer's reply address may not name: every route's
    /// dead-letter subject and input (a reply there would inject work).
    pub reserved_replies: Arc<Vec<crate::subject::SubjectPattern>>,
    /// Whether its workers run.
    pub liveness: Arc<Liveness>,
    pub metrics: Arc<Metrics>,
    pub status: Arc<RouteStatus>,
    /// This route's series in `metrics`, looked up on first use.
    pub series: std::sync::OnceLock<RouteMetrics>,
}

impl Route {
    /// A route with default policy (retries, no gate, unordered, one worker)
    /// whose dead letters go to `dlq.<name>` on `sink`. Fields are public to
    /// adjust.
    pub fn new(
        name: &str,
        source: Arc<dyn Source>,
        source_broker: &'static str,
        sink: Arc<dyn Sink>,
        plugin: Arc<Plugin>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            source_description: format!("{source_broker} (programmatic)"),
            source,
            source_broker,
            sink: sink.clone(),
            dead_letter_sink: sink,
            dead_letter_subject: format!("dlq.{name}"),
            dead_letter_broker: source_broker,
            plugin: Arc::new(PluginSlot::new(plugin)),
            policy: Policy {
                retry: crate::config::RetryConfig::default(),
                on_failure: crate::config::FailureMapping::default(),
            },
            concurrency: 1,
            ordering: RouteOrdering::None,
            ordering_key: KeySource::MessageKey,
            gate: None,
            reserved_replies: Arc::new(Vec::new()),
            liveness: Arc::default(),
            metrics: Arc::new(Metrics::new()),
            status: Arc::new(RouteStatus::default()),
            series: std::sync::OnceLock::new(),
        }
    }
}

/// A failure on its way to the dead-letter destination.
struct Failure<'a> {
    kind: FailureKind,
    reason: &'a str,
    /// Send the requester an error reply (not when its reply address was
    /// the problem).
    answer_requester: bool,
}

/// How a failed attempt waits for the next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RetryMode {
    /// Hand the message back to the broker with a delay (others overtake it).
    Broker,
    /// Wait in the lane and run again (a key's order holds).
    InPlace,
}

/// A unique token per handling, the owner of an idempotency lease.
fn lease_owner() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        crate::message::process_nonce(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as usize
}

enum LaneSender {
    Bounded(mpsc::Sender<Box<dyn Delivery>>),
    Unbounded(mpsc::UnboundedSender<Box<dyn Delivery>>),
}

enum LaneReceiver {
    Bounded(mpsc::Receiver<Box<dyn Delivery>>),
    Unbounded(mpsc::UnboundedReceiver<Box<dyn Delivery>>),
}

impl LaneReceiver {
    async fn recv(&mut self) -> Option<Box<dyn Delivery>> {
        match self {
            Self::Bounded(rx) => rx.recv().await,
            Self::Unbounded(rx) => rx.recv().await,
        }
    }
}

/// The outcome label counted in `sluice_messages_total`.
type Label = &'static str;
/// Handling stopped by shutdown; the delivery went back unsettled.
const INTERRUPTED: Label = "interrupted";
/// Handling panicked; the delivery went back unsettled.
const PANICKED: Label = "panic";

impl Route {
    /// Starts the route's workers. They stop taking messages when `shutdown`
    /// is cancelled and return once their current message is settled.
    pub fn spawn(self: &Arc<Self>, shutdown: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.liveness.spawned.store(true, Ordering::Relaxed);
        match self.ordering {
            RouteOrdering::None => (0..self.concurrency)
                .map(|_| tokio::spawn(self.clone().worker(shutdown.clone(), self.alive())))
                .collect(),
            RouteOrdering::Key | RouteOrdering::Partition => {
                let lanes = self.concurrency as usize;
                let mut handles = Vec::with_capacity(lanes + 1);
                let mut senders = Vec::with_capacity(lanes);
                // A source that pauses its own partitions bounds memory; a
                // busy lane must not then hold up the others.
                let unbounded = self.source.bounds_in_flight();
                for _ in 0..lanes {
                    let (tx, rx) = if unbounded {
                        let (tx, rx) = mpsc::unbounded_channel();
                        (LaneSender::Unbounded(tx), LaneReceiver::Unbounded(rx))
                    } else {
                        let (tx, rx) = mpsc::channel(LANE_BUFFER);
                        (LaneSender::Bounded(tx), LaneReceiver::Bounded(rx))
                    };
                    senders.push(tx);
                    handles.push(tokio::spawn(self.clone().lane(rx, shutdown.clone(), self.alive())));
                }
                handles.push(tokio::spawn(self.clone().dispatch(
                    senders,
                    shutdown.clone(),
                    self.alive(),
                )));
                handles
            }
        }
    }

    /// A worker's share of the liveness count, taken before the task is
    /// spawned (so the count is right the moment `spawn` returns).
    fn alive(&self) -> WorkerAlive {
        WorkerAlive::new(&self.liveness)
    }

    async fn next_delivery(&self, shutdown: &CancellationToken) -> Option<Box<dyn Delivery>> {
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return None,
                next = self.source.next() => next,
            };
            match next {
                Ok(delivery) => return Some(delivery),
                Err(BrokerError::Closed { .. }) => return None,
                Err(e) => {
                    tracing::warn!(route = %self.name, "source: {e}");
                    self.status.set_error(e.to_string());
                    tokio::select! {
                        _ = shutdown.cancelled() => return None,
                        _ = tokio::time::sleep(SOURCE_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// Unordered: take, handle, settle, repeat.
    async fn worker(self: Arc<Self>, shutdown: CancellationToken, _alive: WorkerAlive) {
        while let Some(delivery) = self.next_delivery(&shutdown).await {
            self.process(delivery, RetryMode::Broker, &shutdown).await;
        }
    }

    /// Ordered: hands each delivery to the lane of its key. A full lane
    /// blocks the dispatcher, which stops taking messages: backpressure.
    async fn dispatch(self: Arc<Self>, lanes: Vec<LaneSender>, shutdown: CancellationToken, _alive: WorkerAlive) {
        while let Some(delivery) = self.next_delivery(&shutdown).await {
            let index = match (self.ordering, delivery.partition()) {
                (RouteOrdering::Partition, Some(p)) => p as usize % lanes.len(),
                // One partition (the embedded broker): one lane.
                (RouteOrdering::Partition, None) => 0,
                _ => {
                    let msg = delivery.message();
                    let key = self.ordering_key.extract(msg).unwrap_or_else(|| msg.id.clone());
                    lane_of(&key, lanes.len())
                }
            };
            let sent = match &lanes[index] {
                LaneSender::Unbounded(lane) => lane.send(delivery).is_ok(),
                LaneSender::Bounded(lane) => tokio::select! {
                    // Dropped unsent: handed back to the broker.
                    _ = shutdown.cancelled() => return,
                    sent = lane.send(delivery) => sent.is_ok(),
                },
            };
            if !sent {
                return;
            }
        }
    }

    async fn lane(self: Arc<Self>, mut rx: LaneReceiver, shutdown: CancellationToken, _alive: WorkerAlive) {
        loop {
            let delivery = tokio::select! {
                biased;
                // Waiting deliveries are dropped, i.e. handed back.
                _ = shutdown.cancelled() => return,
                d = rx.recv() => match d { Some(d) => d, None => return },
            };
            self.process(delivery, RetryMode::InPlace, &shutdown).await;
        }
    }

    /// Runs one delivery through gate, invoke, policy and settle.
    async fn process(&self, delivery: Box<dyn Delivery>, mode: RetryMode, shutdown: &CancellationToken) {
        let msg = delivery.message();
        // A `traceparent` on the message makes this handling a span of its
        // trace; what the handling sends continues it as children.
        let exporting = crate::telemetry::otlp::enabled();
        let trace = match trace::handler_span(msg) {
            None if exporting => Some(trace::root_span()),
            found => found,
        };
        // What the exported span says about the message (copied only then).
        let about = exporting.then(|| (msg.subject.clone(), msg.id.clone(), msg.attempt));
        let span = tracing::info_span!(
            "message",
            route = %self.name,
            // Debug-formatted: a producer's id or subject with CR/LF cannot
            // forge a log line.
            subject = ?msg.subject,
            id = ?msg.id,
            attempt = msg.attempt,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_span_id = tracing::field::Empty,
        );
        if let Some(t) = &trace {
            span.record("trace_id", tracing::field::display(&t.trace_id));
            span.record("span_id", tracing::field::display(&t.span_id));
            if !t.parent_id.is_empty() {
                span.record("parent_span_id", tracing::field::display(&t.parent_id));
            }
        }
        async {
            let started = std::time::Instant::now();
            let started_at = std::time::SystemTime::now();
            let gauge = &self.series().in_flight;
            gauge.inc();
            self.status.in_flight.fetch_add(1, Ordering::Relaxed);
            let traceparent = trace.as_ref().map(|t| t.traceparent.as_str());
            // Last line of defence: a panic anywhere in the handling hands
            // the delivery back (dropped unsettled) and the worker lives on.
            let outcome = match AssertUnwindSafe(self.handle(delivery, mode, traceparent, shutdown))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(panic) => {
                    self.caught_panic("handling a message", panic.as_ref());
                    PANICKED
                }
            };
            let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            let current = tracing::Span::current();
            current.record("outcome", tracing::field::display(outcome));
            current.record("duration_ms", duration_ms);
            tracing::debug!("settled");
            if let (Some(t), Some((subject, message_id, attempt))) = (trace, about) {
                crate::telemetry::otlp::export(crate::telemetry::otlp::SpanRecord {
                    trace_id: t.trace_id,
                    span_id: t.span_id,
                    parent_span_id: t.parent_id,
                    start: started_at,
                    end: std::time::SystemTime::now(),
                    route: self.name.clone(),
                    subject,
                    message_id,
                    attempt,
                    outcome,
                });
            }
            if outcome != INTERRUPTED {
                self.count(outcome);
            }
            gauge.dec();
            self.status.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(span)
        .await
    }

    async fn handle(
        &self,
        delivery: Box<dyn Delivery>,
        mode: RetryMode,
        traceparent: Option<&str>,
        shutdown: &CancellationToken,
    ) -> Label {
        if !delivery.begin() {
            return INTERRUPTED;
        }
        // Lease owners matter only with a gate; no allocation otherwise.
        let owner = if self.gate.is_some() {
            lease_owner()
        } else {
            String::new()
        };
        let gate_key = self
            .gate
            .as_ref()
            .and_then(|g| g.key.extract(delivery.message()))
            .map(|k| format!("{}:{k}", self.name));

        if let (Some(gate), Some(key)) = (&self.gate, &gate_key) {
            loop {
                match gate.store.claim(key, &owner, gate.lease).await {
                    Ok(Claim::Acquired) => break,
                    Ok(Claim::Done) => {
                        tracing::debug!(key = %key, "duplicate: already handled");
                        self.settle_result(delivery.ack().await, "ack of a duplicate");
                        return "duplicate";
                    }
                    Ok(Claim::Busy { retry_in }) => {
                        let wait = retry_in.clamp(BUSY_RETRY_MIN, BUSY_RETRY_MAX);
                        if mode == RetryMode::Broker {
                            self.settle_result(delivery.retry(wait).await, "retry of a busy key");
                            return "retry";
                        }
                        if !sleep_unless(shutdown, wait).await {
                            return INTERRUPTED; // dropped: handed back
                        }
                    }
                    Err(e) => {
                        tracing::error!("idempotency store: {e}; the message will be redelivered");
                        self.status.set_error(e.to_string());
                        self.settle_result(delivery.retry(SETTLE_RETRY_DELAY).await, "retry");
                        return "retry";
                    }
                }
            }
        }

        // This message runs on the version current now, to the end, even if
        // a hot reload swaps the plugin meanwhile.
        let plugin = self.plugin.current();
        // A reply address is the producer's choice: it must not point sluice
        // at the server's own APIs or at its dead-letter subject. Refused
        // before the handler runs; no reply is sent there.
        if let Some(why) = delivery
            .message()
            .reply_to
            .as_deref()
            .and_then(|r| self.refused_reply(r))
        {
            tracing::warn!("refusing the message: {why}");
            self.note_failure(FailureKind::InvalidPublish, &why);
            self.release(gate_key.as_deref(), &owner).await;
            let msg = delivery.message().clone();
            let failure = Failure {
                kind: FailureKind::InvalidPublish,
                reason: &why,
                answer_requester: false,
            };
            return self
                .dead_letter(delivery, &plugin, &msg, gate_key.as_deref(), traceparent, failure)
                .await;
        }
        // Cloned only if a retry in place needs a new attempt number.
        let mut msg: std::borrow::Cow<'_, Message> = std::borrow::Cow::Borrowed(delivery.message());
        loop {
            let invocation = self.invoke(&plugin, &msg).await;
            self.observe(&invocation);
            let (kind, reason) = match invocation.outcome {
                Outcome::Ok { reply } => {
                    let outbound = self.outbound(&msg, gate_key.as_deref(), traceparent, invocation.publishes, reply);
                    match self.send(&*self.sink, outbound).await {
                        Ok(_) => {
                            if let (Some(gate), Some(key)) = (&self.gate, &gate_key) {
                                // The publishes are durable: a failure here only
                                // risks a rerun, whose publishes carry the same
                                // dedup ids.
                                if let Err(e) = gate.store.complete(key, &owner, gate.ttl).await {
                                    tracing::warn!("cannot record {key} as done: {e}");
                                }
                            }
                            return self.settle_result(delivery.ack().await, "ok");
                        }
                        // A publish that failed is a failed attempt: counted,
                        // retried with backoff, dead-lettered in the end (at
                        // once when the broker can never carry it).
                        Err(e) => {
                            let kind = if matches!(e, BrokerError::Refused { .. }) {
                                FailureKind::InvalidPublish
                            } else {
                                FailureKind::Retryable
                            };
                            let reason = format!("publishing the handler's messages: {e}");
                            self.note_failure(kind, &reason);
                            self.count_settle_error();
                            (kind, reason)
                        }
                    }
                }
                Outcome::Failed { kind, reason } => (kind, reason),
            };
            let mut decision = self.policy.decide_failure(kind, &reason, msg.attempt);
            // A requester is waiting: answer with the error now rather than
            // retry behind its back until it times out.
            if msg.reply_to.is_some() && matches!(decision, FailureDecision::Retry(_)) {
                decision = FailureDecision::DeadLetter {
                    kind,
                    reason: reason.clone(),
                };
            }
            match decision {
                FailureDecision::Retry(delay) => {
                    tracing::warn!(kind = %kind, retry_in_ms = delay.as_millis() as u64, "handler failed: {reason}");
                    if mode == RetryMode::Broker {
                        self.release(gate_key.as_deref(), &owner).await;
                        return self.settle_result(delivery.retry(delay).await, "retry");
                    }
                    // In place: each retry is counted as it happens; the
                    // message's final outcome is counted when it settles.
                    self.count("retry");
                    if !sleep_unless(shutdown, delay).await {
                        self.release(gate_key.as_deref(), &owner).await;
                        return INTERRUPTED;
                    }
                    let next = msg.attempt.saturating_add(1);
                    msg.to_mut().attempt = next;
                }
                FailureDecision::DeadLetter { kind, reason } => {
                    tracing::warn!(kind = %kind, dead_letter = %self.dead_letter_subject, "dead-lettering: {reason}");
                    // Released, not done: a replayed copy must run again.
                    self.release(gate_key.as_deref(), &owner).await;
                    let msg = msg.into_owned();
                    let failure = Failure {
                        kind,
                        reason: &reason,
                        answer_requester: true,
                    };
                    return self
                        .dead_letter(delivery, &plugin, &msg, gate_key.as_deref(), traceparent, failure)
                        .await;
                }
            }
        }
    }

    /// Why a reply address must not be used, if it must not.
    fn refused_reply(&self, reply_to: &str) -> Option<String> {
        if let Err(why) = crate::headers::check_address(reply_to) {
            return Some(format!("reply address {why}"));
        }
        if crate::headers::is_system_subject(reply_to)
            || reply_to == self.dead_letter_subject
            || self.reserved_replies.iter().any(|p| p.matches(reply_to))
        {
            return Some(format!(
                "reply address {:?} is a server API, dead-letter or route input subject",
                crate::headers::shown(reply_to)
            ));
        }
        None
    }

    /// Runs the handler; a panic in the host while doing so (a bug, never
    /// the plugin's trap, which wasmtime reports) fails the attempt as a
    /// trap instead of killing the worker.
    async fn invoke(&self, plugin: &Plugin, msg: &Message) -> Invocation {
        let started = std::time::Instant::now();
        match AssertUnwindSafe(plugin.invoke(&self.name, msg)).catch_unwind().await {
            Ok(invocation) => invocation,
            Err(panic) => {
                let why = self.caught_panic("running the handler", panic.as_ref());
                Invocation {
                    outcome: Outcome::failed(FailureKind::Trap, why),
                    publishes: Vec::new(),
                    cut: Default::default(),
                    duration: started.elapsed(),
                }
            }
        }
    }

    /// Publishes through `sink`; a panic inside the broker client (some
    /// assert on values they dislike) is caught and refused.
    async fn send(&self, sink: &dyn Sink, outbound: Vec<Outbound>) -> Result<Published, BrokerError> {
        if outbound.is_empty() {
            return Ok(Published::default());
        }
        match AssertUnwindSafe(sink.publish(outbound)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(BrokerError::refused(
                "publish",
                self.caught_panic("publishing", panic.as_ref()),
            )),
        }
    }

    /// Logs and counts a caught panic; returns its text.
    fn caught_panic(&self, what: &str, panic: &(dyn std::any::Any + Send)) -> String {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(route = %self.name, "caught a panic while {what}: {text}");
        self.metrics
            .panics
            .get_or_create(&RouteLabel {
                route: self.name.clone(),
            })
            .inc();
        crate::engine::bounded(format!("internal error while {what}: {text}"))
    }

    fn series(&self) -> &RouteMetrics {
        self.series.get_or_init(|| self.metrics.route(&self.name))
    }

    fn count(&self, outcome: Label) {
        self.series().count(outcome);
        let counter = match outcome {
            "ok" => &self.status.handled,
            "retry" => &self.status.retried,
            "dead_letter" => &self.status.dead_lettered,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn observe(&self, invocation: &Invocation) {
        self.series().duration.observe(invocation.duration.as_secs_f64());
        if let Outcome::Failed { kind, reason } = &invocation.outcome {
            self.note_failure(*kind, reason);
        }
        let cut = invocation.cut;
        for (what, n) in [
            ("log_lines", cut.log_lines),
            ("log_bytes", cut.log_bytes),
            ("reserved_headers", cut.reserved_headers),
        ] {
            if n > 0 {
                self.metrics
                    .output_cut
                    .get_or_create(&RouteOutput {
                        route: self.name.clone(),
                        what: what.to_owned(),
                    })
                    .inc_by(u64::from(n));
            }
        }
    }

    /// Counts a failed attempt and shows it on the status page.
    fn note_failure(&self, kind: FailureKind, reason: &str) {
        self.metrics
            .failures
            .get_or_create(&RouteFailure {
                route: self.name.clone(),
                kind: kind.as_str().to_owned(),
            })
            .inc();
        self.status.set_error(format!("{kind}: {reason}"));
    }

    fn count_settle_error(&self) {
        self.metrics
            .settle_errors
            .get_or_create(&RouteLabel {
                route: self.name.clone(),
            })
            .inc();
    }

    /// The base of the dedup ids of what handling `msg` sends: the
    /// idempotency key, else the message id; a replay counts apart.
    fn dedup_base(&self, msg: &Message, gate_key: Option<&str>) -> String {
        let mut base = gate_key
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}:{}", self.name, msg.id));
        // Only a count: the header is the producer's to forge.
        if let Some(replays) = msg.header(REPLAYS_HEADER).and_then(|r| r.parse::<u32>().ok()) {
            base = format!("{base}:r{replays}");
        }
        base
    }

    /// The handler's publishes and reply, each with a dedup id derived from
    /// the idempotency key (else the message id), so a rerun's publishes are
    /// recognised downstream.
    fn outbound(
        &self,
        msg: &Message,
        gate_key: Option<&str>,
        traceparent: Option<&str>,
        publishes: Vec<Outbound>,
        reply: Option<crate::engine::Reply>,
    ) -> Vec<Outbound> {
        let mut outbound = publishes;
        if let (Some(reply), Some(reply_to)) = (reply, &msg.reply_to) {
            outbound.push(Outbound {
                subject: reply_to.clone(),
                headers: reply.headers,
                payload: reply.payload,
            });
        }
        if outbound.is_empty() {
            return outbound;
        }
        if let Some(tp) = traceparent {
            for m in &mut outbound {
                trace::stamp(&mut m.headers, tp);
            }
        }
        // Plugins cannot set the dedup header (it is reserved): the host's
        // id is the only one.
        let base = self.dedup_base(msg, gate_key);
        for (i, m) in outbound.iter_mut().enumerate() {
            m.headers.push(Header::new(DEDUP_HEADER, format!("{base}:{i}")));
        }
        outbound
    }

    async fn release(&self, gate_key: Option<&str>, owner: &str) {
        if let (Some(gate), Some(key)) = (&self.gate, gate_key) {
            if let Err(e) = gate.store.release(key, owner).await {
                tracing::warn!("cannot release {key}: {e}; it frees up when its lease ends");
            }
        }
    }

    async fn dead_letter(
        &self,
        delivery: Box<dyn Delivery>,
        plugin: &Plugin,
        msg: &Message,
        gate_key: Option<&str>,
        traceparent: Option<&str>,
        failure: Failure<'_>,
    ) -> Label {
        let Failure {
            kind,
            reason,
            answer_requester,
        } = failure;
        if let (Some(reply_to), true) = (&msg.reply_to, answer_requester) {
            // The requester is waiting: tell it what went wrong.
            let mut error_reply = Outbound {
                subject: reply_to.clone(),
                headers: vec![
                    Header::new(dead_letter::ERROR, dead_letter::one_line(reason)),
                    Header::new(dead_letter::ERROR_KIND, kind.as_str()),
                ],
                payload: Vec::new(),
            };
            if let Some(tp) = traceparent {
                trace::stamp(&mut error_reply.headers, tp);
            }
            if let Err(e) = self.send(&*self.sink, vec![error_reply]).await {
                tracing::warn!("cannot send the error reply to {reply_to}: {e}");
            }
        }
        // Its own dedup id: never dropped as a duplicate of its original
        // (whose producer-set id it would otherwise carry).
        // The content hash keeps two different messages that share a
        // producer-chosen id (an AMQP message-id) apart.
        let dedup_id = format!(
            "{}:dlq:{}:{}",
            self.dedup_base(msg, gate_key),
            msg.attempt,
            dead_letter::content_hash(msg)
        );
        let mut copy = dead_letter::copy(
            msg,
            &self.dead_letter_subject,
            dead_letter::FailureContext {
                kind,
                reason,
                route: &self.name,
                plugin_name: plugin.name(),
                plugin_hash: plugin.hash(),
                origin: delivery.origin(),
                dedup_id,
            },
        );
        if let Some(tp) = traceparent {
            trace::stamp(&mut copy.headers, tp);
        }
        let mut sent = self.send(&*self.dead_letter_sink, vec![copy.clone()]).await;
        if let Err(BrokerError::Refused { .. }) = &sent {
            // A header of the original that the dead-letter broker cannot
            // carry (it came from another broker): keep the rest.
            let (kept, dropped) = dead_letter::portable(copy);
            tracing::warn!("the dead-letter broker refused {dropped} header(s) of the original; sending without them");
            sent = self.send(&*self.dead_letter_sink, vec![kept.clone()]).await;
            if let Err(BrokerError::Refused { reason, .. }) = &sent {
                // Still refused (too large once the failure headers are on):
                // the failure without the payload, rather than a loop.
                tracing::error!(
                    "the dead-letter broker refused the dead letter ({reason}); sending it without its payload"
                );
                sent = self
                    .send(&*self.dead_letter_sink, vec![dead_letter::without_payload(kept)])
                    .await;
            }
        }
        match sent {
            Err(e) => self.settle_failed(delivery, "publishing the dead letter", e).await,
            Ok(published) => {
                if published.duplicates > 0 {
                    tracing::debug!("this dead letter was stored by an earlier attempt");
                }
                self.settle_result(delivery.dead_lettered().await, "dead_letter")
            }
        }
    }

    /// A publish failed: the message must not be acked; have it redelivered.
    async fn settle_failed(&self, delivery: Box<dyn Delivery>, what: &str, e: BrokerError) -> Label {
        tracing::error!("{what} failed, the message will be redelivered: {e}");
        self.status.set_error(format!("{what}: {e}"));
        self.count_settle_error();
        // If even the retry fails, dropping the delivery hands it back.
        let _ = delivery.retry(SETTLE_RETRY_DELAY).await;
        "retry"
    }

    fn settle_result(&self, result: Result<(), BrokerError>, label: Label) -> Label {
        if let Err(e) = result {
            tracing::error!("settling ({label}) failed, the message will be redelivered: {e}");
            self.status.set_error(format!("settle: {e}"));
            self.count_settle_error();
        }
        label
    }
}

/// Sleeps `d`; false if shutdown came first.
async fn sleep_unless(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
