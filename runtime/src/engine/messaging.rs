//! The host side of `wasi:messaging@0.2.0-draft`: components written for the
//! WASI messaging proposal run unchanged, with sluice's guarantees. A send is
//! checked and buffered exactly like a sluice plugin's `publish`; a request
//! goes through the same allow-list and deadline as `request`; a reply is
//! sent only when `handle` returns Ok, like a sluice plugin's reply.
//!
//! Messages a component creates live in the host's resource table, outside
//! the component's memory cap, so the host bounds them itself: how many a
//! store may hold and how many bytes in all. Past either bound the call
//! traps (the message fails as `trap`).

use super::bindings::messaging::wasi::messaging::{producer, request_reply, types};
use super::bindings::sluice::plugin::types as sluice_types;
use super::host::HostState;
use crate::headers::MAX_HEADERS;
use crate::message::{Header, Message};
use wasmtime::component::Resource;

/// Messages one store may hold at once, and their bytes in all.
const MAX_HELD_MESSAGES: usize = 10_000;
const MAX_HELD_BYTES: usize = 32 << 20;
/// Longest client name a component may connect with.
const MAX_CLIENT_NAME: usize = 256;

/// A connection as a component sees it. Every client sends through the
/// broker of the route being handled; the name is kept for log lines.
pub struct Client {
    name: String,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish()
    }
}

/// A message held by the host for a component. Its content type is its
/// `content-type` metadata entry (any case): one place, so what the
/// component reads is what is sent.
#[derive(Debug, Default)]
pub struct HeldMessage {
    topic: Option<String>,
    data: Vec<u8>,
    metadata: Vec<(String, String)>,
    /// Counted against the store's bounds: every message but the delivered
    /// one until the component changes it.
    counted: bool,
}

/// Host memory a held message costs beyond its bytes, and each metadata
/// entry: counted so that a million empty entries are not free.
const MESSAGE_COST: usize = std::mem::size_of::<HeldMessage>();
const ENTRY_COST: usize = std::mem::size_of::<(String, String)>();

fn is_content_type(key: &str) -> bool {
    key.eq_ignore_ascii_case("content-type")
}

impl HeldMessage {
    fn size(&self) -> usize {
        let meta: usize = self.metadata.iter().map(|(k, v)| k.len() + v.len() + ENTRY_COST).sum();
        MESSAGE_COST + self.data.len() + meta + self.topic.as_ref().map_or(0, String::len)
    }

    /// The delivered message as a component sees it: metadata are its
    /// headers. Not counted against the bounds (a broker's message may be
    /// larger than what a component may create), until changed.
    pub fn delivered(msg: &Message) -> Self {
        Self {
            topic: Some(msg.subject.clone()),
            data: msg.payload.clone(),
            metadata: msg.headers.iter().map(|h| (h.name.clone(), h.value.clone())).collect(),
            counted: false,
        }
    }

    fn content_type(&self) -> Option<String> {
        self.metadata
            .iter()
            .find(|(k, _)| is_content_type(k))
            .map(|(_, v)| v.clone())
    }

    fn set_content_type(&mut self, value: String) {
        self.metadata.retain(|(k, _)| !is_content_type(k));
        self.metadata.push(("content-type".into(), value));
    }

    /// Headers and payload to send.
    fn into_outbound(self) -> (Vec<Header>, Vec<u8>) {
        let headers = self.metadata.into_iter().map(|(k, v)| Header::new(k, v)).collect();
        (headers, self.data)
    }
}

/// Options of one request.
#[derive(Debug, Default)]
pub struct RequestOptions {
    timeout_ms: Option<u32>,
}

/// What the messaging interface keeps per store.
#[derive(Debug, Default)]
pub struct MessagingState {
    held: usize,
    held_bytes: usize,
    /// The reply set by `reply`, sent when `handle` returns Ok.
    pub(crate) reply: Option<sluice_types::Reply>,
    /// The reply subject of the message being handled.
    pub(crate) reply_to: Option<String>,
    /// The table slot of the delivered message: the only one `reply`
    /// answers (a handle kept from an earlier message is not it).
    delivered: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
#[error("the component holds more than {MAX_HELD_MESSAGES} messages or {} MiB of message data in the host", MAX_HELD_BYTES >> 20)]
struct TooMuchHeld;

#[derive(Debug, thiserror::Error)]
#[error("a message may have at most {MAX_HEADERS} metadata entries")]
struct TooManyEntries;

impl MessagingState {
    pub(crate) fn reset(&mut self) {
        self.reply = None;
        self.reply_to = None;
        self.delivered = None;
    }

    pub(crate) fn is_reply_subject(&self, subject: &str) -> bool {
        self.reply_to.as_deref() == Some(subject)
    }

