//! Dead-letter tooling for the embedded broker: list, show and replay dead
//! letters back to the route they failed on.

use crate::brokers::embedded::{parse_origin, EmbeddedBroker, StoreError, Stored};
use crate::message::{find_header, Header, Outbound};
use crate::pipeline::dead_letter::{ATTEMPTS, ERROR, ERROR_KIND, FAILED_AT, FAILURE_HEADERS, ORIGIN, ROUTE};
use crate::pipeline::REPLAYS_HEADER;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most dead letters looked at in one call.
const SCAN_LIMIT: usize = 1_000_000;

/// One line of `sluice dlq list`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub seq: u64,
    pub route: String,
    pub subject: String,
    pub kind: String,
    pub error: String,
    pub attempts: String,
    pub failed_at: String,
}

/// A dead-letter queue and its messages per error kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueSummary {
    pub queue: String,
    pub messages: usize,
    pub by_kind: BTreeMap<String, usize>,
}

/// Which dead letters a replay takes. Empty: none (say `all`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Filter {
    #[serde(default)]
    pub seqs: Vec<u64>,
    pub kind: Option<String>,
    pub route: Option<String>,
    #[serde(default)]
    pub all: bool,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty() && self.kind.is_none() && self.route.is_none() && !self.all
    }

    fn matches(&self, seq: u64, s: &Summary) -> bool {
        (self.seqs.is_empty() || self.seqs.contains(&seq))
            && self.kind.as_ref().is_none_or(|k| *k == s.kind)
            && self.route.as_ref().is_none_or(|r| *r == s.route)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("say which dead letters to replay: sequence numbers, --kind, --route or --all")]
    NoFilter,
    #[error("dead letter #{seq} came from route `{route}`, which is not an embedded route of this daemon")]
    UnknownRoute { seq: u64, route: String },
}

fn header(stored: &Stored, name: &str) -> String {
    find_header(&stored.headers, name).unwrap_or_default().to_owned()
}

pub fn summary(seq: u64, stored: &Stored) -> Summary {
    let origin = header(stored, ORIGIN);
    Summary {
        seq,
        route: header(stored, ROUTE),
        subject: parse_origin(&origin)
            .map(|(subject, _)| subject.to_owned())
            .unwrap_or(origin),
        kind: header(stored, ERROR_KIND),
        error: header(stored, ERROR),
        attempts: header(stored, ATTEMPTS),
        failed_at: header(stored, FAILED_AT),
    }
}

pub fn list(broker: &EmbeddedBroker, queue: &str, limit: usize) -> Result<Vec<Summary>, StoreError> {
    Ok(broker
        .peek(queue, limit)?
        .iter()
        .map(|(seq, stored)| summary(*seq, stored))
        .collect())
}

pub fn queue_summary(broker: &EmbeddedBroker, queue: &str) -> Result<QueueSummary, StoreError> {
    let all = list(broker, queue, SCAN_LIMIT)?;
    let mut by_kind = BTreeMap::new();
    for s in &all {
        *by_kind.entry(s.kind.clone()).or_insert(0) += 1;
    }
    Ok(QueueSummary {
        queue: queue.to_owned(),
        messages: all.len(),
        by_kind,
    })
}

/// Moves the matching dead letters back to their route's queue, without the
/// `sluice-*` failure headers and with the attempt count reset; returns how
/// many. `routes` are the embedded routes of the daemon.
pub async fn replay(
    broker: &EmbeddedBroker,
    queue: &str,
    filter: &Filter,
    routes: &BTreeSet<String>,
) -> Result<usize, DlqError> {
    if filter.is_empty() {
        return Err(DlqError::NoFilter);
    }
    let mut per_route: BTreeMap<String, (Vec<Outbound>, Vec<u64>)> = BTreeMap::new();
    for (seq, stored) in broker.peek(queue, SCAN_LIMIT)? {
        let s = summary(seq, &stored);
        if !filter.matches(seq, &s) {
            continue;
        }
        if !routes.contains(&s.route) {
            return Err(DlqError::UnknownRoute { seq, route: s.route });
        }
        let replays: u32 = find_header(&stored.headers, REPLAYS_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut headers: Vec<Header> = stored
            .headers
            .into_iter()
            .filter(|h| {
                !FAILURE_HEADERS.iter().any(|f| h.name.eq_ignore_ascii_case(f))
                    && !h.name.eq_ignore_ascii_case(REPLAYS_HEADER)
            })
            .collect();
        headers.push(Header::new(REPLAYS_HEADER, (replays + 1).to_string()));
        let entry = per_route.entry(s.route).or_default();
        entry.0.push(Outbound {
            subject: s.subject,
            headers,
            payload: stored.payload,
        });
        entry.1.push(seq);
    }
    let mut moved = 0;
    for (route, (messages, seqs)) in per_route {
        moved += seqs.len();
        broker.move_messages(&route, messages, queue, seqs).await?;
    }
    Ok(moved)
}
