//! One consumer-group member: a thread owns the librdkafka consumer (poll,
//! commits, rebalance callbacks); deliveries reach the pipeline through a
//! channel. Each assigned partition gets its own librdkafka queue: a
//! partition whose records received and not settled reach the bound is
//! simply not read (librdkafka stops fetching it once its queue is full, and
//! keeps what it prefetched), while the others go on. Only the contiguous
//! settled prefix of a partition is committed.

use super::config::{ConsumerSettings, KafkaConfig, OffsetReset};
use super::offsets::OffsetTracker;
use super::record;
use super::retry::{self, Retried};
use super::{client_config, failed, KafkaBroker, KafkaSetupError, NAME};
use crate::brokers::events;
use crate::brokers::{Backlog, BoxFuture, BrokerError, Delivery, Source};
use crate::error::cause;
use crate::message::Message;
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const POLL: Duration = Duration::from_millis(50);
/// Pause of the poll loop while the overall in-flight bound is reached.
const FULL_WAIT: Duration = Duration::from_millis(5);
/// A delivery dropped unsettled (a settle that failed) comes back after this.
const HAND_BACK_DELAY: Duration = Duration::from_secs(1);

type PartitionKey = (String, i32);

struct Partition {
    generation: u64,
    tracker: OffsetTracker,
    /// The next record of a retry topic, read before it was due: the
    /// partition is not read further until then.
    held: Option<Held>,
    revoked: bool,
    committed: Option<i64>,
}

struct Held {
    due: Instant,
    offset: i64,
    message: Message,
}

/// State shared by the consumer thread, the rebalance callbacks and the
/// deliveries.
pub(super) struct State {
    partitions: Mutex<HashMap<PartitionKey, Partition>>,
    /// Signalled whenever a record is settled (revokes wait on it).
    settled: Condvar,
    generation: AtomicU64,
    connected: AtomicBool,
    stop: AtomicBool,
    max_in_flight: usize,
    /// Across partitions: the poll loop stops taking records at this many.
    max_in_flight_total: usize,
    revoke_timeout: Duration,
    tx: mpsc::UnboundedSender<KafkaDelivery>,
    /// Partitions assigned since the poll loop last looked: it gives each
    /// its own queue.
    to_split: Mutex<Vec<(PartitionKey, u64)>>,
    /// With retry topics: the producer failed records go through.
    retry: Option<KafkaBroker>,
}

impl State {
    /// Partitions assigned to this member and not being revoked.
    fn held(&self) -> usize {
        self.lock().values().filter(|p| !p.revoked).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PartitionKey, Partition>> {
        self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The offsets to commit: each partition's settled prefix not yet
    /// committed (only those in `only`, when given).
    fn committable(&self, only: Option<&[PartitionKey]>) -> TopicPartitionList {
        let parts = self.lock();
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), p) in parts.iter() {
            if only.is_some_and(|o| !o.contains(&(topic.clone(), *partition))) {
                continue;
            }
            if let Some(offset) = p.tracker.committable() {
                if p.committed.is_none_or(|c| offset > c) {
                    let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(offset));
                }
            }
        }
        tpl
    }

    fn mark_committed(&self, tpl: &TopicPartitionList) {
        let mut parts = self.lock();
        for e in tpl.elements() {
            if let (Some(p), Offset::Offset(o)) = (parts.get_mut(&(e.topic().to_owned(), e.partition())), e.offset()) {
                p.committed = Some(o);
            }
        }
    }

    fn commit(&self, consumer: &BaseConsumer<Context>, tpl: TopicPartitionList, mode: CommitMode) {
        if tpl.count() == 0 {
            return;
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => self.mark_committed(&tpl),
            Err(e) => events::failed(NAME, "commit", &e, " (retried at the next interval)"),
        }
    }

    /// Records received and not settled, all partitions together.
    fn pending_total(&self) -> usize {
        self.lock().values().map(|p| p.tracker.pending()).sum()
    }

    /// Settles an offset of the assignment `generation`.
    fn settle(&self, key: &PartitionKey, generation: u64, offset: i64) {
        self.settle_many(std::iter::once((key, generation, offset)));
    }

    /// Settles offsets under one lock, with one wake-up.
    fn settle_many<'a>(&self, settled: impl IntoIterator<Item = (&'a PartitionKey, u64, i64)>) {
        let mut parts = self.lock();
        for (key, generation, offset) in settled {
            if let Some(p) = parts.get_mut(key).filter(|p| p.generation == generation) {
                p.tracker.settled(offset);
            }
        }
        drop(parts);
        self.settled.notify_all();
    }
}

