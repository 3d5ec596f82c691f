//! Idempotency records in an embedded redb file (the default): they survive
//! restarts. Writes go through group commit, so a claim is durable before
//! the handler runs.

use super::{ms, Claim, GateError, IdempotencyStore, Record};
use crate::future::BoxFuture;
use crate::message::now_ms;
use crate::storage::{failed, open_database, GroupCommit, StorageError};
use redb::{ReadableTable, TableDefinition, WriteTransaction};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// (expiry, key): lets expired records be purged without a full scan.
const BY_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("by_expiry");
/// Expired records purged per write, at most.
const PURGE_PER_WRITE: usize = 16;

pub struct FileStore {
    writer: GroupCommit,
}

impl FileStore {
    pub fn open(path: &Path) -> Result<Self, GateError> {
        let db = Arc::new(open_database(path)?);
        let txn = db.begin_write().map_err(failed)?;
        txn.open_table(RECORDS).map_err(failed)?;
        txn.open_table(BY_EXPIRY).map_err(failed)?;
        txn.commit().map_err(failed)?;
        Ok(Self {
            writer: GroupCommit::start(db, "idempotency")?,
        })
    }

    pub fn close(&self) {
        self.writer.close();
    }

    async fn update(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Record>, u64) -> (Option<Option<Record>>, Claim) + Send + 'static,
    ) -> Result<Claim, GateError> {
        let key = key.to_owned();
        Ok(self.writer.run(move |txn| update_in(txn, &key, f)).await?)
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
        let owner = owner.to_owned();
        Box::pin(self.update(key, move |old, now| match Record::claim_result(old, now) {
            Some(found) => (None, found),
            None => (
                Some(Some(Record {
                    done: false,
                    owner,
                    expires_ms: now + ms(lease),
                })),
                Claim::Acquired,
            ),
        }))
    }

    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>> {
        let owner = owner.to_owned();
        Box::pin(async move {
            self.update(key, move |old, now| {
                let new = Record::held_by(old, &owner, now).then(|| {
                    Some(Record {
                        done: true,
                        owner,
                        expires_ms: now + ms(ttl),
                    })
                });
                (new, Claim::Acquired)
            })
            .await
            .map(|_| ())
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>> {
        let owner = owner.to_owned();
        Box::pin(async move {
            self.update(key, move |old, now| {
                let new = (old.is_some() && Record::held_by(old, &owner, now)).then_some(None);
                (new, Claim::Acquired)
            })
            .await
            .map(|_| ())
        })
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
}
