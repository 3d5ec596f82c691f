//! What running a handler on one message produced.

use crate::message::{Header, Outbound};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Why a handler invocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// The handler returned `retryable`.
    Retryable,
    /// The handler returned `permanent`.
    Permanent,
    /// The instance trapped (panic, unreachable, bad memory access...).
    Trap,
    /// The deadline or the fuel budget ran out.
    Timeout,
    /// The memory cap was hit.
    Memory,
    /// The handler asked to send something no broker can carry or the host
    /// refuses (a bad header, a reserved name, an oversized or invalid
    /// destination): permanent, the same input fails the same way.
    InvalidPublish,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
            Self::InvalidPublish => "invalid-publish",
        }
    }

    /// Failures detected by the host rather than returned by the handler;
    /// after one of these an instance is never used again.
    pub fn is_host_detected(self) -> bool {
        matches!(self, Self::Trap | Self::Timeout | Self::Memory)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler's reply to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reply {
    pub headers: Vec<Header>,
    #[serde(with = "crate::message::payload_text")]
    pub payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Ok { reply: Option<Reply> },
    Failed { kind: FailureKind, reason: String },
}

/// Longest failure reason kept (a plugin chooses its error text; the status
/// page, `/v1/status` and the dead-letter header must stay bounded).
pub const MAX_REASON_BYTES: usize = 1024;

impl Outcome {
    /// A failure; the reason is cut to [`MAX_REASON_BYTES`].
    pub fn failed(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self::Failed {
            kind,
            reason: bounded(reason.into()),
        }
    }
}

/// `text` cut to [`MAX_REASON_BYTES`] at a character boundary.
pub fn bounded(mut text: String) -> String {
    if text.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

/// Plugin output the host cut to its bounds during one invocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Cut {
    /// Log lines written (kept).
    #[serde(skip)]
    pub logged: u32,
    /// Log lines dropped past the per-message limit.
    pub log_lines: u32,
    /// Log lines shortened to the line limit.
    pub log_bytes: u32,
    /// Reserved headers (`Nats-Msg-Id`, `sluice-*`...) dropped from the
    /// plugin's publishes and reply.
    pub reserved_headers: u32,
}

impl Cut {
    pub fn is_empty(&self) -> bool {
        self.log_lines == 0 && self.log_bytes == 0 && self.reserved_headers == 0
    }
}

/// The result of one invocation: the outcome, and the publishes the handler
/// queued (to be sent only if the outcome is Ok).
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub publishes: Vec<Outbound>,
    /// What the host cut of the plugin's output.
    #[serde(skip_serializing_if = "Cut::is_empty")]
    pub cut: Cut,
    #[serde(serialize_with = "as_micros", rename = "duration_us")]
    pub duration: Duration,
}

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_micros())
}

/// What one message of a batch produced: its outcome, and its publishes
/// (empty unless the outcome is Ok).
#[derive(Debug, Clone, Serialize)]
pub struct ItemInvocation {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub publishes: Vec<Outbound>,
}

/// The result of running a batch: one item per message, in order.
#[derive(Debug, Clone, Serialize)]
pub struct BatchInvocation {
    pub items: Vec<ItemInvocation>,
    /// What the host cut of the plugin's output, over the whole batch.
    #[serde(skip_serializing_if = "Cut::is_empty")]
    pub cut: Cut,
    #[serde(serialize_with = "as_micros", rename = "duration_us")]
    pub duration: Duration,
    /// The one `handle-batch` call failed as a whole: no outcome points at
    /// a culprit.
    #[serde(skip)]
    pub failed_whole: bool,
}

impl Cut {
    /// Adds another call's cuts to these.
    pub fn add(&mut self, other: Cut) {
        self.logged = self.logged.saturating_add(other.logged);
        self.log_lines = self.log_lines.saturating_add(other.log_lines);
        self.log_bytes = self.log_bytes.saturating_add(other.log_bytes);
        self.reserved_headers = self.reserved_headers.saturating_add(other.reserved_headers);
    }
}