pub(super) struct Context {
    state: Arc<State>,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let revoked: Vec<PartitionKey> = tpl
            .elements()
            .iter()
            .map(|e| (e.topic().to_owned(), e.partition()))
            .collect();
        let state = &self.state;
        // No more dispatching of these partitions; wait (bounded) for what
        // workers hold, then commit what is done.
        let mut parts = state.lock();
        for key in &revoked {
            if let Some(p) = parts.get_mut(key) {
                p.revoked = true;
            }
        }
        let deadline = Instant::now() + state.revoke_timeout;
        loop {
            let busy: usize = revoked
                .iter()
                .filter_map(|k| parts.get(k))
                .map(|p| p.tracker.taken_unsettled())
                .sum();
            let now = Instant::now();
            if busy == 0 || now >= deadline {
                if busy > 0 {
                    tracing::warn!(
                        "revoke: {busy} records still in flight after {:?}; their new owner will handle them again",
                        state.revoke_timeout
                    );
                }
                break;
            }
            parts = match state.settled.wait_timeout(parts, deadline - now) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        drop(parts);
        let tpl = state.committable(Some(&revoked));
        state.commit(consumer, tpl, CommitMode::Sync);
        let mut parts = state.lock();
        for key in &revoked {
            parts.remove(key);
        }
        tracing::info!(partitions = ?revoked, "Kafka partitions revoked");
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                // Each gets a queue of its own from the poll loop (which holds
                // the consumer's `Arc`, needed to split a queue off).
                let mut parts = self.state.lock();
                let mut to_split = self.state.to_split.lock().unwrap_or_else(|e| e.into_inner());
                let mut assigned = Vec::new();
                for e in tpl.elements() {
                    let generation = self.state.generation.fetch_add(1, Ordering::Relaxed) + 1;
                    parts.insert(
                        (e.topic().to_owned(), e.partition()),
                        Partition {
                            generation,
                            tracker: OffsetTracker::default(),
                            held: None,
                            revoked: false,
                            committed: None,
                        },
                    );
                    to_split.push(((e.topic().to_owned(), e.partition()), generation));
                    assigned.push(format!("{}/{}", e.topic(), e.partition()));
                }
                tracing::info!(partitions = ?assigned, "Kafka partitions assigned");
            }
            Rebalance::Error(e) => events::failed(NAME, "rebalance", e, ""),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// What the daemon keeps of a source, to stop it at shutdown.
pub(super) struct Shared {
    state: Arc<State>,
    /// The poll thread owns the consumer; a weak handle asks it for its
    /// positions (local, no request).
    consumer: std::sync::Weak<BaseConsumer<Context>>,
    /// A client of its own for the watermarks the lag needs: on the
    /// consumer's connection a watermark request waits behind a long-polled
    /// fetch, times out, and the broker connection is reset (seen with
    /// tansu, which holds fetches for long).
    watermarks: BaseConsumer,
    /// Where a partition with no committed offset starts: what its backlog
    /// counts from.
    from_earliest: bool,
    /// A backlog read is running (one at a time: a slow broker must not
    /// pile blocking reads up).
    asking: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// Stops polling, commits the handled prefix and leaves the group.
    pub(super) fn close(&self) {
        self.state.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

pub struct KafkaSource {
    shared: Arc<Shared>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<KafkaDelivery>>,
}

impl KafkaSource {
    /// Joins the group; `retry` is the producer for retry topics (given
    /// when `s.retry_levels` > 0).
    pub(super) fn start(
        config: &KafkaConfig,
        s: ConsumerSettings,
        retry: Option<KafkaBroker>,
    ) -> Result<Self, KafkaSetupError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            partitions: Mutex::new(HashMap::new()),
            settled: Condvar::new(),
            generation: AtomicU64::new(0),
            connected: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            max_in_flight: s.max_in_flight_per_partition.max(1),
            max_in_flight_total: s.max_in_flight.max(1),
            revoke_timeout: s.revoke_timeout,
            tx,
            to_split: Mutex::new(Vec::new()),
            retry,
        });
        let mut c = client_config(config);
        c.set("group.id", &s.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", s.offset_reset.as_str());
        if let Some(id) = s.instance_id.as_deref().filter(|i| !i.is_empty()) {
            c.set("group.instance.id", id);
        }
        let consumer: Arc<BaseConsumer<Context>> = Arc::new(
            c.create_with_context(Context { state: state.clone() })
                .map_err(|cause| KafkaSetupError::Client {
                    what: "creating the consumer".into(),
                    cause,
                })?,
        );
        let retry_topics: Vec<String> = s
            .topics
            .iter()
            .flat_map(|t| (1..=s.retry_levels).map(move |level| retry::retry_topic(t, level)))
            .collect();
        let topics: Vec<&str> = s.topics.iter().chain(&retry_topics).map(String::as_str).collect();
        consumer.subscribe(&topics).map_err(|cause| KafkaSetupError::Client {
            what: format!("subscribing to {topics:?}"),
            cause,
        })?;
        let thread_state = state.clone();
        let weak_consumer = Arc::downgrade(&consumer);
        // In the group (to read its committed offsets), never subscribed.
        let watermarks: BaseConsumer = client_config(config)
            .set("group.id", &s.group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|cause| KafkaSetupError::Client {
                what: "creating the client that reads watermarks".into(),
                cause,
            })?;
        let commit_interval = config.commit_interval;
        let session_timeout = config
            .librdkafka
            .get("session.timeout.ms")
            .and_then(|v| v.parse().ok())
            .map_or(DEFAULT_SESSION_TIMEOUT, Duration::from_millis);
        let group = s.group.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-{}", s.group))
            .spawn(move || {
                let idle = IdleMember::new(group, session_timeout);
                poll_loop(consumer, thread_state, commit_interval, idle)
            })
            .map_err(|e| KafkaSetupError::Thread(cause(e)))?;
        Ok(Self {
            shared: Arc::new(Shared {
                state,
                consumer: weak_consumer,
                watermarks,
                from_earliest: s.offset_reset == OffsetReset::Earliest,
                asking: AtomicBool::new(false),
                thread: Mutex::new(Some(thread)),
            }),
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    pub(super) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    async fn next_delivery(&self) -> Result<KafkaDelivery, BrokerError> {
        let mut rx = self.rx.lock().await;
        loop {
            let Some(mut d) = rx.recv().await else {
                return Err(BrokerError::Closed { broker: super::NAME });
            };
            // Records of a partition revoked since they were fetched are
            // left to the new owner (they were not committed).
            if d.is_current() {
                return Ok(d);
            }
            d.settled = true;
        }
    }
}

impl Source for KafkaSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    /// A batch's offsets under one lock.
    fn ack_many(&self, deliveries: Vec<Box<dyn Delivery>>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        let mut ours: Vec<Box<KafkaDelivery>> = Vec::with_capacity(deliveries.len());
        let mut others = Vec::new();
        for (i, d) in deliveries.into_iter().enumerate() {
            match (d as Box<dyn std::any::Any + Send>).downcast::<KafkaDelivery>() {
                Ok(k) => ours.push(k),
                // Not this source's (cannot happen): dropped unsettled,
                // i.e. handed back, and reported as not acked.
                Err(_) => others.push(i),
            }
        }
        for k in &mut ours {
            k.settled = true;
        }
        self.shared
            .state
            .settle_many(ours.iter().map(|k| (&k.key, k.generation, k.offset)));
        let n = ours.len() + others.len();
        Box::pin(async move {
            (0..n)
                .map(|i| {
                    if others.contains(&i) {
                        Err(failed("a delivery of another source"))
                    } else {
                        Ok(())
                    }
                })
                .collect()
        })
    }

    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let Ok(mut rx) = self.rx.try_lock() else {
            return Vec::new();
        };
        let mut taken: Vec<Box<dyn Delivery>> = Vec::new();
        while taken.len() < max {
            let Ok(mut d) = rx.try_recv() else { break };
            if d.is_current() {
                taken.push(Box::new(d));
            } else {
                d.settled = true;
            }
        }
        taken
    }

    fn is_connected(&self) -> bool {
        self.shared.state.connected.load(Ordering::Relaxed)
    }

    fn bounds_in_flight(&self) -> bool {
        true
    }

    fn partitions(&self) -> Option<usize> {
        Some(self.shared.state.held())
    }

    fn backlog(&self) -> BoxFuture<'_, Option<Backlog>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            if shared.asking.swap(true, Ordering::AcqRel) {
                return None;
            }
            // Watermarks are a request to the brokers: off the async threads.
            let asked = tokio::task::spawn_blocking(move || {
                struct Asked<'a>(&'a AtomicBool);
                impl Drop for Asked<'_> {
                    fn drop(&mut self) {
                        self.0.store(false, Ordering::Release);
                    }
                }
                let _asked = Asked(&shared.asking);
                lag(&*shared.consumer.upgrade()?, &shared)
            });
            asked.await.ok().flatten()
        })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        let shared = self.shared.clone();
        Box::pin(async move {
            let _ = tokio::task::spawn_blocking(move || shared.close()).await;
        })
    }
}

