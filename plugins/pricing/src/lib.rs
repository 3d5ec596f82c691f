//! A request/reply responder: the request names a product (plain text, or
//! JSON `{"product": "..."}`), the reply is `{"price_cents": N}`.

use sluice_sdk::{handler, Error, Message, Reply};

handler!(handle);

fn price_cents(product: &str) -> u64 {
    match product {
        "widget" => 999,
        "gadget" => 2499,
        _ => 100,
    }
}

fn handle(msg: Message) -> Result<Reply, Error> {
    let text = msg.text()?.trim();
    let product = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(obj)) => obj
            .get("product")
            .and_then(|p| p.as_str())
            .map(str::to_owned)
            .ok_or_else(|| Error::permanent("JSON request without a \"product\" string"))?,
        Ok(serde_json::Value::String(s)) => s,
        _ => text.to_owned(),
    };
    Reply::json(&serde_json::json!({ "price_cents": price_cents(&product) }))
        .map(|r| r.header("content-type", "application/json"))
}
