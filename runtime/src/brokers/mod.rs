//! Broker adapters. Each folder owns one broker: its connection config, its
//! route-source settings with their defaults, and the adapter that receives
//! messages (a [`Source`]), settles them ([`Delivery`]), publishes them
//! ([`Sink`]) and keeps dead letters ([`DeadLetterStore`]). Adapters know
//! nothing of WASM or of the pipeline that drives them; `registry` is the
//! one table that names them all.
//!
//! # The contract every adapter keeps (checked by the conformance suite)
//!
//! - A [`Delivery`] is settled at most once: [`Delivery::ack`] is final (no
//!   redelivery, unless a crash, a lost connection or a failed commit keeps
//!   the broker from recording it: an ack may return before it is durable), [`Delivery::retry`] delivers it again no earlier than
//!   asked with the attempt count one higher, [`Delivery::dead_lettered`]
//!   drops it once its copy is confirmed elsewhere, and dropping it
//!   unsettled hands it back for redelivery. A broker that cannot keep one
//!   of these says so in [`Guarantees`] (core NATS is at-most-once).
//! - [`Sink::publish`] returns once the broker has confirmed every message:
//!   stored, or dropped as a duplicate (counted in [`Published`]); a message
//!   it can never carry is [`BrokerError::Refused`], never a panic.
//! - A [`DeadLetterStore`] lists and shows without consuming, and replays a
//!   letter by sending it back and removing it only once the copy is
//!   confirmed (a crash in between replays it twice, never zero times).

pub mod embedded;
mod events;
pub mod kafka;
pub mod nats;
pub mod rabbitmq;
mod registry;

pub use registry::{
    origin_subject, BrokerKind, Brokers, BrokersConfig, DeadLetterTarget, RouteUse, SetupError, SourceSpec,
};

use crate::error::{cause, Cause};
pub use crate::future::BoxFuture;
use crate::message::{Message, Outbound};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{broker}: not connected")]
    Disconnected {
        broker: &'static str,
        #[source]
        cause: Cause,
    },
    #[error("{broker}")]
    Failed {
        broker: &'static str,
        #[source]
        cause: Cause,
    },
    #[error("{broker}: shutting down")]
    Closed { broker: &'static str },
    /// The broker (or its client) cannot carry the message as it is: a bad
    /// header, an invalid or unroutable destination, an oversized payload.
    /// Sending it again fails again, so the message is dead-lettered.
    #[error("{broker}: refused: {reason}")]
    Refused { broker: &'static str, reason: String },
}

impl BrokerError {
    /// The broker (or client) that failed.
    pub fn broker(&self) -> &'static str {
        match self {
            Self::Disconnected { broker, .. }
            | Self::Failed { broker, .. }
            | Self::Closed { broker }
            | Self::Refused { broker, .. } => broker,
        }
    }

    pub fn failed(broker: &'static str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Failed {
            broker,
            cause: cause(e),
        }
    }

    pub fn disconnected(broker: &'static str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Disconnected {
            broker,
            cause: cause(e),
        }
    }

    pub fn refused(broker: &'static str, reason: impl Into<String>) -> Self {
        Self::Refused {
            broker,
            reason: reason.into(),
        }
    }
}

/// Broker URL(s), comma-separated, without their secrets: a password after
/// `user:` becomes `***`, and user info without a colon (a NATS token) is
/// hidden whole. For logs and errors.
pub(crate) fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_owned();
            };
            let Some((userinfo, host)) = rest.rsplit_once('@') else {
                return url.to_owned();
            };
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
                None => format!("{scheme}://***@{host}"),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What a sink did with a batch of messages, once all are confirmed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    /// Messages the broker dropped as duplicates of one it already holds
    /// (same dedup id within its window): stored earlier, not now.
    pub duplicates: usize,
}

/// What to do once an ack is out (see [`Delivery::ack_then`]).
pub type AckDone = Box<dyn FnOnce(Result<(), BrokerError>) + Send>;

