//! The order-events scenario's messages, and the work the shipped
//! `order-processor` plugin does, written natively for the hand-written
//! consumers the scenario bench compares sluice with.

use serde::{Deserialize, Serialize};

/// The `i`th order of run `tag`, and its idempotency key.
pub fn order(tag: &str, i: usize) -> (Vec<u8>, String) {
    let payload = format!(
        r#"{{"order_id":"o-{tag}-{i}","user_id":"u-{}","amount_cents":{},"event_type":"created"}}"#,
        i % 100,
        1000 + i
    );
    (payload.into_bytes(), format!("o-{tag}-{i}"))
}

#[derive(Deserialize)]
struct OrderEvent {
    order_id: String,
    user_id: String,
    amount_cents: i64,
    event_type: String,
}

#[derive(Serialize)]
struct EnrichedOrder<'a> {
    order_id: &'a str,
    user_id: &'a str,
    amount_cents: i64,
    amount: String,
    event_type: &'a str,
    source_subject: &'a str,
    source_id: &'a str,
    attempt: u32,
}

/// What `order-processor` does with one order: the subject and payload of
/// the enriched event, or why the order is refused.
pub fn enrich(payload: &[u8], subject: &str, id: &str, attempt: u32) -> Result<(String, Vec<u8>), String> {
    let event: OrderEvent = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
    if event.event_type.is_empty() || event.event_type.contains(['.', '*', '>', ' ']) {
        return Err(format!("event_type {:?} is not a subject token", event.event_type));
    }
    let abs = event.amount_cents.unsigned_abs();
    let enriched = EnrichedOrder {
        order_id: &event.order_id,
        user_id: &event.user_id,
        amount_cents: event.amount_cents,
        amount: format!(
            "{}{}.{:02}",
            if event.amount_cents < 0 { "-" } else { "" },
            abs / 100,
            abs % 100
        ),
        event_type: &event.event_type,
        source_subject: subject,
        source_id: id,
        attempt,
    };
    let out = serde_json::to_vec(&enriched).map_err(|e| e.to_string())?;
    Ok((format!("enriched.orders.{}", event.event_type), out))
}
