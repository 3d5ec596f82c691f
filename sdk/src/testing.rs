//! Unit tests of a handler on the build machine (`cargo test`), without a
//! host: what the handler publishes is recorded, settings and request
//! answers are given by the test. Only compiled for non-WebAssembly targets.
//!
//! ```ignore
//! #[test]
//! fn publishes_the_order() {
//!     sluice_sdk::testing::reset();
//!     handle(Message::new("orders.created", r#"{"order_id":"o-1"}"#)).unwrap();
//!     assert_eq!(sluice_sdk::testing::published()[0].subject, "audit.orders");
//! }
//! ```

use crate::bindings::sluice::plugin::types::{Header, HostError, Level};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// A message the handler published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// In a batch handler: the message (its index) the publish belongs to.
    pub item: Option<u32>,
    pub subject: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct TestHost {
    published: Vec<Published>,
    config: BTreeMap<String, String>,
    answers: BTreeMap<String, Vec<u8>>,
}

thread_local! {
    static HOST: RefCell<TestHost> = RefCell::new(TestHost::default());
}

/// Forgets publishes, settings and answers of this thread.
pub fn reset() {
    HOST.with(|h| *h.borrow_mut() = TestHost::default());
}

/// What the handler published on this thread so far.
pub fn published() -> Vec<Published> {
    HOST.with(|h| h.borrow().published.clone())
}

/// Makes `config(key)` return `value`.
pub fn set_config(key: &str, value: &str) {
    HOST.with(|h| h.borrow_mut().config.insert(key.to_owned(), value.to_owned()));
}

/// Makes `request(subject, ..)` answer `payload`; other subjects time out.
pub fn answer(subject: &str, payload: impl Into<Vec<u8>>) {
    HOST.with(|h| h.borrow_mut().answers.insert(subject.to_owned(), payload.into()));
}

/// The host functions as the SDK calls them, served by the test host.
pub(crate) mod host {
    use super::*;

    pub fn publish(subject: &str, headers: &[Header], payload: &[u8]) -> Result<(), HostError> {
        record(None, subject, headers, payload)
    }

    fn record(item: Option<u32>, subject: &str, headers: &[Header], payload: &[u8]) -> Result<(), HostError> {
        HOST.with(|h| {
            h.borrow_mut().published.push(Published {
                item,
                subject: subject.to_owned(),
                headers: headers.iter().map(|x| (x.name.clone(), x.value.clone())).collect(),
                payload: payload.to_vec(),
            })
        });
        Ok(())
    }

    pub fn publish_item(item: u32, subject: &str, headers: &[Header], payload: &[u8]) -> Result<(), HostError> {
        record(Some(item), subject, headers, payload)
    }

    pub fn request(subject: &str, _payload: &[u8], _timeout_ms: u32) -> Result<Vec<u8>, HostError> {
        HOST.with(|h| h.borrow().answers.get(subject).cloned())
            .ok_or(HostError::Timeout)
    }

    pub fn config(key: &str) -> Option<String> {
        HOST.with(|h| h.borrow().config.get(key).cloned())
    }

    pub fn log(level: Level, text: &str) {
        eprintln!("[{level:?}] {text}");
    }
}

#[cfg(test)]
mod tests {
    use crate::{batch, Error, Message};

    #[test]
    fn each_attributes_publishes_to_the_message_it_runs_on() {
        super::reset();
        let msgs = Message::batch(vec![
            Message::new("a", "0"),
            Message::new("a", "1"),
            Message::new("a", "2"),
        ]);
        let outcomes = batch::each(msgs, |msg| {
            crate::publish("out", msg.payload())?;
            if msg.item() == 1 {
                return Err(Error::retryable("no"));
            }
            Ok(())
        });
        assert_eq!(outcomes.len(), 3);
        assert!(outcomes[1].is_err());
        let items: Vec<Option<u32>> = super::published().iter().map(|p| p.item).collect();
        assert_eq!(items, [Some(0), Some(1), Some(2)]);
        // Outside `each`, a publish belongs to no item.
        crate::publish("out", "x").unwrap();
        assert_eq!(super::published().last().map(|p| p.item), Some(None));
    }
}
