//! Idempotency records in a NATS JetStream key-value bucket, shared by
//! several sluice replicas that already talk to NATS (no Redis needed).
//!
//! Each key holds a [`Record`] (JSON) with its own expiry: in progress
//! (`owner`, until the lease ends) or done (until the TTL ends). Every
//! change is a compare-and-set on the key's revision (`create` when absent,
//! `update` at the revision read), so two replicas racing for one key never
//! both acquire it. The bucket's `max_age` only purges old records; the
//! expiry in the record decides. Lease expiry compares the replicas' clocks:
//! keep them in sync (NTP), as for any lease.

use super::{ms, Claim, GateError, IdempotencyStore, Record};
use crate::future::BoxFuture;
use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Compare-and-set attempts before a claim answers `Busy` (another replica
/// keeps changing the key; the caller tries again later).
const RACES: usize = 4;
/// Encoded keys longer than this are hashed: NATS subjects are bounded.
const MAX_KEY: usize = 200;

/// Why the bucket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum NatsKvError {
    #[error("opening the key-value bucket `{bucket}`: {reason}")]
    Bucket { bucket: String, reason: String },
    #[error("reading `{key}`: {reason}")]
    Read { key: String, reason: String },
    #[error("writing `{key}`: {reason}")]
    Write { key: String, reason: String },
}

pub struct NatsKvStore {
    kv: kv::Store,
    jetstream: async_nats::jetstream::Context,
    bucket: String,
    /// The revision each lease this process holds was written at, so its
    /// completion is one compare-and-set without reading the key first.
    held: std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
}

/// Leases remembered at most (beyond, a completion reads the key first).
const MAX_HELD: usize = 65_536;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(ms).unwrap_or(0)
}

/// A bucket key for an idempotency key. Producers choose idempotency keys,
/// and a KV key allows only `[-/_=.a-zA-Z0-9]`: base64url of the bytes,
/// hashed when long, so any key maps to a valid, bounded one.
pub fn bucket_key(key: &str) -> String {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key.as_bytes());
    if encoded.len() <= MAX_KEY {
        format!("k{encoded}")
    } else {
        format!("h{}", hex::encode(Sha256::digest(key.as_bytes())))
    }
}

/// The current record and the revision a write must expect (0: none).
struct Read {
    record: Option<Record>,
    revision: u64,
}

enum Write {
    Done(u64),
    /// Another replica changed the key since it was read.
    Raced,
}

