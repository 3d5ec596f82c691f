//! Where a key comes from: a header, a JSON pointer into the payload, the
//! broker-native id, or the broker's message key. Used for idempotency keys
//! and ordering keys.

use crate::message::Message;

/// Parsed once, when the config is read: `header:NAME`, `json:/pointer`,
/// `id`, `key` or `none`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum KeySource {
    None,
    /// The broker-native message id.
    Id,
    /// The broker's message key (Kafka key).
    MessageKey,
    Header(String),
    /// RFC 6901 pointer, e.g. `/order/id`.
    Json(String),
}

impl TryFrom<String> for KeySource {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Self::parse(&text)
    }
}

impl KeySource {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "none" => Ok(Self::None),
            "id" => Ok(Self::Id),
            "key" => Ok(Self::MessageKey),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    if name.is_empty() {
                        return Err("`header:` needs a header name".into());
                    }
                    Ok(Self::Header(name.to_owned()))
                } else if let Some(pointer) = text.strip_prefix("json:") {
                    if !pointer.starts_with('/') {
                        return Err(format!("`json:{pointer}`: a JSON pointer starts with `/`"));
                    }
                    Ok(Self::Json(pointer.to_owned()))
                } else {
                    Err(format!(
                        "{text:?} is not a key source (header:NAME, json:/pointer, id, key or none)"
                    ))
                }
            }
        }
    }

    /// The key of `msg`, if it has one.
    pub fn extract(&self, msg: &Message) -> Option<String> {
        match self {
            Self::None => None,
            Self::Id => Some(msg.id.clone()),
            Self::MessageKey => msg.key.clone(),
            Self::Header(name) => msg.header(name).map(str::to_owned),
            Self::Json(pointer) => {
                let value: serde_json::Value = serde_json::from_slice(&msg.payload).ok()?;
                match value.pointer(pointer)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Null => None,
                    other => Some(other.to_string()),
                }
            }
        }
        .filter(|k| !k.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Header;

    fn msg() -> Message {
        Message {
            id: "7".into(),
            subject: "s".into(),
            key: Some("kk".into()),
            headers: vec![Header::new("Idempotency-Key", "abc")],
            payload: br#"{"order":{"id":42,"ref":"r-1"}}"#.to_vec(),
            attempt: 1,
            timestamp_ms: 0,
            reply_to: None,
        }
    }

    #[test]
    fn extracts_from_each_source() {
        let m = msg();
        let get = |s: &str| KeySource::parse(s).unwrap().extract(&m);
        assert_eq!(get("header:idempotency-key"), Some("abc".into()));
        assert_eq!(get("json:/order/id"), Some("42".into()));
        assert_eq!(get("json:/order/ref"), Some("r-1".into()));
        assert_eq!(get("json:/missing"), None);
        assert_eq!(get("id"), Some("7".into()));
        assert_eq!(get("key"), Some("kk".into()));
        assert_eq!(get("none"), None);
        assert!(KeySource::parse("json:order").is_err());
        assert!(KeySource::parse("bogus").is_err());
    }
}
