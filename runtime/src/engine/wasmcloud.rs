//! The host side of `wasmcloud:messaging@0.2.0`: wasmCloud messaging
//! components run unchanged. `publish` is checked and buffered like a sluice
//! plugin's; a publish to the delivered message's `reply-to` becomes the
//! reply, sent only when `handle-message` returns Ok; `request` goes through
//! the request allow-list and the message's deadline.

use super::bindings::sluice::plugin::types as sluice_types;
use super::bindings::wasmcloud::wasmcloud::messaging::{consumer, types};
use super::host::HostState;
use crate::message::Message;

/// The delivered message as a wasmCloud component sees it (headers are not
/// part of this interface).
pub fn delivered(msg: &Message) -> types::BrokerMessage {
    types::BrokerMessage {
        subject: msg.subject.clone(),
        body: msg.payload.clone(),
        reply_to: msg.reply_to.clone(),
    }
}

fn describe(e: sluice_types::HostError) -> String {
    match e {
        sluice_types::HostError::Denied(why) | sluice_types::HostError::Failed(why) => why,
        sluice_types::HostError::Timeout => "timeout".into(),
    }
}

impl types::Host for HostState {}

impl consumer::Host for HostState {
    async fn request(
        &mut self,
        subject: String,
        body: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<types::BrokerMessage, String> {
        let answer = self
            .send_request(subject.clone(), body, Some(timeout_ms))
            .await
            .map_err(describe)?;
        Ok(types::BrokerMessage {
            subject,
            body: answer,
            reply_to: None,
        })
    }

    async fn publish(&mut self, msg: types::BrokerMessage) -> Result<(), String> {
        if self.messaging.is_reply_subject(&msg.subject) {
            return self.messaging.set_reply(Vec::new(), msg.body);
        }
        self.queue_publish(msg.subject, Vec::new(), msg.body).map_err(describe)
    }
}
