//! How a route's deliveries reach its workers: unordered, `concurrency`
//! workers take from the source (or, where the source hands out one at a
//! time behind a lock, from one feeder that takes for them); ordered, one
//! dispatcher hands each delivery to the lane of its key (or partition)
//! and each lane handles one at a time.

use super::status::WorkerAlive;
use super::{RetryMode, Route};
use crate::brokers::Delivery;
use crate::config::Ordering as RouteOrdering;
use futures_util::FutureExt as _;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Pause after a source error before asking again.
pub(super) const SOURCE_ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Deliveries waiting per ordering lane beyond the one being handled.
const LANE_BUFFER: usize = 1;
/// What the dispatcher takes from the source at once, at most.
const DISPATCH_AT_ONCE: usize = 64;
/// Deliveries the feeder of an unordered route takes from what the source
/// holds at once, at most (and at most one per worker).
const FEED_AT_ONCE: usize = 64;

type Feed = async_channel::Sender<Box<dyn Delivery>>;
type Fed = async_channel::Receiver<Box<dyn Delivery>>;

fn lane_of(key: &str, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes.max(1) as u64) as usize
}

enum LaneSender {
    Bounded(mpsc::Sender<Box<dyn Delivery>>),
    Unbounded(mpsc::UnboundedSender<Box<dyn Delivery>>),
}

pub(super) enum LaneReceiver {
    Bounded(mpsc::Receiver<Box<dyn Delivery>>),
    Unbounded(mpsc::UnboundedReceiver<Box<dyn Delivery>>),
}

impl LaneReceiver {
    pub(super) async fn recv(&mut self) -> Option<Box<dyn Delivery>> {
        match self {
            Self::Bounded(rx) => rx.recv().await,
            Self::Unbounded(rx) => rx.recv().await,
        }
    }
}

