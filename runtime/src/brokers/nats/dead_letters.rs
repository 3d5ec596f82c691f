//! Dead letters kept by a JetStream stream that stores the dead-letter
//! subject; a replay publishes each (confirmed) to its origin subject, which
//! a declared stream must store, then deletes it.

use super::NatsBroker;
use crate::brokers::{BrokerError, DeadLetterError, DeadLetterStore, ReplayPick, Sink};
use crate::future::BoxFuture;
use crate::message::Outbound;

pub struct StreamDeadLetters {
    pub nats: NatsBroker,
    pub stream: String,
    pub subject: String,
}

impl DeadLetterStore for StreamDeadLetters {
    fn name(&self) -> &str {
        &self.subject
    }

    fn letters(&self, limit: usize) -> BoxFuture<'_, Result<Vec<(u64, Outbound)>, BrokerError>> {
        Box::pin(self.nats.stored(&self.stream, &self.subject, limit))
    }

    fn get(&self, seq: u64) -> BoxFuture<'_, Result<Option<Outbound>, BrokerError>> {
        Box::pin(self.nats.stored_one(&self.stream, &self.subject, seq))
    }

    fn replay<'a>(&'a self, pick: &'a mut ReplayPick<'a>) -> BoxFuture<'a, Result<usize, DeadLetterError>> {
        Box::pin(async move {
            let selected = crate::brokers::picked(self, pick).await?;
            let mut moved = 0;
            for (seq, replay) in selected {
                let subject = crate::brokers::origin_subject(&replay.origin).map(str::to_owned);
                // The origin is a header: anyone who could write to the
                // dead-letter subject could forge it.
                let Some(subject) =
                    subject.filter(|s| !crate::headers::is_system_subject(s) && self.nats.stream_for(s).is_some())
                else {
                    return Err(DeadLetterError::NoOrigin {
                        seq,
                        origin: replay.origin,
                    });
                };
                let mut copy = replay.copy;
                copy.subject = subject;
                // Published (and confirmed) before it is deleted: a crash in
                // between replays it twice, never zero times.
                let published = self.nats.confirmed_sink().publish(vec![copy]).await?;
                if published.duplicates > 0 {
                    // Not stored now: keep the dead letter.
                    tracing::warn!(
                        seq,
                        "replay dropped by JetStream as a duplicate; the dead letter is kept"
                    );
                    continue;
                }
                self.nats.delete_stored(&self.stream, seq).await?;
                moved += 1;
            }
            Ok(moved)
        })
    }
}
