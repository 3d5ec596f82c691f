//! Acks that trail their handling. Once a message's verdict is an ack, what
//! is left is waiting: for the idempotency store's commit, then the
//! broker's ack. The worker takes its next message meanwhile, so those
//! waits overlap and group commits grow with the load instead of holding a
//! worker each. The invariant is untouched: the ack still follows the
//! durable outcome, only the worker does not wait for it.
//!
//! Only on unordered routes: a lane keeps one message of a key in flight
//! from delivery to ack.

use super::{BrokerOp, Ending, Route};
use crate::brokers::BrokerError;
use crate::metrics::MessageOutcome;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Settles of one route that may trail at once; beyond, workers wait.
const MAX_TRAILING: u32 = 256;

pub struct TrailingSettles {
    permits: Arc<Semaphore>,
}

impl Default for TrailingSettles {
    fn default() -> Self {
        Self {
            permits: Arc::new(Semaphore::new(MAX_TRAILING as usize)),
        }
    }
}

impl TrailingSettles {
    /// A place for one more trailing settle (waits while all are taken).
    pub(super) async fn permit(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }

    /// Places for `n` settles (at most all of them).
    pub(super) async fn permits(&self, n: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(n).unwrap_or(u32::MAX).clamp(1, MAX_TRAILING);
        self.permits.clone().acquire_many_owned(n).await.ok()
    }

    /// Returns once every trailing settle has finished.
    pub(super) async fn drained(&self) {
        let _all = self.permits.acquire_many(MAX_TRAILING).await;
    }
}

/// An ack handed to the broker's ack task, with what accounting it needs
/// once the broker answers. Dropped without an answer (the adapter panicked
/// or lost the callback), it still ends the handling, as a panic, so the
/// in-flight gauge and the trailing permits never leak.
pub(super) struct PendingAck {
    route: Arc<Route>,
    outcome: MessageOutcome,
    ending: Option<Ending>,
    _permit: OwnedSemaphorePermit,
}

impl PendingAck {
    pub(super) fn new(
        route: Arc<Route>,
        outcome: MessageOutcome,
        ending: Ending,
        permit: OwnedSemaphorePermit,
    ) -> Self {
        Self {
            route,
            outcome,
            ending: Some(ending),
            _permit: permit,
        }
    }

    /// The broker answered the ack.
    pub(super) fn done(mut self, acked: Result<(), BrokerError>) {
        let Some(ending) = self.ending.take() else {
            return;
        };
        ending.span.in_scope(|| self.route.settled(acked, BrokerOp::Ack));
        self.route.ended(self.outcome, ending);
    }
}

impl Drop for PendingAck {
    fn drop(&mut self) {
        if let Some(ending) = self.ending.take() {
            ending.span.in_scope(|| {
                tracing::error!(route = %self.route.name, "an ack was dropped unanswered; the broker redelivers the message");
            });
            self.route.count_panic();
            self.route.ended(MessageOutcome::Panic, ending);
        }
    }
}
