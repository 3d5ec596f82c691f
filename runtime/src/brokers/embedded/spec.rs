//! A route's `source` on the embedded broker.

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedSourceSpec {
    /// Subject pattern (`orders.>`) bound to the route's queue.
    pub subject: String,
}

impl EmbeddedSourceSpec {
    pub fn describe(&self) -> String {
        format!("embedded {}", self.subject)
    }
}
