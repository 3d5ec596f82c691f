//! W3C trace context: a `traceparent` on an incoming message is continued by
//! everything the handling sends (publishes, reply, dead letter) as a child
//! span with the same trace id.

use crate::message::{find_header, Header, Message};

pub const TRACEPARENT: &str = "traceparent";

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// The span of one handling, continuing the trace of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpan {
    pub trace_id: String,
    /// The span id of the incoming message's `traceparent`.
    pub parent_id: String,
    /// The handling's own span id: the parent of what it sends.
    pub span_id: String,
    /// The `traceparent` everything the handling sends carries.
    pub traceparent: String,
}

/// The span of the handling of `msg`: same version, trace id and flags, a
/// new span id. None if the message carries no valid `traceparent`.
pub fn handler_span(msg: &Message) -> Option<HandlerSpan> {
    let parent = find_header(&msg.headers, TRACEPARENT)?;
    let mut parts = parent.trim().split('-');
    let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = is_hex(version, 2)
        && version != "ff"
        && is_hex(trace_id, 32)
        && trace_id.bytes().any(|b| b != b'0')
        && is_hex(span_id, 16)
        && is_hex(flags, 2);
    if !valid {
        return None;
    }
    let mut span = rand::random::<u64>();
    if span == 0 {
        span = 1;
    }
    let own = format!("{span:016x}");
    Some(HandlerSpan {
        trace_id: trace_id.to_owned(),
        parent_id: span_id.to_owned(),
        traceparent: format!("{version}-{trace_id}-{own}-{flags}"),
        span_id: own,
    })
}

/// A span starting a new trace (sampled), for a message that carries no
/// `traceparent` when spans are exported.
pub fn root_span() -> HandlerSpan {
    let trace = rand::random::<u128>().max(1);
    let span = rand::random::<u64>().max(1);
    let (trace_id, span_id) = (format!("{trace:032x}"), format!("{span:016x}"));
    HandlerSpan {
        traceparent: format!("00-{trace_id}-{span_id}-01"),
        trace_id,
        parent_id: String::new(),
        span_id,
    }
}

/// Sets (or replaces) the `traceparent` of outgoing headers.
pub fn stamp(headers: &mut Vec<Header>, traceparent: &str) {
    headers.retain(|h| !h.name.eq_ignore_ascii_case(TRACEPARENT));
    headers.push(Header::new(TRACEPARENT, traceparent));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tp: &str) -> Message {
        Message {
            id: "1".into(),
            subject: "s".into(),
            key: None,
            headers: vec![Header::new("traceparent", tp)],
            payload: Vec::new(),
            attempt: 1,
            timestamp_ms: 0,
            reply_to: None,
        }
    }

    #[test]
    fn child_keeps_trace_and_flags_with_a_new_span() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = handler_span(&msg(parent)).unwrap();
        assert_eq!(span.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span.parent_id, "00f067aa0ba902b7");
        assert!(span.traceparent.contains(&span.span_id));
        let child = span.traceparent;
        assert!(child.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, parent);
        assert_eq!(child.len(), parent.len());
    }

    #[test]
    fn invalid_parents_are_ignored() {
        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(handler_span(&msg(bad)), None, "{bad}");
        }
    }
}
