//! The pipeline joins a broker source to a plugin:
//! source -> invoke -> policy -> settle, with `concurrency` workers per route.
//!
//! The invariant kept here: a message is acked only after its outcome is
//! durable — the handler's publishes confirmed by their broker, or its
//! dead-lettered copy confirmed. Any failure on that path leaves the message
//! unacked, so the broker delivers it again.

pub mod dead_letter;
pub mod policy;

use crate::brokers::{BrokerError, Delivery, Sink, Source};
use crate::engine::{Outcome, Plugin};
use crate::message::Outbound;
use crate::metrics::{Metrics, RouteFailure, RouteLabel};
use policy::{Decision, Policy};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Pause after a source error before asking again.
const SOURCE_ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Delay before redelivery when settling failed (e.g. a publish was refused).
const SETTLE_RETRY_DELAY: Duration = Duration::from_secs(1);

/// Counters shown on the status page.
#[derive(Default)]
pub struct RouteStatus {
    pub handled: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub in_flight: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RouteStatusView {
    pub handled: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
    pub last_error: Option<String>,
}

impl RouteStatus {
    pub fn view(&self) -> RouteStatusView {
        RouteStatusView {
            handled: self.handled.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last_error: self.last_error.lock().ok().and_then(|e| e.clone()),
        }
    }

    fn set_error(&self, error: String) {
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error);
        }
    }
}

/// One configured route, ready to run.
pub struct Route {
    pub name: String,
    /// Shown on the status page (`embedded orders.>`).
    pub source_description: String,
    pub source: Arc<dyn Source>,
    /// Where handler publishes and replies go.
    pub sink: Arc<dyn Sink>,
    pub dead_letter_sink: Arc<dyn Sink>,
    pub dead_letter_subject: String,
    pub plugin: Arc<Plugin>,
    pub policy: Policy,
    pub concurrency: u32,
    pub metrics: Arc<Metrics>,
    pub status: Arc<RouteStatus>,
}

impl Route {
    /// Starts the route's workers. They stop taking messages when `shutdown`
    /// is cancelled and return once their current message is settled.
    pub fn spawn(
        self: &Arc<Self>,
        shutdown: &CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        (0..self.concurrency)
            .map(|_| tokio::spawn(self.clone().worker(shutdown.clone())))
            .collect()
    }

