use crate::bindings;
use crate::bindings::sluice::plugin::types::Header;
use crate::Error;

/// A message delivered to the handler.
#[derive(Debug, Clone)]
pub struct Message {
    raw: bindings::Message,
    /// Its index in the batch it came in (0 outside batches).
    item: u32,
}

impl Message {
    /// A message on `subject`, for unit tests of a handler: id `test-1`,
    /// route `test`, attempt 1, no key, no headers.
    pub fn new(subject: &str, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            raw: bindings::Message {
                id: "test-1".into(),
                route: "test".into(),
                subject: subject.into(),
                key: None,
                headers: Vec::new(),
                payload: payload.into(),
                attempt: 1,
                timestamp_ms: 0,
                reply_to: None,
            },
            item: 0,
        }
    }

    /// Adds a header (tests).
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.raw.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// Sets the broker key (tests).
    pub fn with_key(mut self, key: &str) -> Self {
        self.raw.key = Some(key.into());
        self
    }

    /// Sets the delivery attempt, from 1 (tests).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.raw.attempt = attempt;
        self
    }

    #[doc(hidden)]
    pub fn from_raw(raw: bindings::Message) -> Self {
        Self { raw, item: 0 }
    }

    /// A batch of messages for unit tests of a batch handler: each one's
    /// index is its place in `messages`.
    pub fn batch(messages: Vec<Message>) -> Vec<Message> {
        messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| Self {
                raw: m.raw,
                item: u32::try_from(i).unwrap_or(u32::MAX),
            })
            .collect()
    }

    #[doc(hidden)]
    pub fn from_raw_batch(raw: Vec<bindings::Message>) -> Vec<Self> {
        Self::batch(raw.into_iter().map(Self::from_raw).collect())
    }

    /// Its index in the batch it came in (0 outside batches): what its
    /// publishes are attributed to.
    pub fn item(&self) -> u32 {
        self.item
    }

    /// The broker-native id (stream sequence, `topic/partition/offset`, ...).
    pub fn id(&self) -> &str {
        &self.raw.id
    }
    /// The route that delivered this message.
    pub fn route(&self) -> &str {
        &self.raw.route
    }
    /// Subject, topic or routing key.
    pub fn subject(&self) -> &str {
        &self.raw.subject
    }
    /// The broker's message key, if any.
    pub fn key(&self) -> Option<&str> {
        self.raw.key.as_deref()
    }
    /// The payload, byte for byte.
    pub fn payload(&self) -> &[u8] {
        &self.raw.payload
    }
    /// The payload as UTF-8 text; invalid UTF-8 is a permanent error.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.raw.payload).map_err(|e| Error::permanent(format!("payload is not UTF-8: {e}")))
    }
    /// The payload parsed as JSON; malformed JSON is a permanent error.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.raw.payload).map_err(|e| Error::permanent(format!("malformed JSON payload: {e}")))
    }
    /// All headers, as (name, value) pairs.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.raw.headers.iter().map(|h| (h.name.as_str(), h.value.as_str()))
    }
    /// The first header called `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.raw
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }
    /// Delivery attempt, 1 on first delivery.
    pub fn attempt(&self) -> u32 {
        self.raw.attempt
    }
    /// Broker timestamp, milliseconds since the Unix epoch (0 if unknown).
    pub fn timestamp_ms(&self) -> u64 {
        self.raw.timestamp_ms
    }
    /// Reply subject of a request.
    pub fn reply_to(&self) -> Option<&str> {
        self.raw.reply_to.as_deref()
    }
}

/// The answer to a request, sent to the message's reply subject.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    headers: Vec<Header>,
    payload: Vec<u8>,
}

impl Reply {
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            headers: Vec::new(),
            payload: payload.into(),
        }
    }
    /// A reply whose body is `value` as JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Self, Error> {
        serde_json::to_vec(value)
            .map(Self::new)
            .map_err(|e| Error::permanent(e.to_string()))
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }
    pub(crate) fn into_raw(self) -> bindings::Reply {
        bindings::Reply {
            headers: self.headers,
            payload: self.payload,
        }
    }
}