impl NatsKvStore {
    /// Opens `bucket`, creating it (file storage, one value per key,
    /// records purged after `max_age`) when it does not exist.
    pub async fn open(
        jetstream: &async_nats::jetstream::Context,
        bucket: &str,
        max_age: Duration,
    ) -> Result<Self, GateError> {
        let failed = |reason: String| {
            GateError::NatsKv(std::sync::Arc::new(NatsKvError::Bucket {
                bucket: bucket.to_owned(),
                reason,
            }))
        };
        let kv = match jetstream.get_key_value(bucket).await {
            Ok(kv) => {
                let store = Self {
                    kv,
                    jetstream: jetstream.clone(),
                    bucket: bucket.to_owned(),
                    held: Default::default(),
                };
                store.keep_for(max_age).await;
                return Ok(store);
            }
            Err(_) => {
                // The bucket's stream, as the client library's
                // `create_key_value` declares it; declared directly because
                // that call first asks for the account's info, which it
                // cannot parse from nats-server 2.9.
                jetstream
                    .get_or_create_stream(async_nats::jetstream::stream::Config {
                        name: format!("KV_{bucket}"),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        max_age,
                        max_message_size: 4096,
                        storage: async_nats::jetstream::stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        allow_direct: true,
                        discard: async_nats::jetstream::stream::DiscardPolicy::New,
                        num_replicas: 1,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                jetstream
                    .get_key_value(bucket)
                    .await
                    .map_err(|e| failed(e.to_string()))?
            }
        };
        Ok(Self {
            kv,
            jetstream: jetstream.clone(),
            bucket: bucket.to_owned(),
            held: Default::default(),
        })
    }

    /// Makes the bucket keep records at least `max_age` (the longest ttl of
    /// the routes using it, which a reload may raise): a shorter `max_age`
    /// is raised, never lowered (other configs may share the bucket). Only
    /// `max_age` changes: the stream's config is patched as the server sent
    /// it, so settings this client does not know (compression, metadata,
    /// message TTLs) stay as they are.
    pub async fn keep_for(&self, max_age: Duration) {
        let bucket = self.bucket.as_str();
        let name = format!("KV_{bucket}");
        let info: serde_json::Value = match self
            .jetstream
            .request(format!("STREAM.INFO.{name}"), &serde_json::json!({}))
            .await
        {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(bucket, "reading the bucket's settings: {e}");
                return;
            }
        };
        let Some(mut config) = info.get("config").cloned() else {
            tracing::warn!(
                bucket,
                "reading the bucket's settings: {}",
                info.get("error").unwrap_or(&info)
            );
            return;
        };
        let wanted = u64::try_from(max_age.as_nanos()).unwrap_or(u64::MAX);
        let was = config.get("max_age").and_then(serde_json::Value::as_u64).unwrap_or(0);
        if was == 0 {
            tracing::warn!(
                bucket,
                "the bucket keeps records forever (no max age): expired records are only overwritten, never purged, so it grows with every distinct key"
            );
            return;
        }
        if was >= wanted {
            return;
        }
        config["max_age"] = serde_json::Value::from(wanted);
        let secs = |nanos: u64| nanos / 1_000_000_000;
        let updated: Result<serde_json::Value, _> =
            self.jetstream.request(format!("STREAM.UPDATE.{name}"), &config).await;
        match updated {
            Ok(answer) if answer.get("error").is_none() => tracing::info!(
                bucket,
                "records kept {} s (was {} s): the longest idempotency ttl",
                secs(wanted),
                secs(was)
            ),
            answer => tracing::warn!(
                bucket,
                "the bucket forgets records after {} s, sooner than the longest idempotency ttl ({} s), and raising it failed ({}): a duplicate arriving later runs again",
                secs(was),
                secs(wanted),
                match answer {
                    Ok(a) => a.get("error").map(ToString::to_string).unwrap_or_default(),
                    Err(e) => e.to_string(),
                }
            ),
        }
    }

    async fn read(&self, key: &str) -> Result<Read, GateError> {
        let entry = self.kv.entry(key).await.map_err(|e| {
            GateError::NatsKv(std::sync::Arc::new(NatsKvError::Read {
                key: key.to_owned(),
                reason: e.to_string(),
            }))
        })?;
        let Some(entry) = entry else {
            return Ok(Read {
                record: None,
                revision: 0,
            });
        };
        if entry.operation != Operation::Put {
            // Deleted or purged: absent, but a write must expect this revision.
            return Ok(Read {
                record: None,
                revision: entry.revision,
            });
        }
        match serde_json::from_slice::<Record>(&entry.value) {
            Ok(record) => Ok(Read {
                record: Some(record),
                revision: entry.revision,
            }),
            // Not a record (another tool's value, or damaged): as if absent,
            // so a compare-and-set replaces it. Refusing it would redeliver
            // the key's messages forever, never handled nor dead-lettered.
            Err(e) => {
                tracing::warn!(bucket = %self.bucket, key, "a value sluice did not write, replaced: {e}");
                Ok(Read {
                    record: None,
                    revision: entry.revision,
                })
            }
        }
    }

    /// Writes `record` if the key is still at `revision` (0: absent).
    async fn write(&self, key: &str, record: &Record, revision: u64) -> Result<Write, GateError> {
        let value = Bytes::from(serde_json::to_vec(record).unwrap_or_default());
        let failed = |reason: String| {
            GateError::NatsKv(std::sync::Arc::new(NatsKvError::Write {
                key: key.to_owned(),
                reason,
            }))
        };
        if revision == 0 {
            return match self.kv.create(key, value).await {
                Ok(revision) => Ok(Write::Done(revision)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(Write::Raced),
                Err(e) => Err(failed(e.to_string())),
            };
        }
        match self.kv.update(key, value, revision).await {
            Ok(revision) => Ok(Write::Done(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(Write::Raced),
            Err(e) => Err(failed(e.to_string())),
        }
    }

    /// Reads `key` and writes the record `next` makes of what it holds (at
    /// `now`), by compare-and-set, until a write lands: its revision. `next`
    /// answers `Err` to write nothing; `None` after [`RACES`] lost races.
    async fn change<T>(
        &self,
        key: &str,
        next: impl Fn(Option<&Record>, u64) -> Result<Record, T>,
    ) -> Result<Option<Result<u64, T>>, GateError> {
        for _ in 0..RACES {
            let read = self.read(key).await?;
            let record = match next(read.record.as_ref(), now_ms()) {
                Ok(record) => record,
                Err(answer) => return Ok(Some(Err(answer))),
            };
            if let Write::Done(revision) = self.write(key, &record, read.revision).await? {
                return Ok(Some(Ok(revision)));
            }
        }
        Ok(None)
    }

    fn remember(&self, key: &str, owner: &str, revision: u64) {
        if let Ok(mut held) = self.held.lock() {
            if held.len() < MAX_HELD {
                held.insert(key.to_owned(), (owner.to_owned(), revision));
            }
        }
    }

    /// The revision `owner`'s lease on `key` was written at, forgotten.
    fn recall(&self, key: &str, owner: &str) -> Option<u64> {
        let mut held = self.held.lock().ok()?;
        match held.remove(key) {
            Some((o, revision)) if o == owner => Some(revision),
            Some(other) => {
                held.insert(key.to_owned(), other);
                None
            }
            None => None,
        }
    }
}

impl IdempotencyStore for NatsKvStore {
    fn claim<'a>(&'a self, key: &'a str, owner: &'a str, lease: Duration) -> BoxFuture<'a, Result<Claim, GateError>> {
        Box::pin(async move {
            let key = bucket_key(key);
            let record = |now: u64| Record {
                done: false,
                owner: owner.to_owned(),
                expires_ms: now.saturating_add(ms(lease).max(1)),
            };
            // Most keys are new: created in one round trip, read only if not.
            if let Write::Done(revision) = self.write(&key, &record(now_ms()), 0).await? {
                self.remember(&key, owner, revision);
                return Ok(Claim::Acquired);
            }
            let changed = self
                .change(&key, |current, now| match Record::claim_result(current, now) {
                    Some(answer) => Err(answer),
                    None => Ok(record(now)),
                })
                .await?;
            Ok(match changed {
                Some(Ok(revision)) => {
                    self.remember(&key, owner, revision);
                    Claim::Acquired
                }
                Some(Err(answer)) => answer,
                None => Claim::Busy {
                    retry_in: Duration::from_millis(100),
                },
            })
        })
    }

    fn complete<'a>(&'a self, key: &'a str, owner: &'a str, ttl: Duration) -> BoxFuture<'a, Result<(), GateError>> {
        Box::pin(async move {
            let key = bucket_key(key);
            let record = |now: u64| Record {
                done: true,
                owner: owner.to_owned(),
                expires_ms: now.saturating_add(ms(ttl).max(1)),
            };
            // Unchanged since our claim wrote it: still ours.
            if let Some(revision) = self.recall(&key, owner) {
                if let Write::Done(_) = self.write(&key, &record(now_ms()), revision).await? {
                    return Ok(());
                }
            }
            // Done already, or another owner's live lease: theirs.
            let changed = self
                .change(&key, |current, now| {
                    if Record::held_by(current, owner, now) {
                        Ok(record(now))
                    } else {
                        Err(())
                    }
                })
                .await?;
            if changed.is_some() {
                return Ok(());
            }
            Err(GateError::NatsKv(std::sync::Arc::new(NatsKvError::Write {
                key,
                reason: "the key kept changing under other replicas".into(),
            })))
        })
    }

