//! sluice: consumes messages from brokers and hands each one to a sandboxed
//! WebAssembly handler component.
//!
//! Layout: `brokers/*` know how to receive, settle and publish messages and
//! nothing of WASM; `engine` runs plugins and knows nothing of brokers;
//! `pipeline` joins them (route -> invoke -> policy -> settle).

pub mod admin;
pub mod brokers;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod de;
pub mod dlq;
pub mod engine;
pub mod error;
pub mod future;
#[doc(hidden)]
pub mod fuzzing;
pub mod headers;
pub mod idempotency;
pub mod keys;
pub mod message;
pub mod metrics;
pub mod pipeline;
pub mod request;
pub mod storage;
pub mod subject;
pub mod telemetry;

#[cfg(test)]
mod properties;
