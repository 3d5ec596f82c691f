//! The one table of brokers: the only place outside each broker's folder
//! that names them. A route's `source = { broker = "...", ... }` is parsed
//! here into that broker's own settings; the daemon opens the brokers a
//! config uses, and asks here for a route's source, sinks and dead-letter
//! store. A new broker is its folder plus one arm in each match below.

use super::embedded::{EmbeddedBroker, EmbeddedConfig, EmbeddedDeadLetters, EmbeddedSourceSpec, StoreError};
use super::kafka::{self, KafkaBroker, KafkaConfig, KafkaDeadLetters, KafkaSetupError, KafkaSourceSpec};
use super::nats::{CoreSourceSpec, JetStreamSourceSpec, NatsBroker, NatsConfig, NatsSetupError, StreamDeadLetters};
use super::rabbitmq::{RabbitBroker, RabbitConfig, RabbitDeadLetters, RabbitSetupError, RabbitSourceSpec};
use super::{DeadLetterStore, Guarantees, Problem, RouteContext, Sink, Source};
use crate::request::Requester;
use crate::subject::SubjectPattern;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// A broker a route can consume from, publish to or dead-letter to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Embedded,
    /// Core NATS: at-most-once.
    Nats,
    /// A JetStream durable pull consumer.
    Jetstream,
    /// A RabbitMQ queue.
    Rabbitmq,
    /// Kafka topics, through a consumer group.
    Kafka,
}

const KINDS: &str = "embedded, nats, jetstream, rabbitmq or kafka";

impl BrokerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Embedded => "embedded",
            Self::Nats => "nats",
            Self::Jetstream => "jetstream",
            Self::Rabbitmq => "rabbitmq",
            Self::Kafka => "kafka",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "embedded" => Self::Embedded,
            "nats" => Self::Nats,
            "jetstream" => Self::Jetstream,
            "rabbitmq" => Self::Rabbitmq,
            "kafka" => Self::Kafka,
            _ => return None,
        })
    }

    /// Whether both publish into one subject space (core NATS and
    /// JetStream share a server).
    pub fn shares_subjects_with(self, other: Self) -> bool {
        let nats = |k: Self| matches!(k, Self::Nats | Self::Jetstream);
        self == other || (nats(self) && nats(other))
    }

    /// Dead letters can go to a named exchange rather than a queue.
    pub fn has_exchanges(self) -> bool {
        self == Self::Rabbitmq
    }

    /// The `[brokers.X]` table it needs, if any.
    pub fn connection_table(self) -> Option<&'static str> {
        match self {
            Self::Embedded => None,
            Self::Nats | Self::Jetstream => Some("nats"),
            Self::Rabbitmq => Some("rabbitmq"),
            Self::Kafka => Some("kafka"),
        }
    }

    /// What its sources guarantee.
    pub fn guarantees(self) -> Guarantees {
        Guarantees {
            redelivers: self != Self::Nats,
            drops_duplicates: matches!(self, Self::Embedded | Self::Jetstream),
            tells_oldest: matches!(self, Self::Embedded | Self::Jetstream | Self::Kafka),
        }
    }
}

/// `[brokers]`: each broker's connection settings.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokersConfig {
    #[serde(default)]
    pub embedded: EmbeddedConfig,
    /// NATS and JetStream; routes with `broker = "nats"` or `"jetstream"`
    /// need it.
    pub nats: Option<NatsConfig>,
    /// Routes with `broker = "rabbitmq"` need it.
    pub rabbitmq: Option<RabbitConfig>,
    /// Routes with `broker = "kafka"` need it.
    pub kafka: Option<KafkaConfig>,
}

impl BrokersConfig {
    /// Whether the table `kind` needs is there.
    pub fn has(&self, kind: BrokerKind) -> bool {
        match kind {
            BrokerKind::Embedded => true,
            BrokerKind::Nats | BrokerKind::Jetstream => self.nats.is_some(),
            BrokerKind::Rabbitmq => self.rabbitmq.is_some(),
            BrokerKind::Kafka => self.kafka.is_some(),
        }
    }

