//! Request/reply, as handlers use it: the engine calls a [`Requester`], a
//! broker that has request/reply (NATS) supplies one. Neither knows the other.

use crate::future::BoxFuture;
use std::time::Duration;

/// Sends a request and waits for the answer. Supplied by a broker that has
/// request/reply (NATS); the engine itself knows no broker.
pub trait Requester: Send + Sync {
    fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<Vec<u8>, RequestError>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("request timed out")]
    Timeout,
    #[error("request failed")]
    Failed(#[source] crate::error::Cause),
}
