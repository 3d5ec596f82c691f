//! How a message's handling ended, as counted in `sluice_messages_total`.

use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageOutcome {
    /// Handled; its publishes are confirmed and it is acked.
    Ok,
    /// Handed back to be delivered again (or retried in place).
    Retry,
    /// Its copy is in the dead-letter destination and it is acked.
    DeadLetter,
    /// Its idempotency key was handled before: acked without running.
    Duplicate,
    /// Stopped by shutdown; handed back unsettled (not counted).
    Interrupted,
    /// The host panicked handling it; handed back unsettled (counted in
    /// `sluice_worker_panics_total`, not here).
    Panic,
}

impl MessageOutcome {
    /// Those counted in `sluice_messages_total`.
    pub const COUNTED: [Self; 4] = [Self::Ok, Self::Retry, Self::DeadLetter, Self::Duplicate];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Retry => "retry",
            Self::DeadLetter => "dead_letter",
            Self::Duplicate => "duplicate",
            Self::Interrupted => "interrupted",
            Self::Panic => "panic",
        }
    }
}

impl fmt::Display for MessageOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EncodeLabelValue for MessageOutcome {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), fmt::Error> {
        fmt::Write::write_str(encoder, self.as_str())
    }
}
