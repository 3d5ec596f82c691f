//! Persistent storage of the embedded broker: one redb file; queues of
//! messages keyed by (queue, sequence), written through group commit.
//!
//! An in-memory index per queue orders ready messages by (not-before, seq) and
//! tracks which are in flight; it is rebuilt from the file at start, so every
//! message that was in flight when the process died is delivered again.

use super::subject_bindings::Bindings;
use crate::message::{find_header, now_ms, Header, Outbound, DEDUP_HEADER};
use crate::storage::{failed, open_database, GroupCommit, StorageError};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::Notify;

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Publish dedup ids (`Nats-Msg-Id`) seen within the duplicate window.
const DEDUP: TableDefinition<&str, u64> = TableDefinition::new("dedup");
const DEDUP_BY_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("dedup_by_expiry");
const NEXT_SEQ: &str = "next_seq";

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("embedded broker")]
    Storage(#[from] StorageError),
    #[error("embedded broker: message {queue}#{seq} no longer exists")]
    Gone { queue: String, seq: u64 },
}

fn storage(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Storage(failed(e))
}

/// A message as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub subject: String,
    pub headers: Vec<Header>,
    pub payload: Vec<u8>,
    pub attempt: u32,
    pub published_ms: u64,
    pub not_before_ms: u64,
}

impl Stored {
    fn encode(&self) -> Result<Vec<u8>, StoreError> {
        postcard::to_stdvec(self).map_err(storage)
    }
    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        postcard::from_bytes(bytes).map_err(storage)
    }
    fn new(msg: &Outbound, now: u64) -> Self {
        Self {
            subject: msg.subject.clone(),
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
            attempt: 1,
            published_ms: now,
            not_before_ms: now,
        }
    }
}

/// Per-queue view of what is ready, delayed and in flight.
#[derive(Default)]
pub struct QueueIndex {
    ready: BTreeSet<(u64, u64)>,
    in_flight: HashSet<u64>,
    /// Handled, their removal queued for the next commit.
    settling: HashSet<u64>,
    pub notify: Arc<Notify>,
}

impl QueueIndex {
    pub fn len(&self) -> usize {
        self.ready.len() + self.in_flight.len() + self.settling.len()
    }
    /// Taken by a consumer and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    pub fn settling(&self) -> usize {
        self.settling.len()
    }
    /// Messages whose redelivery time is still ahead.
    pub fn delayed(&self, now: u64) -> usize {
        self.ready.range((now + 1, 0)..).count()
    }
}

/// What the index learns after a commit.
enum Effect {
    Insert { queue: String, seq: u64, not_before: u64 },
    Remove { queue: String, seq: u64, not_before: u64 },
    Reschedule { queue: String, seq: u64, not_before: u64 },
}

pub enum Op {
    /// Routes each message to every queue bound to its subject; a message
    /// whose dedup id was seen within the window is dropped.
    Publish(Vec<Outbound>),
    /// Puts messages straight into one queue, attempt 1, and removes `remove`
    /// from queue `from` in the same transaction (replay of dead letters).
    Move {
        queue: String,
        messages: Vec<Outbound>,
        from: String,
        remove: Vec<u64>,
    },
    Remove {
        queue: String,
        seq: u64,
    },
    Retry {
        queue: String,
        seq: u64,
        not_before_ms: u64,
    },
}

/// What a committed op reports.
#[derive(Debug, Default, Clone)]
pub struct OpReport {
    /// Queues reached by a publish.
    pub queues: Vec<String>,
    /// Messages dropped as duplicates by their dedup id.
    pub duplicates: usize,
}

type Index = Arc<Mutex<HashMap<String, QueueIndex>>>;

/// Acks whose commit is not awaited, at most, across the broker.
const MAX_SETTLING: usize = 1024;

