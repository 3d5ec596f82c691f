//! Deserialization helpers shared by the config file and the broker
//! adapters' own settings (which the config embeds but does not know).

pub mod duration;

use serde::de::DeserializeOwned;

/// Marks an error raised inside a nested value with the key path below it
/// (`topics.0`), so the config loader can name the full key and its line
/// even though the value was deserialized on its own.
const NESTED: char = '\u{1f}';

/// The text of an error at `path` below the value being deserialized.
pub fn nested_text(path: &str, message: &str) -> String {
    format!("{NESTED}{path}{NESTED}{message}")
}

pub fn nested<E: serde::de::Error>(path: &str, message: &str) -> E {
    E::custom(nested_text(path, message))
}

/// The path and message of an error made by [`nested`].
pub fn split_nested(message: &str) -> Option<(&str, &str)> {
    message.strip_prefix(NESTED)?.split_once(NESTED)
}

/// Deserializes `T` from a table cut out of the config (a broker's own
/// settings); errors keep the key path inside it.
pub fn from_table<T: DeserializeOwned, E: serde::de::Error>(table: toml::Table) -> Result<T, E> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = dotted(e.path());
        let inner: toml::de::Error = e.into_inner();
        match split_nested(inner.message()) {
            Some((below, message)) => nested(&join(&path, below), message),
            None => nested(&path, inner.message()),
        }
    })
}

fn join(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (true, _) => b.to_owned(),
        (_, true) => a.to_owned(),
        _ => format!("{a}.{b}"),
    }
}

/// serde_path_to_error's `routes[0].retry` as `routes.0.retry`.
pub fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}
