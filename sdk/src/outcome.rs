use crate::bindings;
use crate::Reply;
use std::fmt;

/// Why a handler failed: decides between retry and dead-letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Transient: retried with the route's backoff.
    Retryable(String),
    /// Poison: dead-lettered at once.
    Permanent(String),
}

impl Error {
    pub fn retryable(why: impl Into<String>) -> Self {
        Self::Retryable(why.into())
    }
    pub fn permanent(why: impl Into<String>) -> Self {
        Self::Permanent(why.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Retryable(why) => write!(f, "retryable: {why}"),
            Self::Permanent(why) => write!(f, "permanent: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// Bad input data will not get better on retry.
impl From<serde_json::Error> for Error {
    fn from(err: serde_json::Error) -> Self {
        Self::permanent(err.to_string())
    }
}

impl From<Error> for bindings::HandlerError {
    fn from(err: Error) -> Self {
        match err {
            Error::Retryable(why) => Self::Retryable(why),
            Error::Permanent(why) => Self::Permanent(why),
        }
    }
}

/// What a handler function may return.
pub trait IntoOutcome {
    fn into_outcome(self) -> crate::RawOutcome;
}

impl IntoOutcome for Result<(), Error> {
    fn into_outcome(self) -> crate::RawOutcome {
        self.map(|()| None).map_err(Into::into)
    }
}

impl IntoOutcome for Result<Reply, Error> {
    fn into_outcome(self) -> crate::RawOutcome {
        self.map(|r| Some(r.into_raw())).map_err(Into::into)
    }
}

impl IntoOutcome for Result<Option<Reply>, Error> {
    fn into_outcome(self) -> crate::RawOutcome {
        self.map(|r| r.map(Reply::into_raw)).map_err(Into::into)
    }
}
