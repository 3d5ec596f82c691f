//! The idempotency gate: records `key -> in-progress(lease) | done` so that a
//! duplicate of a handled message is acked without running the handler, and
//! one being handled elsewhere is retried later. Stores: in memory, an
//! embedded file (survives restarts), and Redis or a NATS key-value bucket
//! (shared by replicas).

mod file;
mod memory;
mod nats_kv;
mod redis_store;

pub use file::FileStore;
pub use memory::MemoryStore;
pub use nats_kv::{bucket_key, NatsKvError, NatsKvStore};
pub use redis_store::RedisStore;

use crate::future::BoxFuture;
use crate::storage::StorageError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum GateError {
    #[error("idempotency store")]
    Storage(#[from] StorageError),
    #[error("idempotency store (redis)")]
    Redis(#[source] redis::RedisError),
    #[error("idempotency store (nats-kv)")]
    NatsKv(#[source] std::sync::Arc<NatsKvError>),
}

/// The answer to a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Not seen (or expired): the caller holds the lease and runs the handler.
    Acquired,
    /// Already handled within the TTL: ack without running.
    Done,
    /// Another worker holds the lease; try again after `retry_in`.
    Busy { retry_in: Duration },
}

pub trait IdempotencyStore: Send + Sync {
    /// Takes the lease on `key` for `owner` unless it is done or leased.
    fn claim<'a>(&'a self, key: &'a str, owner: &'a str, lease: Duration) -> BoxFuture<'a, Result<Claim, GateError>>;
    /// Marks `key` done for `ttl` (if `owner` still holds it or nobody does).
    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>>;
    /// Gives the lease back (the handler failed; a retry must run again).
    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>>;
}

/// A record as the memory and file stores keep it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Record {
    pub done: bool,
    pub owner: String,
    pub expires_ms: u64,
}

impl Record {
    /// What a claim finds in this record at `now`.
    pub(crate) fn claim_result(existing: Option<&Record>, now: u64) -> Option<Claim> {
        match existing {
            Some(r) if r.expires_ms > now && r.done => Some(Claim::Done),
            Some(r) if r.expires_ms > now => Some(Claim::Busy {
                retry_in: Duration::from_millis(r.expires_ms - now),
            }),
            _ => None,
        }
    }

    /// Whether `owner` may complete or release a key in this state.
    pub(crate) fn held_by(existing: Option<&Record>, owner: &str, now: u64) -> bool {
        match existing {
            None => true,
            Some(r) => !r.done && (r.owner == owner || r.expires_ms <= now),
        }
    }
}

pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