fn to_message(m: &BorrowedMessage<'_>) -> Message {
    Message {
        id: format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
        subject: m.topic().to_owned(),
        key: m.key().map(record::key_text),
        headers: record::headers(m),
        payload: m.payload().unwrap_or_default().to_vec(),
        attempt: 1,
        timestamp_ms: m
            .timestamp()
            .to_millis()
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
        reply_to: None,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Records taken from one partition queue per turn, so partitions share the
/// thread fairly.
const BATCH: usize = 64;
/// How long the loop waits on the main queue (events) when no partition
/// queue had anything.
const IDLE_WAIT: Duration = Duration::from_millis(2);

/// The poll thread's side: the queue of each assigned partition.
struct Queues {
    consumer: Arc<BaseConsumer<Context>>,
    by_partition: HashMap<PartitionKey, (u64, PartitionQueue<Context>)>,
}

impl Queues {
    /// Gives newly assigned partitions their own queue and drops those of
    /// partitions no longer assigned (or assigned again since).
    fn refresh(&mut self, state: &State) {
        let new: Vec<(PartitionKey, u64)> =
            std::mem::take(&mut *state.to_split.lock().unwrap_or_else(|e| e.into_inner()));
        for (key, generation) in new {
            match self.consumer.split_partition_queue(&key.0, key.1) {
                Some(q) => {
                    self.by_partition.insert(key, (generation, q));
                }
                // Its records keep arriving on the main queue.
                None => tracing::warn!("no queue of its own for {}/{}", key.0, key.1),
            }
        }
        let parts = state.lock();
        self.by_partition.retain(|key, (generation, _)| {
            parts
                .get(key)
                .is_some_and(|p| p.generation == *generation && !p.revoked)
        });
    }
}

/// Hands a record to the pipeline, or holds it in its partition while it is
/// not due (a retry topic's record).
fn take(state: &Arc<State>, key: PartitionKey, offset: i64, mut message: Message) {
    retry::scrub(&mut message, state.retry.is_some());
    // Capped: a record written straight to a retry topic with a far-future
    // not-before must not hold its partition forever.
    let due_in = retry::not_before_ms(&message.headers)
        .map(|at| Duration::from_millis(at.saturating_sub(now_ms())).min(retry::MAX_HOLD))
        .filter(|d| !d.is_zero());
    let mut parts = state.lock();
    let Some(p) = parts.get_mut(&key) else {
        return;
    };
    if let Some(wait) = due_in {
        p.held = Some(Held {
            due: Instant::now() + wait,
            offset,
            message,
        });
        return;
    }
    p.tracker.received(offset, message.timestamp_ms);
    let generation = p.generation;
    drop(parts);
    let retried = retry::restore(&mut message);
    let delivery = KafkaDelivery {
        message,
        key,
        offset,
        generation,
        retried,
        state: state.clone(),
        settled: false,
    };
    let _ = state.tx.send(delivery);
}

/// Hands on the held records that are due.
fn release_due(state: &Arc<State>) {
    let now = Instant::now();
    let due: Vec<(PartitionKey, Held)> = {
        let mut parts = state.lock();
        parts
            .iter_mut()
            .filter(|(_, p)| p.held.as_ref().is_some_and(|h| h.due <= now))
            .filter_map(|(key, p)| p.held.take().map(|h| (key.clone(), h)))
            .collect()
    };
    for (key, held) in due {
        take(state, key, held.offset, held.message);
    }
}

/// Whether the loop should read `key`'s queue now: not at its bound, not
/// holding a record that is not due, not revoked.
fn readable(state: &State, key: &PartitionKey) -> bool {
    state
        .lock()
        .get(key)
        .is_some_and(|p| !p.revoked && p.held.is_none() && p.tracker.pending() < state.max_in_flight)
}

fn consumer_error(state: &State, e: &KafkaError) {
    if matches!(
        e,
        KafkaError::MessageConsumption(RDKafkaErrorCode::AllBrokersDown)
            | KafkaError::MessageConsumption(RDKafkaErrorCode::BrokerTransportFailure)
    ) {
        state.connected.store(false, Ordering::Relaxed);
    }
    events::failed(NAME, "consume", e, "");
}

/// Records of the assigned partitions after what would be committed now:
/// each partition's high watermark minus its first unsettled offset, or
/// where it would be read from when nothing was read from it yet (its
/// position, else the group's committed offset, else where
/// `offset_reset` starts). `None` when a broker does not answer.
fn lag(consumer: &BaseConsumer<Context>, shared: &Shared) -> Option<Backlog> {
    let positions = consumer.position().ok();
    let mut oldest_ms: Option<u64> = None;
    let mut bases: Vec<(String, i32, Option<i64>)> = Vec::new();
    for ((topic, partition), p) in shared.state.lock().iter().filter(|(_, p)| !p.revoked) {
        let position = positions
            .as_ref()
            .and_then(|tpl| match tpl.find_partition(topic, *partition)?.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        if let Some(t) = p.tracker.oldest_ms() {
            oldest_ms = Some(oldest_ms.map_or(t, |o| o.min(t)));
        }
        bases.push((
            topic.clone(),
            *partition,
            p.tracker.committable().or(p.committed).or(position),
        ));
    }
    // Just assigned, or not read yet (this replica is full): the group's
    // committed offset says where reading resumes.
    let mut unknown = TopicPartitionList::new();
    for (topic, partition, _) in bases.iter().filter(|(_, _, b)| b.is_none()) {
        unknown.add_partition(topic, *partition);
    }
    let committed = if unknown.count() > 0 {
        shared
            .watermarks
            .committed_offsets(unknown, Duration::from_secs(2))
            .ok()
    } else {
        None
    };
    let mut messages: u64 = 0;
    for (topic, partition, base) in bases {
        let (low, high) = shared
            .watermarks
            .fetch_watermarks(&topic, partition, Duration::from_secs(2))
            .ok()?;
        let base = base
            .or_else(
                || match committed.as_ref()?.find_partition(&topic, partition)?.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                },
            )
            .unwrap_or(if shared.from_earliest { low } else { high });
        messages = messages.saturating_add(u64::try_from(high.saturating_sub(base.max(low))).unwrap_or(0));
    }
    Some(Backlog {
        messages,
        oldest_ms: oldest_ms.filter(|_| messages > 0),
    })
}

/// librdkafka's default `session.timeout.ms`.
const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(45);

/// Tells when this member has held no partition for longer than a session
/// timeout: a rebalance would have ended by then, so the group has more
/// members than partitions (or this one is fenced off) and this replica
/// does no work. Said once per idle spell, and again when work returns.
struct IdleMember {
    group: String,
    after: Duration,
    since: Option<Instant>,
    said: bool,
    last_look: Instant,
}

impl IdleMember {
    fn new(group: String, after: Duration) -> Self {
        Self {
            group,
            after,
            since: Some(Instant::now()),
            said: false,
            last_look: Instant::now(),
        }
    }

    fn look(&mut self, state: &State) {
        if self.last_look.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_look = Instant::now();
        if state.held() > 0 {
            if self.said {
                tracing::info!(group = %self.group, "this replica holds partitions again");
            }
            self.since = None;
            self.said = false;
            return;
        }
        let since = *self.since.get_or_insert_with(Instant::now);
        if !self.said && since.elapsed() > self.after {
            self.said = true;
            tracing::warn!(
                group = %self.group,
                idle_s = since.elapsed().as_secs(),
                "this replica has held no partition for longer than the session timeout: the group has more members than the topics have partitions, so it stays idle (sluice_route_partitions is 0); run fewer replicas or add partitions"
            );
        }
    }
}

fn poll_loop(consumer: Arc<BaseConsumer<Context>>, state: Arc<State>, commit_interval: Duration, mut idle: IdleMember) {
    let mut last_commit = Instant::now();
    let mut last_check = Instant::now();
    let mut queues = Queues {
        consumer: consumer.clone(),
        by_partition: HashMap::new(),
    };
    let mut busy = false;
    while !state.stop.load(Ordering::Relaxed) {
        // Events (rebalances, errors), and records of partitions not yet on
        // a queue of their own.
        match consumer.poll(if busy { Duration::ZERO } else { IDLE_WAIT }) {
            Some(Ok(m)) => {
                state.connected.store(true, Ordering::Relaxed);
                let key = (m.topic().to_owned(), m.partition());
                let (offset, message) = (m.offset(), to_message(&m));
                drop(m);
                take(&state, key, offset, message);
            }
            Some(Err(e)) => consumer_error(&state, &e),
            None => {}
        }
        queues.refresh(&state);
        release_due(&state);
        busy = false;
        // Full overall: take nothing more until work settles.
        if state.pending_total() < state.max_in_flight_total {
            for (key, (_, queue)) in &queues.by_partition {
                let mut n = 0;
                while n < BATCH && readable(&state, key) {
                    match queue.poll(Duration::ZERO) {
                        Some(Ok(m)) => {
                            state.connected.store(true, Ordering::Relaxed);
                            let (offset, message) = (m.offset(), to_message(&m));
                            drop(m);
                            take(&state, key.clone(), offset, message);
                            n += 1;
                        }
                        Some(Err(e)) => {
                            consumer_error(&state, &e);
                            break;
                        }
                        None => break,
                    }
                }
                busy |= n > 0;
            }
        } else {
            std::thread::sleep(FULL_WAIT);
        }
        if last_commit.elapsed() >= commit_interval {
            state.commit(&consumer, state.committable(None), CommitMode::Async);
            last_commit = Instant::now();
        }
        idle.look(&state);
        if !state.connected.load(Ordering::Relaxed) && last_check.elapsed() >= Duration::from_secs(2) {
            last_check = Instant::now();
            if consumer.fetch_metadata(None, Duration::from_secs(1)).is_ok() {
                state.connected.store(true, Ordering::Relaxed);
                tracing::info!("Kafka brokers reachable again");
            }
        }
    }
    // Shutdown: commit what is done, then leave the group (the revoke
    // callback commits again after waiting for stragglers).
    state.commit(&consumer, state.committable(None), CommitMode::Sync);
    drop(queues);
    consumer.unsubscribe();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && !state.lock().is_empty() {
        let _ = consumer.poll(POLL);
    }
}

pub struct KafkaDelivery {
    message: Message,
    key: PartitionKey,
    offset: i64,
    generation: u64,
    /// Read from a retry topic: the original record.
    retried: Option<Retried>,
    state: Arc<State>,
    /// Settled or given up on: nothing to do at drop.
    settled: bool,
}

impl KafkaDelivery {
    fn is_current(&self) -> bool {
        let parts = self.state.lock();
        parts
            .get(&self.key)
            .is_some_and(|p| p.generation == self.generation && !p.revoked)
    }

    fn settle(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settled = true;
        self.state.settle(&self.key, self.generation, self.offset);
        Box::pin(async { Ok(()) })
    }

    /// Back into the source's channel after `delay`, not taken meanwhile
    /// (so a revoke does not wait for it; its offset still holds commits).
    fn hand_back(&mut self, delay: Duration, next_attempt: bool) -> Result<(), BrokerError> {
        if self.state.stop.load(Ordering::Relaxed) {
            return Err(failed("consumer stopping"));
        }
        {
            let mut parts = self.state.lock();
            match parts
                .get_mut(&self.key)
                .filter(|p| p.generation == self.generation && !p.revoked)
            {
                Some(p) => p.tracker.untaken(self.offset),
                None => return Ok(()),
            }
        }
        self.state.settled.notify_all();
        let mut message = self.message.clone();
        if next_attempt {
            message.attempt = message.attempt.saturating_add(1);
        }
        let again = KafkaDelivery {
            message,
            key: self.key.clone(),
            offset: self.offset,
            generation: self.generation,
            retried: self.retried.clone(),
            state: self.state.clone(),
            settled: false,
        };
        self.settled = true;
        let tx = self.state.tx.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(failed("no runtime to wait for the retry"));
        };
        rt.spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(again);
        });
        Ok(())
    }
}

