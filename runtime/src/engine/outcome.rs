//! What running a handler on one message produced.

use crate::message::{Header, Outbound};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Why a handler invocation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
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
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Retryable => "retryable",
            Self::Permanent => "permanent",
            Self::Trap => "trap",
            Self::Timeout => "timeout",
            Self::Memory => "memory",
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

impl Outcome {
    pub fn failed(kind: FailureKind, reason: impl Into<String>) -> Self {
        Self::Failed {
            kind,
            reason: reason.into(),
        }
    }
}

/// The result of one invocation: the outcome, and the publishes the handler
/// queued (to be sent only if the outcome is Ok).
#[derive(Debug, Clone, Serialize)]
pub struct Invocation {
    #[serde(flatten)]
    pub outcome: Outcome,
    pub publishes: Vec<Outbound>,
    #[serde(serialize_with = "as_micros", rename = "duration_us")]
    pub duration: Duration,
}

fn as_micros<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u128(d.as_micros())
}