    /// Keeps the one reply of this message; refuses a second.
    pub(crate) fn set_reply(&mut self, headers: Vec<Header>, payload: Vec<u8>) -> Result<(), String> {
        if self.reply_to.is_none() {
            return Err("the message has no reply subject (only a delivered request can be replied to)".into());
        }
        if self.reply.is_some() {
            return Err("sluice sends one reply per message; this one already has a reply".into());
        }
        self.reply = Some(sluice_types::Reply {
            headers: headers
                .into_iter()
                .map(|h| sluice_types::Header {
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            payload,
        });
        Ok(())
    }
}

impl HostState {
    /// Puts a message the component made in the resource table, within the
    /// bounds.
    fn hold(&mut self, mut msg: HeldMessage) -> wasmtime::Result<Resource<HeldMessage>> {
        let size = msg.size();
        let m = &mut self.messaging;
        if m.held >= MAX_HELD_MESSAGES || m.held_bytes.saturating_add(size) > MAX_HELD_BYTES {
            return Err(wasmtime::Error::new(TooMuchHeld));
        }
        m.held += 1;
        m.held_bytes += size;
        msg.counted = true;
        Ok(self.table().push(msg)?)
    }

    /// Puts the delivered message in the resource table, uncounted, and
    /// remembers it as the one a reply answers.
    pub(crate) fn hold_delivered(&mut self, msg: &Message) -> wasmtime::Result<Resource<HeldMessage>> {
        let res = self.table().push(HeldMessage::delivered(msg))?;
        self.messaging.delivered = Some(res.rep());
        Ok(res)
    }

    fn release(&mut self, res: Resource<HeldMessage>) -> wasmtime::Result<HeldMessage> {
        let msg = self.table().delete(res)?;
        if msg.counted {
            self.messaging.held = self.messaging.held.saturating_sub(1);
            self.messaging.held_bytes = self.messaging.held_bytes.saturating_sub(msg.size());
        }
        Ok(msg)
    }

    /// Changes a held message, keeping the byte count true and bounded (a
    /// delivered message is counted from its first change on).
    fn update(&mut self, res: &Resource<HeldMessage>, change: impl FnOnce(&mut HeldMessage)) -> wasmtime::Result<()> {
        let msg = self.table().get_mut(res)?;
        let (before, newly_counted) = if msg.counted { (msg.size(), false) } else { (0, true) };
        msg.counted = true;
        change(msg);
        let (after, entries) = (msg.size(), msg.metadata.len());
        let m = &mut self.messaging;
        if newly_counted {
            m.held += 1;
        }
        m.held_bytes = m.held_bytes.saturating_sub(before).saturating_add(after);
        if entries > MAX_HEADERS {
            return Err(wasmtime::Error::new(TooManyEntries));
        }
        if m.held > MAX_HELD_MESSAGES || m.held_bytes > MAX_HELD_BYTES {
            return Err(wasmtime::Error::new(TooMuchHeld));
        }
        Ok(())
    }
}

fn to_wasi_error(e: sluice_types::HostError) -> types::Error {
    match e {
        sluice_types::HostError::Denied(why) => types::Error::PermissionDenied(why),
        sluice_types::HostError::Timeout => types::Error::Timeout,
        sluice_types::HostError::Failed(why) => types::Error::Other(why),
    }
}

/// A handler's error as the reason of a failed message.
pub fn describe(e: &types::Error) -> String {
    match e {
        types::Error::Timeout => "timeout".into(),
        types::Error::Connection(why) => format!("connection: {why}"),
        types::Error::PermissionDenied(why) => format!("permission denied: {why}"),
        types::Error::Other(why) => why.clone(),
    }
}

impl types::Host for HostState {}

impl types::HostClient for HostState {
    async fn connect(&mut self, name: String) -> wasmtime::Result<Result<Resource<Client>, types::Error>> {
        if name.is_empty() || name.len() > MAX_CLIENT_NAME {
            return Ok(Err(types::Error::Other(format!(
                "a client name is 1 to {MAX_CLIENT_NAME} bytes"
            ))));
        }
        // Clients count as held messages: a loop of connects is bounded too.
        if self.messaging.held >= MAX_HELD_MESSAGES {
            return Err(wasmtime::Error::new(TooMuchHeld));
        }
        self.messaging.held += 1;
        Ok(Ok(self.table().push(Client { name })?))
    }

    async fn disconnect(&mut self, _client: Resource<Client>) -> wasmtime::Result<Result<(), types::Error>> {
        Ok(Ok(()))
    }

    async fn drop(&mut self, client: Resource<Client>) -> wasmtime::Result<()> {
        self.table().delete(client)?;
        self.messaging.held = self.messaging.held.saturating_sub(1);
        Ok(())
    }
}

impl types::HostMessage for HostState {
    async fn new(&mut self, data: Vec<u8>) -> wasmtime::Result<Resource<HeldMessage>> {
        self.hold(HeldMessage {
            data,
            ..Default::default()
        })
    }

    async fn topic(&mut self, msg: Resource<HeldMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.table().get(&msg)?.topic.clone())
    }

    async fn content_type(&mut self, msg: Resource<HeldMessage>) -> wasmtime::Result<Option<String>> {
        Ok(self.table().get(&msg)?.content_type())
    }

    async fn set_content_type(&mut self, msg: Resource<HeldMessage>, content_type: String) -> wasmtime::Result<()> {
        self.update(&msg, |m| m.set_content_type(content_type))
    }

    async fn data(&mut self, msg: Resource<HeldMessage>) -> wasmtime::Result<Vec<u8>> {
        Ok(self.table().get(&msg)?.data.clone())
    }

    async fn set_data(&mut self, msg: Resource<HeldMessage>, data: Vec<u8>) -> wasmtime::Result<()> {
        self.update(&msg, |m| m.data = data)
    }

    async fn metadata(&mut self, msg: Resource<HeldMessage>) -> wasmtime::Result<Option<Vec<(String, String)>>> {
        Ok(Some(self.table().get(&msg)?.metadata.clone()))
    }

    async fn add_metadata(&mut self, msg: Resource<HeldMessage>, key: String, value: String) -> wasmtime::Result<()> {
        self.update(&msg, |m| match m.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => *v = value,
            None => m.metadata.push((key, value)),
        })
    }