impl Delivery for KafkaDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        match &self.retried {
            // Where the record first was: a replay goes back there.
            Some(r) if !r.origin.is_empty() => r.origin.clone(),
            _ => format!("kafka://{}?partition={}&offset={}", self.key.0, self.key.1, self.offset),
        }
    }

    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle()
    }

    fn retry(mut self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        let Some(producer) = self.state.retry.clone() else {
            // In process: Kafka has no per-record redelivery. The offset is
            // not committed until the retry settles.
            let r = self.hand_back(delay, true);
            return Box::pin(async move { r });
        };
        // Through the next retry topic: produced (acks=all) before the
        // offset settles, so a crash in between repeats, never loses it.
        let due = now_ms().saturating_add(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
        let record = retry::next(&self.message, &self.origin(), due);
        Box::pin(async move {
            match producer.produce(&record).await {
                Ok(()) => self.settle().await,
                // Dropped unsettled: handed back, tried again in process.
                Err(e) => Err(e),
            }
        })
    }

    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settle()
    }

    fn begin(&self) -> bool {
        // Taken only now: a revoke waits for records being handled, not for
        // those still queued in a lane (it drops them).
        let mut parts = self.state.lock();
        match parts
            .get_mut(&self.key)
            .filter(|p| p.generation == self.generation && !p.revoked)
        {
            Some(p) => {
                p.tracker.taken(self.offset);
                true
            }
            None => false,
        }
    }

    fn partition(&self) -> Option<u32> {
        u32::try_from(self.key.1).ok()
    }
}

impl Drop for KafkaDelivery {
    fn drop(&mut self) {
        if !self.settled {
            // Unsettled (shutdown, or a settle that failed): it is handled
            // again later, never skipped.
            let _ = self.hand_back(HAND_BACK_DELAY, false);
        }
    }
}
