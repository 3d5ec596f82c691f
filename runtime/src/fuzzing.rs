//! Entry points of the fuzz targets in `fuzz/` (`cargo fuzz run <target>`):
//! the parsers and conversions that take bytes from producers, plugins and
//! operators. Each must return, never panic; where two layers check the
//! same thing, they must agree. Not a stable API.

use crate::message::{Header, Message};
use std::path::Path;

/// Config text, as an operator (or an environment variable) writes it.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::parse_str(text, Path::new("fuzz.toml"));
        let _ = crate::config::interpolate::interpolate(text, |name| Some(name.repeat(2)));
    }
}

/// Splits `data` into (name, value) pairs at NUL and `=` bytes.
fn pairs(data: &[u8]) -> Vec<Header> {
    data.split(|b| *b == 0)
        .filter_map(|part| {
            let text = String::from_utf8_lossy(part);
            let (name, value) = text.split_once('=')?;
            Some(Header::new(name, value))
        })
        .collect()
}

/// What a producer sends, per broker: an AMQP header table from its wire
/// bytes (headers shown, attempt count), Kafka record keys and retry
/// headers, a subject and headers as a handler sees them.
pub fn inbound(data: &[u8]) {
    if let Ok((_, table)) = lapin::types::parsing::parse_field_table(data) {
        let _ = crate::brokers::rabbitmq::fuzz_inbound(&table);
    }
    let key = crate::brokers::kafka::record::key_text(data);
    assert_eq!(
        crate::brokers::kafka::record::key_bytes(&key),
        data,
        "Kafka keys round-trip"
    );
    let headers = pairs(data);
    let mut msg = Message {
        id: "1".into(),
        subject: String::from_utf8_lossy(data).into_owned(),
        key: None,
        headers,
        payload: Vec::new(),
        attempt: 1,
        timestamp_ms: 0,
        reply_to: None,
    };
    crate::brokers::kafka::fuzz_retry_headers(&mut msg);
    let _ = crate::brokers::embedded::parse_origin(&msg.subject);
    let _ = crate::brokers::origin_subject(&msg.subject);
    let _ = crate::keys::KeySource::parse(&msg.subject);
}

/// What a plugin hands the host to send: the host's rules first, then each
/// broker's conversion. What the host accepts, NATS must carry.
pub fn outbound(data: &[u8]) {
    let headers = pairs(data);
    let subject = String::from_utf8_lossy(data.split(|b| *b == 0).next().unwrap_or_default()).into_owned();
    let host_ok = crate::headers::check_plugin_headers(&headers).is_ok();
    let nats = crate::brokers::nats::to_header_map(&headers);
    if host_ok {
        assert!(nats.is_ok(), "the host accepted headers NATS refuses: {headers:?}");
    }
    let _ = crate::headers::check_subject(&subject);
    let _ = crate::brokers::kafka::record::check_topic(&subject);
    let copy = crate::message::Outbound {
        subject,
        headers,
        payload: data.to_vec(),
    };
    let (portable, _) = crate::pipeline::dead_letter::portable(copy);
    assert!(crate::brokers::nats::to_header_map(&portable.headers).is_ok());
    let _ = crate::pipeline::dead_letter::one_line(&String::from_utf8_lossy(data));
}
