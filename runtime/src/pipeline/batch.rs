//! Batches (`batch = { max_messages, max_wait, max_bytes }`): a worker, or
//! an ordered lane, gathers deliveries, runs them through one plugin
//! instance and settles each by its own outcome — an Ok item is acked even
//! if its neighbours failed, a failed one is retried or dead-lettered alone,
//! and a failed item's publishes are dropped while the others' are sent.
//!
//! On an ordered route a failed item holds back the later items of its key
//! (or partition): their results are dropped unsent and they run again after
//! it, in order; other keys proceed.

use super::gate::Lease;
use super::policy::FailureDecision;
use super::settle::{DeadLetter, Verdict};
use super::status::WorkerAlive;
use super::{sleep_unless, trace, RetryMode, Route};
use crate::brokers::{BrokerError, Delivery};
use crate::config::{BatchConfig, Ordering as RouteOrdering};
use crate::engine::{BatchInvocation, FailureKind, Outcome, Plugin};
use crate::error::Report;
use crate::message::{Message, Outbound};
use crate::metrics::{MessageOutcome, RouteLabel};
use futures_util::future::BoxFuture;
use futures_util::FutureExt as _;
use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Gate questions of one batch in flight at once (a shared store answers
/// them concurrently; bounded so a large batch does not flood it).
const GATE_AT_ONCE: usize = 64;

/// Deliveries gathered for the next batch.
struct Gathering {
    deliveries: Vec<Box<dyn Delivery>>,
    bytes: u64,
    /// When the batch goes, full or not.
    deadline: Instant,
    config: BatchConfig,
}

impl Gathering {
    fn new(config: BatchConfig, first: Box<dyn Delivery>) -> Self {
        let bytes = first.message().payload.len() as u64;
        let mut deliveries = Vec::with_capacity(config.max_messages as usize);
        deliveries.push(first);
        Self {
            deliveries,
            bytes,
            deadline: Instant::now() + config.max_wait,
            config,
        }
    }

    /// Messages it may still take.
    fn room(&self) -> usize {
        (self.config.max_messages as usize).saturating_sub(self.deliveries.len())
    }

    fn full(&self) -> bool {
        self.deliveries.len() >= self.config.max_messages as usize || self.bytes >= self.config.max_bytes
    }

    /// Adds `delivery`, or gives it back when it would take the batch past
    /// its byte bound (it starts the next batch).
    fn push(&mut self, delivery: Box<dyn Delivery>) -> Option<Box<dyn Delivery>> {
        let size = delivery.message().payload.len() as u64;
        if self.bytes.saturating_add(size) > self.config.max_bytes {
            return Some(delivery);
        }
        self.bytes += size;
        self.deliveries.push(delivery);
        None
    }
}

/// Deliveries a gatherer takes from what the source has at hand per call.
const READY_AT_ONCE: usize = 16;

/// What waiting for the next delivery gave.
pub(super) enum Next {
    Delivery(Box<dyn Delivery>),
    TimedOut,
    Stop,
}

/// A gathered batch, on its way to a worker.
pub(super) type Gathered = Vec<Box<dyn Delivery>>;

type PendingNext<'a> = Option<BoxFuture<'a, Result<Box<dyn Delivery>, BrokerError>>>;

/// One message of a batch while it is handled.
struct Item {
    delivery: Box<dyn Delivery>,
    lease: Option<Lease>,
    /// The message as attempted next, once an in-place retry raised its
    /// attempt number.
    retried: Option<Message>,
    /// Ordered routes: its key (or partition).
    key: Option<String>,
    traceparent: Option<String>,
}

impl Item {
    fn message(&self) -> &Message {
        self.retried.as_ref().unwrap_or_else(|| self.delivery.message())
    }

    fn gate_key(&self) -> Option<String> {
        self.lease.as_ref().map(|l| l.key().to_owned())
    }

    fn dead_letter(self, kind: FailureKind, reason: String, answer_requester: bool, plugin: &Arc<Plugin>) -> Finished {
        let gate_key = self.gate_key();
        let msg = self.message().clone();
        let verdict = Verdict::DeadLetter(Box::new(DeadLetter {
            kind,
            reason,
            answer_requester,
            msg,
            gate_key,
            plugin: plugin.clone(),
            traceparent: self.traceparent,
        }));
        (self.delivery, verdict, self.lease)
    }

    fn finish(self, verdict: Verdict) -> Finished {
        (self.delivery, verdict, self.lease)
    }
}

/// A delivery whose handling is over, and what to do with it.
type Finished = (Box<dyn Delivery>, Verdict, Option<Lease>);

/// Why a handled item's publishes were not sent.
enum SendFailure {
    Failed(FailureKind, String),
    /// An earlier item of its key failed to send: it waits for that one.
    HeldBack,
}

/// What became of an item in one round.
enum Step {
    /// Handled: its publishes and reply, to send.
    Handled(Vec<Outbound>),
    Retry(Duration),
    DeadLetter(FailureKind, String),
    /// Ran after an earlier item of its key failed: its result is dropped
    /// and it runs again after that item.
    HeldBack,
}

/// Batch workers waiting for a batch: the gatherer hands over what it has
/// rather than keep one waiting.
#[derive(Default)]
pub(super) struct IdleWorkers {
    count: std::sync::atomic::AtomicUsize,
    changed: tokio::sync::Notify,
}

/// A worker's idle spell; ends when dropped.
pub(super) struct Idle<'a>(&'a IdleWorkers);

