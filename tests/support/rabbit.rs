//! A plain AMQP client for the RabbitMQ tests (`SLUICE_AMQP_URL`, default
//! guest@127.0.0.1:5672; `cargo xtask test` starts RabbitMQ when none is
//! listening): publishes with confirms, reads queues, cleans up.

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub fn url() -> String {
    std::env::var("SLUICE_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub struct Rabbit {
    pub connection: Connection,
    pub channel: Channel,
}

/// A message read back from a queue.
#[derive(Debug, Clone)]
pub struct Got {
    pub routing_key: String,
    pub headers: Vec<(String, String)>,
    pub payload: Vec<u8>,
    pub persistent: bool,
    pub correlation_id: Option<String>,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => format!("{other:?}"),
    }
}

pub fn table(headers: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in headers {
        t.insert(
            ShortString::from(*k),
            AMQPValue::LongString(LongString::from(v.as_bytes())),
        );
    }
    t
}

impl Rabbit {
    pub async fn connect() -> Self {
        let connection = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at {} is needed (cargo xtask test starts one): {e}", url()));
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm mode");
        Self { connection, channel }
    }

    /// A persistent publish, confirmed.
    pub async fn publish(&self, exchange: &str, routing_key: &str, headers: &[(&str, &str)], payload: &[u8]) {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(table(headers));
        self.publish_with(exchange, routing_key, props, payload).await;
    }

    pub async fn publish_with(&self, exchange: &str, routing_key: &str, props: BasicProperties, payload: &[u8]) {
        self.channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                payload,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }

    /// Takes (and acks) every message now in `queue`.
    pub async fn drain(&self, queue: &str) -> Vec<Got> {
        let mut out = Vec::new();
        while let Some(m) = self
            .channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .expect("basic.get")
        {
            let d = m.delivery;
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
            let headers = d
                .properties
                .headers()
                .as_ref()
                .map(|t| t.inner().iter().map(|(k, v)| (k.to_string(), text(v))).collect())
                .unwrap_or_default();
            out.push(Got {
                routing_key: d.routing_key.to_string(),
                headers,
                payload: d.data,
                persistent: *d.properties.delivery_mode() == Some(2),
                correlation_id: d.properties.correlation_id().as_ref().map(|c| c.to_string()),
            });
        }
        out
    }

    /// Messages ready in `queue` (declared passively on a channel of its own).
    pub async fn count(&self, queue: &str) -> u32 {
        let ch = self.connection.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = ch.close(200, "ok".into()).await;
        q.message_count()
    }

    /// A durable queue of the test's own (to observe what sluice publishes).
    pub async fn declare_queue(&self, name: &str, args: FieldTable) {
        self.channel
            .queue_declare(name.into(), QueueDeclareOptions::durable(), args)
            .await
            .expect("declare queue");
    }

    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                key.into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind");
    }

    /// Deletes queues and exchanges, ignoring the ones that do not exist.
    pub async fn delete(&self, queues: &[&str], exchanges: &[&str]) {
        for q in queues {
            if let Ok(ch) = self.connection.create_channel().await {
                let _ = ch.queue_delete((*q).into(), QueueDeleteOptions::default()).await;
                let _ = ch.close(200, "ok".into()).await;
            }
        }
        for e in exchanges {
            if let Ok(ch) = self.connection.create_channel().await {
                let _ = ch.exchange_delete((*e).into(), ExchangeDeleteOptions::default()).await;
                let _ = ch.close(200, "ok".into()).await;
            }
        }
    }
}
