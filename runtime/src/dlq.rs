//! Dead-letter tooling: list, show and replay dead letters back to where
//! they failed, for the embedded broker's queues and for JetStream streams
//! that store a dead-letter subject.

use crate::brokers::embedded::{parse_origin, EmbeddedBroker, StoreError};
use crate::brokers::kafka::{self, KafkaBroker};
use crate::brokers::nats::NatsBroker;
use crate::brokers::rabbitmq::{self, RabbitBroker};
use crate::brokers::{BrokerError, Sink};
use crate::message::{find_header, Header, Outbound, DEDUP_HEADER};
use crate::pipeline::dead_letter::{ATTEMPTS, ERROR, ERROR_KIND, FAILED_AT, FAILURE_HEADERS, ORIGIN, ROUTE};
use crate::pipeline::REPLAYS_HEADER;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Most dead letters looked at in one call: bounds the memory and time of
/// a scan (RabbitMQ holds every message looked at until the scan ends).
const SCAN_LIMIT: usize = 100_000;

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
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("say which dead letters to replay: sequence numbers, --kind, --route or --all")]
    NoFilter,
    #[error("dead letter #{seq} came from route `{route}`, which is not an embedded route of this daemon")]
    UnknownRoute { seq: u64, route: String },
    #[error("dead letter #{seq} has no origin to go back to, or one no route of this daemon consumes (sluice-origin: {origin:?})")]
    NoOrigin { seq: u64, origin: String },
}

/// Where one dead-letter destination is kept.
#[derive(Clone)]
pub enum Backend {
    /// A queue of the embedded broker; replays go straight to the route's
    /// queue. `routes` are the embedded routes of the daemon.
    Embedded {
        broker: EmbeddedBroker,
        queue: String,
        routes: BTreeSet<String>,
    },
    /// A JetStream stream that stores the dead-letter subject; replays are
    /// published to the origin subject.
    Stream {
        nats: Box<NatsBroker>,
        stream: String,
        subject: String,
    },
    /// A RabbitMQ queue; replays go straight to the route's work queue,
    /// one of `work_queues` (the origin is a header: anyone who can write
    /// to the dead-letter queue could name another).
    Rabbit {
        rabbit: RabbitBroker,
        queue: String,
        work_queues: BTreeSet<String>,
    },
    /// A Kafka topic: a log, so replayed records stay in it. Replays go to
    /// one of the routes' `topics` (any topic when a route subscribes by
    /// pattern).
    Kafka {
        kafka: KafkaBroker,
        topic: String,
        topics: BTreeSet<String>,
        any_topic: bool,
    },
}

fn header(headers: &[Header], name: &str) -> String {
    find_header(headers, name).unwrap_or_default().to_owned()
}

/// The subject a dead letter came from, from its `sluice-origin`
/// (`embedded://S?..`, `nats://S`, `jetstream://STREAM/S?..`).
pub fn origin_subject(origin: &str) -> Option<&str> {
    if let Some((subject, _)) = parse_origin(origin) {
        return Some(subject);
    }
    if let Some((_, routing_key)) = rabbitmq::parse_origin(origin) {
        return Some(routing_key);
    }
    if let Some(rest) = origin.strip_prefix("kafka://") {
        return Some(rest.split('?').next().unwrap_or(rest));
    }
    if let Some(rest) = origin.strip_prefix("nats://") {
        return Some(rest.split('?').next().unwrap_or(rest));
    }
    let rest = origin.strip_prefix("jetstream://")?;
    let (_, rest) = rest.split_once('/')?;
    Some(rest.split('?').next().unwrap_or(rest))
}

pub fn summary(seq: u64, headers: &[Header]) -> Summary {
    let origin = header(headers, ORIGIN);
    Summary {
        seq,
        route: header(headers, ROUTE),
        subject: origin_subject(&origin).map(str::to_owned).unwrap_or(origin),
        kind: header(headers, ERROR_KIND),
        error: header(headers, ERROR),
        attempts: header(headers, ATTEMPTS),
        failed_at: header(headers, FAILED_AT),
    }
}

/// A replayed copy: failure headers stripped, the replay counted.
fn replayed(subject: String, headers: Vec<Header>, payload: Vec<u8>) -> Outbound {
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
    Outbound {
        subject,
        headers,
        payload,
    }
}

impl Backend {
    pub fn name(&self) -> &str {
        match self {
            Self::Embedded { queue, .. } => queue,
            Self::Stream { subject, .. } => subject,
            Self::Rabbit { queue, .. } => queue,
            Self::Kafka { topic, .. } => topic,
        }
    }

    /// Dead letters, oldest first: (sequence, message).
    pub async fn letters(&self, limit: usize) -> Result<Vec<(u64, Outbound)>, DlqError> {
        Ok(match self {
            Self::Embedded { broker, queue, .. } => broker
                .peek(queue, limit)?
                .into_iter()
                .map(|(seq, s)| {
                    (
                        seq,
                        Outbound {
                            subject: s.subject,
                            headers: s.headers,
                            payload: s.payload,
                        },
                    )
                })
                .collect(),
            Self::Stream { nats, stream, subject } => nats.stored(stream, subject, limit).await?,
            Self::Rabbit { rabbit, queue, .. } => rabbit.browse(queue, limit).await?,
            Self::Kafka { kafka, topic, .. } => kafka::admin::read_topic(kafka.config(), topic, limit).await?,
        })
    }

