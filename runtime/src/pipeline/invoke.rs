//! Running the handler and sending what it produced: each guarded, so a
//! panic in the host (a bug, never the plugin's trap, which wasmtime
//! reports) fails the attempt instead of killing the worker; the handler's
//! publishes and reply get dedup ids derived from the message.

use super::{trace, Route, REPLAYS_HEADER};
use crate::brokers::{BrokerError, Published, Sink};
use crate::engine::{FailureKind, Invocation, Outcome, Plugin, Reply};
use crate::message::{Header, Message, Outbound, DEDUP_HEADER};
use crate::metrics::RouteLabel;
use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;

impl Route {
    /// Runs the handler; a host panic fails the attempt as a trap.
    pub(super) async fn invoke(&self, plugin: &Plugin, msg: &Message) -> Invocation {
        let started = std::time::Instant::now();
        match AssertUnwindSafe(plugin.invoke(&self.name, msg)).catch_unwind().await {
            Ok(invocation) => invocation,
            Err(panic) => {
                let why = self.caught_panic("running the handler", panic.as_ref());
                Invocation {
                    outcome: Outcome::failed(FailureKind::Trap, why),
                    publishes: Vec::new(),
                    cut: Default::default(),
                    duration: started.elapsed(),
                }
            }
        }
    }

    /// Publishes through `sink`; a panic inside the broker client (some
    /// assert on values it dislikes) is caught and refused.
    pub(super) async fn send(&self, sink: &dyn Sink, outbound: Vec<Outbound>) -> Result<Published, BrokerError> {
        if outbound.is_empty() {
            return Ok(Published::default());
        }
        match AssertUnwindSafe(sink.publish(outbound)).catch_unwind().await {
            Ok(result) => result,
            Err(panic) => Err(BrokerError::refused(
                "publish",
                self.caught_panic("publishing", panic.as_ref()),
            )),
        }
    }

    /// Logs and counts a caught panic; returns its text.
    pub(super) fn caught_panic(&self, what: &str, panic: &(dyn std::any::Any + Send)) -> String {
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!(route = %self.name, "caught a panic while {what}: {text}");
        self.count_panic();
        crate::engine::bounded(format!("internal error while {what}: {text}"))
    }

    /// Counts a panic of this route's pipeline.
    pub(super) fn count_panic(&self) {
        self.metrics
            .panics
            .get_or_create(&RouteLabel {
                route: self.name.clone(),
            })
            .inc();
    }

    /// Why a producer's reply address must not be used, if it must not: it
    /// must not point sluice at the server's own APIs, a dead-letter
    /// subject or a route's input.
    pub(super) fn refused_reply(&self, reply_to: &str) -> Option<String> {
        if let Err(why) = crate::headers::check_address(reply_to) {
            return Some(format!("reply address {why}"));
        }
        if crate::headers::is_system_subject(reply_to)
            || reply_to == self.dead_letter_subject
            || self.reserved_replies.iter().any(|p| p.matches(reply_to))
        {
            return Some(format!(
                "reply address {:?} is a server API, dead-letter or route input subject",
                crate::headers::shown(reply_to)
            ));
        }
        None
    }

    /// The base of the dedup ids of what handling `msg` sends: the
    /// idempotency key, else the message id; a replay counts apart.
    pub(super) fn dedup_base(&self, msg: &Message, gate_key: Option<&str>) -> String {
        let mut base = gate_key
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{}:{}", self.name, msg.id));
        // Only a count: the header is the producer's to forge.
        if let Some(replays) = msg.header(REPLAYS_HEADER).and_then(|r| r.parse::<u32>().ok()) {
            base = format!("{base}:r{replays}");
        }
        base
    }

    /// The handler's publishes and reply, each with a dedup id derived from
    /// the idempotency key (else the message id), so a rerun's publishes are
    /// recognised downstream.
    pub(super) fn outbound(
        &self,
        msg: &Message,
        gate_key: Option<&str>,
        traceparent: Option<&str>,
        publishes: Vec<Outbound>,
        reply: Option<Reply>,
    ) -> Vec<Outbound> {
        let mut outbound = publishes;
        if let (Some(reply), Some(reply_to)) = (reply, &msg.reply_to) {
            outbound.push(Outbound {
                subject: reply_to.clone(),
                headers: reply.headers,
                payload: reply.payload,
            });
        }
        if outbound.is_empty() {
            return outbound;
        }
        if let Some(tp) = traceparent {
            for m in &mut outbound {
                trace::stamp(&mut m.headers, tp);
            }
        }
        // Plugins cannot set the dedup header (it is reserved): the host's
        // id is the only one.
        let base = self.dedup_base(msg, gate_key);
        for (i, m) in outbound.iter_mut().enumerate() {
            m.headers.push(Header::new(DEDUP_HEADER, format!("{base}:{i}")));
        }
        outbound
    }
}
