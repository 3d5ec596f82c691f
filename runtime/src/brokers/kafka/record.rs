//! Kafka record parts a producer controls, turned into sluice's text model
//! without panicking and without collisions: header names that are not
//! UTF-8 (rdkafka's own header iterator unwraps them), binary keys.

use crate::message::Header;
use rdkafka::bindings as rdsys;
use rdkafka::message::BorrowedMessage;
use std::ffi::CStr;

/// Prefix of a key that is carried as hex: a binary key, or a text key that
/// itself starts with the prefix (so the mapping stays one-to-one).
const HEX_KEY: &str = "hex:";

/// A record key as text: itself when it is UTF-8 (and does not start with
/// `hex:`), else `hex:` and its bytes in hex. Two different keys never give
/// the same text, so idempotency and ordering keys cannot collide.
pub fn key_text(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.starts_with(HEX_KEY) => text.to_owned(),
        _ => format!("{HEX_KEY}{}", hex::encode(key)),
    }
}

/// The bytes of a key given as text by [`key_text`] (or by a handler).
pub fn key_bytes(text: &str) -> Vec<u8> {
    text.strip_prefix(HEX_KEY)
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// The headers of a consumed record; names and values that are not UTF-8
/// are converted lossily.
pub fn headers(m: &BorrowedMessage<'_>) -> Vec<Header> {
    let mut out = Vec::new();
    let mut native: *mut rdsys::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m` is a live message; the headers it returns live as long as
    // it does, and are only read here.
    let found = unsafe { rdsys::rd_kafka_message_headers(m.ptr(), &mut native) };
    if found != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        return out;
    }
    for idx in 0.. {
        let mut name: *const std::os::raw::c_char = std::ptr::null();
        let mut value: *const std::os::raw::c_void = std::ptr::null();
        let mut size: usize = 0;
        // SAFETY: `native` is valid (above); the out-pointers are ours.
        let err = unsafe { rdsys::rd_kafka_header_get_all(native, idx, &mut name, &mut value, &mut size) };
        if err != rdsys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            break;
        }
        // SAFETY: librdkafka hands out NUL-terminated names and `size`
        // bytes of value, valid while the message is.
        let name = unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned();
        let value = if value.is_null() {
            String::new()
        } else {
            let bytes = unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) };
            String::from_utf8_lossy(bytes).into_owned()
        };
        out.push(Header::new(name, value));
    }
    out
}

/// A topic name Kafka accepts: 1..=249 of `[a-zA-Z0-9._-]`, not `.`/`..`.
pub fn check_topic(topic: &str) -> Result<(), String> {
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if topic.is_empty() || topic.len() > 249 || topic == "." || topic == ".." || !topic.chars().all(legal) {
        return Err(format!(
            "{:?} is not a valid Kafka topic (1-249 of a-z A-Z 0-9 . _ -)",
            crate::headers::shown(topic)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_one_to_one() {
        assert_eq!(key_text(b"order-1"), "order-1");
        let binary = [0xff, 0x00, 0x41];
        assert_eq!(key_text(&binary), "hex:ff0041");
        // Two binary keys that are equal when converted lossily stay apart.
        assert_ne!(key_text(&[0xff]), key_text(&[0xfe]));
        // A text key that looks like an encoded one is encoded too.
        assert_ne!(key_text(b"hex:ff"), key_text(&[0xff]));
        for key in [&b"order-1"[..], &binary, b"hex:ff", b""] {
            assert_eq!(key_bytes(&key_text(key)), key);
        }
    }

    #[test]
    fn topics() {
        assert!(check_topic("orders.created_v2-x").is_ok());
        for bad in ["", ".", "..", "a b", "a/b", "ä", &"t".repeat(250)] {
            assert!(check_topic(bad).is_err(), "{bad}");
        }
    }
}
