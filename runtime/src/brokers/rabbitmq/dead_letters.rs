//! Dead letters kept in a RabbitMQ queue; a replay moves each straight to
//! the work queue it came from (read and moved in one pass: positions are
//! only stable while the messages are held).

use super::RabbitBroker;
use crate::brokers::{BrokerError, DeadLetterError, DeadLetterStore, ReplayPick, SCAN_LIMIT};
use crate::future::BoxFuture;
use crate::message::Outbound;
use std::collections::BTreeSet;

pub struct RabbitDeadLetters {
    pub rabbit: RabbitBroker,
    pub queue: String,
    /// The routes' work queues: the only places a replay may go.
    pub work_queues: BTreeSet<String>,
}

impl DeadLetterStore for RabbitDeadLetters {
    fn name(&self) -> &str {
        &self.queue
    }

    fn letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Outbound)>, BrokerError>> {
        Box::pin(self.rabbit.browse(&self.queue, limit))
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<Outbound>, BrokerError>> {
        Box::pin(async move {
            // A sequence is a position: the letters up to it suffice.
            if seq == 0 || seq > SCAN_LIMIT as u64 {
                return Ok(None);
            }
            let scan = usize::try_from(seq).unwrap_or(SCAN_LIMIT);
            crate::brokers::find_letter(self, seq, scan).await
        })
    }

    fn replay<'a>(&'a self, pick: &'a mut ReplayPick<'a>) -> BoxFuture<'a, Result<usize, DeadLetterError>> {
        Box::pin(async move {
            let mut refused = None;
            let moved = self
                .rabbit
                .move_letters(&self.queue, SCAN_LIMIT, |letter| {
                    if refused.is_some() {
                        return Ok(None);
                    }
                    let Some(replay) = pick(letter.seq, &letter.message) else {
                        return Ok(None);
                    };
                    let known = super::parse_origin(&replay.origin).filter(|(q, _)| self.work_queues.contains(*q));
                    let Some((work_queue, routing_key)) = known else {
                        refused = Some(DeadLetterError::NoOrigin {
                            seq: letter.seq,
                            origin: replay.origin,
                        });
                        return Ok(None);
                    };
                    let mut copy = replay.copy;
                    copy.subject = routing_key.to_owned();
                    Ok(Some((work_queue.to_owned(), routing_key.to_owned(), copy)))
                })
                .await?;
            match refused {
                Some(e) => Err(e),
                None => Ok(moved),
            }
        })
    }
}
