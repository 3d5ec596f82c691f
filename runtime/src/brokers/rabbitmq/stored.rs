//! Reading a queue without consuming it (for `sluice dlq`): messages are
//! fetched unacked with `basic.get` and handed back when the channel closes,
//! in their order. A message's sequence number is its position in the queue.

use super::headers::{self, ROUTING_KEY};
use super::{disconnected, RabbitBroker, PERSISTENT};
use crate::brokers::BrokerError;
use crate::message::Outbound;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, LongString};
use lapin::Acker;
use lapin::{BasicProperties, Channel};

/// One message read from a queue, still unacked.
pub struct Letter {
    /// 1-based position in the queue.
    pub seq: u64,
    pub message: Outbound,
    acker: Acker,
}

/// The queue and routing key in a `rabbitmq://QUEUE?routing_key=K&...`
/// origin.
pub fn parse_origin(origin: &str) -> Option<(&str, &str)> {
    let rest = origin.strip_prefix("rabbitmq://")?;
    // Routing keys may hold `?`, `&` and `=`: the key runs from the first
    // `?routing_key=` to the last `&exchange=`.
    let Some((queue, query)) = rest.split_once("?routing_key=") else {
        return Some((rest.split('?').next().unwrap_or(rest), ""));
    };
    let routing_key = query.rsplit_once("&exchange=").map_or(query, |(key, _)| key);
    Some((queue, routing_key))
}

impl RabbitBroker {
    async fn read(&self, channel: &Channel, queue: &str, limit: usize) -> Result<Vec<Letter>, BrokerError> {
        let mut out = Vec::new();
        while out.len() < limit {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(|e| super::failed(format!("reading queue `{queue}`: {e}")))?;
            let Some(got) = got else { break };
            let d = got.delivery;
            let table = d.properties.headers().as_ref();
            out.push(Letter {
                seq: out.len() as u64 + 1,
                message: Outbound {
                    subject: d.routing_key.to_string(),
                    headers: headers::from_table(table),
                    payload: d.data,
                },
                acker: d.acker,
            });
        }
        Ok(out)
    }

    /// The first `limit` messages of `queue`, left in it.
    pub async fn browse(&self, queue: &str, limit: usize) -> Result<Vec<(u64, Outbound)>, BrokerError> {
        let (channel, _) = self.channel().await?;
        let letters = self.read(&channel, queue, limit).await;
        // Closing the channel hands every fetched message back.
        let _ = channel.close(200, "browsed".into()).await;
        Ok(letters?.into_iter().map(|l| (l.seq, l.message)).collect())
    }

    /// Sends the messages `pick` chooses back to a work queue (through the
    /// default exchange, their routing key kept in a header) and removes
    /// them from `queue`; the others stay. Each is confirmed before it is
    /// removed. `pick` returns (work queue, routing key, message).
    pub async fn move_letters(
        &self,
        queue: &str,
        limit: usize,
        mut pick: impl FnMut(&Letter) -> Result<Option<(String, String, Outbound)>, BrokerError>,
    ) -> Result<usize, BrokerError> {
        let (channel, _) = self.channel().await?;
        let result =
            async {
                let mut moved = 0;
                for letter in self.read(&channel, queue, limit).await? {
                    let Some((work_queue, routing_key, m)) = pick(&letter)? else {
                        continue;
                    };
                    let mut table = headers::to_table(&m.headers);
                    table.insert(
                        ROUTING_KEY.into(),
                        AMQPValue::LongString(LongString::from(routing_key.as_bytes())),
                    );
                    let properties = BasicProperties::default()
                        .with_delivery_mode(PERSISTENT)
                        .with_headers(table);
                    self.publish_confirmed(vec![(String::new(), work_queue, properties, m.payload)], true)
                        .await?;
                    match letter.acker.ack(BasicAckOptions::default()).await {
                        Ok(true) => moved += 1,
                        _ => return Err(disconnected(
                            "the channel closed while replaying; the replayed copies were sent, the dead letters stay",
                        )),
                    }
                }
                Ok(moved)
            }
            .await;
        let _ = channel.close(200, "replayed".into()).await;
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_names_queue_and_routing_key() {
        assert_eq!(
            parse_origin("rabbitmq://work?routing_key=order.created&exchange=events"),
            Some(("work", "order.created"))
        );
        assert_eq!(parse_origin("nats://x"), None);
    }
}