    /// Checks what serde cannot: subject patterns, queue names (which must
    /// not be a route's: `route_names`). Keys are full (`brokers.nats...`).
    pub fn validate(&self, route_names: &BTreeSet<&str>) -> Result<(), Problem> {
        if let Some(nats) = &self.nats {
            for (i, stream) in nats.streams.iter().enumerate() {
                for (j, s) in stream.subjects.iter().enumerate() {
                    SubjectPattern::parse(s)
                        .map_err(|e| (format!("brokers.nats.streams.{i}.subjects.{j}"), e.to_string()))?;
                }
            }
        }
        for (i, q) in self.embedded.queues.iter().enumerate() {
            let key = |k: &str| format!("brokers.embedded.queues.{i}.{k}");
            if !crate::subject::is_plain_name(&q.name) {
                return Err((key("name"), crate::subject::PLAIN_NAME.into()));
            }
            if route_names.contains(q.name.as_str()) {
                return Err((key("name"), format!("queue `{}` has the name of a route", q.name)));
            }
            for (j, s) in q.subjects.iter().enumerate() {
                SubjectPattern::parse(s).map_err(|e| (format!("{}.{j}", key("subjects")), e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// A route's `source`: the broker's own settings, checked by the broker's
/// own struct (unknown keys are errors naming the key).
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    Embedded(EmbeddedSourceSpec),
    Nats(CoreSourceSpec),
    Jetstream(JetStreamSourceSpec),
    Rabbitmq(RabbitSourceSpec),
    Kafka(KafkaSourceSpec),
}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut table = toml::Table::deserialize(deserializer)?;
        // `broker` may be left out: the embedded broker.
        let kind = match table.remove("broker") {
            None => BrokerKind::Embedded,
            Some(toml::Value::String(name)) => BrokerKind::parse(&name).ok_or_else(|| {
                crate::de::nested(
                    "broker",
                    &format!("unknown broker `{}`, expected {KINDS}", crate::headers::shown(&name)),
                )
            })?,
            Some(_) => return Err(D::Error::custom(crate::de::nested_text("broker", "must be a string"))),
        };
        Ok(match kind {
            BrokerKind::Embedded => Self::Embedded(crate::de::from_table(table)?),
            BrokerKind::Nats => Self::Nats(crate::de::from_table(table)?),
            BrokerKind::Jetstream => Self::Jetstream(crate::de::from_table(table)?),
            BrokerKind::Rabbitmq => Self::Rabbitmq(crate::de::from_table(table)?),
            BrokerKind::Kafka => Self::Kafka(crate::de::from_table(table)?),
        })
    }
}

impl SourceSpec {
    pub fn kind(&self) -> BrokerKind {
        match self {
            Self::Embedded(_) => BrokerKind::Embedded,
            Self::Nats(_) => BrokerKind::Nats,
            Self::Jetstream(_) => BrokerKind::Jetstream,
            Self::Rabbitmq(_) => BrokerKind::Rabbitmq,
            Self::Kafka(_) => BrokerKind::Kafka,
        }
    }

    /// The subject pattern the route consumes, on brokers with subjects.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Self::Embedded(s) => Some(&s.subject),
            Self::Nats(s) => Some(&s.subject),
            Self::Jetstream(s) => Some(&s.subject),
            Self::Rabbitmq(_) | Self::Kafka(_) => None,
        }
    }

    /// Messages come in partitions whose order matters: the route's
    /// ordering defaults to per partition.
    pub fn partitioned(&self) -> bool {
        matches!(self, Self::Kafka(_))
    }

    /// The broker's own checks; keys are relative to the route.
    pub fn validate(&self, route: &RouteContext) -> Result<(), Problem> {
        if let Some(subject) = self.subject() {
            SubjectPattern::parse(subject).map_err(|e| ("source.subject".to_owned(), e.to_string()))?;
        }
        match self {
            Self::Embedded(_) | Self::Nats(_) => Ok(()),
            Self::Jetstream(s) => s.validate(route),
            Self::Rabbitmq(s) => s.validate(route),
            Self::Kafka(s) => s.validate(route),
        }
    }
}

/// Where a route's dead letters go.
#[derive(Debug, Clone)]
pub struct DeadLetterTarget<'a> {
    pub broker: BrokerKind,
    pub subject: String,
    /// An exchange to publish to rather than the queue `subject` (brokers
    /// with exchanges).
    pub exchange: Option<&'a str>,
}

