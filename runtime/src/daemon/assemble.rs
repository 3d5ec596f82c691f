//! Builds the parts of a daemon from a config: brokers, engine, plugins,
//! idempotency stores, routes.

use crate::brokers::{Brokers, SetupError};
use crate::config::{Config, GateStore, PluginConfig, RouteConfig};
use crate::engine::{Engine, EngineError, EngineSettings, Plugin, PluginError, PluginSlot, PluginSpec, Requester};
use crate::idempotency::{FileStore, GateError, IdempotencyStore, MemoryStore, NatsKvError, NatsKvStore, RedisStore};
use crate::keys::KeySource;
use crate::metrics::Metrics;
use crate::pipeline::policy::Policy;
use crate::pipeline::Gate;
use crate::pipeline::{Route, RouteStatus};
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error(transparent)]
    Broker(#[from] SetupError),
    #[error("cannot listen on {addr} for the admin API (set [admin] listen to another address)")]
    Listen { addr: String, source: std::io::Error },
    #[error("route {route}: no plugin `{plugin}`")]
    NoPlugin { route: String, plugin: String },
    #[error("route {route}: its idempotency store is not open")]
    StoreNotOpen { route: String },
    #[error(transparent)]
    Gate(#[from] GateError),
}

/// The idempotency stores the routes of a config use, opened once.
#[derive(Default)]
pub struct GateStores {
    file: Option<Arc<FileStore>>,
    memory: Option<Arc<MemoryStore>>,
    redis: Option<Arc<RedisStore>>,
    nats_kv: Option<Arc<NatsKvStore>>,
}

/// The default bucket of the `nats-kv` store.
pub const NATS_KV_BUCKET: &str = "sluice_idempotency";

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
                GateStore::NatsKv if stores.nats_kv.is_none() => {
                    stores.nats_kv = Some(Arc::new(open_nats_kv(config).await?));
                }
                // Already open: a reload may have raised a ttl (below).
                _ => {}
            }
        }
        if let Some(open) = &stores.nats_kv {
            let max_age = nats_kv_max_age(config);
            if !max_age.is_zero() {
                open.keep_for(max_age).await;
            }
        }
        Ok(())
    }

    fn get(&self, kind: GateStore) -> Option<Arc<dyn IdempotencyStore>> {
        match kind {
            GateStore::File => self.file.clone().map(|s| s as Arc<dyn IdempotencyStore>),
            GateStore::Memory => self.memory.clone().map(|s| s as Arc<dyn IdempotencyStore>),
            GateStore::Redis => self.redis.clone().map(|s| s as Arc<dyn IdempotencyStore>),
            GateStore::NatsKv => self.nats_kv.clone().map(|s| s as Arc<dyn IdempotencyStore>),
        }
    }

    pub fn close(&self) {
        if let Some(f) = &self.file {
            f.close();
        }
    }
}

/// The `nats-kv` store on the `[brokers.nats]` server; the bucket keeps
/// records as long as the longest ttl of the routes using it.
async fn open_nats_kv(config: &Config) -> Result<NatsKvStore, GateError> {
    let unusable = |reason: String| {
        GateError::NatsKv(Arc::new(NatsKvError::Bucket {
            bucket: config
                .stores
                .nats_kv_bucket
                .clone()
                .unwrap_or_else(|| NATS_KV_BUCKET.into()),
            reason,
        }))
    };
    let nats = config
        .brokers
        .nats
        .as_ref()
        .ok_or_else(|| unusable("`[brokers.nats]` is not configured".into()))?;
    let client = crate::brokers::nats::connect_client(nats)
        .await
        .map_err(|e| unusable(crate::error::Report(&e).to_string()))?;
    let bucket = config.stores.nats_kv_bucket.as_deref().unwrap_or(NATS_KV_BUCKET);
    NatsKvStore::open(&async_nats::jetstream::new(client), bucket, nats_kv_max_age(config)).await
}

/// How long the bucket must keep records: the longest ttl (or lease) of
/// the routes using it.
fn nats_kv_max_age(config: &Config) -> std::time::Duration {
    config
        .routes
        .iter()
        .filter_map(|r| r.idempotency.as_ref())
        .filter(|i| i.store == GateStore::NatsKv)
        .map(|i| i.ttl.max(i.lease))
        .max()
        .unwrap_or_default()
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
    let inputs = config
        .routes
        .iter()
        .filter_map(|r| r.source.subject().map(str::to_owned));
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
        handler_error: plugin.handler_error,
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

/// Opens the brokers `config` uses.
pub async fn open_brokers(config: &Config) -> Result<Brokers, DaemonError> {
    let routes: Vec<_> = config.routes.iter().map(RouteConfig::broker_use).collect();
    Ok(Brokers::open(&config.brokers, &config.data_dir, &routes).await?)
}

/// The dead-letter destinations `sluice dlq` reads, by name.
pub fn dead_letter_stores(config: &Config, brokers: &Brokers) -> BTreeMap<String, crate::dlq::DeadLetters> {
    let routes: Vec<_> = config.routes.iter().map(RouteConfig::broker_use).collect();
    brokers
        .dead_letter_stores(&routes)
        .into_iter()
        .map(|(name, store)| (name, crate::dlq::DeadLetters(store)))
        .collect()
}

/// Declares the embedded queues of `config` (a reload adds routes).
pub fn declare_queues(brokers: &Brokers, config: &Config) -> Result<(), DaemonError> {
    let routes: Vec<_> = config.routes.iter().map(RouteConfig::broker_use).collect();
    Ok(brokers.declare(&config.brokers, &routes)?)
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
                .ok_or_else(|| DaemonError::StoreNotOpen { route: r.name.clone() })?,
            ttl: idem.ttl,
            lease: idem.lease,
        }),
        _ => None,
    };
    let ordering_key = match &r.key {
        Some(k) => k.clone(),
        None => KeySource::MessageKey,
    };
    let uses = r.broker_use();
    let sink = brokers.sink(uses.publish_broker)?;
    let dead_letter_sink = brokers.dead_letter_sink(&uses).await?;
    // Last: the source may join a consumer group.
    let (source, description) = brokers.source(&uses).await?;
    Ok(Arc::new(Route {
        name: r.name.clone(),
        source_description: description,
        source_broker: r.source.kind().as_str(),
        source,
        sink,
        dead_letter_sink,
        dead_letter_subject: r.dead_letter_subject(),
        dead_letter_broker: r.dead_letter_broker().as_str(),
        plugin,
        policy: Policy {
            retry: r.retry.clone(),
            on_failure: r.on_failure,
        },
        concurrency: r.concurrency,
        ordering: r.ordering(),
        ordering_key,
        batch: r.batch,
        gate,
        reserved_replies,
        liveness: Arc::default(),
        metrics: metrics.clone(),
        status: status.unwrap_or_default(),
        series: std::sync::OnceLock::new(),
        trailing: Default::default(),
    }))
}