    async fn worker(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                next = self.source.next() => next,
            };
            match next {
                Ok(delivery) => self.process(delivery).await,
                Err(BrokerError::Closed { .. }) => return,
                Err(e) => {
                    tracing::warn!(route = %self.name, "source: {e}");
                    self.status.set_error(e.to_string());
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(SOURCE_ERROR_PAUSE) => {}
                    }
                }
            }
        }
    }

    /// Runs one delivery through invoke, policy and settle.
    pub async fn process(&self, delivery: Box<dyn Delivery>) {
        let msg = delivery.message();
        let span = tracing::info_span!(
            "message",
            route = %self.name,
            subject = %msg.subject,
            id = %msg.id,
            attempt = msg.attempt,
            outcome = tracing::field::Empty,
        );
        self.process_in_span(delivery).instrument(span).await
    }

    async fn process_in_span(&self, delivery: Box<dyn Delivery>) {
        let label = RouteLabel {
            route: self.name.clone(),
        };
        let gauge = self.metrics.in_flight.get_or_create(&label).clone();
        gauge.inc();
        self.status.in_flight.fetch_add(1, Ordering::Relaxed);

        let msg = delivery.message();
        let invocation = self.plugin.invoke(&self.name, msg).await;
        self.metrics
            .handler_duration
            .get_or_create(&label)
            .observe(invocation.duration.as_secs_f64());
        if let Outcome::Failed { kind, reason } = &invocation.outcome {
            self.metrics
                .failures
                .get_or_create(&RouteFailure {
                    route: self.name.clone(),
                    kind: kind.as_str().to_owned(),
                })
                .inc();
            self.status.set_error(format!("{kind}: {reason}"));
        }
        let decision = self.policy.decide(&invocation.outcome, msg.attempt);
        let outcome_label = match decision {
            Decision::Ack => {
                let mut outbound = invocation.publishes;
                if let (Outcome::Ok { reply: Some(reply) }, Some(reply_to)) =
                    (&invocation.outcome, &msg.reply_to)
                {
                    outbound.push(Outbound {
                        subject: reply_to.clone(),
                        headers: reply.headers.clone(),
                        payload: reply.payload.clone(),
                    });
                }
                self.complete(delivery, outbound).await
            }
            Decision::Retry(delay) => {
                if let Outcome::Failed { kind, reason } = &invocation.outcome {
                    tracing::warn!(kind = %kind, retry_in_ms = delay.as_millis() as u64, "handler failed: {reason}");
                }
                self.settle_result(delivery.retry(delay).await, "retry")
            }
            Decision::DeadLetter { kind, reason } => {
                tracing::warn!(kind = %kind, dead_letter = %self.dead_letter_subject, "dead-lettering: {reason}");
                self.dead_letter(delivery, kind, &reason).await
            }
        };
        tracing::Span::current().record("outcome", outcome_label);
        self.metrics.count(&self.name, outcome_label);
        match outcome_label {
            "ok" => self.status.handled.fetch_add(1, Ordering::Relaxed),
            "retry" => self.status.retried.fetch_add(1, Ordering::Relaxed),
            "dead_letter" => self.status.dead_lettered.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        gauge.dec();
        self.status.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Success: publishes first (confirmed), then the ack.
    async fn complete(&self, delivery: Box<dyn Delivery>, outbound: Vec<Outbound>) -> &'static str {
        if !outbound.is_empty() {
            if let Err(e) = self.sink.publish(outbound).await {
                return self
                    .settle_failed(delivery, "publishing the handler's messages", e)
                    .await;
            }
        }
        self.settle_result(delivery.ack().await, "ok")
    }

    async fn dead_letter(
        &self,
        delivery: Box<dyn Delivery>,
        kind: crate::engine::FailureKind,
        reason: &str,
    ) -> &'static str {
        let copy = dead_letter::copy(
            delivery.message(),
            &self.dead_letter_subject,
            dead_letter::FailureContext {
                kind,
                reason,
                route: &self.name,
                plugin_name: self.plugin.name(),
                plugin_hash: self.plugin.hash(),
                origin: delivery.origin(),
            },
        );
        if let Err(e) = self.dead_letter_sink.publish(vec![copy]).await {
            return self
                .settle_failed(delivery, "publishing the dead letter", e)
                .await;
        }
        self.settle_result(delivery.dead_lettered().await, "dead_letter")
    }

    /// A publish failed: the message must not be acked; have it redelivered.
    async fn settle_failed(
        &self,
        delivery: Box<dyn Delivery>,
        what: &str,
        e: BrokerError,
    ) -> &'static str {
        tracing::error!("{what} failed, the message will be redelivered: {e}");
        self.status.set_error(format!("{what}: {e}"));
        self.metrics
            .settle_errors
            .get_or_create(&RouteLabel {
                route: self.name.clone(),
            })
            .inc();
        // If even the retry fails, dropping the delivery hands it back.
        let _ = delivery.retry(SETTLE_RETRY_DELAY).await;
        "retry"
    }

    fn settle_result(&self, result: Result<(), BrokerError>, label: &'static str) -> &'static str {
        if let Err(e) = result {
            tracing::error!("settling ({label}) failed, the message will be redelivered: {e}");
            self.status.set_error(format!("settle: {e}"));
            self.metrics
                .settle_errors
                .get_or_create(&RouteLabel {
                    route: self.name.clone(),
                })
                .inc();
        }
        label
    }
}
