//! How errors are kept and shown.
//!
//! An error's `Display` says what failed at its own level only; the error it
//! came from is its `source()`, kept as a value rather than flattened into a
//! string. The whole chain ("cannot connect to NATS at …: connection
//! refused") is written out once, at an edge: the CLI (anyhow's `{:#}`), a
//! log line or an admin response, through [`Report`].

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The error underneath, of whatever type the client library returned.
/// Shared so that broker errors stay `Clone` (a settle error is both logged
/// and kept as the route's last error).
pub type Cause = Arc<dyn Error + Send + Sync + 'static>;

/// Keeps `e` as a cause. A `String` or `&str` becomes an error whose text
/// it is, for causes sluice itself words.
pub fn cause(e: impl Into<Box<dyn Error + Send + Sync + 'static>>) -> Cause {
    Arc::from(e.into())
}

/// Writes an error and each of its sources, joined by `: `. A source whose
/// text the level above already ends with (libraries that both quote and
/// return their cause, as lapin does) is not written twice.
pub struct Report<'a>(pub &'a (dyn Error + 'a));

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut above = self.0.to_string();
        f.write_str(&above)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            let text = e.to_string();
            if !above.ends_with(&text) {
                write!(f, ": {text}")?;
            }
            above = text;
            next = e.source();
        }
        Ok(())
    }
}

/// The whole chain of `e` as one string, for an admin response or a plugin.
pub fn report(e: &(dyn Error + '_)) -> String {
    Report(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Cause);

    #[test]
    fn a_report_writes_every_level_once() {
        let inner = std::io::Error::other("inner");
        let e = Outer(cause(inner));
        assert_eq!(report(&e), "outer: inner");
        assert_eq!(e.to_string(), "outer");
        let worded = Outer(cause("worded by sluice"));
        assert_eq!(report(&worded), "outer: worded by sluice");
    }

    #[derive(Debug, thiserror::Error)]
    #[error("IO error: {0}")]
    struct Quoting(#[source] std::io::Error);

    #[test]
    fn a_cause_the_level_above_already_quotes_is_written_once() {
        let e = Outer(cause(Quoting(std::io::Error::other("connection refused"))));
        assert_eq!(report(&e), "outer: IO error: connection refused");
    }
}
