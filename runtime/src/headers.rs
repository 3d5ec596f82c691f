//! Rules for what a plugin may hand the host to send: header names and
//! values every broker can carry, names reserved for the host, and bounds.
//! Checked when the plugin calls `publish` or returns a reply, so a bad
//! value becomes a clear handler error instead of reaching a broker client
//! (some of which assert, i.e. panic, on it).

use crate::message::Header;

/// Most headers on one outbound message.
pub const MAX_HEADERS: usize = 256;
/// Longest header name, in bytes (AMQP field names are short strings).
pub const MAX_NAME_BYTES: usize = 255;
/// Most bytes of names and values on one outbound message.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Longest subject, topic or routing key a plugin may name.
pub const MAX_SUBJECT_BYTES: usize = 1024;

/// Header name prefixes only the host sets: dedup ids and the NATS server's
/// own controls (`Nats-Rollup` can purge a subject, `Nats-Expected-*` steer
/// writes), sluice's failure and retry bookkeeping, RabbitMQ's death record.
const RESERVED_PREFIXES: [&str; 4] = ["nats-", "sluice-", "x-sluice-", "x-death"];
/// Reserved-looking names a plugin may still set on purpose.
const PLUGIN_SETTABLE: [&str; 1] = [crate::message::KEY_HEADER];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("header name is empty")]
    EmptyName,
    #[error("header name {0:?} is not printable ASCII without spaces or ':'")]
    BadName(String),
    #[error("header name {0:?}... is longer than {MAX_NAME_BYTES} bytes")]
    LongName(String),
    #[error("header {0:?} has a value with a control character (CR, LF, NUL...)")]
    BadValue(String),
    #[error("more than {MAX_HEADERS} headers")]
    TooMany,
    #[error("headers of more than {} KiB in all", MAX_HEADER_BYTES >> 10)]
    TooLarge,
}

/// A short, printable rendering of an untrusted string for error texts.
pub fn shown(text: &str) -> String {
    text.chars()
        .take(64)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// True for names only the host may set.
pub fn is_reserved(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
        && !PLUGIN_SETTABLE.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A name every broker accepts: 1..=255 bytes of printable ASCII, no ':'.
pub fn check_name(name: &str) -> Result<(), HeaderError> {
    if name.is_empty() {
        return Err(HeaderError::EmptyName);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(HeaderError::LongName(shown(name)));
    }
    if name.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
        return Err(HeaderError::BadName(shown(name)));
    }
    Ok(())
}

/// A value every broker accepts: no control characters except tab.
pub fn check_value(name: &str, value: &str) -> Result<(), HeaderError> {
    if value.chars().any(|c| c.is_control() && c != '\t') {
        return Err(HeaderError::BadValue(shown(name)));
    }
    Ok(())
}

/// Takes the reserved headers out of what a plugin wants sent (a plugin
/// that forwards a message's headers forwards `Nats-Msg-Id` too): the
/// host's own values are the only ones. Returns how many were dropped.
pub fn strip_reserved(headers: &mut Vec<Header>) -> usize {
    let before = headers.len();
    headers.retain(|h| !is_reserved(&h.name));
    before - headers.len()
}

/// Checks the headers a plugin wants sent (reserved ones already
/// stripped); returns their size in bytes.
pub fn check_plugin_headers(headers: &[Header]) -> Result<usize, HeaderError> {
    if headers.len() > MAX_HEADERS {
        return Err(HeaderError::TooMany);
    }
    let mut bytes = 0usize;
    for h in headers {
        check_name(&h.name)?;
        check_value(&h.name, &h.value)?;
        bytes = bytes.saturating_add(h.name.len() + h.value.len());
    }
    if bytes > MAX_HEADER_BYTES {
        return Err(HeaderError::TooLarge);
    }
    Ok(bytes)
}

/// A subject the host will send to for a plugin: bounded, no control
/// characters, a valid concrete subject.
pub fn check_subject(subject: &str) -> Result<(), String> {
    check_address(subject)?;
    crate::subject::validate_subject(subject).map_err(|e| e.to_string())
}

/// Any address (subject, reply address) the host sends to: bounded length,
/// no control characters.
pub fn check_address(address: &str) -> Result<(), String> {
    if address.len() > MAX_SUBJECT_BYTES {
        return Err(format!(
            "{:?}... is longer than {MAX_SUBJECT_BYTES} bytes",
            shown(address)
        ));
    }
    if address.chars().any(char::is_control) {
        return Err(format!("{:?} contains a control character", shown(address)));
    }
    Ok(())
}

/// Subject prefixes a plugin, a reply address or a replay may never reach
/// unless an allow-list names them literally: the NATS server's APIs
/// (`$JS.API.STREAM.DELETE.X`), system and KV subjects, and inboxes of the
/// server itself.
const SYSTEM_PREFIXES: [&str; 4] = ["$JS.", "$SYS.", "$KV.", "$O."];

/// True for subjects that control the NATS server rather than carry data.
pub fn is_system_subject(subject: &str) -> bool {
    SYSTEM_PREFIXES.iter().any(|p| subject.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values() {
        assert!(check_name("Idempotency-Key").is_ok());
        assert_eq!(check_name(""), Err(HeaderError::EmptyName));
        assert!(matches!(check_name("bad name"), Err(HeaderError::BadName(_))));
        assert!(matches!(check_name("a:b"), Err(HeaderError::BadName(_))));
        assert!(matches!(check_name("é"), Err(HeaderError::BadName(_))));
        assert!(matches!(check_name(&"n".repeat(256)), Err(HeaderError::LongName(_))));
        assert!(check_value("h", "a\tb").is_ok());
        assert!(check_value("h", "a\r\nX-Forged: 1").is_err());
        assert!(check_value("h", "nul\0").is_err());
    }

    #[test]
    fn reserved_names_are_the_hosts() {
        for name in [
            "Nats-Msg-Id",
            "nats-rollup",
            "sluice-error",
            "X-Sluice-Attempt",
            "x-death",
        ] {
            assert!(is_reserved(name), "{name}");
        }
        assert!(!is_reserved("sluice-key"));
        assert!(!is_reserved("traceparent"));
        let mut forged = vec![
            Header::new("Nats-Msg-Id", "x"),
            Header::new("sluice-key", "k"),
            Header::new("a", "b"),
        ];
        assert_eq!(strip_reserved(&mut forged), 1);
        assert_eq!(forged.len(), 2);
    }

    #[test]
    fn bounds() {
        let many: Vec<Header> = (0..=MAX_HEADERS).map(|i| Header::new(format!("h{i}"), "v")).collect();
        assert_eq!(check_plugin_headers(&many), Err(HeaderError::TooMany));
        let big = [Header::new("h", "v".repeat(MAX_HEADER_BYTES))];
        assert_eq!(check_plugin_headers(&big), Err(HeaderError::TooLarge));
    }

    #[test]
    fn system_subjects() {
        assert!(is_system_subject("$JS.API.STREAM.DELETE.ORDERS"));
        assert!(is_system_subject("$KV.bucket.key"));
        assert!(!is_system_subject("orders.created"));
    }
}
