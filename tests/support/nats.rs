//! NATS helpers shared by tests whose effects are counted in a JetStream
//! stream (which drops a second publish with the same `Nats-Msg-Id`).

use async_nats::jetstream;

pub fn url() -> String {
    std::env::var("SLUICE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn context() -> jetstream::Context {
    let url = url();
    let client = async_nats::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("nats-server at {url} is needed: {e}"));
    jetstream::new(client)
}

/// The config block of a stream that stores `subject` (for a daemon's
/// `[brokers.nats]`): the daemon then publishes there with PubAck and its
/// dedup id, so each effect is stored once however often it is sent.
pub fn stream_block(stream: &str, subject: &str) -> String {
    format!("[[brokers.nats.streams]]\nname = \"{stream}\"\nsubjects = [\"{subject}\"]\n")
}

/// Messages stored in `stream`; panics when the stream does not exist.
pub async fn stored(stream: &str) -> u64 {
    let mut s = context()
        .await
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
    s.info().await.expect("stream info").state.messages
}

pub async fn delete_stream(stream: &str) {
    let _ = context().await.delete_stream(stream).await;
}

/// Messages a core NATS subscription received (the Kafka and RabbitMQ
/// tests send the handlers' publishes to NATS: tansu takes ~10 ms per
/// acknowledged produce, and RabbitMQ cannot drop a duplicate).
#[derive(Clone, Default)]
pub struct Collected(pub std::sync::Arc<std::sync::Mutex<Vec<Received>>>);

/// A payload and its `Nats-Msg-Id`.
pub type Received = (String, Option<String>);

impl Collected {
    /// Subscribes to `subject` on `rt` and keeps (payload, Nats-Msg-Id).
    pub fn subscribe(rt: &tokio::runtime::Runtime, subject: &str) -> Self {
        use futures_util::StreamExt;
        let url = url();
        let collected = Self::default();
        let mut sub = rt.block_on(async {
            let client = async_nats::connect(&url)
                .await
                .unwrap_or_else(|e| panic!("nats-server at {url} is needed: {e}"));
            let sub = client.subscribe(subject.to_owned()).await.expect("subscribe");
            client.flush().await.expect("flush");
            // The client lives as long as the subscription task.
            std::mem::forget(client);
            sub
        });
        let store = collected.0.clone();
        rt.spawn(async move {
            while let Some(m) = sub.next().await {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Msg-Id"))
                    .map(|v| v.to_string());
                let payload = String::from_utf8_lossy(&m.payload).into_owned();
                if let Ok(mut s) = store.lock() {
                    s.push((payload, id));
                }
            }
        });
        collected
    }

    pub fn len(&self) -> usize {
        self.0.lock().map(|s| s.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<(String, Option<String>)> {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}
