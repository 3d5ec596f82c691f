//! The running daemon: its plugins and routes, and the reloads that change
//! them while messages flow. A reload is prepared whole (plugins compiled
//! and instantiated once, routes built) before anything running is touched,
//! so a refused one leaves the daemon exactly as it was.

use super::assemble::{
    build_engine, build_route, dead_letter_stores, declare_queues, load_plugin, load_plugins, open_brokers,
    DaemonError, GateStores,
};
use crate::admin::{AdminState, CONFIG_RELOAD};
use crate::brokers::Brokers;
use crate::config::{self, Config, ConfigError, PluginConfig, RouteConfig};
use crate::engine::{Engine, Plugin, PluginError, PluginSlot, Requester};
use crate::error::report;
use crate::idempotency::GateError;
use crate::metrics::{Metrics, ReloadResult};
use crate::pipeline::Route;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Why a new config was refused; the running one stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Gate(#[from] GateError),
    #[error(transparent)]
    Plugin(#[from] PluginError),
    #[error("plugin `{0}` was not loaded")]
    NotLoaded(String),
    #[error(transparent)]
    Setup(#[from] DaemonError),
    #[error("route {route}")]
    Route {
        route: String,
        #[source]
        cause: Box<DaemonError>,
    },
}

/// A route and the workers running it.
struct Running {
    config: RouteConfig,
    route: Arc<Route>,
    stop: CancellationToken,
    workers: Vec<JoinHandle<()>>,
}

impl Running {
    fn new(config: RouteConfig, route: Arc<Route>) -> Self {
        Self {
            config,
            route,
            stop: CancellationToken::new(),
            workers: Vec::new(),
        }
    }

    fn start(&mut self) {
        if self.workers.is_empty() {
            self.workers = self.route.spawn(&self.stop);
            let route = &self.route;
            tracing::info!(route = %route.name, source = %route.source_description, plugin = %route.plugin.current().name(), concurrency = route.concurrency, "route started");
        }
    }

    /// Stops taking messages and waits up to `grace` for those in flight;
    /// anything unsettled then goes back to the broker.
    async fn stop(self, grace: Duration) {
        self.stop_by(tokio::time::Instant::now() + grace).await;
    }

    async fn stop_by(self, deadline: tokio::time::Instant) {
        self.route.liveness.stopping();
        self.stop.cancel();
        let drained = tokio::time::timeout_at(deadline, async {
            for w in self.workers {
                let _ = w.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(route = %self.route.name, "grace period over; unsettled messages will be redelivered");
        }
    }
}

pub struct Supervisor {
    config: Config,
    engine: Engine,
    brokers: Brokers,
    gates: GateStores,
    metrics: Arc<Metrics>,
    state: Arc<AdminState>,
    requester: Option<Arc<dyn Requester>>,
    plugins: BTreeMap<String, Arc<PluginSlot>>,
    routes: Vec<Running>,
    /// SHA-256 of the config file's content last acted on.
    config_digest: Option<String>,
}

/// Keeps the running value of a section that only a restart applies,
/// noting its name in `pending` when the new config changes it.
fn keep<T: PartialEq + Clone>(name: &'static str, new: &mut T, old: &T, pending: &mut Vec<&'static str>) {
    if new != old {
        pending.push(name);
        *new = old.clone();
    }
}

/// SHA-256 (hex) of a file's content; none if it cannot be read.
async fn digest_of(path: &std::path::Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let bytes = tokio::fs::read(path).await.ok()?;
    Some(hex::encode(Sha256::digest(&bytes)))
}

impl Supervisor {
    /// Opens the brokers, loads the plugins and builds the routes of
    /// `config`; nothing runs until [`Supervisor::start_routes`].
    pub async fn open(config: Config) -> Result<Self, DaemonError> {
        let brokers = open_brokers(&config).await?;
        let engine = build_engine(&config)?;
        let requester = brokers.requester();
        let metrics = Arc::new(Metrics::new());
        let gates = GateStores::open(&config).await?;
        let access = crate::admin::access::Access::new(&config.admin);
        let state = Arc::new(AdminState::new(metrics.clone(), brokers.embedded.clone(), access));
        let mut supervisor = Self {
            config,
            engine,
            brokers,
            gates,
            metrics,
            state,
            requester,
            plugins: BTreeMap::new(),
            routes: Vec::new(),
            config_digest: None,
        };
        supervisor.config_digest = digest_of(&supervisor.config.file).await;
        let loaded = load_plugins(&supervisor.engine, &supervisor.config, supervisor.requester.clone()).await?;
        for (name, plugin) in loaded {
            supervisor.metrics.plugin_version(&name, None, plugin.hash());
            supervisor.plugins.insert(name, Arc::new(PluginSlot::new(plugin)));
        }
        let reserved = super::assemble::reserved_replies(&supervisor.config);
        for r in &supervisor.config.routes {
            let slot = supervisor.slot(&supervisor.plugins, r)?;
            let route = build_route(
                r,
                &supervisor.brokers,
                slot,
                &supervisor.gates,
                &supervisor.metrics,
                None,
                reserved.clone(),
            )
            .await?;
            supervisor.routes.push(Running::new(r.clone(), route));
        }
        supervisor.publish_state();
        Ok(supervisor)
    }

    pub fn state(&self) -> Arc<AdminState> {
        self.state.clone()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The files whose changes [`Supervisor::changed`] acts on.
    pub fn watched_files(&self) -> Vec<PathBuf> {
        let mut files = vec![self.config.file.clone()];
        files.extend(self.config.plugins.values().map(|p| p.path.clone()));
        files
    }

    pub fn start_routes(&mut self) {
        for r in &mut self.routes {
            r.start();
        }
    }

    /// Acts on changed files (normalized paths): the config is reloaded
    /// first, then each plugin whose `.wasm` changed.
    ///
    /// Any change in a watched file's folder counts: a file replaced through
    /// a symlink swap (a Kubernetes ConfigMap, say) changes other entries
    /// than its own name. Files whose content is the same are left alone.
    pub async fn changed(&mut self, paths: &[PathBuf]) {
        tracing::debug!(?paths, "files changed");
        let touched = |file: &PathBuf| {
            let file = super::watch::normalize(file);
            paths.iter().any(|p| *p == file || p.parent() == file.parent())
        };
        if touched(&self.config.file.clone()) {
            let digest = digest_of(&self.config.file).await;
            if digest != self.config_digest {
                self.config_digest = digest;
                self.reload_config().await;
            }
        }
        let plugins: Vec<String> = self
            .config
            .plugins
            .iter()
            .filter(|(_, p)| touched(&p.path))
            .map(|(name, _)| name.clone())
            .collect();
        for name in plugins {
            self.reload_plugin(&name).await;
        }
    }

    async fn load(
        &self,
        name: &str,
        config: &PluginConfig,
        protected: Vec<String>,
    ) -> Result<Arc<Plugin>, PluginError> {
        load_plugin(&self.engine, name, config, self.requester.clone(), protected).await
    }

    fn slot(&self, slots: &BTreeMap<String, Arc<PluginSlot>>, r: &RouteConfig) -> Result<Arc<PluginSlot>, DaemonError> {
        slots.get(&r.plugin).cloned().ok_or_else(|| DaemonError::NoPlugin {
            route: r.name.clone(),
            plugin: r.plugin.clone(),
        })
    }

    /// Swaps in the `.wasm` now on disk for `name`, unless it is broken: then
    /// the running version keeps serving.
    pub async fn reload_plugin(&mut self, name: &str) {
        let (Some(slot), Some(config)) = (self.plugins.get(name).cloned(), self.config.plugins.get(name).cloned())
        else {
            return;
        };
        let old = slot.current();
        if digest_of(&config.path).await.is_some_and(|d| d == old.hash()) {
            return;
        }
        let started = Instant::now();
        match self
            .load(name, &config, super::assemble::protected_subjects(self.config()))
            .await
        {
            Ok(new) => {
                slot.swap(new.clone());
                self.metrics.plugin_reloaded(name, "ok");
                self.metrics.plugin_version(name, Some(old.hash()), new.hash());
                self.state.reload_result(name, None);
                tracing::info!(
                    plugin = %name,
                    from = %&old.hash()[..12],
                    to = %&new.hash()[..12],
                    ready_ms = started.elapsed().as_millis() as u64,
                    "plugin reloaded: new messages run the new version, those in flight finish on the old one"
                );
            }
            Err(e) => {
                self.metrics.plugin_reloaded(name, "refused");
                let e = report(&e);
                self.state.reload_result(name, Some(e.clone()));
                tracing::error!(plugin = %name, serving = %&old.hash()[..12], "new version refused, the running one keeps serving: {e}");
            }
        }
    }

    /// Reads the config file again and applies it whole, or not at all.
    pub async fn reload_config(&mut self) {
        let result = match config::load(&self.config.file) {
            Ok(new) => self.apply(new).await,
            Err(e) => Err(ReloadError::Config(e)),
        };
        let label = |result: &str| ReloadResult {
            result: result.to_owned(),
        };
        match result {
            Ok(summary) => {
                self.metrics.config_reloads.get_or_create(&label("ok")).inc();
                self.state.reload_result(CONFIG_RELOAD, None);
                tracing::info!("config reloaded: {summary}");
            }
            Err(e) => {
                let e = report(&e);
                self.metrics.config_reloads.get_or_create(&label("refused")).inc();
                self.state.reload_result(CONFIG_RELOAD, Some(e.clone()));
                tracing::error!("config reload refused, the running config stays: {e}");
            }
        }
    }

    async fn apply(&mut self, mut new: Config) -> Result<String, ReloadError> {
        // What is opened once at start-up stays as it is until a restart.
        let old = &self.config;
        let mut pending = Vec::new();
        keep("data_dir", &mut new.data_dir, &old.data_dir, &mut pending);
        keep("instance_id", &mut new.instance_id, &old.instance_id, &mut pending);
        keep("[admin]", &mut new.admin, &old.admin, &mut pending);
        keep("[engine]", &mut new.engine, &old.engine, &mut pending);
        keep("[brokers]", &mut new.brokers, &old.brokers, &mut pending);
        keep("[stores]", &mut new.stores, &old.stores, &mut pending);
        keep("[telemetry]", &mut new.telemetry, &old.telemetry, &mut pending);
        if !pending.is_empty() {
            tracing::warn!("changes to {} take effect at the next restart", pending.join(", "));
        }

        // Prepare: nothing running changes if any of this fails.
        self.gates.ensure(&new).await?;
        let mut loaded = BTreeMap::new();
        for (name, plugin) in &new.plugins {
            if self.plugins.contains_key(name) && self.config.plugins.get(name) == Some(plugin) {
                continue;
            }
            let protected = super::assemble::protected_subjects(&new);
            let version = self.load(name, plugin, protected).await?;
            loaded.insert(name.clone(), version);
        }
        let mut slots = BTreeMap::new();
        for name in new.plugins.keys() {
            let slot = match (self.plugins.get(name), loaded.get(name)) {
                (Some(slot), _) => slot.clone(),
                (None, Some(version)) => Arc::new(PluginSlot::new(version.clone())),
                (None, None) => return Err(ReloadError::NotLoaded(name.clone())),
            };
            slots.insert(name.clone(), slot);
        }
        declare_queues(&self.brokers, &new)?;
        let mut built = BTreeMap::new();
        for r in &new.routes {
            let old = self.routes.iter().find(|x| x.config.name == r.name);
            if old.is_some_and(|o| o.config == *r) {
                continue;
            }
            let status = old.map(|o| o.route.status.clone());
            let route = match self.slot(&slots, r) {
                Ok(slot) => {
                    let reserved = super::assemble::reserved_replies(&new);
                    build_route(r, &self.brokers, slot, &self.gates, &self.metrics, status, reserved).await
                }
                Err(e) => Err(e),
            };
            match route {
                Ok(route) => {
                    built.insert(r.name.clone(), route);
                }
                Err(e) => {
                    for route in built.values() {
                        route.source.close().await;
                    }
                    return Err(ReloadError::Route {
                        route: r.name.clone(),
                        cause: Box::new(e),
                    });
                }
            }
        }

        // Commit.
        let mut summary = Vec::new();
        for (name, version) in loaded {
            match self.plugins.get(&name) {
                Some(slot) => {
                    let old = slot.swap(version.clone());
                    self.metrics.plugin_version(&name, Some(old.hash()), version.hash());
                    summary.push(format!("plugin {name} reloaded"));
                }
                None => {
                    self.metrics.plugin_version(&name, None, version.hash());
                    summary.push(format!("plugin {name} added"));
                }
            }
        }
        for (name, slot) in &self.plugins {
            if !slots.contains_key(name) {
                self.metrics.plugin_info.remove(&crate::metrics::PluginVersion {
                    plugin: name.clone(),
                    hash: slot.current().hash().to_owned(),
                });
                summary.push(format!("plugin {name} removed"));
            }
        }
        let mut kept = Vec::new();
        for running in std::mem::take(&mut self.routes) {
            if new.routes.contains(&running.config) {
                kept.push(running);
                continue;
            }
            let name = running.config.name.clone();
            let source = running.route.source.clone();
            running.stop(new.shutdown_grace).await;
            source.close().await;
            if !built.contains_key(&name) {
                tracing::info!(route = %name, "route stopped");
                summary.push(format!("route {name} stopped"));
            }
        }
        for r in &new.routes {
            if let Some(i) = kept.iter().position(|k| k.config.name == r.name) {
                self.routes.push(kept.remove(i));
                continue;
            }
            let Some(route) = built.remove(&r.name) else {
                continue;
            };
            let restarted = self.config.routes.iter().any(|old| old.name == r.name);
            let mut running = Running::new(r.clone(), route);
            running.start();
            self.routes.push(running);
            summary.push(format!(
                "route {} {}",
                r.name,
                if restarted { "restarted" } else { "started" }
            ));
        }
        self.plugins = slots;
        self.config = new;
        self.publish_state();
        Ok(if summary.is_empty() {
            "nothing to change".into()
        } else {
            summary.join(", ")
        })
    }

    /// Shows the current routes, plugins and dead-letter destinations on
    /// the admin API.
    fn publish_state(&self) {
        self.state
            .routes
            .store(Arc::new(self.routes.iter().map(|r| r.route.clone()).collect()));
        self.state.plugins.store(Arc::new(self.plugins.clone()));
        self.state
            .dead_letters
            .store(Arc::new(dead_letter_stores(&self.config, &self.brokers)));
    }

    /// Stops every route (waiting up to the grace period in all for the
    /// messages in flight), then closes the brokers and stores.
    pub async fn shutdown(self) {
        // All stop taking messages at once; then each gets what is left of
        // one grace period.
        let deadline = tokio::time::Instant::now() + self.config.shutdown_grace;
        for r in &self.routes {
            r.route.liveness.stopping();
            r.stop.cancel();
        }
        for r in self.routes {
            r.stop_by(deadline).await;
        }
        self.brokers.close().await;
        self.gates.close();
    }
}
