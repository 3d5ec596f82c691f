//! Durations in the config (`"30s"`, `"2m"`), bounded: far beyond any
//! sensible setting and far below what overflows a clock (`Instant + d`
//! panics), so no value in a file can crash the daemon later. Used as
//! `#[serde(with = "crate::de::duration")]`; the error names the key.

use serde::{Deserialize, Deserializer, Serializer};
use std::time::Duration;

/// Longest duration any setting may have.
pub const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A duration or an optional one.
pub trait Bounded: Sized {
    fn longest(&self) -> Option<Duration>;
}

impl Bounded for Duration {
    fn longest(&self) -> Option<Duration> {
        Some(*self)
    }
}

impl Bounded for Option<Duration> {
    fn longest(&self) -> Option<Duration> {
        *self
    }
}

pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Bounded,
    humantime_serde::Serde<T>: Deserialize<'de>,
{
    let value: T = humantime_serde::deserialize(d)?;
    if value.longest().is_some_and(|v| v > MAX) {
        return Err(serde::de::Error::custom("must be at most 10 years"));
    }
    Ok(value)
}

pub fn serialize<S, T>(value: &T, s: S) -> Result<S::Ok, S::Error>
where
    S: Serializer,
    for<'a> humantime_serde::Serde<&'a T>: serde::Serialize,
{
    humantime_serde::serialize(value, s)
}
