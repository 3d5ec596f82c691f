//! Builds the parts of a daemon from a config: brokers, engine, plugins,
//! idempotency stores, routes.

use crate::brokers::embedded::{EmbeddedBroker, StoreError};
use crate::brokers::kafka::{self, KafkaBroker, KafkaSetupError};
use crate::brokers::nats::{ConsumerSettings, NatsBroker, NatsSetupError};
use crate::brokers::rabbitmq::{self, RabbitBroker, RabbitSetupError};
use crate::brokers::{Sink, Source};
use crate::config::{BrokerKind, Config, GateStore, PluginConfig, RouteConfig};
use crate::engine::{Engine, EngineError, EngineSettings, Plugin, PluginError, PluginSlot, PluginSpec, Requester};
use crate::idempotency::{FileStore, GateError, IdempotencyStore, MemoryStore, RedisStore};
use crate::metrics::Metrics;
use crate::keys::KeySource;
use crate::pipeline::policy::Policy;
use crate::pipeline::Gate;
use crate::pipeline::{Route, RouteStatus};
use crate::subject::SubjectPattern;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("cannot open the embedded broker in {dir}: {source}")]
    Broker { dir: String, source: StoreError },
    #[error("cannot create the data directory {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("cannot listen on {addr} for the admin API: {source} (set [admin] listen to another address)")]
    Listen { addr: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("idempotency store: {0}")]
    Gate(#[from] GateError),
    #[error(transparent)]
    Nats(#[from] NatsSetupError),
    #[error(transparent)]
    Rabbit(#[from] RabbitSetupError),
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
}

/// The idempotency stores the routes of a config use, opened once.
#[derive(Default)]
pub struct GateStores {
    file: Option<Arc<FileStore>>,
    memory: Option<Arc<MemoryStore>>,
    redis: Option<Arc<RedisStore>>,
}

impl GateStores {
    pub async fn open(config: &Config) -> Result<Self, DaemonError> {
        let mut stores = Self::default();
        stores.ensure(config).await?;
        Ok(stores)
    }

    /// Opens the stores `config` needs that are not open yet.
    pub async fn ensure(&mut self, config: &Config) -> Result<(), DaemonError> {
        let stores = self;
        for route in &config.routes {
            let Some(idem) = &route.idempotency else {
                continue;
            };
            match idem.store {
                GateStore::File if stores.file.is_none() => {
                    stores.file = Some(Arc::new(FileStore::open(&config.data_dir.join("idempotency.redb"))?));
                }
                GateStore::Memory if stores.memory.is_none() => stores.memory = Some(Arc::new(MemoryStore::new())),
                GateStore::Redis if stores.redis.is_none() => {
                    let url = config.stores.redis_url.as_deref().unwrap_or_default();
                    stores.redis = Some(Arc::new(RedisStore::connect(url, "sluice:idem:").await?));
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn get(&self, kind: GateStore) -> Option<Arc<dyn IdempotencyStore>> {
        match kind {
            GateStore::File => self.file.clone().map(|s| s as Arc<dyn IdempotencyStore>),
            GateStore::Memory => self.memory.clone().map(|s| s as Arc<dyn IdempotencyStore>),
            GateStore::Redis => self.redis.clone().map(|s| s as Arc<dyn IdempotencyStore>),
        }
    }

    pub fn close(&self) {
        if let Some(f) = &self.file {
            f.close();
        }
    }
}

/// The engine for a config: fuel metering if any plugin has a budget, and
/// the compiled-plugin cache under the data directory.
pub fn build_engine(config: &Config) -> Result<Engine, DaemonError> {
    Ok(Engine::new(EngineSettings {
        max_instances: config.engine.max_instances,
        fuel: config.plugins.values().any(|p| p.fuel.is_some()),
        cache_dir: config.engine.cache.then(|| config.data_dir.join("cache")),
    })?)
}

/// Subjects a plugin's wildcard allow-list must not reach: every route's
/// dead-letter subject (a plugin forging dead letters could replay them).
pub fn protected_subjects(config: &Config) -> Vec<String> {
    let mut subjects: Vec<String> = config.routes.iter().map(|r| r.dead_letter_subject()).collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// Subjects no producer's reply address may name: every route's
/// dead-letter subject and input.
pub fn reserved_replies(config: &Config) -> Arc<Vec<crate::subject::SubjectPattern>> {
    let inputs = config.routes.iter().map(|r| r.source.subject.clone());
    let patterns = protected_subjects(config)
        .into_iter()
        .chain(inputs)
        .filter(|s| !s.is_empty())
        .filter_map(|s| crate::subject::SubjectPattern::parse(&s).ok())
        .collect();
    Arc::new(patterns)
}

pub fn plugin_spec(
    name: &str,
    plugin: &PluginConfig,
    requester: Option<Arc<dyn Requester>>,
    protected_subjects: Vec<String>,
) -> PluginSpec {
    PluginSpec {
        name: name.to_owned(),
        path: plugin.path.clone(),
        isolation: plugin.isolation,
        memory_cap_bytes: plugin
            .max_memory_mb
            .checked_mul(1 << 20)
            .and_then(|b| usize::try_from(b).ok())
            .unwrap_or(usize::MAX),
        timeout: plugin.timeout,
        fuel: plugin.fuel,
        reuse_max_messages: plugin.reuse_max_messages,
        publish_allow: plugin.publish.clone(),
        request_allow: plugin.request.clone(),
        settings: plugin.settings(),
        requester,
        protected_subjects,
    }
}

/// Loads one version of plugin `name`: compiled on a blocking thread (off
/// the async workers, which keep handling messages), then instantiated once
/// so a version whose start-up fails is refused before it serves. Used at
/// start-up, by hot reloads and by `sluice check`.
pub async fn load_plugin(
    engine: &Engine,
    name: &str,
    config: &PluginConfig,
    requester: Option<Arc<dyn Requester>>,
    protected_subjects: Vec<String>,
) -> Result<Arc<Plugin>, PluginError> {
    let spec = plugin_spec(name, config, requester, protected_subjects);
    let engine = engine.clone();
    let loaded = tokio::task::spawn_blocking(move || engine.load(spec))
        .await
        .map_err(|e| PluginError::Instantiate {
            name: name.to_owned(),
            path: config.path.clone(),
            reason: format!("compilation did not finish: {e}"),
        })??;
    loaded.probe().await?;
    Ok(Arc::new(loaded))
}

/// Loads every plugin of the config; the first refusal is the error.
pub async fn load_plugins(
    engine: &Engine,
    config: &Config,
    requester: Option<Arc<dyn Requester>>,
) -> Result<BTreeMap<String, Arc<Plugin>>, PluginError> {
    let mut plugins = BTreeMap::new();
    for (name, plugin) in &config.plugins {
        let loaded = load_plugin(engine, name, plugin, requester.clone(), protected_subjects(config)).await?;
        tracing::info!(
            plugin = %name,
            hash = %&loaded.hash()[..12],
            isolation = loaded.isolation().as_str(),
            "plugin loaded"
        );
        plugins.insert(name.clone(), loaded);
    }
    Ok(plugins)
}

/// The broker dead letters of `route` go to: its own, unless it says.
pub fn dead_letter_broker(route: &crate::config::RouteConfig) -> BrokerKind {
    route
        .dead_letter
        .as_ref()
        .and_then(|d| d.broker)
        .unwrap_or(route.source.broker)
}

/// The dead-letter destinations `sluice dlq` can read: embedded queues, and
/// NATS subjects a declared stream stores.
pub fn dead_letter_backends(config: &Config, brokers: &Brokers) -> BTreeMap<String, crate::dlq::Backend> {
    use crate::dlq::Backend;
    let embedded_routes: std::collections::BTreeSet<String> = config
        .routes
        .iter()
        .filter(|r| r.source.broker == BrokerKind::Embedded)
        .map(|r| r.name.clone())
        .collect();
    let work_queues: std::collections::BTreeSet<String> =
        config.routes.iter().filter_map(|r| r.source.queue.clone()).collect();
    let topics: std::collections::BTreeSet<String> = config
        .routes
        .iter()
        .flat_map(|r| r.source.topics.clone().unwrap_or_default())
        .collect();
    let any_topic = topics.iter().any(|t| t.starts_with('^'));
    let mut out = BTreeMap::new();
    for r in &config.routes {
        let subject = r.dead_letter_subject();
        let exchange = r.dead_letter.as_ref().and_then(|d| d.exchange.as_ref());
        let backend = match (dead_letter_broker(r), &brokers.nats) {
            (BrokerKind::Kafka, _) => match &brokers.kafka {
                Some(k) => Backend::Kafka {
                    kafka: k.clone(),
                    topic: subject.clone(),
                    topics: topics.clone(),
                    any_topic,
                },
                None => continue,
            },
            (BrokerKind::Rabbitmq, _) => match (&brokers.rabbitmq, exchange) {
                (Some(rabbit), None) => Backend::Rabbit {
                    rabbit: rabbit.clone(),
                    queue: subject.clone(),
                    work_queues: work_queues.clone(),
                },
                (_, Some(exchange)) => {
                    tracing::warn!(route = %r.name, "dead letters go to the exchange `{exchange}`: `sluice dlq` reads only the queues sluice publishes to directly");
                    continue;
                }
                (None, None) => continue,
            },
            (BrokerKind::Embedded, _) => Backend::Embedded {
                broker: brokers.embedded.clone(),
                queue: subject.clone(),
                routes: embedded_routes.clone(),
            },
            (_, Some(nats)) => match nats.stream_for(&subject) {
                Some(stream) => Backend::Stream {
                    nats: Box::new(nats.clone()),
                    stream: stream.to_owned(),
                    subject: subject.clone(),
                },
                None => {
                    tracing::warn!(route = %r.name, "dead letters go to {subject} on core NATS, where nothing keeps them: declare a stream for it to keep and replay them");
                    continue;
                }
            },
            (_, None) => continue,
        };
        out.insert(subject, backend);
    }
    out
}

/// The brokers a config uses.
pub struct Brokers {
    pub embedded: EmbeddedBroker,
    pub nats: Option<NatsBroker>,
    pub rabbitmq: Option<RabbitBroker>,
    pub kafka: Option<KafkaBroker>,
}

impl Brokers {
    pub async fn open(config: &Config) -> Result<Self, DaemonError> {
        let embedded = open_broker(config)?;
        let nats = match &config.brokers.nats {
            Some(n) => Some(NatsBroker::connect(n).await?),
            None => None,
        };
        let rabbitmq = match &config.brokers.rabbitmq {
            Some(r) => {
                let rabbit = RabbitBroker::connect(r).await?;
                // Dead letters sent straight to a queue need that queue.
                for route in &config.routes {
                    let to_exchange = route.dead_letter.as_ref().is_some_and(|d| d.exchange.is_some());
                    if dead_letter_broker(route) == BrokerKind::Rabbitmq && !to_exchange {
                        rabbit.declare_queue(&route.dead_letter_subject()).await?;
                    }
                }
                Some(rabbit)
            }
            None => None,
        };
        let kafka = match &config.brokers.kafka {
            Some(k) => {
                let kafka = KafkaBroker::connect(k).await?;
                for route in &config.routes {
                    if dead_letter_broker(route) == BrokerKind::Kafka {
                        kafka.ensure_topic(&route.dead_letter_subject()).await?;
                    }
                }
                Some(kafka)
            }
            None => None,
        };
        Ok(Self {
            embedded,
            nats,
            rabbitmq,
            kafka,
        })
    }

    fn kafka(&self) -> Result<&KafkaBroker, DaemonError> {
        self.kafka
            .as_ref()
            .ok_or_else(|| DaemonError::Invalid("a route uses Kafka but [brokers.kafka] is missing".into()))
    }

    fn rabbitmq(&self) -> Result<&RabbitBroker, DaemonError> {
        self.rabbitmq
            .as_ref()
            .ok_or_else(|| DaemonError::Invalid("a route uses RabbitMQ but [brokers.rabbitmq] is missing".into()))
    }

    /// Where a route's dead letters go.
    fn dead_letter_sink(&self, r: &crate::config::RouteConfig) -> Result<Arc<dyn Sink>, DaemonError> {
        match dead_letter_broker(r) {
            BrokerKind::Rabbitmq => {
                let exchange = r.dead_letter.as_ref().and_then(|d| d.exchange.as_deref());
                Ok(Arc::new(self.rabbitmq()?.dead_letter_sink(exchange)))
            }
            // The original is acked (termed, committed) once its copy is
            // stored: the copy must be confirmed by a stream, not sent on
            // core NATS and hoped for. Only a core NATS source, itself
            // at-most-once, may dead-letter to core NATS.
            BrokerKind::Nats | BrokerKind::Jetstream if r.source.broker != BrokerKind::Nats => {
                Ok(Arc::new(self.nats()?.confirmed_sink()))
            }
            other => self.sink(other),
        }
    }

    fn nats(&self) -> Result<&NatsBroker, DaemonError> {
        self.nats
            .as_ref()
            .ok_or_else(|| DaemonError::Invalid("a route uses NATS but [brokers.nats] is missing".into()))
    }

    fn sink(&self, kind: BrokerKind) -> Result<Arc<dyn Sink>, DaemonError> {
        Ok(match kind {
            BrokerKind::Embedded => Arc::new(self.embedded.clone()),
            BrokerKind::Nats | BrokerKind::Jetstream => Arc::new(self.nats()?.clone()),
            BrokerKind::Rabbitmq => Arc::new(self.rabbitmq()?.sink()),
            BrokerKind::Kafka => Arc::new(self.kafka()?.clone()),
        })
    }

    /// Request/reply for handlers, where a broker offers it.
    pub fn requester(&self) -> Option<Arc<dyn Requester>> {
        self.nats.clone().map(|n| Arc::new(n) as Arc<dyn Requester>)
    }

    async fn source(&self, r: &crate::config::RouteConfig) -> Result<(Arc<dyn Source>, String), DaemonError> {
        let s = &r.source;
        Ok(match s.broker {
            BrokerKind::Embedded => (
                Arc::new(self.embedded.source(&r.name)),
                format!("embedded {}", s.subject),
            ),
            BrokerKind::Nats => {
                let src = self.nats()?.core_source(&s.subject, s.queue_group.as_deref()).await?;
                let group = s
                    .queue_group
                    .as_ref()
                    .map(|g| format!(" (queue group {g})"))
                    .unwrap_or_default();
                (Arc::new(src), format!("nats {}{group}", s.subject))
            }
            BrokerKind::Jetstream => {
                let settings = ConsumerSettings {
                    stream: s.stream.clone().unwrap_or_default(),
                    durable: s.consumer.clone().unwrap_or_else(|| r.name.clone()),
                    filter_subject: s.subject.clone(),
                    ack_wait: s.ack_wait.unwrap_or(Duration::from_secs(30)),
                    max_deliver: s.max_deliver.unwrap_or(-1),
                    max_ack_pending: s.max_ack_pending.unwrap_or(1000),
                };
                let src = self.nats()?.jetstream_source(&settings).await?;
                let description = format!("jetstream {}/{} {}", settings.stream, settings.durable, s.subject);
                (Arc::new(src), description)
            }
            BrokerKind::Rabbitmq => {
                let queue = s.queue.clone().unwrap_or_default();
                let settings = rabbitmq::ConsumerSettings {
                    queue: queue.clone(),
                    prefetch: s.prefetch.unwrap_or_else(|| {
                        u16::try_from(r.concurrency.saturating_mul(2))
                            .unwrap_or(u16::MAX)
                            .max(2)
                    }),
                    retry_via: s.retry_via.unwrap_or_default(),
                    consumer_tag: format!("sluice-{}", r.name),
                };
                let via = match settings.retry_via {
                    rabbitmq::RetryVia::DelayQueue => "delay queues",
                    rabbitmq::RetryVia::InProcess => "in process",
                };
                let description = format!("rabbitmq queue {queue} (prefetch {}, retries {via})", settings.prefetch);
                (Arc::new(self.rabbitmq()?.source(settings)), description)
            }
            BrokerKind::Kafka => {
                let settings = kafka::ConsumerSettings {
                    topics: s.topics.clone().unwrap_or_default(),
                    group: s.group.clone().unwrap_or_else(|| format!("sluice-{}", r.name)),
                    offset_reset: s.offset_reset.unwrap_or_default(),
                    instance_id: s.instance_id.clone(),
                    max_in_flight_per_partition: s.max_in_flight_per_partition.unwrap_or(5000),
                    max_in_flight: s.max_in_flight.unwrap_or(20_000),
                    revoke_timeout: s.revoke_timeout.unwrap_or(Duration::from_secs(30)),
                    retry_levels: match s.retry_topics {
                        Some(true) => r.retry.max_attempts.saturating_sub(1),
                        _ => 0,
                    },
                };
                let kafka = self.kafka()?;
                for topic in &settings.topics {
                    for level in 1..=settings.retry_levels {
                        kafka.ensure_topic(&kafka::retry_topic(topic, level)).await?;
                    }
                }
                let retries = if settings.retry_levels > 0 {
                    ", retry topics"
                } else {
                    ""
                };
                let description = format!(
                    "kafka {} (group {}{retries})",
                    settings.topics.join(","),
                    settings.group
                );
                (Arc::new(kafka.source(settings)?), description)
            }
        })
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

fn pattern(text: &str) -> Result<SubjectPattern, DaemonError> {
    SubjectPattern::parse(text).map_err(|e| DaemonError::Invalid(e.to_string()))
}

/// Opens the embedded broker and declares the queues of the config: one per
/// route, one per dead-letter subject, and the extra ones.
pub fn open_broker(config: &Config) -> Result<EmbeddedBroker, DaemonError> {
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    let broker = EmbeddedBroker::open(
        &config.data_dir.join("embedded.redb"),
        config.brokers.embedded.duplicate_window,
    )
    .map_err(|source| DaemonError::Broker {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    declare_queues(&broker, config)?;
    Ok(broker)
}

/// Declares the embedded queues of `config`: one per embedded route, one per
/// embedded dead-letter subject, and the extra ones. Existing queues keep
/// their messages.
pub fn declare_queues(broker: &EmbeddedBroker, config: &Config) -> Result<(), DaemonError> {
    for route in &config.routes {
        if route.source.broker == BrokerKind::Embedded {
            broker.declare_queue(&route.name, vec![pattern(&route.source.subject)?], None);
        }
        if dead_letter_broker(route) == BrokerKind::Embedded {
            let dlq = route.dead_letter_subject();
            broker.declare_queue(&dlq, vec![pattern(&dlq)?], None);
        }
    }
    for q in &config.brokers.embedded.queues {
        let patterns = q.subjects.iter().map(|s| pattern(s)).collect::<Result<_, _>>()?;
        broker.declare_queue(&q.name, patterns, q.max_len);
    }
    Ok(())
}

/// Builds one route of the config on `plugin`'s slot. `status` carries the
/// counters over when a reload rebuilds a running route.
pub async fn build_route(
    r: &RouteConfig,
    brokers: &Brokers,
    plugin: Arc<PluginSlot>,
    gates: &GateStores,
    metrics: &Arc<Metrics>,
    status: Option<Arc<RouteStatus>>,
    reserved_replies: Arc<Vec<crate::subject::SubjectPattern>>,
) -> Result<Arc<Route>, DaemonError> {
    let gate = match &r.idempotency {
        Some(idem) if idem.key != KeySource::None => Some(Gate {
            key: idem.key.clone(),
            store: gates
                .get(idem.store)
                .ok_or_else(|| DaemonError::Invalid(format!("route {}: idempotency store not open", r.name)))?,
            ttl: idem.ttl,
            lease: idem.lease,
        }),
        _ => None,
    };
    let ordering_key = match &r.key {
        Some(k) => k.clone(),
        None => KeySource::MessageKey,
    };
    let sink = brokers.sink(r.publish_broker.unwrap_or(r.source.broker))?;
    let dead_letter_sink = brokers.dead_letter_sink(r)?;
    // A durable source acks its original only once the dead letter is
    // stored: a NATS dead-letter subject must be kept by a stream, or every
    // poison message would be redelivered forever. Refused at start.
    let to_nats = matches!(dead_letter_broker(r), BrokerKind::Nats | BrokerKind::Jetstream);
    if to_nats && r.source.broker != BrokerKind::Nats {
        let subject = r.dead_letter_subject();
        if !brokers.nats()?.is_stored(&subject).await {
            return Err(DaemonError::Invalid(format!(
                "route {}: its dead letters go to `{subject}` on NATS, which no JetStream stream stores; declare one under [[brokers.nats.streams]] (or set dead_letter.subject to a stored subject)",
                r.name
            )));
        }
    }
    // Last: the source may join a consumer group.
    let (source, description) = brokers.source(r).await?;
    Ok(Arc::new(Route {
        name: r.name.clone(),
        source_description: description,
        source_broker: r.source.broker.as_str(),
        source,
        sink,
        dead_letter_sink,
        dead_letter_subject: r.dead_letter_subject(),
        dead_letter_broker: dead_letter_broker(r).as_str(),
        plugin,
        policy: Policy {
            retry: r.retry.clone(),
            on_failure: r.on_failure,
        },
        concurrency: r.concurrency,
        ordering: r.ordering(),
        ordering_key,
        gate,
        reserved_replies,
        liveness: Arc::default(),
        metrics: metrics.clone(),
        status: status.unwrap_or_default(),
        series: std::sync::OnceLock::new(),
    }))
}
