//! The dead-lettered copy: payload and headers byte for byte, plus the
//! `sluice-*` headers saying what failed, where and when.

use crate::engine::FailureKind;
use crate::message::{Header, Message, Outbound, DEDUP_HEADER};
use std::time::SystemTime;

pub const ERROR: &str = "sluice-error";
pub const ERROR_KIND: &str = "sluice-error-kind";
pub const ATTEMPTS: &str = "sluice-attempts";
pub const ROUTE: &str = "sluice-route";
pub const PLUGIN: &str = "sluice-plugin";
pub const ORIGIN: &str = "sluice-origin";
pub const FAILED_AT: &str = "sluice-failed-at";
/// The producer's `Nats-Msg-Id` of a dead-lettered message: the copy has a
/// dedup id of its own, so no broker drops it as a duplicate of its
/// original.
pub const ORIGINAL_MSG_ID: &str = "sluice-original-msg-id";

/// All headers sluice adds to a dead letter.
pub const FAILURE_HEADERS: [&str; 7] = [ERROR, ERROR_KIND, ATTEMPTS, ROUTE, PLUGIN, ORIGIN, FAILED_AT];

pub struct FailureContext<'a> {
    pub kind: FailureKind,
    pub reason: &'a str,
    pub route: &'a str,
    pub plugin_name: &'a str,
    pub plugin_hash: &'a str,
    pub origin: String,
    /// The copy's own dedup id (`<route>:<key or id>:dlq:<attempt>`).
    pub dedup_id: String,
}

pub fn copy(msg: &Message, subject: &str, failure: FailureContext<'_>) -> Outbound {
    // Earlier failure headers (a replayed message that failed again) are
    // replaced, not repeated.
    let mut headers: Vec<Header> = msg
        .headers
        .iter()
        .filter(|h| !FAILURE_HEADERS.iter().any(|f| h.name.eq_ignore_ascii_case(f)))
        .map(|h| {
            if h.name.eq_ignore_ascii_case(DEDUP_HEADER) {
                Header::new(ORIGINAL_MSG_ID, h.value.as_str())
            } else {
                h.clone()
            }
        })
        .collect();
    if let Some(key) = &msg.key {
        if crate::message::find_header(&headers, crate::message::KEY_HEADER).is_none() {
            headers.push(Header::new(crate::message::KEY_HEADER, key.as_str()));
        }
    }
    headers.extend([
        Header::new(ERROR, one_line(failure.reason)),
        Header::new(ERROR_KIND, failure.kind.as_str()),
        Header::new(ATTEMPTS, msg.attempt.to_string()),
        Header::new(ROUTE, failure.route),
        Header::new(
            PLUGIN,
            format!("{}@sha256:{}", failure.plugin_name, failure.plugin_hash),
        ),
        Header::new(ORIGIN, failure.origin),
        Header::new(DEDUP_HEADER, failure.dedup_id),
        Header::new(
            FAILED_AT,
            humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        ),
    ]);
    Outbound {
        subject: subject.to_owned(),
        headers,
        payload: msg.payload.clone(),
    }
}

/// `copy` without the headers no broker can carry (names or values a
/// producer of another broker could set); returns how many were dropped.
pub fn portable(mut copy: Outbound) -> (Outbound, usize) {
    let before = copy.headers.len();
    copy.headers.retain(|h| {
        crate::headers::check_name(&h.name).is_ok() && crate::headers::check_value(&h.name, &h.value).is_ok()
    });
    let dropped = before - copy.headers.len();
    (copy, dropped)
}

/// Set on a dead letter sent without its payload (the broker refused the
/// full copy): the payload's size in bytes.
pub const PAYLOAD_DROPPED: &str = "sluice-payload-dropped";

/// `copy` with only sluice's failure headers and no payload: what is left
/// when the dead-letter broker refuses the full copy.
pub fn without_payload(mut copy: Outbound) -> Outbound {
    let size = copy.payload.len();
    copy.headers.retain(|h| {
        FAILURE_HEADERS.iter().any(|f| h.name.eq_ignore_ascii_case(f))
            || h.name.eq_ignore_ascii_case(DEDUP_HEADER)
            || h.name.eq_ignore_ascii_case(ORIGINAL_MSG_ID)
    });
    copy.headers.push(Header::new(PAYLOAD_DROPPED, size.to_string()));
    copy.payload = Vec::new();
    copy
}

/// A short hash of a message's payload and headers.
pub fn content_hash(msg: &Message) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(&msg.payload);
    // Sorted: some brokers' clients hand headers out in no fixed order, and
    // a redelivery must hash the same.
    let mut headers: Vec<&crate::message::Header> = msg.headers.iter().collect();
    headers.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    for header in headers {
        h.update(header.name.as_bytes());
        h.update([0]);
        h.update(header.value.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..6])
}

/// Header values must stay on one line for every broker.
pub fn one_line(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    flat.chars().take(1024).collect()
}