    fn release<'a>(&'a self, key: &'a str, owner: &'a str) -> BoxFuture<'a, Result<(), GateError>> {
        Box::pin(async move {
            let key = bucket_key(key);
            let _ = self.recall(&key, owner);
            let read = self.read(&key).await?;
            let ours = read.record.as_ref().is_some_and(|r| !r.done && r.owner == owner);
            if !ours {
                return Ok(());
            }
            // An expired lease frees the key: no delete marker to race with.
            let free = Record {
                done: false,
                owner: String::new(),
                expires_ms: 0,
            };
            // Raced: someone else holds it now (our lease had run out).
            let _ = self.write(&key, &free, read.revision).await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_key_maps_to_a_valid_bounded_bucket_key() {
        let valid = |k: &str| {
            !k.is_empty()
                && k.len() <= MAX_KEY + 1
                && k.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_=.".contains(&b))
                && !k.starts_with('.')
                && !k.ends_with('.')
        };
        for key in [
            "",
            "o-1",
            "a.b.*.>",
            "with space",
            "ünïcödé",
            "\0\n\r",
            &"x".repeat(10_000),
        ] {
            let k = bucket_key(key);
            assert!(valid(&k), "{key:?} -> {k:?}");
        }
        // Distinct keys stay distinct (short ones are encoded, not hashed).
        assert_ne!(bucket_key("a"), bucket_key("b"));
        assert_ne!(bucket_key(&"x".repeat(500)), bucket_key(&"x".repeat(501)));
    }
}