/// One received message, to be settled exactly once. Dropping it unsettled
/// hands it back to the broker for redelivery. (`Any`: a source settling
/// many at once finds its own deliveries' details.)
pub trait Delivery: Send + std::any::Any {
    fn message(&self) -> &Message;
    /// Where it came from, for the `sluice-origin` dead-letter header.
    fn origin(&self) -> String;
    /// Done: the outcome (and any publishes) is durable.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Deliver again after `delay`, with the attempt count increased.
    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// A dead-lettered copy has been confirmed elsewhere: drop the original.
    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Acks it and returns at once; `then` gets the result once the ack is
    /// out. A broker that writes acks from a task of its own calls `then`
    /// there, sparing a task (and a wake-up of another thread) per message;
    /// by default `then` runs at once when the ack is done at once (core
    /// NATS, Kafka's offset marks), else a task awaits [`Delivery::ack`].
    fn ack_then(self: Box<Self>, then: AckDone) {
        use futures_util::FutureExt as _;
        let mut acked = self.ack();
        match (&mut acked).now_or_never() {
            Some(result) => then(result),
            None => {
                tokio::spawn(async move { then(acked.await) });
            }
        }
    }
    /// Called right before the handler runs. False: the delivery went stale
    /// while it waited in a lane (its partition was revoked) and is dropped
    /// unhandled; its new owner handles it.
    fn begin(&self) -> bool {
        true
    }
    /// The partition it came from, where the broker has partitions: the
    /// unit of `ordering = "partition"`.
    fn partition(&self) -> Option<u32> {
        None
    }
}

/// What a broker holds for a source and has not settled yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Waiting, or delivered and not acked/committed.
    pub messages: u64,
    /// When the oldest of them was published (Unix ms, the broker's or the
    /// producer's clock), where the broker tells; `None` when it does not
    /// (or when `messages` is 0).
    pub oldest_ms: Option<u64>,
}

impl Backlog {
    /// A count without an age.
    pub fn count(messages: u64) -> Self {
        Self {
            messages,
            oldest_ms: None,
        }
    }
}

/// A stream of deliveries for one route.
pub trait Source: Send + Sync {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>>;
    /// Deliveries the source has at hand now, at most `max`, taken at once
    /// without waiting (one lock, no wake-up per message): how a batch
    /// fills after its first delivery. Empty when nothing is at hand or
    /// another caller holds the source; errors are left for `next` to
    /// report.
    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let _ = max;
        Vec::new()
    }
    /// Acks many deliveries of this source at once (a batch's successes),
    /// each result in their order. A broker that can settle a group in one
    /// operation does so; by default each is acked on its own, together.
    fn ack_many(&self, deliveries: Vec<Box<dyn Delivery>>) -> BoxFuture<'_, Vec<Result<(), BrokerError>>> {
        Box::pin(futures_util::future::join_all(deliveries.into_iter().map(|d| d.ack())))
    }
    fn is_connected(&self) -> bool {
        true
    }
    /// True when concurrent `next` calls queue on one subscription (behind
    /// a lock), so one task taking deliveries for every worker costs less
    /// than each worker waiting its turn. False where building a delivery
    /// is the work (the embedded broker reads the store): workers then
    /// share it.
    fn takes_one_at_a_time(&self) -> bool {
        false
    }
    /// True when the source itself bounds what it hands out (pausing
    /// partitions), so the pipeline may queue per lane without blocking the
    /// other lanes.
    fn bounds_in_flight(&self) -> bool {
        false
    }
    /// Messages of this source the broker holds that are not settled yet
    /// (waiting, or delivered and not acked/committed), and how old the
    /// oldest of them is where the broker tells; what an autoscaler scales
    /// on (`sluice_route_lag`, `sluice_route_oldest_unacked_seconds`).
    /// `None`: the broker keeps no backlog (core NATS) or could not be asked.
    fn backlog(&self) -> BoxFuture<'_, Option<Backlog>> {
        Box::pin(async { None })
    }
    /// Partitions of the source this replica holds, where the broker
    /// assigns them to group members (Kafka); `None` elsewhere. A replica
    /// holding none is idle: more replicas than partitions.
    fn partitions(&self) -> Option<usize> {
        None
    }
    /// Stops the source for good (a route removed by a config reload):
    /// leaves consumer groups, commits what is settled.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Publishes messages and returns once the broker has confirmed all of them
