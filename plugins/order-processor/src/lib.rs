//! The order-events example: validates an order event and publishes an
//! enriched copy to `enriched.orders.<event_type>`.

use serde::{Deserialize, Serialize};
use sluice_sdk::{handler, log, Error, Message};

handler!(handle);

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

fn handle(msg: Message) -> Result<(), Error> {
    // Malformed JSON or missing fields will never succeed: permanent.
    let event: OrderEvent = msg.json()?;
    if event.event_type.is_empty() || event.event_type.contains(['.', '*', '>', ' ']) {
        return Err(Error::permanent(format!(
            "event_type {:?} is not a subject token",
            event.event_type
        )));
    }
    let enriched = EnrichedOrder {
        order_id: &event.order_id,
        user_id: &event.user_id,
        amount_cents: event.amount_cents,
        amount: format!(
            "{}{}.{:02}",
            if event.amount_cents < 0 { "-" } else { "" },
            event.amount_cents.unsigned_abs() / 100,
            event.amount_cents.unsigned_abs() % 100
        ),
        event_type: &event.event_type,
        source_subject: msg.subject(),
        source_id: msg.id(),
        attempt: msg.attempt(),
    };
    let subject = format!("enriched.orders.{}", event.event_type);
    sluice_sdk::publish_json(&subject, &enriched)?;
    log::debug(format!("order {} -> {subject}", event.order_id));
    Ok(())
}
