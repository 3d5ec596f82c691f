//! The pipeline joins a broker source to a plugin, in stages:
//! `lane` (deliveries to workers, in order where asked) -> `gate`
//! (idempotency) -> `invoke` (the handler, its publishes) -> `policy`
//! (retry or dead-letter) -> `settle` (the one place a delivery is acked,
//! retried, dead-lettered or handed back).
//!
//! The invariant kept here: a message is acked only after its outcome is
//! durable — the handler's publishes confirmed by their broker, or its
//! dead-lettered copy confirmed. Any failure on that path leaves the message
//! unacked, so the broker delivers it again.

mod batch;
pub mod dead_letter;
mod gate;
mod invoke;
mod lag;
mod lane;
pub mod policy;
mod settle;
mod status;
pub mod trace;
mod trailing;

pub use crate::metrics::MessageOutcome;
pub use gate::Gate;
pub use status::{Liveness, RouteStatus, RouteStatusView};
pub use trailing::TrailingSettles;

use crate::brokers::{BrokerError, Delivery, Sink, Source};
use crate::config::Ordering as RouteOrdering;
use crate::engine::{FailureKind, Invocation, Outcome, Plugin, PluginSlot};
use crate::error::{report, Report};
use crate::keys::KeySource;
use crate::message::Message;
use crate::metrics::{Metrics, RouteFailure, RouteMetrics, RouteOutput};
use futures_util::FutureExt as _;
use gate::{Admission, Lease};
use policy::{FailureDecision, Policy};
use settle::{BrokerOp, DeadLetter, Verdict, SETTLE_RETRY_DELAY};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Header on a replayed dead letter: how often it was replayed. Part of the
/// publish dedup ids, so a replay's publishes are not taken for duplicates.
pub const REPLAYS_HEADER: &str = "sluice-replays";

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
    /// Several messages per plugin call; none: one.
    pub batch: Option<crate::config::BatchConfig>,
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
    /// Acks still waiting after their worker moved on.
    pub trailing: TrailingSettles,
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
            batch: None,
            gate: None,
            reserved_replies: Arc::new(Vec::new()),
            liveness: Arc::default(),
            metrics: Arc::new(Metrics::new()),
            status: Arc::new(RouteStatus::default()),
            series: std::sync::OnceLock::new(),
            trailing: TrailingSettles::default(),
        }
    }
}

/// What the end of a handling needs to account for it.
struct Ending {
    started: std::time::Instant,
    started_at: std::time::SystemTime,
    /// Subject, id and attempt, when spans are exported.
    about: Option<(String, String, u32)>,
    trace: Option<trace::HandlerSpan>,
    span: tracing::Span,
}

/// Why the gate does not let a message run now.
enum Refusal {
    /// Its handling ends with this verdict.
    Ends(Verdict),
    /// Its key is held elsewhere: ask again after this.
    Busy(Duration),
}

/// How a failed attempt waits for the next.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RetryMode {
    /// Hand the message back to the broker with a delay (others overtake it).
    Broker,
    /// Wait in the lane and run again (a key's order holds).
    InPlace,
}

