//! Settling: every handling ends in one [`Verdict`], carried out here and
//! only here. The invariant: a message is acked only once its outcome is
//! durable (publishes confirmed, or its dead-letter copy confirmed); any
//! failure on that path leaves it unacked, so the broker delivers it again.

use super::gate::Lease;
use super::{dead_letter, trace, Route};
use crate::brokers::{BrokerError, Delivery};
use crate::engine::{FailureKind, Plugin};
use crate::error::Report;
use crate::message::{Header, Message, Outbound};
use crate::metrics::MessageOutcome;
use crate::metrics::{BrokerErrorLabel, RouteLabel};
use std::sync::Arc;
use std::time::Duration;

/// Delay before redelivery when settling failed (e.g. a publish was refused).
pub(super) const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// How a handling ends.
pub(super) enum Verdict {
    /// The outcome is durable: ack it (handled, or a duplicate).
    Ack(MessageOutcome),
    /// Have the broker deliver it again after the delay, attempt + 1.
    RetryAfter(Duration),
    /// Store a copy in the dead-letter destination, then ack it.
    DeadLetter(Box<DeadLetter>),
    /// Drop it unsettled: the broker delivers it again.
    HandBack(MessageOutcome),
}

/// A failure on its way to the dead-letter destination.
pub(super) struct DeadLetter {
    pub kind: FailureKind,
    pub reason: String,
    /// Send the requester an error reply (not when its reply address was
    /// the problem).
    pub answer_requester: bool,
    /// The message as last attempted.
    pub msg: Message,
    pub gate_key: Option<String>,
    pub plugin: Arc<Plugin>,
    pub traceparent: Option<String>,
}

/// A broker operation, for `sluice_broker_errors_total{broker,op}`.
#[derive(Debug, Clone, Copy)]
pub(super) enum BrokerOp {
    Receive,
    Ack,
    Retry,
    DeadLettered,
    Publish,
    PublishDeadLetter,
    ErrorReply,
}

impl BrokerOp {
    fn as_str(self) -> &'static str {
        match self {
            Self::Receive => "receive",
            Self::Ack => "ack",
            Self::Retry => "retry",
            Self::DeadLettered => "dead_lettered",
            Self::Publish => "publish",
            Self::PublishDeadLetter => "publish_dead_letter",
            Self::ErrorReply => "error_reply",
        }
    }

    /// Whether the failure leaves a message unsettled (redelivered).
    fn is_settle(self) -> bool {
        !matches!(self, Self::Receive | Self::ErrorReply)
    }
}

impl Route {
    /// A broker operation failed: logged, counted and shown in one place.
    pub(super) fn broker_error(&self, op: BrokerOp, e: &BrokerError) {
        match op {
            BrokerOp::Receive | BrokerOp::ErrorReply => {
                tracing::warn!(route = %self.name, op = op.as_str(), "broker: {}", Report(e))
            }
            _ => {
                tracing::error!(route = %self.name, op = op.as_str(), "broker: {}; the message will be redelivered", Report(e))
            }
        }
        self.status.set_error(format!("{}: {}", op.as_str(), Report(e)));
        self.metrics
            .broker_errors
            .get_or_create(&BrokerErrorLabel {
                broker: e.broker().to_owned(),
                op: op.as_str().to_owned(),
            })
            .inc();
        if op.is_settle() {
            self.metrics
                .settle_errors
                .get_or_create(&RouteLabel {
                    route: self.name.clone(),
                })
                .inc();
        }
    }

    pub(super) fn settled(&self, result: Result<(), BrokerError>, op: BrokerOp) {
        if let Err(e) = result {
            self.broker_error(op, &e);
        }
    }

