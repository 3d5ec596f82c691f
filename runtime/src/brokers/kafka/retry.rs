//! Non-blocking retries through retry topics: a record whose attempt N
//! failed is produced to `<topic>.retry.N` with a not-before time, and its
//! offset settles, so the records after it flow on. The consumer reads the
//! retry topics too; a record read before it is due is held, and its retry
//! partition is not read further until then. The retry headers are taken
//! off before the handler sees the record, so it sees the original topic
//! and the attempt number.

use crate::message::{Header, Message, Outbound, KEY_HEADER};

/// The original record's topic.
pub const TOPIC: &str = "sluice-retry-topic";
/// The attempt the retried record is (2 for the first retry).
pub const ATTEMPT: &str = "sluice-retry-attempt";
/// Not to be handled before this time, in milliseconds since the epoch.
pub const NOT_BEFORE: &str = "sluice-retry-not-before";
/// Where the original record is (`kafka://topic?partition=P&offset=O`):
/// dead letters point there, so a replay goes to the original topic.
pub const ORIGIN: &str = "sluice-retry-origin";

/// Longest a retry-topic record is held before it is handled, whatever its
/// not-before says.
pub const MAX_HOLD: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The retry topic of level `level` for `topic`.
pub fn retry_topic(topic: &str, level: u32) -> String {
    format!("{topic}.retry.{level}")
}

/// The topic a retry topic (`<topic>.retry.<n>`) retries.
pub fn retried_topic(topic: &str) -> Option<&str> {
    let (base, level) = topic.rsplit_once(".retry.")?;
    (!base.is_empty() && level.parse::<u32>().is_ok()).then_some(base)
}

/// Retry headers are sluice's own bookkeeping on its retry topics; on any
/// other record they are a producer's forgery (a not-before in the far
/// future would freeze the partition) and are taken off unread.
pub fn scrub(msg: &mut Message, retry_topics: bool) {
    if retry_topics && retried_topic(&msg.subject).is_some() {
        return;
    }
    msg.headers.retain(|h| !is_retry_header(&h.name));
}

fn is_retry_header(name: &str) -> bool {
    [TOPIC, ATTEMPT, NOT_BEFORE, ORIGIN]
        .iter()
        .any(|r| r.eq_ignore_ascii_case(name))
}

/// What a record read from a retry topic says about the original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retried {
    pub topic: String,
    pub origin: String,
}

/// The not-before time of a record, from its raw headers.
pub fn not_before_ms(headers: &[Header]) -> Option<u64> {
    crate::message::find_header(headers, NOT_BEFORE).and_then(|v| v.parse().ok())
}

/// Takes the retry headers off `msg`, restoring the original topic as its
/// subject and the attempt number; `None` for a first delivery.
pub fn restore(msg: &mut Message) -> Option<Retried> {
    // The original topic is the retry topic's base, whatever a header says.
    let topic = retried_topic(&msg.subject)?.to_owned();
    msg.header(TOPIC)?;
    if let Some(attempt) = msg.header(ATTEMPT).and_then(|a| a.parse::<u32>().ok()) {
        msg.attempt = attempt.max(1);
    }
    let origin = msg
        .header(ORIGIN)
        .filter(|o| o.starts_with(&format!("kafka://{topic}?")))
        .map(str::to_owned)
        .unwrap_or_default();
    msg.headers.retain(|h| !is_retry_header(&h.name));
    msg.subject = topic.clone();
    // The original record's id: publish dedup ids stay the same across
    // attempts.
    if let Some(id) = id_of(&origin) {
        msg.id = id;
    }
    Some(Retried { topic, origin })
}

/// `topic/partition/offset` of a `kafka://topic?partition=P&offset=O`.
fn id_of(origin: &str) -> Option<String> {
    let (topic, query) = origin.strip_prefix("kafka://")?.split_once('?')?;
    let (partition, offset) = query.strip_prefix("partition=")?.split_once("&offset=")?;
    Some(format!("{topic}/{partition}/{offset}"))
}

/// The record to produce for the next attempt of `msg` (whose attempt
/// failed), due at `not_before_ms`.
pub fn next(msg: &Message, origin: &str, not_before_ms: u64) -> Outbound {
    let mut headers = msg.headers.clone();
    if let Some(key) = &msg.key {
        headers.push(Header::new(KEY_HEADER, key.clone()));
    }
    headers.push(Header::new(TOPIC, msg.subject.clone()));
    headers.push(Header::new(ATTEMPT, msg.attempt.saturating_add(1).to_string()));
    headers.push(Header::new(NOT_BEFORE, not_before_ms.to_string()));
    headers.push(Header::new(ORIGIN, origin));
    Outbound {
        subject: retry_topic(&msg.subject, msg.attempt),
        headers,
        payload: msg.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_record_round_trips_to_the_original_message_one_attempt_on() {
        let msg = Message {
            id: "orders/0/7".into(),
            subject: "orders".into(),
            key: Some("u-1".into()),
            headers: vec![Header::new("h", "v")],
            payload: b"p".to_vec(),
            attempt: 2,
            timestamp_ms: 0,
            reply_to: None,
        };
        let out = next(&msg, "kafka://orders?partition=0&offset=7", 1234);
        assert_eq!(out.subject, "orders.retry.2");
        assert_eq!(not_before_ms(&out.headers), Some(1234));
        let mut again = Message {
            id: "orders.retry.2/0/0".into(),
            subject: out.subject.clone(),
            key: Some("u-1".into()),
            headers: out.headers.into_iter().filter(|h| h.name != KEY_HEADER).collect(),
            payload: out.payload,
            attempt: 1,
            timestamp_ms: 0,
            reply_to: None,
        };
        let retried = restore(&mut again).unwrap();
        assert_eq!(retried.origin, "kafka://orders?partition=0&offset=7");
        assert_eq!(again.subject, "orders");
        assert_eq!(again.id, "orders/0/7");
        assert_eq!(again.attempt, 3);
        assert_eq!(again.headers, vec![Header::new("h", "v")]);
    }
}
