//! Consuming one queue of the embedded broker.

use super::store::{Op, Store, StoreError, Stored};
use super::NAME;
use crate::brokers::{Backlog, BoxFuture, BrokerError, Delivery, Source};
use crate::message::{now_ms, Message};
use std::sync::Arc;
use std::time::Duration;

pub struct EmbeddedSource {
    store: Arc<Store>,
    queue: String,
}

impl EmbeddedSource {
    pub(super) fn new(store: Arc<Store>, queue: &str) -> Self {
        Self {
            store,
            queue: queue.to_owned(),
        }
    }

    fn delivery(&self, seq: u64, stored: Stored) -> EmbeddedDelivery {
        EmbeddedDelivery {
            store: self.store.clone(),
            queue: self.queue.clone(),
            seq,
            settled: false,
            message: Message {
                id: seq.to_string(),
                subject: stored.subject,
                key: None,
                headers: stored.headers,
                payload: stored.payload,
                attempt: stored.attempt,
                timestamp_ms: stored.published_ms,
                reply_to: None,
            },
        }
    }

    async fn next_delivery(&self) -> Result<EmbeddedDelivery, BrokerError> {
        let notify = self.store.notifier(&self.queue);
        loop {
            // Register interest before looking, so a publish between the look
            // and the wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = now_ms();
            match self.store.take_ready(&self.queue, now) {
                Ok(seq) => match self.store.read(&self.queue, seq) {
                    Ok(Some(stored)) => return Ok(self.delivery(seq, stored)),
                    // Removed meanwhile (trimmed, moved): nothing to deliver.
                    Ok(None) => {
                        self.store.forget(&self.queue, seq);
                        continue;
                    }
                    Err(e) => {
                        self.store.release(&self.queue, seq);
                        return Err(e.into());
                    }
                },
                Err(Some(at)) => {
                    let wait = Duration::from_millis(at.saturating_sub(now));
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(None) => notified.await,
            }
        }
    }
}

impl Source for EmbeddedSource {
    fn next(&self) -> BoxFuture<'_, Result<Box<dyn Delivery>, BrokerError>> {
        Box::pin(async move { self.next_delivery().await.map(|d| Box::new(d) as Box<dyn Delivery>) })
    }

    fn ready(&self, max: usize) -> Vec<Box<dyn Delivery>> {
        let now = now_ms();
        let mut taken: Vec<Box<dyn Delivery>> = Vec::new();
        while taken.len() < max {
            let Ok(seq) = self.store.take_ready(&self.queue, now) else {
                break;
            };
            match self.store.read(&self.queue, seq) {
                Ok(Some(stored)) => taken.push(Box::new(self.delivery(seq, stored))),
                Ok(None) => self.store.forget(&self.queue, seq),
                // Back to the queue; `next` reports the store's failure.
                Err(_) => {
                    self.store.release(&self.queue, seq);
                    break;
                }
            }
        }
        taken
    }

    fn backlog(&self) -> BoxFuture<'_, Option<Backlog>> {
        Box::pin(async move {
            let (messages, oldest_ms) = self.store.backlog(&self.queue)?;
            Some(Backlog {
                messages: messages as u64,
                oldest_ms,
            })
        })
    }
}

/// `embedded://SUBJECT?queue=QUEUE&seq=SEQ`: the `sluice-origin` of a dead
/// letter from the embedded broker.
pub fn origin(subject: &str, queue: &str, seq: u64) -> String {
    format!("{NAME}://{subject}?queue={queue}&seq={seq}")
}

/// The subject and queue of an embedded `sluice-origin`.
pub fn parse_origin(origin: &str) -> Option<(&str, &str)> {
    let rest = origin.strip_prefix(NAME)?.strip_prefix("://")?;
    // Subjects may hold `?`, `&` and `=`; queue names may not (the config
    // refuses them), so the last `?queue=` is the separator.
    let (subject, query) = rest.rsplit_once("?queue=")?;
    let queue = query.split('&').next()?;
    Some((subject, queue))
}

/// One message taken from a queue. Dropped unsettled, it goes back to the
/// queue at once.
pub struct EmbeddedDelivery {
    store: Arc<Store>,
    queue: String,
    seq: u64,
    settled: bool,
    message: Message,
}

impl EmbeddedDelivery {
    fn settle(mut self: Box<Self>, op: Op) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settled = true;
        Box::pin(async move {
            let result = self.store.submit(op).await;
            if result.is_err() {
                // Not settled after all: make it deliverable again.
                self.store.release(&self.queue, self.seq);
            }
            result.map(|_| ()).map_err(Into::into)
        })
    }
}

impl Delivery for EmbeddedDelivery {
    fn message(&self) -> &Message {
        &self.message
    }

    fn origin(&self) -> String {
        origin(&self.message.subject, &self.queue, self.seq)
    }

    /// Queued for the next group commit and answered at once: the
    /// message's outcome (its publishes, its dead letter) is already
    /// durable, so the worker need not wait for an fsync to take the next
    /// message. Until the removal commits the message stays in flight; if it
    /// never does (the store fails, the process dies) it is delivered again.
    /// A graceful shutdown commits every queued removal.
    fn ack(mut self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.settled = true;
        let op = Op::Remove {
            queue: self.queue.clone(),
            seq: self.seq,
        };
        let committed = match self.store.enqueue(op) {
            Ok(committed) => committed,
            Err(e) => {
                self.store.release(&self.queue, self.seq);
                return Box::pin(std::future::ready(Err(e.into())));
            }
        };
        let (store, queue, seq) = (self.store.clone(), self.queue.clone(), self.seq);
        let Ok(permit) = store.settle_permits.clone().try_acquire_owned() else {
            // Too many removals in the air: wait for this one.
            return Box::pin(async move {
                match committed.await {
                    Ok(_) | Err(StoreError::Gone { .. }) => Ok(()),
                    Err(e) => {
                        store.release(&queue, seq);
                        Err(e.into())
                    }
                }
            });
        };
        store.settling(&queue, seq);
        // Weak: a pending deletion must not keep the file open after the
        // broker is closed and dropped (its commit is queued already).
        let store = Arc::downgrade(&store);
        tokio::spawn(async move {
            match committed.await {
                // Removed by someone else meanwhile (trimmed, replayed):
                // gone is what an ack wants.
                Ok(_) | Err(StoreError::Gone { .. }) => {}
                Err(e) => {
                    if let Some(store) = store.upgrade() {
                        store.release(&queue, seq);
                    }
                    crate::brokers::events::failed(NAME, "ack", &e, "; the message will be delivered again");
                }
            }
            drop(permit);
        });
        Box::pin(std::future::ready(Ok(())))
    }

    fn retry(self: Box<Self>, delay: Duration) -> BoxFuture<'static, Result<(), BrokerError>> {
        let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        let op = Op::Retry {
            queue: self.queue.clone(),
            seq: self.seq,
            not_before_ms: now_ms().saturating_add(delay_ms),
        };
        self.settle(op)
    }

    fn dead_lettered(self: Box<Self>) -> BoxFuture<'static, Result<(), BrokerError>> {
        self.ack()
    }
}

impl Drop for EmbeddedDelivery {
    fn drop(&mut self) {
        if !self.settled {
            self.store.release(&self.queue, self.seq);
        }
    }
}
