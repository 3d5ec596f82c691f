//! Persistent storage of the embedded broker: one redb file; queues of
//! messages keyed by (queue, sequence). All writes go through one writer
//! thread that commits whatever has queued up in a single fsync'd transaction
//! (group commit), and replies only after the commit: a caller that got `Ok`
//! knows its change survives a crash.
//!
//! An in-memory index per queue orders ready messages by (not-before, seq) and
//! tracks which are in flight; it is rebuilt from the file at start, so every
//! message that was in flight when the process died is delivered again.

use super::subject_bindings::Bindings;
use crate::message::{now_ms, Header, Outbound};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use tokio::sync::{oneshot, Notify};

const MESSAGES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("messages");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT_SEQ: &str = "next_seq";
/// Upper bound of operations folded into one transaction.
const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("embedded broker storage: {0}")]
    Storage(String),
    #[error("embedded broker: message {queue}#{seq} no longer exists")]
    Gone { queue: String, seq: u64 },
    #[error("embedded broker is closed")]
    Closed,
}

fn storage<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Storage(e.to_string())
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
}

/// Per-queue view of what is ready, delayed and in flight.
#[derive(Default)]
pub struct QueueIndex {
    ready: BTreeSet<(u64, u64)>,
    in_flight: HashSet<u64>,
    pub notify: Arc<Notify>,
}

impl QueueIndex {
    pub fn len(&self) -> usize {
        self.ready.len() + self.in_flight.len()
    }
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
    /// Messages whose redelivery time is still ahead.
    pub fn delayed(&self, now: u64) -> usize {
        self.ready.range((now + 1, 0)..).count()
    }
}

/// What the index needs to learn after a commit.
enum Effect {
    Insert {
        queue: String,
        seq: u64,
        not_before: u64,
    },
    Remove {
        queue: String,
        seq: u64,
        not_before: u64,
    },
    Reschedule {
        queue: String,
        seq: u64,
        not_before: u64,
    },
}

pub enum Op {
    /// Routes each message to every queue bound to its subject.
    Publish(Vec<Outbound>),
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

/// What a successful op returns: for a publish, the queues it reached.
pub type OpResult = Vec<String>;

struct Job {
    op: Op,
    done: oneshot::Sender<Result<OpResult, StoreError>>,
}

pub struct Store {
    db: Arc<Database>,
    pub(super) index: Mutex<HashMap<String, QueueIndex>>,
    pub(super) bindings: RwLock<Bindings>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

impl Store {
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(storage)?;
        }
        let db = Database::create(path)
            .map_err(|e| StoreError::Storage(format!("{}: {e}", path.display())))?;
        let db = Arc::new(db);
        // Make sure the tables exist, then rebuild the index.
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(MESSAGES).map_err(storage)?;
        txn.open_table(META).map_err(storage)?;
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
        let (tx, rx) = mpsc::channel::<Job>();
        let store = Arc::new(Self {
            db,
            index: Mutex::new(index),
            bindings: RwLock::new(Bindings::default()),
            jobs: Mutex::new(Some(tx)),
        });
        let writer = Arc::downgrade(&store);
        std::thread::Builder::new()
            .name("sluice-embedded-writer".into())
            .spawn(move || writer_loop(writer, rx))
            .map_err(storage)?;
        Ok(store)
    }

    /// Queues `op` for the writer and waits for its commit.
    pub async fn submit(&self, op: Op) -> Result<OpResult, StoreError> {
        let (done, wait) = oneshot::channel();
        {
            let jobs = self.jobs.lock().map_err(|_| StoreError::Closed)?;
            let tx = jobs.as_ref().ok_or(StoreError::Closed)?;
            tx.send(Job { op, done }).map_err(|_| StoreError::Closed)?;
        }
        wait.await.map_err(|_| StoreError::Closed)?
    }

    /// Stops accepting writes; the writer finishes what is queued and exits.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.jobs.lock() {
            jobs.take();
        }
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
        for entry in table
            .range((queue, 0)..=(queue, u64::MAX))
            .map_err(storage)?
        {
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
    pub fn release(&self, queue: &str, seq: u64) {
        if let Ok(mut index) = self.index.lock() {
            if let Some(q) = index.get_mut(queue) {
                if q.in_flight.remove(&seq) {
                    q.ready.insert((0, seq));
                    q.notify.notify_waiters();
                }
            }
        }
    }

    pub fn notifier(&self, queue: &str) -> Arc<Notify> {
        match self.index.lock() {
            Ok(mut index) => index.entry(queue.to_owned()).or_default().notify.clone(),
            Err(_) => Arc::new(Notify::new()),
        }
    }
}

fn writer_loop(store: std::sync::Weak<Store>, rx: mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let Some(store) = store.upgrade() else {
            for job in batch {
                let _ = job.done.send(Err(StoreError::Closed));
            }
            return;
        };
        commit_batch(&store, batch);
    }
}

