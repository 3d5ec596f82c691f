//! The idempotency gate: a message whose key was handled is acked without
//! running; one whose key another worker holds waits. The key is held by a
//! [`Lease`], completed once the outcome is durable or released when
//! dropped (whatever path the handling takes, panics included).

use crate::error::Report;
use crate::idempotency::{Claim, IdempotencyStore};
use crate::keys::KeySource;
use crate::message::Message;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bounds of the wait before asking again for a key another worker holds:
/// its lease may end long after the handling does.
const BUSY_RETRY_MIN: Duration = Duration::from_millis(50);
const BUSY_RETRY_MAX: Duration = Duration::from_secs(1);

/// The idempotency gate of a route.
pub struct Gate {
    pub key: KeySource,
    pub store: Arc<dyn IdempotencyStore>,
    pub ttl: Duration,
    pub lease: Duration,
}

/// What the gate says about one message.
pub(super) enum Admission {
    /// Run it, holding its key (none: it has no key).
    Run(Option<Lease>),
    /// Handled before: ack it.
    Duplicate,
    /// Another worker holds the key: ask again after this.
    Busy(Duration),
    /// The store failed: have the message redelivered.
    StoreFailed(crate::idempotency::GateError),
}

/// A unique token per handling, the owner of an idempotency lease.
fn lease_owner() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}/{}-{}",
        crate::message::instance_id(),
        crate::message::process_nonce(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

impl Gate {
    /// The gate key of `msg` on `route`, if it has one.
    pub(super) fn key_of(&self, route: &str, msg: &Message) -> Option<String> {
        self.key.extract(msg).map(|k| format!("{route}:{k}"))
    }

    pub(super) async fn admit(&self, key: Option<String>) -> Admission {
        let Some(key) = key else {
            return Admission::Run(None);
        };
        let owner = lease_owner();
        match self.store.claim(&key, &owner, self.lease).await {
            Ok(Claim::Acquired) => Admission::Run(Some(Lease {
                store: self.store.clone(),
                ttl: self.ttl,
                key,
                owner,
                settled: false,
            })),
            Ok(Claim::Done) => Admission::Duplicate,
            Ok(Claim::Busy { retry_in }) => Admission::Busy(retry_in.clamp(BUSY_RETRY_MIN, BUSY_RETRY_MAX)),
            Err(e) => Admission::StoreFailed(e),
        }
    }
}

/// A held idempotency key.
pub(super) struct Lease {
    store: Arc<dyn IdempotencyStore>,
    ttl: Duration,
    key: String,
    owner: String,
    settled: bool,
}

impl Lease {
    pub(super) fn key(&self) -> &str {
        &self.key
    }

    /// The outcome is durable: remember the key as handled. A failure here
    /// only risks a rerun, whose publishes carry the same dedup ids.
    pub(super) async fn complete(mut self) {
        self.settled = true;
        if let Err(e) = self.store.complete(&self.key, &self.owner, self.ttl).await {
            // Debug-formatted: a producer's key cannot forge a log line.
            tracing::warn!("cannot record {:?} as done: {}", self.key, Report(&e));
        }
    }

    /// Frees the key now (not done: a retry or a replayed copy must run).
    pub(super) async fn release(mut self) {
        self.settled = true;
        release(&*self.store, &self.key, &self.owner).await;
    }
}

async fn release(store: &dyn IdempotencyStore, key: &str, owner: &str) {
    if let Err(e) = store.release(key, owner).await {
        tracing::warn!(
            "cannot release {key:?}: {}; it frees up when its lease ends",
            Report(&e)
        );
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Dropped on a path that did not settle it (shutdown, a panic):
        // released in the background; if even that fails, the lease ends.
        let (store, key, owner) = (
            self.store.clone(),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.owner),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release(&*store, &key, &owner).await });
        }
    }
}
