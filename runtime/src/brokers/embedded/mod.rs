//! The embedded broker: a persistent, in-process queue with NATS-style
//! subjects, so sluice runs with no external broker. Publishing to a subject
//! stores a copy in every queue bound to it (each route has one, and so does
//! each dead-letter subject); a subject no queue is bound to is dropped, as
//! in NATS core. Messages survive restarts; one in flight when the process
//! dies is delivered again.

pub mod config;
mod dead_letters;
mod source;
pub mod spec;
mod store;
mod subject_bindings;

pub use config::{EmbeddedConfig, QueueConfig};
pub use dead_letters::EmbeddedDeadLetters;
pub use source::{origin, parse_origin, EmbeddedDelivery, EmbeddedSource};
pub use spec::EmbeddedSourceSpec;
pub use store::{OpReport, StoreError, Stored};

use super::{BoxFuture, BrokerError, Published, Sink};
use crate::message::{now_ms, Outbound};
use crate::subject::{validate_subject, SubjectError, SubjectPattern};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use store::{Op, Store};

const NAME: &str = "embedded";

impl From<StoreError> for BrokerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Storage(crate::storage::StorageError::Closed) => BrokerError::Closed { broker: NAME },
            other => BrokerError::failed(NAME, other),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Subject(#[from] SubjectError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Queue counters for the status page and `GET /v1/queues`.
#[derive(Debug, Clone, Serialize)]
pub struct QueueInfo {
    pub name: String,
    pub subjects: Vec<String>,
    pub messages: usize,
    pub in_flight: usize,
    /// Handled and acknowledged, the removal not yet committed.
    pub settling: usize,
    pub delayed: usize,
}

/// A handle on the embedded broker. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedBroker {
    store: Arc<Store>,
}

impl EmbeddedBroker {
    /// Opens (or creates) the broker file at `path`. Publishes carrying the
    /// same `Nats-Msg-Id` within `duplicate_window` are stored once.
    pub fn open(path: &Path, duplicate_window: Duration) -> Result<Self, StoreError> {
        Ok(Self {
            store: Store::open(path, duplicate_window)?,
        })
    }

    /// Binds queue `name` to `patterns`; keeps at most `max_len` messages.
    pub fn declare_queue(&self, name: &str, patterns: Vec<SubjectPattern>, max_len: Option<u64>) {
        if let Ok(mut b) = self.store.bindings.write() {
            b.declare(name, patterns, max_len);
        }
    }

    /// Stores `messages` durably; reports the queues they reached and the
    /// duplicates dropped.
    pub async fn publish(&self, messages: Vec<Outbound>) -> Result<OpReport, PublishError> {
        for m in &messages {
            validate_subject(&m.subject)?;
        }
        Ok(self.store.submit(Op::Publish(messages)).await?)
    }

    /// Puts messages straight into `queue` (bypassing subject bindings) and
    /// removes the messages `remove` from queue `from` in the same commit: a
    /// replay can neither lose nor double a message.
    pub async fn move_messages(
        &self,
        queue: &str,
        messages: Vec<Outbound>,
        from: &str,
        remove: Vec<u64>,
    ) -> Result<(), StoreError> {
        self.store
            .submit(Op::Move {
                queue: queue.to_owned(),
                messages,
                from: from.to_owned(),
                remove,
            })
            .await
            .map(|_| ())
    }

    /// Deletes one message of a queue.
    pub async fn remove(&self, queue: &str, seq: u64) -> Result<(), StoreError> {
        self.store
            .submit(Op::Remove {
                queue: queue.to_owned(),
                seq,
            })
            .await
            .map(|_| ())
    }

    /// One message of a queue.
    pub fn get(&self, queue: &str, seq: u64) -> Result<Option<Stored>, StoreError> {
        self.store.read(queue, seq)
    }

    /// A consumer of queue `name`.
    pub fn source(&self, queue: &str) -> EmbeddedSource {
        EmbeddedSource::new(self.store.clone(), queue)
    }

    /// Up to `limit` messages of a queue, oldest first, without consuming them.
    pub fn peek(&self, queue: &str, limit: usize) -> Result<Vec<(u64, Stored)>, StoreError> {
        self.store.list(queue, limit)
    }

    /// Every queue that is declared or holds messages.
    pub fn queues(&self) -> Vec<QueueInfo> {
        let now = now_ms();
        let bindings = match self.store.bindings.read() {
            Ok(b) => b,
            Err(_) => return Vec::new(),
        };
        let index = match self.store.index.lock() {
            Ok(i) => i,
            Err(_) => return Vec::new(),
        };
        let mut names: Vec<String> = bindings.names().map(str::to_owned).collect();
        for name in index.keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        names.sort();
        names
            .into_iter()
            .map(|name| {
                let q = index.get(&name);
                QueueInfo {
                    subjects: bindings.patterns_of(&name),
                    messages: q.map_or(0, |q| q.len()),
                    in_flight: q.map_or(0, |q| q.in_flight()),
                    settling: q.map_or(0, |q| q.settling()),
                    delayed: q.map_or(0, |q| q.delayed(now)),
                    name,
                }
            })
            .collect()
    }

    /// Returns once every write queued so far (queued acks included) is
    /// committed.
    pub async fn sync(&self) -> Result<(), StoreError> {
        self.store.sync().await
    }

    /// Stops accepting writes (pending ones complete).
    pub fn close(&self) {
        self.store.close();
    }
}

impl Sink for EmbeddedBroker {
    fn publish(&self, messages: Vec<Outbound>) -> BoxFuture<'_, Result<Published, BrokerError>> {
        Box::pin(async move {
            EmbeddedBroker::publish(self, messages)
                .await
                .map(|report| Published {
                    duplicates: report.duplicates,
                })
                .map_err(|e| match e {
                    PublishError::Store(s) => s.into(),
                    PublishError::Subject(s) => BrokerError::refused(NAME, s.to_string()),
                })
        })
    }
}