pub struct Store {
    db: Arc<Database>,
    writer: GroupCommit,
    /// Removals queued without waiting for their commit, bounded: past the
    /// bound an ack waits for its commit (backpressure on a slow disk).
    pub(super) settle_permits: Arc<tokio::sync::Semaphore>,
    pub(super) index: Index,
    pub(super) bindings: Arc<RwLock<Bindings>>,
    duplicate_window: Duration,
}

impl Store {
    pub fn open(path: &Path, duplicate_window: Duration) -> Result<Arc<Self>, StoreError> {
        let db = Arc::new(open_database(path)?);
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(MESSAGES).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
        txn.open_table(DEDUP).map_err(storage)?;
        txn.open_table(DEDUP_BY_EXPIRY).map_err(storage)?;
        txn.commit().map_err(storage)?;

        let mut index: HashMap<String, QueueIndex> = HashMap::new();
        {
            let read = db.begin_read().map_err(storage)?;
            let table = read.open_table(MESSAGES).map_err(storage)?;
            for entry in table.iter().map_err(storage)? {
                let (key, value) = entry.map_err(storage)?;
                let (queue, seq) = key.value();
                let stored = Stored::decode(value.value())?;
                index
                    .entry(queue.to_owned())
                    .or_default()
                    .ready
                    .insert((stored.not_before_ms, seq));
            }
        }
        let writer = GroupCommit::start(db.clone(), "embedded")?;
        Ok(Arc::new(Self {
            db,
            writer,
            settle_permits: Arc::new(tokio::sync::Semaphore::new(MAX_SETTLING)),
            index: Arc::new(Mutex::new(index)),
            bindings: Arc::new(RwLock::new(Bindings::default())),
            duplicate_window,
        }))
    }

    /// Commits `op` (group commit) and updates the index.
    pub async fn submit(&self, op: Op) -> Result<OpReport, StoreError> {
        self.enqueue(op)?.await
    }