    /// Carries out `verdict`; the lease on the message's key, if any, is
    /// completed before an ack and released otherwise.
    pub(super) async fn settle(
        &self,
        delivery: Box<dyn Delivery>,
        verdict: Verdict,
        lease: Option<Lease>,
    ) -> MessageOutcome {
        let (lease, verdict) = match verdict {
            Verdict::Ack(outcome) => {
                if let Some(lease) = lease {
                    lease.complete().await;
                }
                self.settled(delivery.ack().await, BrokerOp::Ack);
                return outcome;
            }
            other => (lease, other),
        };
        // Released, not done: a retry or a replayed copy must run again.
        if let Some(lease) = lease {
            lease.release().await;
        }
        match verdict {
            Verdict::Ack(outcome) | Verdict::HandBack(outcome) => outcome,
            Verdict::RetryAfter(delay) => {
                self.settled(delivery.retry(delay).await, BrokerOp::Retry);
                MessageOutcome::Retry
            }
            Verdict::DeadLetter(letter) => self.dead_letter(delivery, *letter).await,
        }
    }

    async fn dead_letter(&self, delivery: Box<dyn Delivery>, letter: DeadLetter) -> MessageOutcome {
        let DeadLetter {
            kind,
            reason,
            answer_requester,
            msg,
            gate_key,
            plugin,
            traceparent,
        } = letter;
        tracing::warn!(kind = %kind, dead_letter = %self.dead_letter_subject, "dead-lettering: {reason}");
        if let (Some(reply_to), true) = (&msg.reply_to, answer_requester) {
            // The requester is waiting: tell it what went wrong.
            let mut error_reply = Outbound {
                subject: reply_to.clone(),
                headers: vec![
                    Header::new(dead_letter::ERROR, dead_letter::one_line(&reason)),
                    Header::new(dead_letter::ERROR_KIND, kind.as_str()),
                ],
                payload: Vec::new(),
            };
            if let Some(tp) = &traceparent {
                trace::stamp(&mut error_reply.headers, tp);
            }
            if let Err(e) = self.send(&*self.sink, vec![error_reply]).await {
                self.broker_error(BrokerOp::ErrorReply, &e);
            }
        }
        // Its own dedup id: never dropped as a duplicate of its original
        // (whose producer-set id it would otherwise carry). The content hash
        // keeps two different messages that share a producer-chosen id (an
        // AMQP message-id) apart.
        let dedup_id = format!(
            "{}:dlq:{}:{}",
            self.dedup_base(&msg, gate_key.as_deref()),
            msg.attempt,
            dead_letter::content_hash(&msg)
        );
        let mut copy = dead_letter::copy(
            &msg,
            &self.dead_letter_subject,
            dead_letter::FailureContext {
                kind,
                reason: &reason,
                route: &self.name,
                plugin_name: plugin.name(),
                plugin_hash: plugin.hash(),
                origin: delivery.origin(),
                dedup_id,
            },
        );
        if let Some(tp) = &traceparent {
            trace::stamp(&mut copy.headers, tp);
        }
        let mut sent = self.send(&*self.dead_letter_sink, vec![copy.clone()]).await;
        if let Err(BrokerError::Refused { .. }) = &sent {
            // A header of the original that the dead-letter broker cannot
            // carry (it came from another broker): keep the rest.
            let (kept, dropped) = dead_letter::portable(copy);
            tracing::warn!("the dead-letter broker refused {dropped} header(s) of the original; sending without them");
            sent = self.send(&*self.dead_letter_sink, vec![kept.clone()]).await;
            if let Err(BrokerError::Refused { reason, .. }) = &sent {
                // Still refused (too large once the failure headers are on):
                // the failure without the payload, rather than a loop.
                tracing::error!(
                    "the dead-letter broker refused the dead letter ({reason}); sending it without its payload"
                );
                sent = self
                    .send(&*self.dead_letter_sink, vec![dead_letter::without_payload(kept)])
                    .await;
            }
        }
        match sent {
            Err(e) => {
                self.broker_error(BrokerOp::PublishDeadLetter, &e);
                // If even the retry fails, dropping the delivery hands it back.
                let _ = delivery.retry(SETTLE_RETRY_DELAY).await;
                MessageOutcome::Retry
            }
            Ok(published) => {
                if published.duplicates > 0 {
                    tracing::debug!("this dead letter was stored by an earlier attempt");
                }
                self.settled(delivery.dead_lettered().await, BrokerOp::DeadLettered);
                MessageOutcome::DeadLetter
            }
        }
    }
}