    pub async fn get(&self, seq: u64) -> Result<Option<Outbound>, DlqError> {
        Ok(match self {
            Self::Embedded { broker, queue, .. } => broker.get(queue, seq)?.map(|s| Outbound {
                subject: s.subject,
                headers: s.headers,
                payload: s.payload,
            }),
            Self::Stream { nats, stream, subject } => nats.stored_one(stream, subject, seq).await?,
            Self::Rabbit { rabbit, queue, .. } => {
                if seq > SCAN_LIMIT as u64 {
                    return Ok(None);
                }
                let limit = usize::try_from(seq).unwrap_or(SCAN_LIMIT);
                rabbit
                    .browse(queue, limit)
                    .await?
                    .into_iter()
                    .find(|(s, _)| *s == seq)
                    .map(|(_, m)| m)
            }
            Self::Kafka { kafka, topic, .. } => kafka::admin::read_topic(kafka.config(), topic, SCAN_LIMIT)
                .await?
                .into_iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, m)| m),
        })
    }

    pub async fn list(&self, limit: usize) -> Result<Vec<Summary>, DlqError> {
        Ok(self
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
        if let Self::Rabbit {
            rabbit,
            queue,
            work_queues,
        } = self
        {
            // Read and moved in one pass: positions are only stable while
            // the messages are held.
            let mut refused = None;
            let moved = rabbit
                .move_letters(queue, SCAN_LIMIT, |letter| {
                    let s = summary(letter.seq, &letter.message.headers);
                    if refused.is_some() || !filter.matches(letter.seq, &s) {
                        return Ok(None);
                    }
                    let origin = header(&letter.message.headers, ORIGIN);
                    let origin_known = rabbitmq::parse_origin(&origin).filter(|(q, _)| work_queues.contains(*q));
                    let Some((work_queue, routing_key)) = origin_known else {
                        refused = Some(DlqError::NoOrigin {
                            seq: letter.seq,
                            origin,
                        });
                        return Ok(None);
                    };
                    let m = letter.message.clone();
                    Ok(Some((
                        work_queue.to_owned(),
                        routing_key.to_owned(),
                        replayed(routing_key.to_owned(), m.headers, m.payload),
                    )))
                })
                .await?;
            return match refused {
                Some(e) => Err(e),
                None => Ok(moved),
            };
        }
        let mut selected = Vec::new();
        for (seq, m) in self.letters(SCAN_LIMIT).await? {
            let s = summary(seq, &m.headers);
            if filter.matches(seq, &s) {
                selected.push((seq, s, m));
            }
        }
        match self {
            Self::Embedded { broker, queue, routes } => {
                let mut per_route: BTreeMap<String, (Vec<Outbound>, Vec<u64>)> = BTreeMap::new();
                for (seq, s, m) in selected {
                    if !routes.contains(&s.route) {
                        return Err(DlqError::UnknownRoute { seq, route: s.route });
                    }
                    let entry = per_route.entry(s.route).or_default();
                    entry.0.push(replayed(s.subject, m.headers, m.payload));
                    entry.1.push(seq);
                }
                let mut moved = 0;
                for (route, (messages, seqs)) in per_route {
                    moved += seqs.len();
                    broker.move_messages(&route, messages, queue, seqs).await?;
                }
                Ok(moved)
            }
            Self::Stream { nats, stream, .. } => {
                let mut moved = 0;
                for (seq, _, m) in selected {
                    let origin = header(&m.headers, ORIGIN);
                    let Some(subject) = origin_subject(&origin).map(str::to_owned) else {
                        return Err(DlqError::NoOrigin { seq, origin });
                    };
                    // The origin is a header: anyone who could write to the
                    // dead-letter subject could forge it.
                    if crate::headers::is_system_subject(&subject) || nats.stream_for(&subject).is_none() {
                        return Err(DlqError::NoOrigin { seq, origin });
                    }
                    // Published (and confirmed) before it is deleted: a crash
                    // in between replays it twice, never zero times.
                    let published =
                        Sink::publish(&nats.confirmed_sink(), vec![replayed(subject, m.headers, m.payload)]).await?;
                    if published.duplicates > 0 {
                        // Not stored now: keep the dead letter.
                        tracing::warn!(
                            seq,
                            "replay dropped by JetStream as a duplicate; the dead letter is kept"
                        );
                        continue;
                    }
                    nats.delete_stored(stream, seq).await?;
                    moved += 1;
                }
                Ok(moved)
            }
            Self::Rabbit { .. } => Ok(0),
            Self::Kafka {
                kafka,
                topics,
                any_topic,
                ..
            } => {
                let mut moved = 0;
                for (seq, _, m) in selected {
                    let origin = header(&m.headers, ORIGIN);
                    let known = origin_subject(&origin).filter(|t| *any_topic || topics.contains(*t));
                    let Some(topic) = known.map(str::to_owned) else {
                        return Err(DlqError::NoOrigin { seq, origin });
                    };
                    // The key travels in the sluice-key header, which the
                    // producer turns back into the record key.
                    kafka.produce(&replayed(topic, m.headers, m.payload)).await?;
                    moved += 1;
                }
                Ok(moved)
            }
        }
    }
}