    /// Queues `op` for the next commit now; the future ends once it is
    /// committed and the index updated.
    pub fn enqueue(
        &self,
        op: Op,
    ) -> Result<impl std::future::Future<Output = Result<OpReport, StoreError>> + Send + 'static, StoreError> {
        let bindings = self.bindings.clone();
        let index = self.index.clone();
        let window = self.duplicate_window;
        let committed = self
            .writer
            .enqueue(move |txn| Ok(apply_op(txn, op, &bindings, &index, window)))?;
        let index = self.index.clone();
        Ok(async move {
            let (report, effects) = committed.await?;
            let report = report?;
            apply_effects(&index, effects);
            Ok(report)
        })
    }

    /// Returns once every write queued before it is committed (acks are
    /// queued without waiting for their commit).
    pub async fn sync(&self) -> Result<(), StoreError> {
        Ok(self.writer.run(|_| Ok(())).await?)
    }

    /// Stops accepting writes; queued ones still commit.
    pub fn close(&self) {
        self.writer.close();
    }

    /// Reads one stored message.
    pub fn read(&self, queue: &str, seq: u64) -> Result<Option<Stored>, StoreError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(MESSAGES).map_err(storage)?;
        let value = table.get((queue, seq)).map_err(storage)?;
        value.map(|v| Stored::decode(v.value())).transpose()
    }

    /// The first `limit` messages of a queue in sequence order.
    pub fn list(&self, queue: &str, limit: usize) -> Result<Vec<(u64, Stored)>, StoreError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(MESSAGES).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table.range((queue, 0)..=(queue, u64::MAX)).map_err(storage)? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry.map_err(storage)?;
            out.push((key.value().1, Stored::decode(value.value())?));
        }
        Ok(out)
    }

    /// Takes the next ready message of `queue` (not before its time) and
    /// marks it in flight. `Err(Some(t))`: nothing until `t` (ms); `Err(None)`:
    /// empty.
    pub fn take_ready(&self, queue: &str, now: u64) -> Result<u64, Option<u64>> {
        let mut index = self.index.lock().map_err(|_| None)?;
        let q = index.entry(queue.to_owned()).or_default();
        let Some(&(not_before, seq)) = q.ready.first() else {
            return Err(None);
        };
        if not_before > now {
            return Err(Some(not_before));
        }
        q.ready.remove(&(not_before, seq));
        q.in_flight.insert(seq);
        Ok(seq)
    }

    /// Hands an unsettled in-flight message back (delivery dropped).
    /// Marks a taken message as handled, its removal queued.
    pub fn settling(&self, queue: &str, seq: u64) {
        if let Ok(mut index) = self.index.lock() {
            if let Some(q) = index.get_mut(queue) {
                if q.in_flight.remove(&seq) {
                    q.settling.insert(seq);
                }
            }
        }
    }

    /// Drops a taken seq whose message is gone (trimmed or moved meanwhile).
    pub fn forget(&self, queue: &str, seq: u64) {
        if let Ok(mut index) = self.index.lock() {
            if let Some(q) = index.get_mut(queue) {
                q.in_flight.remove(&seq);
                q.settling.remove(&seq);
            }
        }
    }

    pub fn release(&self, queue: &str, seq: u64) {
        if let Ok(mut index) = self.index.lock() {
            if let Some(q) = index.get_mut(queue) {
                if q.in_flight.remove(&seq) || q.settling.remove(&seq) {
                    q.ready.insert((0, seq));
                    q.notify.notify_waiters();
                }
            }
        }
    }

    /// Messages in `queue` not yet removed (ready, delayed, in flight), and
    /// when the oldest of them was published (sequences only grow, so the
    /// lowest is the oldest).
    pub fn backlog(&self, queue: &str) -> Option<(usize, Option<u64>)> {
        let (len, lowest) = {
            let index = self.index.lock().ok()?;
            match index.get(queue) {
                None => (0, None),
                Some(q) => {
                    let lowest = q
                        .ready
                        .iter()
                        .map(|(_, seq)| *seq)
                        .chain(q.in_flight.iter().copied())
                        .chain(q.settling.iter().copied())
                        .min();
                    (q.len(), lowest)
                }
            }
        };
        // Read failed or the message went meanwhile: the count stands alone.
        let oldest = lowest.and_then(|seq| self.read(queue, seq).ok().flatten().map(|m| m.published_ms));
        Some((len, oldest))
    }

    pub fn notifier(&self, queue: &str) -> Arc<Notify> {
        match self.index.lock() {
            Ok(mut index) => index.entry(queue.to_owned()).or_default().notify.clone(),
            Err(_) => Arc::new(Notify::new()),
        }
    }
}