/// (stored, or dropped as a duplicate of a message it holds). A message the
/// broker cannot carry is [`BrokerError::Refused`], never a panic.
pub trait Sink: Send + Sync {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>>;
}

/// What delivery guarantees an adapter's sources keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guarantees {
    /// Unsettled deliveries (dropped, or lost in a crash) come back.
    pub redelivers: bool,
    /// Its sinks store a message once per dedup id (`Nats-Msg-Id`) within a
    /// window, reporting later copies in [`Published::duplicates`].
    pub drops_duplicates: bool,
    /// Its backlog tells when the oldest unsettled message was published
    /// ([`Backlog::oldest_ms`]; Kafka: of the records this replica read).
    pub tells_oldest: bool,
}

/// A route as a broker sees it: what its defaults and checks depend on.
#[derive(Debug, Clone, Copy)]
pub struct RouteContext<'a> {
    pub name: &'a str,
    pub concurrency: u32,
    /// `retry.max_attempts`.
    pub max_attempts: u32,
    /// `ordering = "none"`: messages may overtake each other.
    pub unordered: bool,
}

/// A config problem found by a broker: the key below the route
/// (`source.prefetch`) and what is wrong.
pub type Problem = (String, String);

/// One dead letter picked for replay: where it failed (its
/// `sluice-origin`), the route that failed it, and the copy to send back
/// (the store sets its subject from the origin).
pub struct Replay {
    pub origin: String,
    pub route: String,
    pub copy: Outbound,
}

/// Chooses the letters a replay takes: `None` leaves a letter where it is.
pub type ReplayPick<'a> = dyn FnMut(u64, &Outbound) -> Option<Replay> + Send + 'a;

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("dead letter #{seq} came from route `{route}`, which does not consume from this broker in this daemon")]
    UnknownRoute { seq: u64, route: String },
    #[error("dead letter #{seq} has no origin to go back to, or one no route of this daemon consumes (sluice-origin: {origin:?})")]
    NoOrigin { seq: u64, origin: String },
}

/// Where one dead-letter destination is kept, for `sluice dlq`.
pub trait DeadLetterStore: Send + Sync {
    /// The destination (queue, subject, topic).
    fn name(&self) -> &str;
    /// Dead letters, oldest first, without consuming them: (sequence, letter).
    fn letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Outbound)>, BrokerError>>;
    /// One dead letter.
    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<Outbound>, BrokerError>>;
    /// Sends every letter `pick` takes back to its origin, which must be one
    /// this daemon consumes (the origin is a header: anyone who can write to
    /// the dead-letter destination could name another), and removes it once
    /// the copy is confirmed. Returns how many moved.
    fn replay<'a>(&'a self, pick: &'a mut ReplayPick<'a>) -> BoxFuture<'a, Result<usize, DeadLetterError>>;
    /// True where a replayed letter stays (a log, e.g. a Kafka topic).
    fn keeps_replayed(&self) -> bool {
        false
    }
}

/// Finds letter `seq` among the first `scan` letters: for stores whose
/// letters can only be read in order (RabbitMQ, Kafka).
pub(crate) async fn find_letter(
    store: &dyn DeadLetterStore,
    seq: u64,
    scan: usize,
) -> Result<Option<Outbound>, BrokerError> {
    Ok(store
        .letters(scan)
        .await?
        .into_iter()
        .find(|(s, _)| *s == seq)
        .map(|(_, m)| m))
}

/// The letters `pick` takes, with their sequence numbers, in order.
pub(crate) async fn picked(
    store: &dyn DeadLetterStore,
    pick: &mut ReplayPick<'_>,
) -> Result<Vec<(u64, Replay)>, BrokerError> {
    Ok(store
        .letters(SCAN_LIMIT)
        .await?
        .into_iter()
        .filter_map(|(seq, letter)| pick(seq, &letter).map(|replay| (seq, replay)))
        .collect())
}

/// Most dead letters looked at in one scan: bounds the memory and time of
/// a scan (RabbitMQ holds every message looked at until the scan ends).
pub const SCAN_LIMIT: usize = 100_000;