fn commit_batch(store: &Store, batch: Vec<Job>) {
    let mut effects = Vec::new();
    let mut results = Vec::with_capacity(batch.len());
    let outcome = (|| -> Result<(), StoreError> {
        let txn = store.db.begin_write().map_err(storage)?;
        {
            let mut messages = txn.open_table(MESSAGES).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let mut next_seq = meta
                .get(NEXT_SEQ)
                .map_err(storage)?
                .map(|v| v.value())
                .unwrap_or(1);
            let bindings = store.bindings.read().map_err(|_| StoreError::Closed)?;
            // Queue length changes of this batch, not yet in the index.
            let mut pending: HashMap<String, i64> = HashMap::new();
            for job in &batch {
                let result = match &job.op {
                    Op::Publish(outbound) => publish(
                        &mut messages,
                        &bindings,
                        outbound,
                        &mut next_seq,
                        &mut effects,
                        &mut pending,
                        store,
                    ),
                    Op::Remove { queue, seq } => {
                        match messages.remove((queue.as_str(), *seq)).map_err(storage)? {
                            Some(old) => {
                                let not_before = Stored::decode(old.value())?.not_before_ms;
                                effects.push(Effect::Remove {
                                    queue: queue.clone(),
                                    seq: *seq,
                                    not_before,
                                });
                                *pending.entry(queue.clone()).or_default() -= 1;
                                Ok(Vec::new())
                            }
                            None => Err(StoreError::Gone {
                                queue: queue.clone(),
                                seq: *seq,
                            }),
                        }
                    }
                    Op::Retry {
                        queue,
                        seq,
                        not_before_ms,
                    } => {
                        let old = messages
                            .get((queue.as_str(), *seq))
                            .map_err(storage)?
                            .map(|v| Stored::decode(v.value()))
                            .transpose()?;
                        match old {
                            Some(mut stored) => {
                                stored.attempt = stored.attempt.saturating_add(1);
                                stored.not_before_ms = *not_before_ms;
                                messages
                                    .insert((queue.as_str(), *seq), stored.encode()?.as_slice())
                                    .map_err(storage)?;
                                effects.push(Effect::Reschedule {
                                    queue: queue.clone(),
                                    seq: *seq,
                                    not_before: *not_before_ms,
                                });
                                Ok(Vec::new())
                            }
                            None => Err(StoreError::Gone {
                                queue: queue.clone(),
                                seq: *seq,
                            }),
                        }
                    }
                };
                results.push(result);
            }
            meta.insert(NEXT_SEQ, next_seq).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    })();

    match outcome {
        Ok(()) => {
            apply(store, effects);
            for (job, result) in batch.into_iter().zip(results) {
                let _ = job.done.send(result);
            }
        }
        Err(e) => {
            tracing::error!("embedded broker commit failed: {e}");
            for job in batch {
                let _ = job.done.send(Err(e.clone()));
            }
        }
    }
}

fn publish(
    messages: &mut redb::Table<(&str, u64), &[u8]>,
    bindings: &Bindings,
    outbound: &[Outbound],
    next_seq: &mut u64,
    effects: &mut Vec<Effect>,
    pending: &mut HashMap<String, i64>,
    store: &Store,
) -> Result<OpResult, StoreError> {
    let now = now_ms();
    let mut reached = Vec::new();
    for msg in outbound {
        let stored = Stored {
            subject: msg.subject.clone(),
            headers: msg.headers.clone(),
            payload: msg.payload.clone(),
            attempt: 1,
            published_ms: now,
            not_before_ms: now,
        };
        let bytes = stored.encode()?;
        for (queue, max_len) in bindings.queues_for(&msg.subject) {
            let seq = *next_seq;
            *next_seq += 1;
            messages
                .insert((queue, seq), bytes.as_slice())
                .map_err(storage)?;
            effects.push(Effect::Insert {
                queue: queue.to_owned(),
                seq,
                not_before: now,
            });
            *pending.entry(queue.to_owned()).or_default() += 1;
            if let Some(max) = max_len {
                trim(messages, store, queue, max, effects, pending)?;
            }
            if !reached.iter().any(|q| q == queue) {
                reached.push(queue.to_owned());
            }
        }
    }
    Ok(reached)
}

/// Drops the oldest messages of a capped queue (never one in flight).
fn trim(
    messages: &mut redb::Table<(&str, u64), &[u8]>,
    store: &Store,
    queue: &str,
    max: u64,
    effects: &mut Vec<Effect>,
    pending: &mut HashMap<String, i64>,
) -> Result<(), StoreError> {
    let (indexed, in_flight) = match store.index.lock() {
        Ok(index) => index
            .get(queue)
            .map(|q| (q.len() as i64, q.in_flight.clone()))
            .unwrap_or_default(),
        Err(_) => return Ok(()),
    };
    let delta = pending.get(queue).copied().unwrap_or(0);
    let excess = indexed + delta - i64::try_from(max).unwrap_or(i64::MAX);
    if excess <= 0 {
        return Ok(());
    }
    let mut victims = Vec::new();
    for entry in messages
        .range((queue, 0)..=(queue, u64::MAX))
        .map_err(storage)?
    {
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
        *pending.entry(queue.to_owned()).or_default() -= 1;
    }
    Ok(())
}

fn apply(store: &Store, effects: Vec<Effect>) {
    let Ok(mut index) = store.index.lock() else {
        return;
    };
    let mut touched: HashSet<String> = HashSet::new();
    for effect in effects {
        match effect {
            Effect::Insert {
                queue,
                seq,
                not_before,
            } => {
                index
                    .entry(queue.clone())
                    .or_default()
                    .ready
                    .insert((not_before, seq));
                touched.insert(queue);
            }
            Effect::Remove {
                queue,
                seq,
                not_before,
            } => {
                if let Some(q) = index.get_mut(&queue) {
                    if !q.in_flight.remove(&seq) {
                        q.ready.remove(&(not_before, seq));
                        // A released message was re-queued at time 0.
                        q.ready.remove(&(0, seq));
                    }
                }
            }
            Effect::Reschedule {
                queue,
                seq,
                not_before,
            } => {
                let q = index.entry(queue.clone()).or_default();
                q.in_flight.remove(&seq);
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