/// Runs one op inside the batch transaction. Returns the op's own result and
/// the index effects to apply once the batch is committed.
fn apply_op(
    txn: &WriteTransaction,
    op: Op,
    bindings: &RwLock<Bindings>,
    index: &Index,
    window: Duration,
) -> (Result<OpReport, StoreError>, Vec<Effect>) {
    let mut effects = Vec::new();
    let result = (|| {
        let mut messages = txn.open_table(MESSAGES).map_err(storage)?;
        match op {
            Op::Publish(outbound) => {
                let bindings = bindings.read().map_err(|_| storage("bindings lock poisoned"))?;
                let mut report = OpReport::default();
                let now = now_ms();
                let mut seqs = Sequences::open(txn)?;
                let mut dedup = Dedup::open(txn, now, window)?;
                for msg in &outbound {
                    if let Some(id) = find_header(&msg.headers, DEDUP_HEADER) {
                        if !dedup.first_time(id)? {
                            report.duplicates += 1;
                            continue;
                        }
                    }
                    let bytes = Stored::new(msg, now).encode()?;
                    for (queue, max_len) in bindings.queues_for(&msg.subject) {
                        let seq = seqs.next();
                        messages.insert((queue, seq), bytes.as_slice()).map_err(storage)?;
                        effects.push(Effect::Insert {
                            queue: queue.to_owned(),
                            seq,
                            not_before: now,
                        });
                        if let Some(max) = max_len {
                            trim(&mut messages, index, queue, max, &mut effects)?;
                        }
                        if !report.queues.iter().any(|q| q == queue) {
                            report.queues.push(queue.to_owned());
                        }
                    }
                }
                seqs.save()?;
                Ok(report)
            }
            Op::Move {
                queue,
                messages: outbound,
                from,
                remove,
            } => {
                let now = now_ms();
                let mut seqs = Sequences::open(txn)?;
                for msg in &outbound {
                    let seq = seqs.next();
                    messages
                        .insert((queue.as_str(), seq), Stored::new(msg, now).encode()?.as_slice())
                        .map_err(storage)?;
                    effects.push(Effect::Insert {
                        queue: queue.clone(),
                        seq,
                        not_before: now,
                    });
                }
                seqs.save()?;
                for seq in remove {
                    if let Some(old) = messages.remove((from.as_str(), seq)).map_err(storage)? {
                        let not_before = Stored::decode(old.value())?.not_before_ms;
                        effects.push(Effect::Remove {
                            queue: from.clone(),
                            seq,
                            not_before,
                        });
                    }
                }
                Ok(OpReport {
                    queues: vec![queue],
                    duplicates: 0,
                })
            }
            Op::Remove { queue, seq } => {
                let old = messages.remove((queue.as_str(), seq)).map_err(storage)?;
                let not_before = match old {
                    Some(old) => Stored::decode(old.value())?.not_before_ms,
                    None => return Err(StoreError::Gone { queue, seq }),
                };
                effects.push(Effect::Remove { queue, seq, not_before });
                Ok(OpReport::default())
            }
            Op::Retry {
                queue,
                seq,
                not_before_ms,
            } => {
                let old = messages
                    .get((queue.as_str(), seq))
                    .map_err(storage)?
                    .map(|v| Stored::decode(v.value()))
                    .transpose()?;
                let Some(mut stored) = old else {
                    return Err(StoreError::Gone { queue, seq });
                };
                stored.attempt = stored.attempt.saturating_add(1);
                stored.not_before_ms = not_before_ms;
                messages
                    .insert((queue.as_str(), seq), stored.encode()?.as_slice())
                    .map_err(storage)?;
                effects.push(Effect::Reschedule {
                    queue,
                    seq,
                    not_before: not_before_ms,
                });
                Ok(OpReport::default())
            }
        }
    })();
    if result.is_err() {
        effects.clear();
    }
    (result, effects)
}

/// The global message sequence, read and saved once per op.
struct Sequences<'t> {
    meta: redb::Table<'t, &'static str, u64>,
    next: u64,
}

impl<'t> Sequences<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        let meta = txn.open_table(META).map_err(storage)?;
        let next = meta.get(NEXT_SEQ).map_err(storage)?.map(|v| v.value()).unwrap_or(1);
        Ok(Self { meta, next })
    }
    fn next(&mut self) -> u64 {
        let seq = self.next;
        self.next += 1;
        seq
    }
    fn save(mut self) -> Result<(), StoreError> {
        self.meta.insert(NEXT_SEQ, self.next).map_err(storage)?;
        Ok(())
    }
}

/// Publish dedup ids within the duplicate window; expired ones are purged as
/// publishes go by.
struct Dedup<'t> {
    ids: redb::Table<'t, &'static str, u64>,
    by_expiry: redb::Table<'t, (u64, &'static str), ()>,
    now: u64,
    window_ms: u64,
}

