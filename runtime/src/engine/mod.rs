//! The WebAssembly engine: loads handler components, runs one message through
//! a sandboxed instance, and reports an [`Outcome`]. Knows nothing of brokers.

mod bindings;
mod cache;
mod host;
mod language;
mod messaging;
mod outcome;
mod plugin;
mod slot;
mod stderr;
mod wasmcloud;

use crate::error::{cause, Cause};
pub use host::{HostState, PluginContext, RequestError, Requester};
pub use outcome::{
    bounded, BatchInvocation, Cut, FailureKind, Invocation, ItemInvocation, Outcome, Reply, MAX_REASON_BYTES,
};
pub use plugin::{HandlerErrorPolicy, Plugin, PluginError, PluginSpec, MAX_BATCH_TIMEOUT};
pub use slot::PluginSlot;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::Linker;
use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances: the resolution of per-message deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);
/// A running handler yields to the async runtime every this many ticks, so a
/// busy plugin never holds a worker thread for long.
pub(crate) const YIELD_EVERY_TICKS: u64 = 10;

/// Engine-wide settings. Changing any of them changes the compiled-code cache
/// key.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// Pool slots: instances that can exist at once across all plugins.
    pub max_instances: u32,
    /// Count fuel (needed when any plugin sets a fuel budget).
    pub fuel: bool,
    /// Where compiled components are kept; none disables the cache.
    pub cache_dir: Option<PathBuf>,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            max_instances: 256,
            fuel: false,
            cache_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the WebAssembly engine")]
pub struct EngineError(#[source] Cause);

/// A configured wasmtime engine plus the linker that provides WASI and the
/// sluice host interface. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) wasmtime: wasmtime::Engine,
    pub(crate) linker: Arc<Linker<HostState>>,
    pub(crate) settings: Arc<EngineSettings>,
    _ticker: Arc<EpochTicker>,
}

impl Engine {
    pub fn new(settings: EngineSettings) -> Result<Self, EngineError> {
        let n = settings.max_instances.max(1);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(8))
            .total_stacks(n)
            .max_core_instances_per_component(32)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            // Per-plugin caps are enforced by the store limiter; this is the
            // ceiling any plugin may be configured with.
            .max_memory_size(4 << 30)
            // Reset slots by zeroing resident pages instead of unmapping them:
            // the measured difference between ~40 µs and ~20 µs per instance.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(64 << 10)
            .pagemap_scan(Enabled::Auto);

        let mut config = wasmtime::Config::new();
        config
            .wasm_component_model(true)
            .epoch_interruption(true)
            .consume_fuel(settings.fuel)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let wasmtime = wasmtime::Engine::new(&config).map_err(|e| EngineError(cause(e)))?;

        let mut linker = Linker::<HostState>::new(&wasmtime);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| EngineError(cause(e)))?;
        bindings::Handler::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| EngineError(cause(e)))?;
        bindings::messaging::MessagingRequestReply::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |s| s,
        )
        .map_err(|e| EngineError(cause(e)))?;
        bindings::wasmcloud::HandlerComponent::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |s| s)
            .map_err(|e| EngineError(cause(e)))?;

        let ticker = EpochTicker::start(wasmtime.clone());
        Ok(Self {
            wasmtime,
            linker: Arc::new(linker),
            settings: Arc::new(settings),
            _ticker: Arc::new(ticker),
        })
    }

    /// Loads, checks and prepares a plugin. Refuses anything that is not a
    /// component of the `sluice:plugin/handler` world, saying why.
    pub fn load(&self, spec: PluginSpec) -> Result<Plugin, PluginError> {
        plugin::Plugin::load(self, spec)
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }
}

/// Advances the engine's epoch on a dedicated thread; stops when dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = std::thread::Builder::new().name("sluice-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        });
        if let Err(e) = spawned {
            // Without the ticker a busy guest is never interrupted; the
            // timer around each call still ends the invocation when it waits.
            tracing::error!("cannot start the epoch thread: {e}");
        }
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A new instance for every message: nothing leaks between messages.
    #[default]
    Fresh,
    /// A small pool of warm instances, each dropped after a failure or
    /// `reuse_max_messages` messages.
    Reuse,
}

impl Isolation {
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Fresh => "fresh",
            Isolation::Reuse => "reuse",
        }
    }
}
