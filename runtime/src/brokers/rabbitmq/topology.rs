//! Declaring exchanges, queues and bindings, and saying in plain words why
//! RabbitMQ refused one.

use super::config::{ExchangeConfig, QueueConfig, QueueType, RabbitConfig};
use super::headers::arguments;
use super::RabbitSetupError;
use crate::error::cause;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

fn refusal(what: &'static str, name: &str, e: &lapin::Error) -> RabbitSetupError {
    let text = e.to_string();
    let reason = if let Some(at) = text.find("PRECONDITION_FAILED") {
        let detail = text[at..]
            .trim_start_matches("PRECONDITION_FAILED")
            .trim_start_matches([' ', '-']);
        format!(
            "already exists with other settings ({detail}); change the config to match it, or delete the {what} so sluice can declare it"
        )
    } else if text.contains("ACCESS_REFUSED") {
        format!("access refused: the user may not configure it ({text})")
    } else {
        text
    };
    RabbitSetupError::Topology {
        what,
        name: name.to_owned(),
        cause: cause(reason),
    }
}

async fn channel(connection: &Connection) -> Result<Channel, RabbitSetupError> {
    connection
        .create_channel()
        .await
        .map_err(|e| RabbitSetupError::Topology {
            what: "channel",
            name: String::new(),
            cause: cause(e),
        })
}

fn exchange_kind(e: &ExchangeConfig) -> ExchangeKind {
    use super::config::ExchangeKind as K;
    match e.kind {
        K::Topic => ExchangeKind::Topic,
        K::Direct => ExchangeKind::Direct,
        K::Fanout => ExchangeKind::Fanout,
        K::Headers => ExchangeKind::Headers,
    }
}

fn queue_arguments(q: &QueueConfig) -> FieldTable {
    let mut args = arguments(&q.arguments);
    if q.queue_type == QueueType::Quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    }
    if let Some(n) = q.max_length {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(n));
    }
    if let Some(ttl) = q.message_ttl {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms));
    }
    args
}

/// Declares everything the config names. A channel that saw an error is
/// closed by RabbitMQ, so each step that can fail gets its own.
pub(super) async fn declare(connection: &Connection, config: &RabbitConfig) -> Result<(), RabbitSetupError> {
    let ch = channel(connection).await?;
    for e in &config.exchanges {
        ch.exchange_declare(
            ShortString::from(e.name.as_str()),
            exchange_kind(e),
            ExchangeDeclareOptions {
                durable: e.durable,
                ..Default::default()
            },
            arguments(&e.arguments),
        )
        .await
        .map_err(|err| refusal("exchange", &e.name, &err))?;
    }
    for q in &config.queues {
        ch.queue_declare(
            ShortString::from(q.name.as_str()),
            QueueDeclareOptions {
                durable: q.durable,
                ..Default::default()
            },
            queue_arguments(q),
        )
        .await
        .map_err(|err| refusal("queue", &q.name, &err))?;
        for b in &q.bindings {
            ch.queue_bind(
                ShortString::from(q.name.as_str()),
                ShortString::from(b.exchange.as_str()),
                ShortString::from(b.routing_key.as_str()),
                QueueBindOptions::default(),
                arguments(&b.arguments),
            )
            .await
            .map_err(|err| {
                refusal(
                    "binding",
                    &format!("{} -> {} ({})", b.exchange, q.name, b.routing_key),
                    &err,
                )
            })?;
        }
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Makes sure a durable queue `name` exists; an existing one is kept as it
/// is, whatever its arguments.
pub(super) async fn declare_plain_queue(connection: &Connection, name: &str) -> Result<(), RabbitSetupError> {
    let ch = channel(connection).await?;
    let declared = ch
        .queue_declare(name.into(), QueueDeclareOptions::durable(), FieldTable::default())
        .await;
    match declared {
        Ok(_) => {
            let _ = ch.close(200, "declared".into()).await;
            Ok(())
        }
        // It exists with other arguments (a quorum queue, a length limit):
        // fine, as long as it exists.
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => {
            let ch = channel(connection).await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            ch.queue_declare(name.into(), passive, FieldTable::default())
                .await
                .map_err(|err| refusal("queue", name, &err))?;
            let _ = ch.close(200, "checked".into()).await;
            Ok(())
        }
        Err(e) => Err(refusal("queue", name, &e)),
    }
}

/// A durable queue holding messages `ttl_ms` before RabbitMQ dead-letters
/// them, through the default exchange, back into `work_queue`.
pub(super) async fn declare_delay_queue(
    connection: &Connection,
    name: &str,
    work_queue: &str,
    ttl_ms: u64,
) -> Result<(), RabbitSetupError> {
    let ch = channel(connection).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(ttl_ms).unwrap_or(i64::MAX)),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(work_queue.as_bytes())),
    );
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(|err| refusal("delay queue", name, &err))?;
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}
