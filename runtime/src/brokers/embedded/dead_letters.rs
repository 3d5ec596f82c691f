//! Dead letters kept in an embedded queue; a replay moves them back into
//! the queue of the route that failed them, in one commit.

use super::EmbeddedBroker;
use crate::brokers::{BrokerError, DeadLetterError, DeadLetterStore, ReplayPick, SCAN_LIMIT};
use crate::future::BoxFuture;
use crate::message::Outbound;
use std::collections::{BTreeMap, BTreeSet};

pub struct EmbeddedDeadLetters {
    pub broker: EmbeddedBroker,
    pub queue: String,
    /// The embedded routes of the daemon: replays go to their queues only.
    pub routes: BTreeSet<String>,
}

fn outbound(s: super::Stored) -> Outbound {
    Outbound {
        subject: s.subject,
        headers: s.headers,
        payload: s.payload,
    }
}

impl DeadLetterStore for EmbeddedDeadLetters {
    fn name(&self) -> &str {
        &self.queue
    }

    fn letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Outbound)>, BrokerError>> {
        Box::pin(async move {
            Ok(self
                .broker
                .peek(&self.queue, limit)?
                .into_iter()
                .map(|(seq, s)| (seq, outbound(s)))
                .collect())
        })
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<Outbound>, BrokerError>> {
        Box::pin(async move { Ok(self.broker.get(&self.queue, seq)?.map(outbound)) })
    }

    fn replay<'a>(&'a self, pick: &'a mut ReplayPick<'a>) -> BoxFuture<'a, Result<usize, DeadLetterError>> {
        Box::pin(async move {
            let mut per_route: BTreeMap<String, (Vec<Outbound>, Vec<u64>)> = BTreeMap::new();
            for (seq, letter) in self.letters(SCAN_LIMIT).await? {
                let Some(replay) = pick(seq, &letter) else {
                    continue;
                };
                if !self.routes.contains(&replay.route) {
                    return Err(DeadLetterError::UnknownRoute {
                        seq,
                        route: replay.route,
                    });
                }
                let Some(subject) = crate::brokers::origin_subject(&replay.origin) else {
                    return Err(DeadLetterError::NoOrigin {
                        seq,
                        origin: replay.origin,
                    });
                };
                let mut copy = replay.copy;
                copy.subject = subject.to_owned();
                let entry = per_route.entry(replay.route).or_default();
                entry.0.push(copy);
                entry.1.push(seq);
            }
            let mut moved = 0;
            for (route, (messages, seqs)) in per_route {
                moved += seqs.len();
                self.broker
                    .move_messages(&route, messages, &self.queue, seqs)
                    .await
                    .map_err(BrokerError::from)?;
            }
            Ok(moved)
        })
    }
}
