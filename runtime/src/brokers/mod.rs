//! Broker adapters: each receives messages (a [`Source`]), settles them
//! ([`Delivery`]) and publishes ([`Sink`]). They know nothing of WASM.

pub mod embedded;
pub mod kafka;
pub mod nats;
pub mod rabbitmq;

use crate::message::{Message, Outbound};
pub use crate::future::BoxFuture;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("{broker}: not connected: {reason}")]
    Disconnected { broker: &'static str, reason: String },
    #[error("{broker}: {reason}")]
    Failed { broker: &'static str, reason: String },
    #[error("{broker}: shutting down")]
    Closed { broker: &'static str },
    /// The broker (or its client) cannot carry the message as it is: a bad
    /// header, an invalid or unroutable destination, an oversized payload.
    /// Sending it again fails again, so the message is dead-lettered.
    #[error("{broker}: refused: {reason}")]
    Refused { broker: &'static str, reason: String },
}

impl BrokerError {
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

/// One received message, to be settled exactly once. Dropping it unsettled
/// hands it back to the broker for redelivery.
pub trait Delivery: Send {
    fn message(&self) -> &Message;
    /// Where it came from, for the `sluice-origin` dead-letter header.
    fn origin(&self) -> String;
    /// Done: the outcome (and any publishes) is durable.
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// Deliver again after `delay`, with the attempt count increased.
    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>>;
    /// A dead-lettered copy has been confirmed elsewhere: drop the original.
    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>>;
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

/// A stream of deliveries for one route.
pub trait Source: Send + Sync {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>>;
    fn is_connected(&self) -> bool {
        true
    }
    /// True when the source itself bounds what it hands out (pausing
    /// partitions), so the pipeline may queue per lane without blocking the
    /// other lanes.
    fn bounds_in_flight(&self) -> bool {
        false
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
