//! From an outcome, the attempt number and the route's policy to a settle
//! decision: ack, retry after a delay, or dead-letter.

use crate::config::{FailureAction, FailureMapping, Jitter, RetryConfig};
use crate::engine::{FailureKind, Outcome};
use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Ack,
    Retry(Duration),
    DeadLetter { kind: FailureKind, reason: String },
}

/// What to do with a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum FailureDecision {
    Retry(Duration),
    DeadLetter { kind: FailureKind, reason: String },
}

impl From<FailureDecision> for Decision {
    fn from(f: FailureDecision) -> Self {
        match f {
            FailureDecision::Retry(d) => Decision::Retry(d),
            FailureDecision::DeadLetter { kind, reason } => Decision::DeadLetter { kind, reason },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub retry: RetryConfig,
    pub on_failure: FailureMapping,
}

impl Policy {
    pub fn decide(&self, outcome: &Outcome, attempt: u32) -> Decision {
        match outcome {
            Outcome::Ok { .. } => Decision::Ack,
            Outcome::Failed { kind, reason } => self.decide_failure(*kind, reason, attempt).into(),
        }
    }

    /// A failed attempt `attempt` of kind `kind`: retry while the kind is
    /// retried and attempts are left, else dead-letter.
    pub fn decide_failure(&self, kind: FailureKind, reason: &str, attempt: u32) -> FailureDecision {
        let action = match kind {
            FailureKind::Retryable => FailureAction::Retry,
            FailureKind::Permanent | FailureKind::InvalidPublish => FailureAction::DeadLetter,
            FailureKind::Trap => self.on_failure.trap,
            FailureKind::Timeout => self.on_failure.timeout,
            FailureKind::Memory => self.on_failure.memory,
        };
        if action == FailureAction::Retry && attempt < self.retry.max_attempts {
            FailureDecision::Retry(self.backoff(attempt))
        } else {
            FailureDecision::DeadLetter {
                kind,
                reason: reason.to_owned(),
            }
        }
    }

    /// Delay before attempt `attempt + 1`: exponential from
    /// `initial_backoff`, capped at `max_backoff`, with full jitter by default.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let r = &self.retry;
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let base = r.initial_backoff.as_secs_f64() * r.multiplier.powi(exp);
        let capped = base.min(r.max_backoff.as_secs_f64());
        let secs = match r.jitter {
            Jitter::None => capped,
            Jitter::Full => rand::rng().random_range(0.0..=capped),
        };
        Duration::from_secs_f64(secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32, jitter: Jitter) -> Policy {
        Policy {
            retry: RetryConfig {
                max_attempts,
                initial_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(1),
                multiplier: 2.0,
                jitter,
            },
            on_failure: FailureMapping::default(),
        }
    }

    fn failed(kind: FailureKind) -> Outcome {
        Outcome::failed(kind, "x")
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy(10, Jitter::None);
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        let j = policy(10, Jitter::Full);
        for _ in 0..100 {
            assert!(j.backoff(3) <= Duration::from_millis(400));
        }
    }

    #[test]
    fn retries_until_max_attempts_then_dead_letters() {
        let p = policy(3, Jitter::None);
        assert!(matches!(
            p.decide(&failed(FailureKind::Retryable), 1),
            Decision::Retry(_)
        ));
        assert!(matches!(p.decide(&failed(FailureKind::Trap), 2), Decision::Retry(_)));
        assert!(matches!(
            p.decide(&failed(FailureKind::Retryable), 3),
            Decision::DeadLetter { .. }
        ));
        assert!(matches!(
            p.decide(&failed(FailureKind::Permanent), 1),
            Decision::DeadLetter { .. }
        ));
        assert_eq!(p.decide(&Outcome::Ok { reply: None }, 1), Decision::Ack);
    }

    #[test]
    fn host_failures_follow_the_route_mapping() {
        let mut p = policy(5, Jitter::None);
        p.on_failure.timeout = FailureAction::DeadLetter;
        assert!(matches!(
            p.decide(&failed(FailureKind::Timeout), 1),
            Decision::DeadLetter { .. }
        ));
        assert!(matches!(p.decide(&failed(FailureKind::Memory), 1), Decision::Retry(_)));
    }
}
