//! Batch handlers: one call for several messages, one outcome per message.
//! What a handler publishes while [`each`] runs it on a message belongs to
//! that message: sent if its outcome is Ok, dropped with it otherwise.

use crate::{bindings, IntoOutcome, Message, RawOutcome};
use std::cell::Cell;

thread_local! {
    /// The batch item being handled inside [`each`].
    static CURRENT: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The item [`each`] is running on, if any.
pub(crate) fn current() -> Option<u32> {
    CURRENT.with(Cell::get)
}

/// Runs `handle` on each message of `batch`, in order, and collects the
/// outcomes; what `handle` publishes belongs to the message it is running on.
pub fn each<R>(batch: Vec<Message>, mut handle: impl FnMut(Message) -> R) -> Vec<R> {
    batch
        .into_iter()
        .map(|msg| {
            let outer = CURRENT.with(|c| c.replace(Some(msg.item())));
            let outcome = handle(msg);
            CURRENT.with(|c| c.set(outer));
            outcome
        })
        .collect()
}

#[doc(hidden)]
pub fn run<R: IntoOutcome>(
    handler: impl FnOnce(Vec<Message>) -> Vec<R>,
    msgs: Vec<bindings::Message>,
) -> Vec<RawOutcome> {
    handler(Message::from_raw_batch(msgs))
        .into_iter()
        .map(IntoOutcome::into_outcome)
        .collect()
}

#[doc(hidden)]
pub fn run_one<R: IntoOutcome>(handler: impl FnOnce(Vec<Message>) -> Vec<R>, msg: bindings::Message) -> RawOutcome {
    run(handler, vec![msg]).into_iter().next().unwrap_or_else(|| {
        Err(bindings::HandlerError::Permanent(
            "the batch handler returned no outcome".into(),
        ))
    })
}