    async fn set_metadata(&mut self, msg: Resource<HeldMessage>, meta: Vec<(String, String)>) -> wasmtime::Result<()> {
        self.update(&msg, |m| m.metadata = meta)
    }

    async fn remove_metadata(&mut self, msg: Resource<HeldMessage>, key: String) -> wasmtime::Result<()> {
        self.update(&msg, |m| m.metadata.retain(|(k, _)| *k != key))
    }

    async fn drop(&mut self, msg: Resource<HeldMessage>) -> wasmtime::Result<()> {
        self.release(msg).map(|_| ())
    }
}

impl producer::Host for HostState {
    async fn send(
        &mut self,
        _client: Resource<Client>,
        topic: String,
        msg: Resource<HeldMessage>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        let (headers, payload) = self.release(msg)?.into_outbound();
        Ok(self.queue_publish(topic, headers, payload).map_err(to_wasi_error))
    }
}

impl request_reply::HostRequestOptions for HostState {
    async fn new(&mut self) -> wasmtime::Result<Resource<RequestOptions>> {
        if self.messaging.held >= MAX_HELD_MESSAGES {
            return Err(wasmtime::Error::new(TooMuchHeld));
        }
        self.messaging.held += 1;
        Ok(self.table().push(RequestOptions::default())?)
    }

    async fn set_timeout_ms(&mut self, options: Resource<RequestOptions>, timeout_ms: u32) -> wasmtime::Result<()> {
        self.table().get_mut(&options)?.timeout_ms = Some(timeout_ms);
        Ok(())
    }

    /// sluice's requests wait for one reply, so any number asks for one.
    async fn set_expected_replies(&mut self, options: Resource<RequestOptions>, _n: u32) -> wasmtime::Result<()> {
        self.table().get(&options)?;
        Ok(())
    }

    async fn drop(&mut self, options: Resource<RequestOptions>) -> wasmtime::Result<()> {
        self.table().delete(options)?;
        self.messaging.held = self.messaging.held.saturating_sub(1);
        Ok(())
    }
}

impl request_reply::Host for HostState {
    async fn request(
        &mut self,
        _client: Resource<Client>,
        topic: String,
        msg: Resource<HeldMessage>,
        options: Option<Resource<RequestOptions>>,
    ) -> wasmtime::Result<Result<Vec<Resource<HeldMessage>>, types::Error>> {
        let timeout_ms = match options {
            Some(o) => {
                let o = self.table().delete(o)?;
                self.messaging.held = self.messaging.held.saturating_sub(1);
                o.timeout_ms
            }
            None => None,
        };
        let payload = self.table().get(&msg)?.data.clone();
        match self.send_request(topic, payload, timeout_ms).await {
            Ok(answer) => {
                let reply = self.hold(HeldMessage {
                    data: answer,
                    ..Default::default()
                })?;
                Ok(Ok(vec![reply]))
            }
            Err(e) => Ok(Err(to_wasi_error(e))),
        }
    }

    async fn reply(
        &mut self,
        reply_to: Resource<HeldMessage>,
        msg: Resource<HeldMessage>,
    ) -> wasmtime::Result<Result<(), types::Error>> {
        let is_delivered = self.messaging.delivered == Some(reply_to.rep());
        let (headers, payload) = self.release(msg)?.into_outbound();
        if !is_delivered {
            return Ok(Err(types::Error::Other(
                "only the message being handled can be replied to".into(),
            )));
        }
        Ok(self.messaging.set_reply(headers, payload).map_err(types::Error::Other))
    }
}
