//! The sluice plugin SDK.
//!
//! A handler is one function and one macro line:
//!
//! ```ignore
//! use sluice_sdk::{handler, Message, Error};
//!
//! handler!(handle);
//!
//! fn handle(msg: Message) -> Result<(), Error> {
//!     let order: serde_json::Value = msg.json()?; // malformed JSON -> permanent error
//!     sluice_sdk::publish("audit.orders", msg.payload())?;
//!     sluice_sdk::log::info(format!("order {}", order["order_id"]));
//!     Ok(())
//! }
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the `.wasm`
//! in `target/wasm32-wasip2/release/` is the component sluice loads.

pub mod batch;
mod message;
mod outcome;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use message::{Message, Reply};

/// A handler's outcome as the WIT has it; what the macros' exports return.
#[doc(hidden)]
pub type RawOutcome = Result<Option<bindings::Reply>, bindings::HandlerError>;
pub use outcome::{Error, IntoOutcome};

/// Generated bindings for the `sluice:plugin/handler` world. Public so the
/// `handler!` macro can reach them from the plugin crate; not a stable API.
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "handler",
        default_bindings_module: "::sluice_sdk::bindings",
        pub_export_macro: true,
        export_macro_name: "__export_handler",
    });
}

/// Generated bindings for the `sluice:plugin/batch-handler` world (its
/// interfaces are the ones above). Not a stable API.
#[doc(hidden)]
pub mod batch_bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "batch-handler",
        default_bindings_module: "::sluice_sdk::batch_bindings",
        pub_export_macro: true,
        export_macro_name: "__export_batch_handler",
        with: {
            "sluice:plugin/types@0.1.1": crate::bindings::sluice::plugin::types,
            "sluice:plugin/host@0.1.1": crate::bindings::sluice::plugin::host,
        },
    });
}

// In a component the host provides these; in a native `cargo test`, the
// test host of [`testing`] does.
#[cfg(target_arch = "wasm32")]
use bindings::sluice::plugin::host;
use bindings::sluice::plugin::types::{Header, HostError};
use std::time::Duration;
#[cfg(not(target_arch = "wasm32"))]
use testing::host;

/// Marks the function that handles batches of messages (a route's `batch`
/// setting). The function takes a `Vec<Message>` and returns one outcome per
/// message, in order: `Vec<Result<(), Error>>` (or `Result<Reply, Error>`,
/// `Result<Option<Reply>, Error>`). On a route without `batch` it is called
/// with a batch of one.
///
/// ```ignore
/// sluice_sdk::batch_handler!(handle);
///
/// fn handle(batch: Vec<Message>) -> Vec<Result<(), Error>> {
///     sluice_sdk::batch::each(batch, |msg| {
///         let order: serde_json::Value = msg.json()?;
///         sluice_sdk::publish_json("orders.seen", &order) // belongs to `msg`
///     })
/// }
/// ```
#[macro_export]
macro_rules! batch_handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __SluiceBatchHandler;

        impl $crate::batch_bindings::Guest for __SluiceBatchHandler {
            fn handle(msg: $crate::bindings::Message) -> $crate::RawOutcome {
                $crate::batch::run_one($handler, msg)
            }

            fn handle_batch(msgs: ::std::vec::Vec<$crate::bindings::Message>) -> ::std::vec::Vec<$crate::RawOutcome> {
                $crate::batch::run($handler, msgs)
            }
        }

        $crate::batch_bindings::__export_batch_handler!(__SluiceBatchHandler with_types_in $crate::batch_bindings);
    };
}

/// Marks the function that handles each message.
///
/// The function takes a [`Message`] and returns `Result<(), Error>`,
/// `Result<Reply, Error>` or `Result<Option<Reply>, Error>`.
#[macro_export]
macro_rules! handler {
    ($handler:path) => {
        #[doc(hidden)]
        struct __SluiceHandler;

        impl $crate::bindings::Guest for __SluiceHandler {
            fn handle(msg: $crate::bindings::Message) -> $crate::RawOutcome {
                $crate::IntoOutcome::into_outcome($handler($crate::Message::from_raw(msg)))
            }
        }

        $crate::bindings::__export_handler!(__SluiceHandler with_types_in $crate::bindings);
    };
}

fn headers_to_wit(headers: &[(&str, &str)]) -> Vec<Header> {
    headers
        .iter()
        .map(|(name, value)| Header {
            name: (*name).to_string(),
            value: (*value).to_string(),
        })
        .collect()
}

fn host_error(err: HostError) -> Error {
    match err {
        // A denied subject is a deployment mistake that retrying will not fix.
        HostError::Denied(why) => Error::permanent(format!("denied by the host: {why}")),
        HostError::Timeout => Error::retryable("request timed out"),
        HostError::Failed(why) => Error::retryable(why),
    }
}

/// Queues `payload` for `subject`. Sent only if the handler returns Ok.
pub fn publish(subject: &str, payload: impl AsRef<[u8]>) -> Result<(), Error> {
    publish_with_headers(subject, &[], payload)
}

/// Queues `value` as JSON for `subject`. Sent only if the handler returns Ok.
pub fn publish_json<T: serde::Serialize>(subject: &str, value: &T) -> Result<(), Error> {
    let body = serde_json::to_vec(value).map_err(|e| Error::permanent(e.to_string()))?;
    publish(subject, body)
}

/// Queues a message with headers. Sent only if the handler returns Ok (in
/// a batch, inside [`batch::each`]: if that message's outcome is Ok).
pub fn publish_with_headers(subject: &str, headers: &[(&str, &str)], payload: impl AsRef<[u8]>) -> Result<(), Error> {
    let headers = headers_to_wit(headers);
    match batch::current() {
        Some(item) => host::publish_item(item, subject, &headers, payload.as_ref()),
        None => host::publish(subject, &headers, payload.as_ref()),
    }
    .map_err(host_error)
}

/// Queues a message on behalf of `msg` of a batch: sent only if `msg`'s
/// outcome is Ok. For batch handlers that work on the whole batch at once
/// rather than through [`batch::each`].
pub fn publish_for(
    msg: &Message,
    subject: &str,
    headers: &[(&str, &str)],
    payload: impl AsRef<[u8]>,
) -> Result<(), Error> {
    host::publish_item(msg.item(), subject, &headers_to_wit(headers), payload.as_ref()).map_err(host_error)
}

/// Sends a request and waits for its answer (NATS request/reply).
pub fn request(subject: &str, payload: impl AsRef<[u8]>, timeout: Duration) -> Result<Vec<u8>, Error> {
    let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
    host::request(subject, payload.as_ref(), ms).map_err(host_error)
}

/// Reads this plugin's setting `key` from the config file.
pub fn config(key: &str) -> Option<String> {
    host::config(key)
}

/// Log lines, written to the host's log with the route and message id.
pub mod log {
    use crate::bindings::sluice::plugin::types::Level;
    use crate::host;

    pub fn trace(text: impl AsRef<str>) {
        host::log(Level::Trace, text.as_ref());
    }
    pub fn debug(text: impl AsRef<str>) {
        host::log(Level::Debug, text.as_ref());
    }
    pub fn info(text: impl AsRef<str>) {
        host::log(Level::Info, text.as_ref());
    }
    pub fn warn(text: impl AsRef<str>) {
        host::log(Level::Warn, text.as_ref());
    }
    pub fn error(text: impl AsRef<str>) {
        host::log(Level::Error, text.as_ref());
    }
}
