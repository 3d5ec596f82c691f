//! Dead-letter tooling: list, show and replay dead letters back to where
//! they failed. What a dead letter says (its `sluice-*` headers) is read
//! here; where it is kept and how it goes back is its broker's
//! [`DeadLetterStore`].

use crate::brokers::{BrokerError, DeadLetterError, DeadLetterStore, Replay, SCAN_LIMIT};
use crate::message::{find_header, Header, Outbound, DEDUP_HEADER};
use crate::pipeline::dead_letter::{ATTEMPTS, ERROR, ERROR_KIND, FAILED_AT, FAILURE_HEADERS, ORIGIN, ROUTE};
use crate::pipeline::REPLAYS_HEADER;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

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
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Replay(#[from] DeadLetterError),
    #[error("say which dead letters to replay: sequence numbers, --kind, --route or --all")]
    NoFilter,
}

/// One dead-letter destination, read through its broker's store.
#[derive(Clone)]
pub struct DeadLetters(pub Arc<dyn DeadLetterStore>);

fn header(headers: &[Header], name: &str) -> String {
    find_header(headers, name).unwrap_or_default().to_owned()
}

pub fn summary(seq: u64, headers: &[Header]) -> Summary {
    let origin = header(headers, ORIGIN);
    Summary {
        seq,
        route: header(headers, ROUTE),
        subject: crate::brokers::origin_subject(&origin)
            .map(str::to_owned)
            .unwrap_or(origin),
        kind: header(headers, ERROR_KIND),
        error: header(headers, ERROR),
        attempts: header(headers, ATTEMPTS),
        failed_at: header(headers, FAILED_AT),
    }
}

/// A replayed copy: failure headers stripped, the replay counted.
fn replayed(headers: Vec<Header>, payload: Vec<u8>) -> Outbound {
    let replays: u32 = find_header(&headers, REPLAYS_HEADER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut headers: Vec<Header> = headers
        .into_iter()
        .filter(|h| {
            !FAILURE_HEADERS.iter().any(|f| h.name.eq_ignore_ascii_case(f))
                && !h.name.eq_ignore_ascii_case(REPLAYS_HEADER)
                && !h.name.eq_ignore_ascii_case(DEDUP_HEADER)
        })
        .collect();
    headers.push(Header::new(REPLAYS_HEADER, replays.saturating_add(1).to_string()));
    // The store sets the subject, from the origin.
    Outbound {
        subject: String::new(),
        headers,
        payload,
    }
}

impl DeadLetters {
    pub fn name(&self) -> &str {
        self.0.name()
    }

    pub async fn get(&self, seq: u64) -> Result<Option<Outbound>, DlqError> {
        Ok(self.0.get(seq).await?)
    }

    pub async fn list(&self, limit: usize) -> Result<Vec<Summary>, DlqError> {
        Ok(self
            .0
            .letters(limit)
            .await?
            .iter()
            .map(|(seq, m)| summary(*seq, &m.headers))
            .collect())
    }

    pub async fn queue_summary(&self) -> Result<QueueSummary, DlqError> {
        let all = self.list(SCAN_LIMIT).await?;
        let mut by_kind = BTreeMap::new();
        for s in &all {
            *by_kind.entry(s.kind.clone()).or_insert(0) += 1;
        }
        Ok(QueueSummary {
            queue: self.name().to_owned(),
            messages: all.len(),
            by_kind,
        })
    }

    /// Sends the matching dead letters back where they came from, without
    /// the `sluice-*` failure headers and with the attempt count reset;
    /// returns how many.
    pub async fn replay(&self, filter: &Filter) -> Result<usize, DlqError> {
        if filter.is_empty() {
            return Err(DlqError::NoFilter);
        }
        let mut pick = |seq: u64, letter: &Outbound| {
            let s = summary(seq, &letter.headers);
            if !filter.matches(seq, &s) {
                return None;
            }
            Some(Replay {
                origin: header(&letter.headers, ORIGIN),
                route: s.route,
                copy: replayed(letter.headers.clone(), letter.payload.clone()),
            })
        };
        Ok(self.0.replay(&mut pick).await?)
    }
}