impl<'t> Dedup<'t> {
    fn open(txn: &'t WriteTransaction, now: u64, window: Duration) -> Result<Self, StoreError> {
        let mut ids = txn.open_table(DEDUP).map_err(storage)?;
        let mut by_expiry = txn.open_table(DEDUP_BY_EXPIRY).map_err(storage)?;
        let expired: Vec<(u64, String)> = by_expiry
            .range((0, "")..(now, ""))
            .map_err(storage)?
            .take(256)
            .filter_map(|e| e.ok().map(|(k, _)| (k.value().0, k.value().1.to_owned())))
            .collect();
        for (at, id) in expired {
            by_expiry.remove((at, id.as_str())).map_err(storage)?;
            ids.remove(id.as_str()).map_err(storage)?;
        }
        Ok(Self {
            ids,
            by_expiry,
            now,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Records `id`; false if it was seen within the window.
    fn first_time(&mut self, id: &str) -> Result<bool, StoreError> {
        if let Some(expiry) = self.ids.get(id).map_err(storage)?.map(|v| v.value()) {
            if expiry > self.now {
                return Ok(false);
            }
            self.by_expiry.remove((expiry, id)).map_err(storage)?;
        }
        let expiry = self.now.saturating_add(self.window_ms);
        self.ids.insert(id, expiry).map_err(storage)?;
        self.by_expiry.insert((expiry, id), ()).map_err(storage)?;
        Ok(true)
    }
}

/// Drops the oldest messages of a capped queue (never one in flight).
fn trim(
    messages: &mut redb::Table<(&str, u64), &[u8]>,
    index: &Index,
    queue: &str,
    max: u64,
    effects: &mut Vec<Effect>,
) -> Result<(), StoreError> {
    let (indexed, in_flight) = match index.lock() {
        Ok(index) => index
            .get(queue)
            // Settling messages are on their way out (their removal may be
            // committed already, its effect not yet applied): counting them
            // would trim unhandled messages for them.
            .map(|q| ((q.ready.len() + q.in_flight.len()) as i64, q.in_flight.clone()))
            .unwrap_or_default(),
        Err(_) => return Ok(()),
    };
    // Effects of this batch are not in the index yet.
    let pending: i64 = effects
        .iter()
        .map(|e| match e {
            Effect::Insert { queue: q, .. } if q == queue => 1,
            Effect::Remove { queue: q, .. } if q == queue => -1,
            _ => 0,
        })
        .sum();
    let excess = indexed + pending - i64::try_from(max).unwrap_or(i64::MAX);
    if excess <= 0 {
        return Ok(());
    }
    let mut victims = Vec::new();
    for entry in messages.range((queue, 0)..=(queue, u64::MAX)).map_err(storage)? {
        if victims.len() as i64 >= excess {
            break;
        }
        let (key, value) = entry.map_err(storage)?;
        let seq = key.value().1;
        if !in_flight.contains(&seq) {
            victims.push((seq, Stored::decode(value.value())?.not_before_ms));
        }
    }
    for (seq, not_before) in victims {
        messages.remove((queue, seq)).map_err(storage)?;
        effects.push(Effect::Remove {
            queue: queue.to_owned(),
            seq,
            not_before,
        });
    }
    Ok(())
}

fn apply_effects(index: &Index, effects: Vec<Effect>) {
    let Ok(mut index) = index.lock() else {
        return;
    };
    let mut touched: HashSet<String> = HashSet::new();
    for effect in effects {
        match effect {
            Effect::Insert { queue, seq, not_before } => {
                index.entry(queue.clone()).or_default().ready.insert((not_before, seq));
                touched.insert(queue);
            }
            Effect::Remove { queue, seq, not_before } => {
                if let Some(q) = index.get_mut(&queue) {
                    if !q.in_flight.remove(&seq) && !q.settling.remove(&seq) {
                        q.ready.remove(&(not_before, seq));
                        // A released message was re-queued at time 0.
                        q.ready.remove(&(0, seq));
                    }
                }
            }
            Effect::Reschedule { queue, seq, not_before } => {
                let q = index.entry(queue.clone()).or_default();
                q.in_flight.remove(&seq);
                q.settling.remove(&seq);
                q.ready.insert((not_before, seq));
                touched.insert(queue);
            }
        }
    }
    for queue in touched {
        if let Some(q) = index.get(&queue) {
            q.notify.notify_waiters();
        }
    }
}