impl Route {
    /// Runs one delivery through gate, invoke, policy and settle. With
    /// broker retries (unordered routes) an ack trails: the worker returns
    /// once the verdict is known.
    async fn process(self: &Arc<Self>, delivery: Box<dyn Delivery>, mode: RetryMode, shutdown: &CancellationToken) {
        let msg = delivery.message();
        // A `traceparent` on the message makes this handling a span of its
        // trace; what the handling sends continues it as children.
        let exporting = crate::telemetry::otlp::enabled();
        let trace = match trace::handler_span(msg) {
            None if exporting => Some(trace::root_span()),
            found => found,
        };
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
        let ending = Ending {
            started: std::time::Instant::now(),
            started_at: std::time::SystemTime::now(),
            // What the exported span says about the message (copied only then).
            about: exporting.then(|| (msg.subject.clone(), msg.id.clone(), msg.attempt)),
            trace,
            span,
        };
        self.series().in_flight.inc();
        let traceparent = ending.trace.as_ref().map(|t| t.traceparent.as_str());
        // Last line of defence: a panic anywhere in the handling hands the
        // delivery back (dropped unsettled) and the worker lives on.
        let handling = async move {
            let decided = if delivery.begin() {
                self.handle(delivery.message(), mode, traceparent, shutdown).await
            } else {
                (Verdict::HandBack(MessageOutcome::Interrupted), None)
            };
            (delivery, decided)
        };
        let handled = AssertUnwindSafe(handling)
            .catch_unwind()
            .instrument(ending.span.clone())
            .await;
        let (delivery, (verdict, lease)) = match handled {
            Ok(decided) => decided,
            Err(panic) => {
                ending
                    .span
                    .in_scope(|| self.caught_panic("handling a message", panic.as_ref()));
                self.ended(MessageOutcome::Panic, ending);
                return;
            }
        };
        if let (RetryMode::Broker, Verdict::Ack(outcome)) = (mode, &verdict) {
            if let Some(permit) = self.trailing.permit().await {
                let outcome = *outcome;
                match lease {
                    // No task of its own where the source has one writing
                    // acks: a task per message (and the wake-up of another
                    // thread it costs) was a tenth of the profile.
                    // A panic in the adapter drops the pending ack, which
                    // then accounts for the handling (and counts the panic).
                    None => {
                        let pending = trailing::PendingAck::new(self.clone(), outcome, ending, permit);
                        let acking = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            delivery.ack_then(Box::new(move |acked| pending.done(acked)))
                        }));
                        if acking.is_err() {
                            tracing::error!(route = %self.name, "caught a panic while acking a message");
                        }
                    }
                    Some(lease) => {
                        tokio::spawn(self.clone().trail_ack(delivery, outcome, lease, ending, permit));
                    }
                }
                return;
            }
        }
        self.finish(delivery, verdict, lease, ending).await;
    }

    /// An ack that trails its handling: the key recorded done, then the ack
    /// (only what that needs goes into the task: a spawn copies its future).
    async fn trail_ack(
        self: Arc<Self>,
        delivery: Box<dyn Delivery>,
        outcome: MessageOutcome,
        lease: Lease,
        ending: Ending,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) {
        let settling = async {
            lease.complete().await;
            self.settled(delivery.ack().await, BrokerOp::Ack);
            outcome
        };
        self.settle_guarded(settling, ending).await;
    }

    /// Settles a handled delivery and accounts for it.
    async fn finish(&self, delivery: Box<dyn Delivery>, verdict: Verdict, lease: Option<Lease>, ending: Ending) {
        self.settle_guarded(self.settle(delivery, verdict, lease), ending).await;
    }

    /// Runs a settle in the message's span, a panic in it caught and
    /// counted, then accounts for the handling.
    async fn settle_guarded(&self, settling: impl std::future::Future<Output = MessageOutcome>, ending: Ending) {
        let settling = AssertUnwindSafe(settling).catch_unwind();
        let outcome = match settling.instrument(ending.span.clone()).await {
            Ok(outcome) => outcome,
            Err(panic) => {
                ending
                    .span
                    .in_scope(|| self.caught_panic("settling a message", panic.as_ref()));
                MessageOutcome::Panic
            }
        };
        self.ended(outcome, ending);
    }

    /// A handling is over: its span, its count.
    fn ended(&self, outcome: MessageOutcome, ending: Ending) {
        let Ending {
            started,
            started_at,
            about,
            trace,
            span,
        } = ending;
        let _entered = span.enter();
        span.record("outcome", tracing::field::display(outcome));
        span.record("duration_ms", started.elapsed().as_secs_f64() * 1000.0);
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
                outcome: outcome.as_str(),
            });
        }
        self.count(outcome);
        self.series().in_flight.dec();
    }

    /// Gate, invoke and policy: what should become of the delivery, and the
    /// lease on its key if it holds one.
    async fn handle(
        &self,
        message: &Message,
        mode: RetryMode,
        traceparent: Option<&str>,
        shutdown: &CancellationToken,
    ) -> (Verdict, Option<Lease>) {
        let lease = match self.admit(message, mode, shutdown).await {
            Ok(lease) => lease,
            Err(verdict) => return (verdict, None),
        };
        let gate_key = lease.as_ref().map(|l| l.key().to_owned());
        // This message runs on the version current now, to the end, even if
        // a hot reload swaps the plugin meanwhile.
        let plugin = self.plugin.current();
        let dead_letter = |kind, reason, answer_requester, msg: Message| {
            Verdict::DeadLetter(Box::new(DeadLetter {
                kind,
                reason,
                answer_requester,
                msg,
                gate_key: gate_key.clone(),
                plugin: plugin.clone(),
                traceparent: traceparent.map(str::to_owned),
            }))
        };
        // A reply address is the producer's choice: refused before the
        // handler runs; no reply is sent there.
        if let Some(why) = message.reply_to.as_deref().and_then(|r| self.refused_reply(r)) {
            tracing::warn!("refusing the message: {why}");
            self.note_failure(FailureKind::InvalidPublish, &why);
            let msg = message.clone();
            return (dead_letter(FailureKind::InvalidPublish, why, false, msg), lease);
        }
        // Cloned only if a retry in place needs a new attempt number.
        let mut msg: std::borrow::Cow<'_, Message> = std::borrow::Cow::Borrowed(message);
        loop {
            let invocation = self.invoke(&plugin, &msg).await;
            self.observe(&invocation);
            let (kind, reason) = match invocation.outcome {
                Outcome::Ok { reply } => {
                    let outbound = self.outbound(&msg, gate_key.as_deref(), traceparent, invocation.publishes, reply);
                    match self.send(&*self.sink, outbound).await {
                        Ok(_) => return (Verdict::Ack(MessageOutcome::Ok), lease),
                        // A publish that failed is a failed attempt: counted,
                        // retried with backoff, dead-lettered in the end (at
                        // once when the broker can never carry it).
                        Err(e) => {
                            let kind = if matches!(e, BrokerError::Refused { .. }) {
                                FailureKind::InvalidPublish
                            } else {
                                FailureKind::Retryable
                            };
                            self.broker_error(BrokerOp::Publish, &e);
                            let reason = format!("publishing the handler's messages: {}", Report(&e));
                            self.note_failure(kind, &reason);
                            (kind, reason)
                        }
                    }
                }
                Outcome::Failed { kind, reason } => (kind, reason),
            };
            match self.decide(&msg, kind, &reason) {
                FailureDecision::Retry(delay) => {
                    tracing::warn!(kind = %kind, retry_in_ms = delay.as_millis() as u64, "handler failed: {reason}");
                    if mode == RetryMode::Broker {
                        return (Verdict::RetryAfter(delay), lease);
                    }
                    // In place: each retry is counted as it happens; the
                    // message's final outcome is counted when it settles.
                    self.count(MessageOutcome::Retry);
                    if !sleep_unless(shutdown, delay).await {
                        return (Verdict::HandBack(MessageOutcome::Interrupted), lease);
                    }
                    let next = msg.attempt.saturating_add(1);
                    msg.to_mut().attempt = next;
                }
                FailureDecision::DeadLetter { kind, reason } => {
                    return (dead_letter(kind, reason, true, msg.into_owned()), lease);
                }
            }
        }
    }

    /// The gate's word on `message`: run it (holding its key's lease, if
    /// it has a key), or the verdict that ends its handling now.
    async fn admit(
        &self,
        message: &Message,
        mode: RetryMode,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, Verdict> {
        loop {
            match self.admit_once(message, mode).await {
                Ok(lease) => return Ok(lease),
                Err(Refusal::Ends(verdict)) => return Err(verdict),
                Err(Refusal::Busy(wait)) => {
                    if !sleep_unless(shutdown, wait).await {
                        return Err(Verdict::HandBack(MessageOutcome::Interrupted));
                    }
                }
            }
        }
    }

    /// One question to the gate. `Busy` only in place (`RetryMode::InPlace`):
    /// with broker retries a held key is a delayed redelivery.
    async fn admit_once(&self, message: &Message, mode: RetryMode) -> Result<Option<Lease>, Refusal> {
        let Some(gate) = &self.gate else {
            return Ok(None);
        };
        let key = gate.key_of(&self.name, message);
        match gate.admit(key.clone()).await {
            Admission::Run(lease) => Ok(lease),
            Admission::Duplicate => {
                tracing::debug!(key = ?key, "duplicate: already handled");
                Err(Refusal::Ends(Verdict::Ack(MessageOutcome::Duplicate)))
            }
            Admission::Busy(wait) if mode == RetryMode::Broker => Err(Refusal::Ends(Verdict::RetryAfter(wait))),
            Admission::Busy(wait) => Err(Refusal::Busy(wait)),
            Admission::StoreFailed(e) => {
                tracing::error!("{}; the message will be redelivered", Report(&e));
                self.status.set_error(report(&e));
                Err(Refusal::Ends(Verdict::RetryAfter(SETTLE_RETRY_DELAY)))
            }
        }
    }

    /// What the policy makes of a failed attempt on `msg`.
    fn decide(&self, msg: &Message, kind: FailureKind, reason: &str) -> FailureDecision {
        let decision = self.policy.decide_failure(kind, reason, msg.attempt);
        // A requester is waiting: answer with the error now rather than
        // retry behind its back until it times out.
        if msg.reply_to.is_some() && matches!(decision, FailureDecision::Retry(_)) {
            return FailureDecision::DeadLetter {
                kind,
                reason: reason.to_owned(),
            };
        }
        decision
    }

    fn series(&self) -> &RouteMetrics {
        self.series.get_or_init(|| self.metrics.route(&self.name))
    }

    /// The status page's view: the same counters as `/metrics`.
    pub fn status_view(&self) -> RouteStatusView {
        self.status.view(self.series())
    }

    fn count(&self, outcome: MessageOutcome) {
        if MessageOutcome::COUNTED.contains(&outcome) {
            self.series().counter(outcome).inc();
        }
    }

    fn observe(&self, invocation: &Invocation) {
        self.series().duration.observe(invocation.duration.as_secs_f64());
        if let Outcome::Failed { kind, reason } = &invocation.outcome {
            self.note_failure(*kind, reason);
        }
        self.count_cut(invocation.cut);
    }

    /// Counts plugin output the host cut to its bounds.
    fn count_cut(&self, cut: crate::engine::Cut) {
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
}

/// Sleeps `d`; false if shutdown came first.
async fn sleep_unless(shutdown: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