impl IdleWorkers {
    fn any(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Acquire) > 0
    }

    fn enter(&self) -> Idle<'_> {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        self.changed.notify_waiters();
        Idle(self)
    }

    /// Resolves when a worker next becomes idle.
    async fn became_idle(&self) {
        self.changed.notified().await;
    }
}

impl Drop for Idle<'_> {
    fn drop(&mut self) {
        self.0.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Route {
    /// Unordered, with batches: the one task that takes from the source
    /// and gathers batches for the workers. Alone on the source, it may keep
    /// a wait for the next delivery across a batch's deadline (a source's
    /// `next` is never dropped half-way: it may hold a message, or a lock
    /// the source's other callers would wait on).
    pub(super) async fn gather(
        self: Arc<Self>,
        config: BatchConfig,
        batches: mpsc::Sender<Gathered>,
        idle: Arc<IdleWorkers>,
        shutdown: CancellationToken,
        _alive: WorkerAlive,
    ) {
        let mut pending: PendingNext<'_> = None;
        // Taken from the source, not in a batch yet (past a byte bound, or
        // more than the batch had room for).
        let mut carried: VecDeque<Box<dyn Delivery>> = VecDeque::new();
        loop {
            let first = match carried.pop_front() {
                Some(d) => d,
                None => match self.next_from_source(&mut pending, None, &shutdown).await {
                    Next::Delivery(d) => d,
                    Next::TimedOut | Next::Stop => return,
                },
            };
            let mut batch = Gathering::new(config, first);
            'fill: while !batch.full() {
                // What the source has at hand, a few at a time (the byte
                // bound is known only once they are taken: what a batch
                // cannot hold waits for the next one, at most READY_AT_ONCE).
                // Not while a wait is pending: it holds the source.
                let mut took = false;
                if carried.is_empty() && pending.is_none() {
                    carried.extend(self.source.ready(batch.room().min(READY_AT_ONCE)));
                    took = !carried.is_empty();
                }
                while let Some(d) = carried.pop_front() {
                    if batch.full() {
                        carried.push_front(d);
                        break 'fill;
                    }
                    if let Some(over) = batch.push(d) {
                        carried.push_front(over);
                        break 'fill;
                    }
                }
                if batch.full() {
                    break;
                }
                if took {
                    continue;
                }
                // `max_wait` is how long a batch may wait for more, not how
                // long it must: while a worker is idle, what is there goes
                // as soon as the source has nothing ready.
                let until = if idle.any() { Instant::now() } else { batch.deadline };
                let next = tokio::select! {
                    biased;
                    next = self.next_from_source(&mut pending, Some(until), &shutdown) => next,
                    // A worker became idle meanwhile (the wait stays in
                    // `pending`).
                    _ = idle.became_idle() => Next::TimedOut,
                };
                match next {
                    Next::Delivery(d) => {
                        if let Some(over) = batch.push(d) {
                            carried.push_front(over);
                            break;
                        }
                    }
                    Next::TimedOut => break,
                    // Gathered but not started: dropped, i.e. handed back.
                    Next::Stop => return,
                }
            }
            // A full queue holds the gatherer: backpressure on the source.
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                sent = batches.send(batch.deliveries) => if sent.is_err() { return },
            }
        }
    }

    /// Unordered, with batches: handle the gathered batches, one at a time.
    pub(super) async fn batch_worker(
        self: Arc<Self>,
        batches: Arc<tokio::sync::Mutex<mpsc::Receiver<Gathered>>>,
        idle: Arc<IdleWorkers>,
        shutdown: CancellationToken,
        _alive: WorkerAlive,
    ) {
        loop {
            let batch = {
                let _idle = idle.enter();
                let mut queue = batches.lock().await;
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break,
                    b = queue.recv() => match b { Some(b) => b, None => break },
                }
            };
            self.process_batch(batch, RetryMode::Broker, &shutdown).await;
        }
        // Returns (the route counts as stopped) once its acks are out.
        self.trailing.drained().await;
    }

    /// Ordered, with batches: a lane gathers from its queue.
    pub(super) async fn batch_lane(
        self: Arc<Self>,
        config: BatchConfig,
        mut rx: super::lane::LaneReceiver,
        shutdown: CancellationToken,
        _alive: WorkerAlive,
    ) {
        let mut carried: Option<Box<dyn Delivery>> = None;
        loop {
            let first = match carried.take() {
                Some(d) => d,
                None => tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    d = rx.recv() => match d { Some(d) => d, None => return },
                },
            };
            let mut batch = Gathering::new(config, first);
            while !batch.full() {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(batch.deadline.into()) => break,
                    d = rx.recv() => match d { Some(d) => d, None => break },
                };
                if let Some(over) = batch.push(next) {
                    carried = Some(over);
                    break;
                }
            }
            self.process_batch(batch.deliveries, RetryMode::InPlace, &shutdown)
                .await;
        }
    }

    /// The next delivery, waiting until `deadline` at most (none: as long
    /// as it takes). A wait cut by the deadline stays in `pending`. A source
    /// error is counted and waited out; a closed source stops the caller.
    pub(super) async fn next_from_source<'a>(
        &'a self,
        pending: &mut PendingNext<'a>,
        deadline: Option<Instant>,
        shutdown: &CancellationToken,
    ) -> Next {
        loop {
            let next = pending.get_or_insert_with(|| self.source.next());
            let far = Instant::now() + Duration::from_secs(24 * 3600);
            let until = deadline.unwrap_or(far);
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Next::Stop,
                result = next => result,
                _ = tokio::time::sleep_until(until.into()), if deadline.is_some() => return Next::TimedOut,
            };
            *pending = None;
            match result {
                Ok(delivery) => return Next::Delivery(delivery),
                Err(BrokerError::Closed { .. }) => return Next::Stop,
                Err(e) => {
                    self.broker_error(super::settle::BrokerOp::Receive, &e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Next::Stop,
                        _ = tokio::time::sleep(super::lane::SOURCE_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// Runs a batch through gate, plugin, policy and settle.
    pub(super) async fn process_batch(
        self: &Arc<Self>,
        deliveries: Vec<Box<dyn Delivery>>,
        mode: RetryMode,
        shutdown: &CancellationToken,
    ) {
        let n = deliveries.len();
        let span = tracing::info_span!(
            "batch",
            route = %self.name,
            size = n,
            // Debug-formatted: a producer's id cannot forge a log line.
            first = ?deliveries.first().map(|d| d.message().id.clone()).unwrap_or_default(),
        );
        async {
            self.metrics
                .batch_size
                .get_or_create(&RouteLabel {
                    route: self.name.clone(),
                })
                .observe(n as f64);
            let gauge = &self.series().in_flight;
            gauge.inc_by(gauge_count(n));
            // Items given to a settle leave the gauge once settled (which
            // may trail this call); the rest (handed back) leave it here.
            let settling = AtomicUsize::new(0);
            // A panic in the host hands back whatever was not settled yet
            // (dropped deliveries are redelivered); the worker lives on.
            if let Err(panic) = AssertUnwindSafe(self.run_batch(deliveries, mode, &settling, shutdown))
                .catch_unwind()
                .await
            {
                self.caught_panic("handling a batch", panic.as_ref());
            }
            gauge.dec_by(gauge_count(n.saturating_sub(settling.into_inner())));
        }
        .instrument(span)
        .await
    }

    async fn run_batch(
        self: &Arc<Self>,
        deliveries: Vec<Box<dyn Delivery>>,
        mode: RetryMode,
        settling: &AtomicUsize,
        shutdown: &CancellationToken,
    ) {
        // The batch runs on the version current now, to the end.
        let plugin = self.plugin.current();
        let mut stale: Vec<Finished> = Vec::new();
        let mut begun: Vec<Box<dyn Delivery>> = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            if delivery.begin() {
                begun.push(delivery);
            } else {
                stale.push((delivery, Verdict::HandBack(MessageOutcome::Interrupted), None));
            }
        }
        self.settle_all(stale, mode, settling).await;
        // Messages whose key another handling holds wait for this part of
        // the batch to end (it may be the holder: two copies of one key in
        // a batch), then run.
        while !begun.is_empty() {
            let Some((waiting, wait)) = self.run_admitted(begun, &plugin, mode, settling, shutdown).await else {
                return;
            };
            if !waiting.is_empty() && !sleep_unless(shutdown, wait).await {
                // Begun but never run: dropped, i.e. handed back.
                return;
            }
            begun = waiting;
        }
    }

    /// Admits what it can of `begun` and runs it to the end; returns the
    /// messages that must wait (their key is held elsewhere, or an earlier
    /// message of their key waits) and how long, or none when interrupted.
    async fn run_admitted(
        self: &Arc<Self>,
        begun: Vec<Box<dyn Delivery>>,
        plugin: &Arc<Plugin>,
        mode: RetryMode,
        settling: &AtomicUsize,
        shutdown: &CancellationToken,
    ) -> Option<(Vec<Box<dyn Delivery>>, Duration)> {
        let mut finished: Vec<Finished> = Vec::new();
        let mut items: Vec<Item> = Vec::with_capacity(begun.len());
        let mut waiting: Vec<Box<dyn Delivery>> = Vec::new();
        let mut waiting_keys: HashSet<String> = HashSet::new();
        let mut wait = Duration::ZERO;
        // Unordered: the gate asked for the whole batch at once, so a shared
        // store costs one round trip's time per batch, not one per message.
        // (Ordered, a message may not be admitted at all: asked in turn.)
        // At most GATE_AT_ONCE asked at a time, in order.
        let mut admitted: std::collections::VecDeque<_> = if mode == RetryMode::Broker && self.gate.is_some() {
            let msgs: Vec<&Message> = begun.iter().map(|d| d.message()).collect();
            let mut answers = std::collections::VecDeque::with_capacity(msgs.len());
            for chunk in msgs.chunks(GATE_AT_ONCE) {
                answers.extend(futures_util::future::join_all(chunk.iter().map(|m| self.admit_once(m, mode))).await);
            }
            answers
        } else {
            Default::default()
        };
        for delivery in begun {
            let key = (mode == RetryMode::InPlace).then(|| self.hold_key(&*delivery));
            if key.as_ref().is_some_and(|k| waiting_keys.contains(k)) {
                waiting.push(delivery);
                continue;
            }
            let admission = match admitted.pop_front() {
                Some(a) => a,
                None => self.admit_once(delivery.message(), mode).await,
            };
            let lease = match admission {
                Ok(lease) => lease,
                Err(super::Refusal::Ends(verdict)) => {
                    finished.push((delivery, verdict, None));
                    continue;
                }
                Err(super::Refusal::Busy(busy)) => {
                    wait = wait.max(busy);
                    waiting_keys.extend(key);
                    waiting.push(delivery);
                    continue;
                }
            };
            let traceparent = trace::handler_span(delivery.message()).map(|t| t.traceparent);
            let item = Item {
                delivery,
                lease,
                retried: None,
                key,
                traceparent,
            };
            // A reply address is the producer's choice: refused before the
            // handler runs.
            if let Some(why) = item.message().reply_to.as_deref().and_then(|r| self.refused_reply(r)) {
                tracing::warn!("refusing the message: {why}");
                self.note_failure(FailureKind::InvalidPublish, &why);
                finished.push(item.dead_letter(FailureKind::InvalidPublish, why, false, plugin));
                continue;
            }
            items.push(item);
        }
        self.settle_all(std::mem::take(&mut finished), mode, settling).await;

        while !items.is_empty() {
            // The deadline of the whole batch, however it runs.
            let until = Instant::now() + plugin.batch_timeout(items.len());
            let mut run = {
                let msgs: Vec<&Message> = items.iter().map(Item::message).collect();
                self.invoke_batch(plugin, &msgs, None).await
            };
            if run.failed_whole && items.len() > 1 {
                // A trap, timeout, memory hit or refusal of the whole
                // `handle-batch` call says nothing of which message caused
                // it: each runs again alone at once (within the batch's
                // deadline), so only the culprit fails. Counted as a retry
                // of each, but the same attempt: the attempt number stays
                // the broker's count of the message's own failures.
                tracing::warn!("the batch failed as a whole; running its messages one by one");
                for _ in &items {
                    self.count(MessageOutcome::Retry);
                }
                let msgs: Vec<&Message> = items.iter().map(Item::message).collect();
                run = self.invoke_batch(plugin, &msgs, Some(until)).await;
            }
            let mut steps = self.steps(&items, run);
            let keys: Vec<Option<String>> = items.iter().map(|i| i.key.clone()).collect();
            for (i, change) in self.send_handled(&steps, &keys).await {
                if let (Some(item), Some(step)) = (items.get(i), steps.get_mut(i)) {
                    *step = match change {
                        SendFailure::Failed(kind, reason) => self.failed_step(item.message(), kind, &reason),
                        SendFailure::HeldBack => Step::HeldBack,
                    };
                }
            }
            let mut again = Vec::new();
            let mut wait = Duration::ZERO;
            for (mut item, step) in items.into_iter().zip(steps) {
                match step {
                    Step::Handled(_) => finished.push(item.finish(Verdict::Ack(MessageOutcome::Ok))),
                    Step::DeadLetter(kind, reason) => finished.push(item.dead_letter(kind, reason, true, plugin)),
                    Step::Retry(delay) if mode == RetryMode::Broker => {
                        finished.push(item.finish(Verdict::RetryAfter(delay)));
                    }
                    Step::Retry(delay) => {
                        // In place: counted as it happens; the final outcome
                        // is counted when the item settles.
                        self.count(MessageOutcome::Retry);
                        wait = wait.max(delay);
                        let mut next = item.message().clone();
                        next.attempt = next.attempt.saturating_add(1);
                        item.retried = Some(next);
                        again.push(item);
                    }
                    Step::HeldBack => again.push(item),
                }
            }
            // Settled now: other keys do not wait for this key's retries.
            self.settle_all(std::mem::take(&mut finished), mode, settling).await;
            items = again;
            if !items.is_empty() && !sleep_unless(shutdown, wait).await {
                let interrupted = items
                    .into_iter()
                    .map(|item| item.finish(Verdict::HandBack(MessageOutcome::Interrupted)))
                    .collect();
                self.settle_all(interrupted, mode, settling).await;
                return None;
            }
        }
        Some((waiting, wait))
    }

    /// The unit of order on this route: a failed item holds back the later
    /// items that share it.
    fn hold_key(&self, delivery: &dyn Delivery) -> String {
        match (self.ordering, delivery.partition()) {
            (RouteOrdering::Partition, partition) => partition.map(|p| p.to_string()).unwrap_or_default(),
            _ => self.ordering_key_of(delivery.message()),
        }
    }

    /// Settles each finished delivery (at once: they are independent) and
    /// counts its outcome. On unordered routes the settles trail: the
    /// worker goes on with the next batch meanwhile.
    async fn settle_all(self: &Arc<Self>, finished: Vec<Finished>, mode: RetryMode, settling: &AtomicUsize) {
        if finished.is_empty() {
            return;
        }
        // In flight until settled: a settle that trails takes them off
        // the batch's count, and off the gauge once done.
        let n = finished.len();
        if mode == RetryMode::Broker {
            if let Some(permits) = self.trailing.permits(n).await {
                settling.fetch_add(n, AtomicOrdering::Relaxed);
                let route = self.clone();
                tokio::spawn(
                    async move {
                        if let Err(panic) = AssertUnwindSafe(route.settle_now(finished)).catch_unwind().await {
                            route.caught_panic("settling a batch", panic.as_ref());
                        }
                        route.series().in_flight.dec_by(gauge_count(n));
                        drop(permits);
                    }
                    .in_current_span(),
                );
                return;
            }
        }
        // A panic here leaves them to the batch's count.
        self.settle_now(finished).await;
        settling.fetch_add(n, AtomicOrdering::Relaxed);
        self.series().in_flight.dec_by(gauge_count(n));
    }

    /// The successes are acked together (one operation where the broker
    /// has one), once their keys are recorded done; the rest one by one.
    async fn settle_now(&self, finished: Vec<Finished>) {
        let (acks, rest): (Vec<Finished>, Vec<Finished>) = finished
            .into_iter()
            .partition(|(_, verdict, _)| matches!(verdict, Verdict::Ack(_)));
        let settles = rest
            .into_iter()
            .map(|(delivery, verdict, lease)| self.settle(delivery, verdict, lease));
        let acked = async {
            if acks.is_empty() {
                return;
            }
            let mut deliveries = Vec::with_capacity(acks.len());
            let mut outcomes = Vec::with_capacity(acks.len());
            let mut leases = Vec::new();
            for (delivery, verdict, lease) in acks {
                deliveries.push(delivery);
                if let Verdict::Ack(outcome) = verdict {
                    outcomes.push(outcome);
                }
                leases.extend(lease);
            }
            futures_util::future::join_all(leases.into_iter().map(Lease::complete)).await;
            for (result, outcome) in self.source.ack_many(deliveries).await.into_iter().zip(outcomes) {
                self.settled(result, super::settle::BrokerOp::Ack);
                self.count(outcome);
            }
        };
        let (outcomes, ()) = futures_util::future::join(futures_util::future::join_all(settles), acked).await;
        for outcome in outcomes {
            self.count(outcome);
        }
    }

    /// Runs the plugin on a batch (`one_by_one`: each message alone, all
    /// by that deadline); a host panic fails every item as a trap.
    async fn invoke_batch(&self, plugin: &Plugin, msgs: &[&Message], one_by_one: Option<Instant>) -> BatchInvocation {
        let started = Instant::now();
        let invoked = async {
            match one_by_one {
                Some(until) => plugin.invoke_each(&self.name, msgs, until).await,
                None => plugin.invoke_batch(&self.name, msgs).await,
            }
        };
        let run = match AssertUnwindSafe(invoked).catch_unwind().await {
            Ok(run) => run,
            Err(panic) => {
                let why = self.caught_panic("running the handler", panic.as_ref());
                BatchInvocation {
                    items: Vec::new(),
                    cut: Default::default(),
                    duration: started.elapsed(),
                    failed_whole: false,
                }
                .padded(msgs.len(), &why)
            }
        };
        let run = run.padded(msgs.len(), "the plugin returned no outcome for this message");
        self.series().duration.observe(run.duration.as_secs_f64());
        self.count_cut(run.cut);
        for item in &run.items {
            if let Outcome::Failed { kind, reason } = &item.outcome {
                self.note_failure(*kind, reason);
            }
        }
        run
    }

    /// Each item's step in this round, from its outcome.
    fn steps(&self, items: &[Item], run: BatchInvocation) -> Vec<Step> {
        let mut steps = Vec::with_capacity(items.len());
        let mut held: HashSet<&str> = HashSet::new();
        for (item, result) in items.iter().zip(run.items) {
            if item.key.as_deref().is_some_and(|k| held.contains(k)) {
                steps.push(Step::HeldBack);
                continue;
            }
            let msg = item.message();
            let step = match result.outcome {
                Outcome::Ok { reply } => Step::Handled(self.outbound(
                    msg,
                    item.gate_key().as_deref(),
                    item.traceparent.as_deref(),
                    result.publishes,
                    reply,
                )),
                Outcome::Failed { kind, reason } => self.failed_step(msg, kind, &reason),
            };
            if let (Step::Retry(_), Some(key)) = (&step, item.key.as_deref()) {
                held.insert(key);
            }
            steps.push(step);
        }
        steps
    }

    /// Sends the handled items' publishes, in one call when it goes through.
    /// A refusal (one message no broker can carry) is narrowed down item by
    /// item so it fails only its own; any other error fails every item sent.
    /// Returns the items whose publishing failed, with the failure, and on
    /// ordered routes the later items of a failed one's key, left unsent.
    async fn send_handled(&self, steps: &[Step], keys: &[Option<String>]) -> Vec<(usize, SendFailure)> {
        let outbound: Vec<Outbound> = steps
            .iter()
            .flat_map(|s| match s {
                Step::Handled(out) => out.clone(),
                _ => Vec::new(),
            })
            .collect();
        let failed = match self.send(&*self.sink, outbound).await {
            Ok(_) => return Vec::new(),
            Err(BrokerError::Refused { .. }) => {
                let mut failed = Vec::new();
                let mut failed_keys: HashSet<&str> = HashSet::new();
                for (i, step) in steps.iter().enumerate() {
                    let Step::Handled(out) = step else { continue };
                    let key = keys.get(i).and_then(Option::as_deref);
                    if key.is_some_and(|k| failed_keys.contains(k)) {
                        // Sent, it would become visible before the failed
                        // message of its key.
                        failed.push((i, None));
                        continue;
                    }
                    if let Err(e) = self.send(&*self.sink, out.clone()).await {
                        failed_keys.extend(key);
                        failed.push((i, Some(e)));
                    }
                }
                failed
            }
            Err(e) => steps
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s, Step::Handled(_)))
                .map(|(i, _)| (i, Some(e.clone())))
                .collect(),
        };
        failed
            .into_iter()
            .map(|(i, e)| {
                let Some(e) = e else {
                    return (i, SendFailure::HeldBack);
                };
                let kind = if matches!(e, BrokerError::Refused { .. }) {
                    FailureKind::InvalidPublish
                } else {
                    FailureKind::Retryable
                };
                self.broker_error(super::settle::BrokerOp::Publish, &e);
                let reason = format!("publishing the handler's messages: {}", Report(&e));
                self.note_failure(kind, &reason);
                (i, SendFailure::Failed(kind, reason))
            })
            .collect()
    }

    fn failed_step(&self, msg: &Message, kind: FailureKind, reason: &str) -> Step {
        match self.decide(msg, kind, reason) {
            FailureDecision::Retry(delay) => {
                tracing::warn!(kind = %kind, id = ?msg.id, retry_in_ms = delay.as_millis() as u64, "handler failed: {reason}");
                Step::Retry(delay)
            }
            FailureDecision::DeadLetter { kind, reason } => Step::DeadLetter(kind, reason),
        }
    }
}

impl BatchInvocation {
    /// One item per message: any missing is a trap with reason `why`.
    fn padded(mut self, n: usize, why: &str) -> Self {
        while self.items.len() < n {
            self.items.push(crate::engine::ItemInvocation {
                outcome: Outcome::failed(FailureKind::Trap, why),
                publishes: Vec::new(),
            });
        }
        self
    }
}

/// `n` as a gauge step.
fn gauge_count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}
