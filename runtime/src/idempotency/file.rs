//! Idempotency records in an embedded redb file (the default): handled
//! keys survive restarts.
//!
//! Only completions are written, through group commit, and a completion is
//! durable before the message is acked. Leases (keys being handled) live in
//! memory: the file belongs to one process (redb locks it), and a crash
//! loses only in-progress leases, whose messages are redelivered and run
//! again, the same outcome as a lease that ran out. This halves the fsyncs
//! per message and takes the claim off the disk entirely.

use super::{ms, Claim, GateError, IdempotencyStore, Record};
use crate::future::BoxFuture;
use crate::message::now_ms;
use crate::storage::{failed, open_database, GroupCommit, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// (expiry, key): lets expired records be purged without a full scan.
const BY_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_expiry");
/// Expired records purged per write, at most.
const PURGE_PER_WRITE: usize = 16;
/// Sweep expired leases every this many claims.
const SWEEP_EVERY: u32 = 4096;

/// A key being handled: who holds it, until when (ms).
struct Held {
    owner: String,
    expires_ms: u64,
}

#[derive(Default)]
struct Leases {
    held: HashMap<String, Held>,
    claims: u32,
}

pub struct FileStore {
    db: Arc<Database>,
    writer: GroupCommit,
    leases: Mutex<Leases>,
}

impl FileStore {
    pub fn open(path: &Path) -> Result<Self, GateError> {
        let db = Arc::new(open_database(path)?);
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(RECORDS).map_err(failed)?;
        txn.open_table(BY_EXPIRY).map_err(failed)?;
        txn.commit().map_err(failed)?;
        Ok(Self {
            writer: GroupCommit::start(db.clone(), "idempotency")?,
            db,
            leases: Mutex::default(),
        })
    }

    pub fn close(&self) {
        self.writer.close();
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        // The map stays consistent whatever panicked while holding it.
        self.leases.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The committed record of `key`.
    fn stored(&self, key: &str) -> Result<Option<Record>, StorageError> {
        let txn = self.db.begin_read().map_err(failed)?;
        let records = txn.open_table(RECORDS).map_err(failed)?;
        match records.get(key).map_err(failed)? {
            Some(v) => Ok(Some(postcard::from_bytes(v.value()).map_err(failed)?)),
            None => Ok(None),
        }
    }

    fn claim_now(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim, GateError> {
        let now = now_ms();
        // Held across the read, so two claims of one key cannot both win.
        let mut leases = self.leases();
        leases.claims += 1;
        if leases.claims >= SWEEP_EVERY {
            leases.claims = 0;
            leases.held.retain(|_, h| h.expires_ms > now);
        }
        if let Some(h) = leases.held.get(key).filter(|h| h.expires_ms > now) {
            return Ok(Claim::Busy {
                retry_in: Duration::from_millis(h.expires_ms - now),
            });
        }
        // A stored lease (written by an older version) is a crash's
        // leftover: only a done record counts.
        if self.stored(key)?.is_some_and(|r| r.done && r.expires_ms > now) {
            return Ok(Claim::Done);
        }
        leases.held.insert(
            key.to_owned(),
            Held {
                owner: owner.to_owned(),
                expires_ms: now + ms(lease),
            },
        );
        Ok(Claim::Acquired)
    }

    /// Takes `key` for `owner`'s completion if it holds the lease, or
    /// nobody holds a live one: the lease then never runs out until the
    /// commit is done, so no claim can take the key in between.
    fn hold_for_completion(&self, key: &str, owner: &str) -> bool {
        let now = now_ms();
        let mut leases = self.leases();
        let free = leases
            .held
            .get(key)
            .is_none_or(|h| h.owner == owner || h.expires_ms <= now);
        if free {
            leases.held.insert(
                key.to_owned(),
                Held {
                    owner: owner.to_owned(),
                    expires_ms: u64::MAX,
                },
            );
        }
        free
    }

    /// Drops `owner`'s lease on `key`, if it still has it.
    fn drop_lease(&self, key: &str, owner: &str) {
        let mut leases = self.leases();
        if leases.held.get(key).is_some_and(|h| h.owner == owner) {
            leases.held.remove(key);
        }
    }

    async fn complete_now(&self, key: &str, owner: &str, ttl: Duration) -> Result<(), GateError> {
        if !self.hold_for_completion(key, owner) {
            return Ok(());
        }
        let stored_key = key.to_owned();
        let owner_copy = owner.to_owned();
        // The lease stays until the commit: a claim meanwhile is told to
        // wait, and finds the key done when it asks again.
        let written = self
            .writer
            .run(move |txn| {
                update_in(txn, &stored_key, move |old, now| {
                    let new = (!old.is_some_and(|r| r.done && r.expires_ms > now)).then(|| {
                        Some(Record {
                            done: true,
                            owner: owner_copy,
                            expires_ms: now + ms(ttl),
                        })
                    });
                    (new, Claim::Acquired)
                })
            })
            .await;
        self.drop_lease(key, owner);
        written.map(|_| ()).map_err(GateError::from)
    }
}

/// Reads the record of `key`; `f` returns the new state (`Some(None)`:
/// delete, `None`: unchanged) and the answer.
fn update_in(
    txn: &WriteTransaction,
    key: &str,
    f: impl FnOnce(Option<&Record>, u64) -> (Option<Option<Record>>, Claim),
) -> Result<Claim, StorageError> {
    let now = now_ms();
    let mut records = txn.open_table(RECORDS).map_err(failed)?;
    let mut by_expiry = txn.open_table(BY_EXPIRY).map_err(failed)?;
    purge(&mut records, &mut by_expiry, now)?;
    let old: Option<Record> = match records.get(key).map_err(failed)? {
        Some(v) => Some(postcard::from_bytes(v.value()).map_err(failed)?),
        None => None,
    };
    let (new, answer) = f(old.as_ref(), now);
    if let Some(new) = new {
        if let Some(old) = &old {
            by_expiry.remove((old.expires_ms, key)).map_err(failed)?;
        }
        match new {
            Some(record) => {
                let bytes = postcard::to_stdvec(&record).map_err(failed)?;
                records.insert(key, bytes.as_slice()).map_err(failed)?;
                by_expiry.insert((record.expires_ms, key), ()).map_err(failed)?;
            }
            None => {
                records.remove(key).map_err(failed)?;
            }
        }
    }
    Ok(answer)
}

fn purge(
    records: &mut redb::Table<&str, &[u8]>,
    by_expiry: &mut redb::Table<(u64, &str), ()>,
    now: u64,
) -> Result<(), StorageError> {
    let expired: Vec<(u64, String)> = by_expiry
        .range((0, "")..(now, ""))
        .map_err(failed)?
        .take(PURGE_PER_WRITE)
        .filter_map(|e| e.ok().map(|(k, _)| (k.value().0, k.value().1.to_owned())))
        .collect();
    for (at, key) in expired {
        by_expiry.remove((at, key.as_str())).map_err(failed)?;
        records.remove(key.as_str()).map_err(failed)?;
    }
    Ok(())
}

impl IdempotencyStore for FileStore {
    fn claim<'a>(&'a self, key: &'a str, owner: &'a str, lease: Duration) -> BoxFuture<'a, Result<Claim, GateError>> {
        let result = self.claim_now(key, owner, lease);
        Box::pin(async move { result })
    }

    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>> {
        Box::pin(self.complete_now(key, owner, ttl))
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>> {
        // Nothing on disk: leases are not written.
        self.drop_lease(key, owner);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.redb");
        {
            let s = FileStore::open(&path).unwrap();
            assert_eq!(
                s.claim("k", "a", Duration::from_secs(5)).await.unwrap(),
                Claim::Acquired
            );
            s.complete("k", "a", Duration::from_secs(60)).await.unwrap();
            assert_eq!(
                s.claim("x", "a", Duration::from_secs(5)).await.unwrap(),
                Claim::Acquired
            );
            s.release("x", "a").await.unwrap();
            s.close();
        }
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.claim("k", "b", Duration::from_secs(5)).await.unwrap(), Claim::Done);
        assert_eq!(
            s.claim("x", "b", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired
        );
    }

    #[tokio::test]
    async fn a_completion_after_the_lease_ran_out_still_wins_over_a_new_claim() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(&dir.path().join("idem.redb")).unwrap();
        assert_eq!(s.claim("k", "a", Duration::ZERO).await.unwrap(), Claim::Acquired);
        // The lease has run out; the holder completes before anyone claims.
        assert!(s.hold_for_completion("k", "a"));
        assert!(matches!(
            s.claim("k", "b", Duration::from_secs(30)).await.unwrap(),
            Claim::Busy { .. }
        ));
        s.complete("k", "a", Duration::from_secs(60)).await.unwrap();
        assert_eq!(s.claim("k", "b", Duration::from_secs(30)).await.unwrap(), Claim::Done);
    }

    #[tokio::test]
    async fn a_lease_is_held_in_memory_and_not_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("idem.redb");
        {
            let s = FileStore::open(&path).unwrap();
            let lease = Duration::from_secs(30);
            assert_eq!(s.claim("k", "a", lease).await.unwrap(), Claim::Acquired);
            assert!(matches!(s.claim("k", "b", lease).await.unwrap(), Claim::Busy { .. }));
            // Only the holder (or nobody) may complete or release it.
            s.release("k", "b").await.unwrap();
            assert!(matches!(s.claim("k", "b", lease).await.unwrap(), Claim::Busy { .. }));
            s.complete("k", "b", Duration::from_secs(60)).await.unwrap();
            assert!(matches!(s.claim("k", "b", lease).await.unwrap(), Claim::Busy { .. }));
            // A crash while "x" is held: its lease is gone with the process.
            assert_eq!(s.claim("x", "a", lease).await.unwrap(), Claim::Acquired);
            s.complete("k", "a", Duration::from_secs(60)).await.unwrap();
            assert_eq!(s.claim("k", "b", lease).await.unwrap(), Claim::Done);
            s.close();
        }
        let s = FileStore::open(&path).unwrap();
        assert_eq!(s.claim("k", "b", Duration::from_secs(5)).await.unwrap(), Claim::Done);
        assert_eq!(
            s.claim("x", "b", Duration::from_secs(5)).await.unwrap(),
            Claim::Acquired
        );
    }
}
