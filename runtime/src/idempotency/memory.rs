//! In-memory idempotency records: fast, lost on restart.

use super::{ms, Claim, GateError, IdempotencyStore, Record};
use crate::future::BoxFuture;
use crate::message::now_ms;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Sweep expired records every this many writes.
const SWEEP_EVERY: u32 = 4096;

#[derive(Default)]
pub struct MemoryStore {
    records: Mutex<(HashMap<String, Record>, u32)>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<R>(&self, f: impl FnOnce(&mut HashMap<String, Record>, u64) -> R) -> R {
        let mut guard = match self.records.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = now_ms();
        let (records, writes) = &mut *guard;
        *writes += 1;
        if *writes >= SWEEP_EVERY {
            *writes = 0;
            records.retain(|_, r| r.expires_ms > now);
        }
        f(records, now)
    }
}

impl IdempotencyStore for MemoryStore {
    fn claim<'a>(&'a self, key: &'a str, owner: &'a str, lease: Duration) -> BoxFuture<'a, Result<Claim, GateError>> {
        let result = self.with(|records, now| {
            if let Some(found) = Record::claim_result(records.get(key), now) {
                return found;
            }
            records.insert(
                key.to_owned(),
                Record {
                    done: false,
                    owner: owner.to_owned(),
                    expires_ms: now + ms(lease),
                },
            );
            Claim::Acquired
        });
        Box::pin(async move { Ok(result) })
    }

    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>> {
        self.with(|records, now| {
            if Record::held_by(records.get(key), owner, now) {
                records.insert(
                    key.to_owned(),
                    Record {
                        done: true,
                        owner: owner.to_owned(),
                        expires_ms: now + ms(ttl),
                    },
                );
            }
        });
        Box::pin(async { Ok(()) })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>> {
        self.with(|records, now| {
            if records.contains_key(key) && Record::held_by(records.get(key), owner, now) {
                records.remove(key);
            }
        });
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claim_complete_duplicate_and_release() {
        let s = MemoryStore::new();
        let lease = Duration::from_secs(5);
        assert_eq!(s.claim("k", "a", lease).await.unwrap(), Claim::Acquired);
        assert!(matches!(s.claim("k", "b", lease).await.unwrap(), Claim::Busy { .. }));
        s.release("k", "b").await.unwrap(); // not the holder: no effect
        assert!(matches!(s.claim("k", "b", lease).await.unwrap(), Claim::Busy { .. }));
        s.release("k", "a").await.unwrap();
        assert_eq!(s.claim("k", "b", lease).await.unwrap(), Claim::Acquired);
        s.complete("k", "b", Duration::from_secs(60)).await.unwrap();
        assert_eq!(s.claim("k", "c", lease).await.unwrap(), Claim::Done);
    }

    #[tokio::test]
    async fn expired_lease_frees_the_key() {
        let s = MemoryStore::new();
        assert_eq!(
            s.claim("k", "a", Duration::from_millis(30)).await.unwrap(),
            Claim::Acquired
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            s.claim("k", "b", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired
        );
    }
}