/// What of a route the brokers need to open and serve it.
#[derive(Debug, Clone)]
pub struct RouteUse<'a> {
    pub context: RouteContext<'a>,
    pub source: &'a SourceSpec,
    pub dead_letter: DeadLetterTarget<'a>,
    /// Where the handler's publishes go.
    pub publish_broker: BrokerKind,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot open the embedded broker in {dir}")]
    Embedded { dir: String, source: StoreError },
    #[error("cannot create the data directory {dir}")]
    DataDir { dir: String, source: std::io::Error },
    #[error(transparent)]
    Nats(#[from] NatsSetupError),
    #[error(transparent)]
    Rabbit(#[from] RabbitSetupError),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    #[error("a route uses {kind} but [brokers.{table}] is missing")]
    Missing { kind: &'static str, table: &'static str },
    #[error("route {route}: its dead letters go to `{subject}` on NATS, which no JetStream stream stores; declare one under [[brokers.nats.streams]] (or set dead_letter.subject to a stored subject)")]
    NotStored { route: String, subject: String },
    #[error(transparent)]
    Pattern(#[from] crate::subject::SubjectError),
}

/// The brokers a config uses, connected.
pub struct Brokers {
    pub embedded: EmbeddedBroker,
    nats: Option<NatsBroker>,
    rabbitmq: Option<RabbitBroker>,
    kafka: Option<KafkaBroker>,
}

impl Brokers {
    /// Opens the embedded broker under `data_dir` and connects to the
    /// brokers `config` has tables for; declares the queues and topics the
    /// routes' dead letters need.
    pub async fn open(config: &BrokersConfig, data_dir: &Path, routes: &[RouteUse<'_>]) -> Result<Self, SetupError> {
        std::fs::create_dir_all(data_dir).map_err(|source| SetupError::DataDir {
            dir: data_dir.display().to_string(),
            source,
        })?;
        let embedded = EmbeddedBroker::open(&data_dir.join("embedded.redb"), config.embedded.duplicate_window)
            .map_err(|source| SetupError::Embedded {
                dir: data_dir.display().to_string(),
                source,
            })?;
        let nats = match &config.nats {
            Some(n) => Some(NatsBroker::connect(n).await?),
            None => None,
        };
        let rabbitmq = match &config.rabbitmq {
            Some(r) => {
                let rabbit = RabbitBroker::connect(r).await?;
                // Dead letters sent straight to a queue need that queue.
                for route in routes {
                    let d = &route.dead_letter;
                    if d.broker == BrokerKind::Rabbitmq && d.exchange.is_none() {
                        rabbit.declare_queue(&d.subject).await?;
                    }
                }
                Some(rabbit)
            }
            None => None,
        };
        let kafka = match &config.kafka {
            Some(k) => {
                let kafka = KafkaBroker::connect(k).await?;
                for route in routes {
                    if route.dead_letter.broker == BrokerKind::Kafka {
                        kafka.ensure_topic(&route.dead_letter.subject).await?;
                    }
                }
                Some(kafka)
            }
            None => None,
        };
        let brokers = Self {
            embedded,
            nats,
            rabbitmq,
            kafka,
        };
        brokers.declare(config, routes)?;
        Ok(brokers)
    }

    /// Declares the embedded queues: one per embedded route, one per
    /// embedded dead-letter subject, and the extra ones. Existing queues keep
    /// their messages; run again by a config reload.
    pub fn declare(&self, config: &BrokersConfig, routes: &[RouteUse<'_>]) -> Result<(), SetupError> {
        for route in routes {
            if let SourceSpec::Embedded(s) = route.source {
                self.embedded
                    .declare_queue(route.context.name, vec![SubjectPattern::parse(&s.subject)?], None);
            }
            if route.dead_letter.broker == BrokerKind::Embedded {
                let dlq = &route.dead_letter.subject;
                self.embedded
                    .declare_queue(dlq, vec![SubjectPattern::parse(dlq)?], None);
            }
        }
        for q in &config.embedded.queues {
            let patterns = q
                .subjects
                .iter()
                .map(|s| SubjectPattern::parse(s))
                .collect::<Result<_, _>>()?;
            self.embedded.declare_queue(&q.name, patterns, q.max_len);
        }
        Ok(())
    }

    fn nats(&self) -> Result<&NatsBroker, SetupError> {
        self.nats.as_ref().ok_or(SetupError::Missing {
            kind: "NATS",
            table: "nats",
        })
    }

    fn rabbitmq(&self) -> Result<&RabbitBroker, SetupError> {
        self.rabbitmq.as_ref().ok_or(SetupError::Missing {
            kind: "RabbitMQ",
            table: "rabbitmq",
        })
    }

    fn kafka(&self) -> Result<&KafkaBroker, SetupError> {
        self.kafka.as_ref().ok_or(SetupError::Missing {
            kind: "Kafka",
            table: "kafka",
        })
    }

    /// Publishes to `kind`.
    pub fn sink(&self, kind: BrokerKind) -> Result<Arc<dyn Sink>, SetupError> {
        Ok(match kind {
            BrokerKind::Embedded => Arc::new(self.embedded.clone()),
            BrokerKind::Nats | BrokerKind::Jetstream => Arc::new(self.nats()?.clone()),
            BrokerKind::Rabbitmq => Arc::new(self.rabbitmq()?.sink()),
            BrokerKind::Kafka => Arc::new(self.kafka()?.clone()),
        })
    }

    /// Where a route's dead letters go. The original is acked (termed,
    /// committed) once its copy is stored: on NATS the copy must be
    /// confirmed by a stream, not sent on core NATS and hoped for (refused
    /// at start when no stream stores the subject). Only a core NATS source,
    /// itself at-most-once, may dead-letter to core NATS.
    pub async fn dead_letter_sink(&self, route: &RouteUse<'_>) -> Result<Arc<dyn Sink>, SetupError> {
        let d = &route.dead_letter;
        match d.broker {
            BrokerKind::Rabbitmq => Ok(Arc::new(self.rabbitmq()?.dead_letter_sink(d.exchange))),
            BrokerKind::Nats | BrokerKind::Jetstream if route.source.kind() != BrokerKind::Nats => {
                let nats = self.nats()?;
                if !nats.is_stored(&d.subject).await {
                    return Err(SetupError::NotStored {
                        route: route.context.name.to_owned(),
                        subject: d.subject.clone(),
                    });
                }
                Ok(Arc::new(nats.confirmed_sink()))
            }
            other => self.sink(other),
        }
    }

    /// Request/reply for handlers, where a broker offers it.
    pub fn requester(&self) -> Option<Arc<dyn Requester>> {
        self.nats.clone().map(|n| Arc::new(n) as Arc<dyn Requester>)
    }

    /// The route's source and a description for the status page. Last in
    /// building a route: the source may join a consumer group.
    pub async fn source(&self, route: &RouteUse<'_>) -> Result<(Arc<dyn Source>, String), SetupError> {
        let ctx = &route.context;
        Ok(match route.source {
            SourceSpec::Embedded(s) => (Arc::new(self.embedded.source(ctx.name)), s.describe()),
            SourceSpec::Nats(s) => {
                let src = self.nats()?.core_source(&s.subject, s.queue_group.as_deref()).await?;
                (Arc::new(src), s.describe())
            }
            SourceSpec::Jetstream(s) => {
                let settings = s.settings(ctx);
                let src = self.nats()?.jetstream_source(&settings).await?;
                let description = format!("jetstream {}/{} {}", settings.stream, settings.durable, s.subject);
                (Arc::new(src), description)
            }
            SourceSpec::Rabbitmq(s) => {
                let settings = s.settings(ctx);
                let description = RabbitSourceSpec::describe(&settings);
                (Arc::new(self.rabbitmq()?.source(settings)), description)
            }
            SourceSpec::Kafka(s) => {
                let settings = s.settings(ctx);
                let kafka = self.kafka()?;
                for topic in &settings.topics {
                    for level in 1..=settings.retry_levels {
                        kafka.ensure_topic(&kafka::retry_topic(topic, level)).await?;
                    }
                }
                let description = KafkaSourceSpec::describe(&settings);
                (Arc::new(kafka.source(settings)?), description)
            }
        })
    }

    /// The dead-letter destinations `sluice dlq` can read, by name: embedded
    /// queues, NATS subjects a declared stream stores, RabbitMQ queues,
    /// Kafka topics. Replays go only where a route consumes.
    pub fn dead_letter_stores(&self, routes: &[RouteUse<'_>]) -> BTreeMap<String, Arc<dyn DeadLetterStore>> {
        let mut embedded_routes = BTreeSet::new();
        let mut work_queues = BTreeSet::new();
        let mut topics = BTreeSet::new();
        for r in routes {
            match r.source {
                SourceSpec::Embedded(_) => {
                    embedded_routes.insert(r.context.name.to_owned());
                }
                SourceSpec::Rabbitmq(s) => {
                    work_queues.insert(s.queue.clone());
                }
                SourceSpec::Kafka(s) => topics.extend(s.topics.iter().cloned()),
                SourceSpec::Nats(_) | SourceSpec::Jetstream(_) => {}
            }
        }
        let any_topic = topics.iter().any(|t| t.starts_with('^'));
        let mut out: BTreeMap<String, Arc<dyn DeadLetterStore>> = BTreeMap::new();
        for r in routes {
            let d = &r.dead_letter;
            let subject = d.subject.clone();
            let store: Arc<dyn DeadLetterStore> = match d.broker {
                BrokerKind::Embedded => Arc::new(EmbeddedDeadLetters {
                    broker: self.embedded.clone(),
                    queue: subject.clone(),
                    routes: embedded_routes.clone(),
                }),
                BrokerKind::Kafka => match &self.kafka {
                    Some(k) => Arc::new(KafkaDeadLetters {
                        kafka: k.clone(),
                        topic: subject.clone(),
                        topics: topics.clone(),
                        any_topic,
                    }),
                    None => continue,
                },
                BrokerKind::Rabbitmq => match (&self.rabbitmq, d.exchange) {
                    (Some(rabbit), None) => Arc::new(RabbitDeadLetters {
                        rabbit: rabbit.clone(),
                        queue: subject.clone(),
                        work_queues: work_queues.clone(),
                    }),
                    (_, Some(exchange)) => {
                        tracing::warn!(route = %r.context.name, "dead letters go to the exchange `{exchange}`: `sluice dlq` reads only the queues sluice publishes to directly");
                        continue;
                    }
                    (None, None) => continue,
                },
                BrokerKind::Nats | BrokerKind::Jetstream => {
                    let Some(nats) = &self.nats else { continue };
                    match nats.stream_for(&subject) {
                        Some(stream) => Arc::new(StreamDeadLetters {
                            nats: nats.clone(),
                            stream: stream.to_owned(),
                            subject: subject.clone(),
                        }),
                        None => {
                            tracing::warn!(route = %r.context.name, "dead letters go to {subject} on core NATS, where nothing keeps them: declare a stream for it to keep and replay them");
                            continue;
                        }
                    }
                }
            };
            out.insert(subject, store);
        }
        out
    }

    pub async fn close(&self) {
        if let Some(kafka) = self.kafka.clone() {
            // Joins the consumer threads (final commits, leaving the group).
            let _ = tokio::task::spawn_blocking(move || kafka.close()).await;
        }
        if let Some(rabbit) = &self.rabbitmq {
            rabbit.close().await;
        }
        if let Some(nats) = &self.nats {
            nats.close().await;
        }
        self.embedded.close();
    }
}

/// The subject (topic, routing key) a dead letter came from, from its
/// `sluice-origin`: `embedded://S?queue=..`, `nats://S`,
/// `jetstream://STREAM/S?..`, `rabbitmq://QUEUE?routing_key=K..`,
/// `kafka://T?..`.
pub fn origin_subject(origin: &str) -> Option<&str> {
    if let Some((subject, _)) = super::embedded::parse_origin(origin) {
        return Some(subject);
    }
    if let Some((_, routing_key)) = super::rabbitmq::parse_origin(origin) {
        return Some(routing_key);
    }
    if let Some(rest) = origin.strip_prefix("kafka://") {
        return Some(before_query(rest));
    }
    if let Some(rest) = origin.strip_prefix("nats://") {
        return Some(before_query(rest));
    }
    let rest = origin.strip_prefix("jetstream://")?;
    let (_, rest) = rest.split_once('/')?;
    Some(before_query(rest))
}

fn before_query(rest: &str) -> &str {
    rest.split('?').next().unwrap_or(rest)
}
