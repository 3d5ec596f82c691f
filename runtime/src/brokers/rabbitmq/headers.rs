//! AMQP header tables <-> sluice's string headers, and the attempt count
//! a message carries (sluice's own header, else RabbitMQ's `x-death`).

use crate::message::Header;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::collections::BTreeMap;

/// The delivery attempt sluice stamps on a message it sends to a delay
/// queue. Internal: not shown to handlers.
pub const ATTEMPT: &str = "x-sluice-attempt";
/// The routing key a message had before a delay queue or a replay sent it
/// straight to the work queue. Internal: not shown to handlers.
pub const ROUTING_KEY: &str = "x-sluice-routing-key";
/// RabbitMQ's own dead-letter history (a table per queue and reason).
pub const X_DEATH: &str = "x-death";

fn is_internal(name: &str) -> bool {
    name.eq_ignore_ascii_case(ATTEMPT) || name.eq_ignore_ascii_case(ROUTING_KEY)
}

/// A scalar AMQP value as text; tables and arrays have no faithful string
/// form and are left out (`x-death` is read into the attempt count instead).
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        AMQPValue::DecimalValue(_) | AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) | AMQPValue::Void => {
            return None
        }
    })
}

fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        other => text(other).and_then(|t| t.parse().ok()),
    }
}

/// The headers a handler sees: scalar values as text, sluice's internal
/// ones left out.
pub fn from_table(table: Option<&FieldTable>) -> Vec<Header> {
    let Some(table) = table else { return Vec::new() };
    table
        .inner()
        .iter()
        .filter(|(name, _)| !is_internal(name.as_str()))
        .filter_map(|(name, value)| text(value).map(|v| Header::new(name.as_str(), v)))
        .collect()
}

/// String headers as an AMQP table (a repeated name keeps its last value:
/// AMQP tables have unique keys).
pub fn to_table(headers: &[Header]) -> FieldTable {
    let mut table = FieldTable::default();
    for h in headers {
        table.insert(
            ShortString::from(h.name.as_str()),
            AMQPValue::LongString(LongString::from(h.value.as_bytes())),
        );
    }
    table
}

/// The 1-based attempt of a delivery: sluice's header when it set one;
/// else one more than the deaths RabbitMQ recorded (a message dead-lettered
/// by a RabbitMQ policy keeps its history); else 2 when RabbitMQ says it
/// was delivered before (a crash or a lost channel), else 1.
pub fn attempt(table: Option<&FieldTable>, redelivered: bool) -> u32 {
    let own = table.and_then(|t| t.inner().get(ATTEMPT)).and_then(integer);
    // Producer-supplied numbers: saturating, never overflowing.
    let base = match own {
        Some(n) => n,
        None => table.map(deaths).unwrap_or(0).saturating_add(1),
    };
    let base = if redelivered { base.saturating_add(1) } else { base };
    u32::try_from(base.max(1)).unwrap_or(u32::MAX)
}

/// The sum of the `count` of every `x-death` entry.
fn deaths(table: &FieldTable) -> i64 {
    let Some(AMQPValue::FieldArray(entries)) = table.inner().get(X_DEATH) else {
        return 0;
    };
    entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t.inner().get("count").and_then(integer).unwrap_or(1).max(0)),
            _ => None,
        })
        .fold(0i64, i64::saturating_add)
}

/// A header value from the raw table, as text.
pub fn raw(table: Option<&FieldTable>, name: &str) -> Option<String> {
    table?.inner().get(name).and_then(text)
}

/// Settings from the config file as AMQP arguments.
pub fn arguments(values: &BTreeMap<String, toml::Value>) -> FieldTable {
    let mut table = FieldTable::default();
    for (k, v) in values {
        table.insert(ShortString::from(k.as_str()), toml_value(v));
    }
    table
}

fn toml_value(v: &toml::Value) -> AMQPValue {
    match v {
        toml::Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        toml::Value::Integer(n) => AMQPValue::LongLongInt(*n),
        toml::Value::Float(f) => AMQPValue::Double(*f),
        toml::Value::Boolean(b) => AMQPValue::Boolean(*b),
        other => AMQPValue::LongString(LongString::from(other.to_string().as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    fn death(count: i64) -> AMQPValue {
        let mut t = FieldTable::default();
        t.insert("count".into(), AMQPValue::LongLongInt(count));
        t.insert("reason".into(), AMQPValue::LongString("rejected".into()));
        AMQPValue::FieldTable(t)
    }

    #[test]
    fn attempt_prefers_sluice_header_then_x_death() {
        assert_eq!(attempt(None, false), 1);
        assert_eq!(attempt(None, true), 2);
        let mut t = FieldTable::default();
        t.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![death(2), death(1)])),
        );
        assert_eq!(attempt(Some(&t), false), 4);
        t.insert(ATTEMPT.into(), AMQPValue::LongString("3".into()));
        assert_eq!(attempt(Some(&t), false), 3);
    }

    #[test]
    fn internal_and_table_headers_are_not_shown() {
        let mut t = FieldTable::default();
        t.insert(ATTEMPT.into(), AMQPValue::LongLongInt(2));
        t.insert(X_DEATH.into(), AMQPValue::FieldArray(FieldArray::from(vec![death(1)])));
        t.insert("Idempotency-Key".into(), AMQPValue::LongString("k1".into()));
        t.insert("retries".into(), AMQPValue::LongInt(7));
        let h = from_table(Some(&t));
        assert_eq!(
            h,
            vec![Header::new("Idempotency-Key", "k1"), Header::new("retries", "7")]
        );
    }
}