impl Route {
    /// Starts the route's workers. They stop taking messages when `shutdown`
    /// is cancelled and return once their current message is settled.
    pub fn spawn(self: &Arc<Self>, shutdown: &CancellationToken) -> Vec<tokio::task::JoinHandle<()>> {
        self.liveness.spawned();
        // The route's series exist before its first message.
        let _ = self.series();
        tokio::spawn(self.clone().report_lag(shutdown.clone()));
        let alive = || WorkerAlive::new(&self.liveness);
        match self.ordering {
            RouteOrdering::None => match self.batch {
                Some(batch) => {
                    // One gatherer feeds the workers whole batches; one
                    // batch waits ready while the workers are busy.
                    let (tx, rx) = mpsc::channel(1);
                    let rx = Arc::new(tokio::sync::Mutex::new(rx));
                    let idle = Arc::new(super::batch::IdleWorkers::default());
                    let mut handles = vec![tokio::spawn(self.clone().gather(
                        batch,
                        tx,
                        idle.clone(),
                        shutdown.clone(),
                        alive(),
                    ))];
                    handles.extend((0..self.concurrency).map(|_| {
                        tokio::spawn(
                            self.clone()
                                .batch_worker(rx.clone(), idle.clone(), shutdown.clone(), alive()),
                        )
                    }));
                    handles
                }
                None if !self.source.takes_one_at_a_time() => (0..self.concurrency)
                    .map(|_| tokio::spawn(self.clone().worker(None, shutdown.clone(), alive())))
                    .collect(),
                None => {
                    // One task takes from the source and hands deliveries
                    // over: workers never queue on the source's lock, and
                    // what the source holds is taken in one go.
                    let (tx, rx) = async_channel::bounded(self.concurrency.max(1) as usize);
                    let mut handles = vec![tokio::spawn(self.clone().feed(tx, shutdown.clone(), alive()))];
                    handles.extend(
                        (0..self.concurrency)
                            .map(|_| tokio::spawn(self.clone().worker(Some(rx.clone()), shutdown.clone(), alive()))),
                    );
                    handles
                }
            },
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
                        // A lane gathers its batches from its queue.
                        let buffer = self
                            .batch
                            .map_or(LANE_BUFFER, |b| (b.max_messages as usize).max(LANE_BUFFER));
                        let (tx, rx) = mpsc::channel(buffer);
                        (LaneSender::Bounded(tx), LaneReceiver::Bounded(rx))
                    };
                    senders.push(tx);
                    handles.push(match self.batch {
                        Some(batch) => tokio::spawn(self.clone().batch_lane(batch, rx, shutdown.clone(), alive())),
                        None => tokio::spawn(self.clone().lane(rx, shutdown.clone(), alive())),
                    });
                }
                handles.push(tokio::spawn(self.clone().dispatch(senders, shutdown.clone(), alive())));
                handles
            }
        }
    }

    /// The key `ordering = "key"` keeps in order (the message id when the
    /// message has none: it is then ordered with nothing).
    pub(super) fn ordering_key_of(&self, msg: &crate::message::Message) -> String {
        self.ordering_key.extract(msg).unwrap_or_else(|| msg.id.clone())
    }

    async fn next_delivery(&self, shutdown: &CancellationToken) -> Option<Box<dyn Delivery>> {
        match self.next_from_source(&mut None, None, shutdown).await {
            super::batch::Next::Delivery(d) => Some(d),
            super::batch::Next::TimedOut | super::batch::Next::Stop => None,
        }
    }

    /// Unordered: takes deliveries from the source, with what it has at
    /// hand, for the workers. At most the channel's capacity plus one
    /// source's worth wait; at shutdown they are dropped, i.e. handed back.
    async fn feed(self: Arc<Self>, workers: Feed, shutdown: CancellationToken, _alive: WorkerAlive) {
        // A panic in the source's client is caught: the route goes on
        // after the pause a source error gets.
        while let Err(panic) = AssertUnwindSafe(self.feed_until_stopped(&workers, &shutdown))
            .catch_unwind()
            .await
        {
            self.caught_panic("taking from the source", panic.as_ref());
            if !super::sleep_unless(&shutdown, SOURCE_ERROR_PAUSE).await {
                return;
            }
        }
    }

    async fn feed_until_stopped(&self, workers: &Feed, shutdown: &CancellationToken) {
        while let Some(first) = self.next_delivery(shutdown).await {
            // No more than the workers' queue has room for: what waits
            // beyond it is held from the broker for nothing.
            let room = workers.capacity().unwrap_or(1).saturating_sub(workers.len() + 1);
            let more = match room.min(FEED_AT_ONCE) {
                0 => Vec::new(),
                n => self.source.ready(n),
            };
            for delivery in std::iter::once(first).chain(more) {
                let sent = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    sent = workers.send(delivery) => sent.is_ok(),
                };
                if !sent {
                    return;
                }
            }
        }
    }

    /// Unordered: take (from the feeder, else the source), handle, settle
    /// (an ack trails), repeat.
    async fn worker(self: Arc<Self>, fed: Option<Fed>, shutdown: CancellationToken, _alive: WorkerAlive) {
        loop {
            let delivery = match &fed {
                Some(fed) => tokio::select! {
                    biased;
                    // Waiting deliveries are dropped, i.e. handed back.
                    _ = shutdown.cancelled() => break,
                    d = fed.recv() => match d { Ok(d) => d, Err(_) => break },
                },
                None => match self.next_delivery(&shutdown).await {
                    Some(d) => d,
                    None => break,
                },
            };
            self.process(delivery, RetryMode::Broker, &shutdown).await;
        }
        // What waits is handed back now, not once the last worker is done.
        if let Some(fed) = fed {
            fed.close();
            while fed.try_recv().is_ok() {}
        }
        // Returns (the route counts as stopped) once its acks are out.
        self.trailing.drained().await;
    }

    /// Ordered: hands each delivery to the lane of its key. A full lane
    /// blocks the dispatcher, which stops taking messages: backpressure.
    async fn dispatch(self: Arc<Self>, lanes: Vec<LaneSender>, shutdown: CancellationToken, _alive: WorkerAlive) {
        // Taken with the last delivery (what the source had at hand), in
        // source order; dropped unsent at shutdown, i.e. handed back.
        let mut taken: VecDeque<Box<dyn Delivery>> = VecDeque::new();
        loop {
            let delivery = match taken.pop_front() {
                Some(d) => d,
                None => match self.next_delivery(&shutdown).await {
                    Some(d) => {
                        taken.extend(self.source.ready(DISPATCH_AT_ONCE));
                        d
                    }
                    None => return,
                },
            };
            let index = match (self.ordering, delivery.partition()) {
                (RouteOrdering::Partition, Some(p)) => p as usize % lanes.len(),
                // One partition (the embedded broker): one lane.
                (RouteOrdering::Partition, None) => 0,
                _ => lane_of(&self.ordering_key_of(delivery.message()), lanes.len()),
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
}
