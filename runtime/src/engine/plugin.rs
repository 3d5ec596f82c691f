//! A loaded plugin version: checked, compiled, pre-instantiated; runs one
//! message per call in a fresh or a reused instance.

use super::bindings::batch::BatchHandlerPre;
use super::bindings::messaging::MessagingRequestReplyPre;
use super::bindings::wasmcloud::HandlerComponentPre;
use super::bindings::{sluice::plugin::types, HandlerPre};
use super::host::{HostState, PluginContext, Requester};
use super::outcome::{BatchInvocation, Cut, FailureKind, Invocation, ItemInvocation, Outcome, Reply};
use super::Isolation;
use super::{cache, Engine, YIELD_EVERY_TICKS};
use crate::error::{cause, Cause};
use crate::message::{Header, Message};
use crate::subject::{SubjectError, SubjectPattern};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::component::types::ComponentItem;
use wasmtime::{Store, Trap, UpdateDeadline};

/// Everything needed to load one plugin.
#[derive(Clone)]
pub struct PluginSpec {
    pub name: String,
    pub path: PathBuf,
    pub isolation: Isolation,
    pub memory_cap_bytes: usize,
    pub timeout: Duration,
    pub fuel: Option<u64>,
    pub reuse_max_messages: u32,
    pub publish_allow: Vec<String>,
    pub request_allow: Vec<String>,
    pub settings: BTreeMap<String, String>,
    pub requester: Option<Arc<dyn Requester>>,
    /// Subjects the allow-lists reach only by naming them (dead-letter and
    /// retry subjects of the routes).
    pub protected_subjects: Vec<String>,
    /// What an `error` returned by a `wasi:messaging` handler means (the
    /// proposal has no retryable/permanent distinction).
    pub handler_error: HandlerErrorPolicy,
}

/// How a `wasi:messaging` handler's `error` is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerErrorPolicy {
    /// Retried with the route's backoff, then dead-lettered.
    #[default]
    Retryable,
    /// Dead-lettered at once.
    Permanent,
}

impl PluginSpec {
    /// A spec with the defaults of the config file, for `path`.
    pub fn new(name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            isolation: Isolation::Fresh,
            memory_cap_bytes: 64 << 20,
            timeout: Duration::from_secs(5),
            fuel: None,
            reuse_max_messages: 10_000,
            publish_allow: Vec::new(),
            request_allow: Vec::new(),
            settings: BTreeMap::new(),
            requester: None,
            protected_subjects: Vec::new(),
            handler_error: HandlerErrorPolicy::default(),
        }
    }
}

/// Why a `.wasm` was refused.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{name}`: cannot read {}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin `{name}`: {} is not WebAssembly (no `\\0asm` header)", path.display())]
    NotWasm { name: String, path: PathBuf },
    #[error("plugin `{name}`: {} is a core WebAssembly module, not a component; build it with `cargo build --target wasm32-wasip2`", path.display())]
    CoreModule { name: String, path: PathBuf },
    #[error("plugin `{name}`: {} is not a valid component", path.display())]
    Invalid {
        name: String,
        path: PathBuf,
        #[source]
        cause: Cause,
    },
    #[error("plugin `{name}`: {} exports neither `handle` (world sluice:plugin/handler) nor `{MESSAGING_HANDLER}` (a wasi:messaging world) nor `{WASMCLOUD_HANDLER}`; it exports: {exports}", path.display())]
    MissingExport {
        name: String,
        path: PathBuf,
        exports: String,
    },
    #[error("plugin `{name}`: {} targets another world", path.display())]
    OtherWorld {
        name: String,
        path: PathBuf,
        #[source]
        cause: Cause,
    },
    #[error("plugin `{name}`: {list} pattern")]
    Pattern {
        name: String,
        list: &'static str,
        source: SubjectError,
    },
    #[error("plugin `{name}`: {} cannot be instantiated: {reason}", path.display())]
    Instantiate {
        name: String,
        path: PathBuf,
        reason: String,
    },
    #[error("plugin `{name}`: sets `fuel` but the engine was started without fuel metering")]
    FuelDisabled { name: String },
}

/// A warm instance kept between messages in `reuse` mode.
struct Warm {
    store: Store<HostState>,
    handler: Handler,
    uses: u32,
}

/// The world a component was built for, as found when it was loaded.
#[derive(Clone)]
enum Pre {
    Sluice(HandlerPre<HostState>, &'static str),
    /// Exports `handle-batch` as well as `handle`.
    SluiceBatch(BatchHandlerPre<HostState>, &'static str),
    Messaging {
        pre: MessagingRequestReplyPre<HostState>,
        world: &'static str,
        on_error: HandlerErrorPolicy,
    },
    WasmCloud(HandlerComponentPre<HostState>, HandlerErrorPolicy),
}

/// An instance of either world.
enum Handler {
    Sluice(super::bindings::Handler),
    SluiceBatch(super::bindings::batch::BatchHandler),
    Messaging(super::bindings::messaging::MessagingRequestReply, HandlerErrorPolicy),
    WasmCloud(super::bindings::wasmcloud::HandlerComponent, HandlerErrorPolicy),
}

/// What a handler call returns, in sluice's terms whatever the world.
type HandleResult = wasmtime::Result<Result<Option<types::Reply>, types::HandlerError>>;

impl Pre {
    async fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Handler> {
        Ok(match self {
            Pre::Sluice(pre, _) => Handler::Sluice(pre.instantiate_async(store).await?),
            Pre::SluiceBatch(pre, _) => Handler::SluiceBatch(pre.instantiate_async(store).await?),
            Pre::Messaging { pre, on_error, .. } => Handler::Messaging(pre.instantiate_async(store).await?, *on_error),
            Pre::WasmCloud(pre, on_error) => Handler::WasmCloud(pre.instantiate_async(store).await?, *on_error),
        })
    }

    fn world(&self) -> &'static str {
        match self {
            Pre::Sluice(_, world) | Pre::SluiceBatch(_, world) => world,
            Pre::Messaging { world, .. } => world,
            Pre::WasmCloud(..) => WASMCLOUD_HANDLER,
        }
    }
}

impl Handler {
    async fn handle(&self, store: &mut Store<HostState>, route: &str, msg: &Message) -> HandleResult {
        let (result, on_error) = match self {
            Handler::Sluice(h) => return h.call_handle(store, &to_wit(route, msg)).await,
            Handler::SluiceBatch(h) => return h.call_handle(store, &to_wit(route, msg)).await,
            Handler::Messaging(h, on_error) => {
                store.data_mut().messaging.reply_to.clone_from(&msg.reply_to);
                let delivered = store.data_mut().hold_delivered(msg)?;
                let result = h
                    .wasi_messaging_incoming_handler()
                    .call_handle(&mut *store, delivered)
                    .await?;
                (result.map_err(|e| super::messaging::describe(&e)), on_error)
            }
            Handler::WasmCloud(h, on_error) => {
                store.data_mut().messaging.reply_to.clone_from(&msg.reply_to);
                let delivered = super::wasmcloud::delivered(msg);
                let result = h
                    .wasmcloud_messaging_handler()
                    .call_handle_message(&mut *store, &delivered)
                    .await?;
                (result, on_error)
            }
        };
        // Neither interface tells a retryable error from a permanent one:
        // the plugin's `handler_error` does.
        Ok(match result {
            Ok(()) => Ok(store.data_mut().messaging.reply.take()),
            Err(why) => Err(match on_error {
                HandlerErrorPolicy::Retryable => types::HandlerError::Retryable(why),
                HandlerErrorPolicy::Permanent => types::HandlerError::Permanent(why),
            }),
        })
    }
}

/// A loaded, runnable plugin version.
pub struct Plugin {
    name: String,
    hash: String,
    path: PathBuf,
    spec_isolation: Isolation,
    memory_cap: usize,
    timeout: Duration,
    fuel: Option<u64>,
    reuse_max: u32,
    engine: Engine,
    pre: Pre,
    ctx: Arc<PluginContext>,
    warm: Mutex<Vec<Warm>>,
    imports: Vec<String>,
    language: &'static str,
}

/// The deadline of the message a store is running; read by the epoch
/// callback. Kept outside `HostState` since only the engine needs it.
#[derive(Debug, thiserror::Error)]
#[error("deadline exceeded")]
struct DeadlineExceeded;

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn patterns(name: &str, list: &'static str, items: &[String]) -> Result<Vec<SubjectPattern>, PluginError> {
    items
        .iter()
        .map(|p| {
            SubjectPattern::parse(p).map_err(|source| PluginError::Pattern {
                name: name.to_owned(),
                list,
                source,
            })
        })
        .collect()
}

/// sluice's own worlds, by the version of the package a plugin imports.
const WORLDS: [(&str, &str, &str); 2] = [
    (
        "@0.1.0",
        "sluice:plugin/handler@0.1.0",
        "sluice:plugin/batch-handler@0.1.0",
    ),
    (
        "@0.1.1",
        "sluice:plugin/handler@0.1.1",
        "sluice:plugin/batch-handler@0.1.1",
    ),
];
/// Longest batch deadline, whatever the batch size: the idempotency lease
/// and the broker's redelivery timers must outlast it.
pub const MAX_BATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// The world a sluice plugin was built for, from the version of the
/// `sluice:plugin` interfaces it imports (the newest if it imports none).
fn sluice_world(imports: &[String], batch: bool) -> &'static str {
    let built_for = WORLDS
        .iter()
        .find(|(version, ..)| {
            imports
                .iter()
                .any(|i| i.starts_with("sluice:plugin/") && i.ends_with(version))
        })
        .unwrap_or(&WORLDS[WORLDS.len() - 1]);
    if batch {
        built_for.2
    } else {
        built_for.1
    }
}
/// What a component built for a `wasi:messaging` world exports.
const MESSAGING_HANDLER: &str = "wasi:messaging/incoming-handler@0.2.0-draft";
const MESSAGING_REQUEST_REPLY: &str = "wasi:messaging/request-reply@0.2.0-draft";
/// What a wasmCloud messaging component exports.
const WASMCLOUD_HANDLER: &str = "wasmcloud:messaging/handler@0.2.0";

impl Plugin {
    pub(super) fn load(engine: &Engine, spec: PluginSpec) -> Result<Self, PluginError> {
        let name = spec.name.clone();
        let path = spec.path.clone();
        let bytes = std::fs::read(&path).map_err(|source| PluginError::Read {
            name: name.clone(),
            path: path.clone(),
            source,
        })?;
        Self::from_bytes(engine, spec, &bytes)
    }

    /// Checks and prepares a plugin from its bytes (`spec.path` is only used
    /// in messages).
    pub fn from_bytes(engine: &Engine, spec: PluginSpec, bytes: &[u8]) -> Result<Self, PluginError> {
        let name = spec.name.clone();
        let path = spec.path.clone();
        if spec.fuel.is_some() && !engine.settings.fuel {
            return Err(PluginError::FuelDisabled { name });
        }
        if bytes.len() < 8 || &bytes[0..4] != b"\0asm" {
            return Err(PluginError::NotWasm { name, path });
        }
        // Bytes 4..8: version 1 for core modules, 0x0d + layer 1 for components.
        if bytes[4..8] == [1, 0, 0, 0] {
            return Err(PluginError::CoreModule { name, path });
        }
        let hash = sha256_hex(bytes);
        let wasmtime = &engine.wasmtime;
        let component = cache::compile(wasmtime, bytes, &hash, engine.settings.cache_dir.as_deref()).map_err(|e| {
            PluginError::Invalid {
                name: name.clone(),
                path: path.clone(),
                cause: cause(e),
            }
        })?;

        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(wasmtime).map(|(n, _)| n.to_owned()).collect();
        let exports: Vec<(String, bool)> = ty
            .exports(wasmtime)
            .map(|(n, item)| (n.to_owned(), matches!(item.ty, ComponentItem::ComponentFunc(_))))
            .collect();
        let other_world = |e: wasmtime::Error| PluginError::OtherWorld {
            name: name.clone(),
            path: path.clone(),
            cause: cause(e),
        };
        let instance_pre = engine.linker.instantiate_pre(&component).map_err(other_world)?;
        let exports_func = |name: &str| exports.iter().any(|(n, func)| n == name && *func);
        let pre = if exports_func("handle-batch") && exports_func("handle") {
            let world = sluice_world(&imports, true);
            Pre::SluiceBatch(BatchHandlerPre::new(instance_pre).map_err(other_world)?, world)
        } else if exports_func("handle") {
            let world = sluice_world(&imports, false);
            Pre::Sluice(HandlerPre::new(instance_pre).map_err(other_world)?, world)
        } else if exports.iter().any(|(n, _)| n == MESSAGING_HANDLER) {
            let world = if imports.iter().any(|i| i == MESSAGING_REQUEST_REPLY) {
                "wasi:messaging/messaging-request-reply@0.2.0-draft"
            } else {
                "wasi:messaging/messaging-core@0.2.0-draft"
            };
            Pre::Messaging {
                pre: MessagingRequestReplyPre::new(instance_pre).map_err(other_world)?,
                world,
                on_error: spec.handler_error,
            }
        } else if exports.iter().any(|(n, _)| n == WASMCLOUD_HANDLER) {
            Pre::WasmCloud(
                HandlerComponentPre::new(instance_pre).map_err(other_world)?,
                spec.handler_error,
            )
        } else {
            let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
            return Err(PluginError::MissingExport {
                name,
                path,
                exports: if names.is_empty() {
                    "nothing".into()
                } else {
                    names.join(", ")
                },
            });
        };

        let ctx = Arc::new(PluginContext {
            name: name.clone(),
            publish_allow: patterns(&name, "publish", &spec.publish_allow)?,
            request_allow: patterns(&name, "request", &spec.request_allow)?,
            settings: spec.settings,
            requester: spec.requester,
            protected: patterns(&name, "protected", &spec.protected_subjects)?,
        });
        Ok(Self {
            name,
            hash,
            path,
            spec_isolation: spec.isolation,
            memory_cap: spec.memory_cap_bytes,
            timeout: spec.timeout,
            fuel: spec.fuel,
            reuse_max: spec.reuse_max_messages.max(1),
            engine: engine.clone(),
            pre,
            ctx,
            warm: Mutex::new(Vec::new()),
            imports,
            language: super::language::detect(bytes),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    /// SHA-256 of the `.wasm`, hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn isolation(&self) -> Isolation {
        self.spec_isolation
    }
    /// The interfaces the component imports (WASI and the sluice host).
    pub fn imports(&self) -> &[String] {
        &self.imports
    }
    /// The language it was written in, as far as its binary tells.
    pub fn language(&self) -> &'static str {
        self.language
    }
    /// The WIT world it was built for.
    pub fn world(&self) -> &'static str {
        self.pre.world()
    }
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Instantiates the component once without handling anything, so a
    /// version whose start-up fails is refused before it is put in service.
    /// In `reuse` mode the instance is kept warm for the first message.
    pub async fn probe(&self) -> Result<(), PluginError> {
        match self.new_warm().await {
            Ok(warm) => {
                if self.spec_isolation == Isolation::Reuse {
                    if let Ok(mut pool) = self.warm.lock() {
                        pool.push(warm);
                    }
                }
                Ok(())
            }
            Err(outcome) => Err(PluginError::Instantiate {
                name: self.name.clone(),
                path: self.path.clone(),
                reason: match outcome {
                    Outcome::Failed { kind, reason } => format!("{kind}: {reason}"),
                    Outcome::Ok { .. } => "unknown".into(),
                },
            }),
        }
    }

    /// A new instance, ready for messages; the failure as an outcome.
    async fn new_warm(&self) -> Result<Warm, Outcome> {
        let mut store = self.new_store();
        self.arm(&mut store);
        let deadline = store.data().deadline;
        let Ok(instantiated) = tokio::time::timeout_at(deadline.into(), self.pre.instantiate(&mut store)).await else {
            return Err(self.timed_out());
        };
        match instantiated {
            Ok(handler) => Ok(Warm {
                store,
                handler,
                uses: 0,
            }),
            Err(e) => Err(self.classify(Ok(Err(e)), store.data_mut())),
        }
    }

    /// A store whose epoch callback, set once, lets the guest yield every
    /// few ticks and interrupts it once the current message's deadline (in
    /// the store data, set by `arm`) has passed.
    fn new_store(&self) -> Store<HostState> {
        let mut store = Store::new(&self.engine.wasmtime, HostState::new(self.ctx.clone(), self.memory_cap));
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().deadline {
                Err(wasmtime::Error::new(DeadlineExceeded))
            } else {
                // tokio's yield_now lets the I/O driver and timers run too;
                // a plain wake would starve them behind a busy guest.
                Ok(UpdateDeadline::YieldCustom(
                    YIELD_EVERY_TICKS,
                    Box::pin(tokio::task::yield_now()),
                ))
            }
        });
        store
    }

    /// Arms the deadline for one message.
    fn arm(&self, store: &mut Store<HostState>) {
        self.arm_for(store, self.timeout, 1);
    }

    /// Arms a deadline `timeout` from now.
    /// Arms a deadline `timeout` from now, and a fuel budget for `messages`.
    fn arm_for(&self, store: &mut Store<HostState>, timeout: Duration, messages: u64) {
        let now = Instant::now();
        // A timeout too large for the clock means: no deadline in practice.
        store.data_mut().deadline = now
            .checked_add(timeout)
            .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600));
        store.set_epoch_deadline(YIELD_EVERY_TICKS);
        if self.engine.settings.fuel {
            // Without a budget of its own a plugin runs unmetered in practice.
            let budget = self.fuel.map_or(u64::MAX, |f| f.saturating_mul(messages.max(1)));
            let _ = store.set_fuel(budget);
        }
    }

    /// Runs the handler on `msg` delivered by `route`.
    pub async fn invoke(&self, route: &str, msg: &Message) -> Invocation {
        let started = Instant::now();
        let (outcome, publishes, cut) = match self.spec_isolation {
            Isolation::Fresh => self.invoke_fresh(route, msg).await,
            Isolation::Reuse => self.invoke_reused(route, msg).await,
        };
        // Publishes of a failed handler are dropped: no half-done effects.
        let publishes = if matches!(outcome, Outcome::Ok { .. }) {
            publishes
        } else {
            Vec::new()
        };
        Invocation {
            outcome,
            publishes,
            cut,
            duration: started.elapsed(),
        }
    }

    async fn invoke_fresh(&self, route: &str, msg: &Message) -> (Outcome, Vec<crate::message::Outbound>, Cut) {
        let mut store = self.new_store();
        store.data_mut().reset(route, &msg.id);
        self.arm(&mut store);
        let deadline = store.data().deadline;
        let call = async {
            let handler = self.pre.instantiate(&mut store).await?;
            handler.handle(&mut store, route, msg).await
        };
        // The epoch deadline stops a busy guest; the timer stops one that
        // waits (a WASI sleep or poll, a host call): the whole invocation is
        // bounded either way.
        let Ok(result) = tokio::time::timeout_at(deadline.into(), call).await else {
            return (self.timed_out(), Vec::new(), store.data().cut);
        };
        let outcome = self.classify(Ok(result), store.data_mut());
        let publishes = store.data_mut().take_publishes();
        (outcome, publishes, store.data().cut)
    }

    async fn invoke_reused(&self, route: &str, msg: &Message) -> (Outcome, Vec<crate::message::Outbound>, Cut) {
        let warm = match self.take_warm().await {
            Ok(w) => w,
            Err(outcome) => return (outcome, Vec::new(), Cut::default()),
        };
        let (outcome, publishes, cut, kept) = self.call_once(warm, route, msg, self.timeout).await;
        if let Some(warm) = kept {
            self.give_back(warm);
        }
        (outcome, publishes, cut)
    }

    /// Whether the component exports `handle-batch`.
    pub fn handles_batches(&self) -> bool {
        matches!(self.pre, Pre::SluiceBatch(..))
    }

    /// The deadline of a batch of `n`: the timeout per message times `n`,
    /// capped at [`MAX_BATCH_TIMEOUT`] (never below one message's timeout).
    pub fn batch_timeout(&self, n: usize) -> Duration {
        let n = u32::try_from(n.max(1)).unwrap_or(u32::MAX);
        self.timeout.saturating_mul(n).min(MAX_BATCH_TIMEOUT.max(self.timeout))
    }

    /// Runs the handler on a batch: one instance for the whole batch (in
    /// `fresh` mode too: fresh isolates batches, not messages), one outcome
    /// per message, in order. A component with `handle-batch` gets the batch
    /// in one call; any other is called once per message on that instance,
    /// and a trap or timeout costs only the message it happened on (the
    /// next message gets a new instance).
    pub async fn invoke_batch(&self, route: &str, msgs: &[&Message]) -> BatchInvocation {
        let started = Instant::now();
        if self.handles_batches() && msgs.len() > 1 {
            let (items, cut, whole) = self.run_batch_export(route, msgs).await;
            let mut run = Self::batch_invocation(items, cut, started);
            run.failed_whole = whole;
            return run;
        }
        let until = started + self.batch_timeout(msgs.len());
        let (items, cut) = self.run_each(route, msgs, until).await;
        Self::batch_invocation(items, cut, started)
    }

    /// Runs `handle` on each message alone (one instance while it stays
    /// healthy): how the messages of a batch that failed as a whole are
    /// told apart, so one poison message does not fail its neighbours.
    /// A message not started by `until` fails as a timeout: the batch's
    /// deadline bounds the whole batch, whichever way it runs.
    pub async fn invoke_each(&self, route: &str, msgs: &[&Message], until: Instant) -> BatchInvocation {
        let started = Instant::now();
        let (items, cut) = self.run_each(route, msgs, until).await;
        Self::batch_invocation(items, cut, started)
    }

    fn batch_invocation(
        items: Vec<(Outcome, Vec<crate::message::Outbound>)>,
        cut: Cut,
        started: Instant,
    ) -> BatchInvocation {
        let items = items
            .into_iter()
            .map(|(outcome, publishes)| ItemInvocation {
                // Publishes of a failed message are dropped with it.
                publishes: if matches!(outcome, Outcome::Ok { .. }) {
                    publishes
                } else {
                    Vec::new()
                },
                outcome,
            })
            .collect();
        BatchInvocation {
            items,
            cut,
            duration: started.elapsed(),
            failed_whole: false,
        }
    }

    /// An instance for the next call: a warm one in `reuse` mode, else new.
    async fn take_warm(&self) -> Result<Warm, Outcome> {
        if self.spec_isolation == Isolation::Reuse {
            if let Some(warm) = self.warm.lock().map(|mut w| w.pop()).unwrap_or(None) {
                return Ok(warm);
            }
        }
        self.new_warm().await
    }

    /// Hands an instance back after a batch: kept in `reuse` mode.
    fn give_back(&self, warm: Warm) {
        if self.spec_isolation == Isolation::Reuse && warm.uses < self.reuse_max {
            if let Ok(mut pool) = self.warm.lock() {
                pool.push(warm);
            }
        }
    }

    /// `handle-batch` in one call.
    /// Also says whether the call failed as a whole (a trap, timeout,
    /// memory hit, a list of the wrong length, or a refusal that was the
    /// call's rather than one message's): nothing then tells the culprit.
    async fn run_batch_export(
        &self,
        route: &str,
        msgs: &[&Message],
    ) -> (Vec<(Outcome, Vec<crate::message::Outbound>)>, Cut, bool) {
        let n = msgs.len();
        let all = |outcome: Outcome| (0..n).map(|_| (outcome.clone(), Vec::new())).collect::<Vec<_>>();
        let mut warm = match self.take_warm().await {
            Ok(w) => w,
            Err(outcome) => return (all(outcome), Cut::default(), true),
        };
        let first = msgs.first().map_or("", |m| m.id.as_str());
        warm.store.data_mut().reset(route, &format!("{first} (batch of {n})"));
        warm.store.data_mut().batch = Some(u32::try_from(n).unwrap_or(u32::MAX));
        let timeout = self.batch_timeout(n);
        self.arm_for(&mut warm.store, timeout, n as u64);
        let deadline = warm.store.data().deadline;
        let batch: Vec<types::Message> = msgs.iter().map(|m| to_wit(route, m)).collect();
        let Handler::SluiceBatch(handler) = &warm.handler else {
            let (items, cut) = self.run_each(route, msgs, deadline).await;
            return (items, cut, false);
        };
        let call = handler.call_handle_batch(&mut warm.store, &batch);
        // Timed out while waiting: the instance is dropped, never reused.
        let Ok(result) = tokio::time::timeout_at(deadline.into(), call).await else {
            let outcome = Outcome::failed(
                FailureKind::Timeout,
                format!("the batch of {n} exceeded its deadline of {} ms", timeout.as_millis()),
            );
            return (all(outcome), warm.store.data().cut, true);
        };
        warm.uses = warm.uses.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        let (items, healthy, whole) = match result {
            Ok(results) if results.len() != n => (
                all(Outcome::failed(
                    FailureKind::Trap,
                    format!("handle-batch returned {} outcomes for {n} messages", results.len()),
                )),
                true,
                true,
            ),
            Ok(results) => {
                let whole = warm.store.data().invalid_publish.is_some();
                let state = warm.store.data_mut();
                let mut outcomes: Vec<Outcome> = Vec::with_capacity(n);
                for (i, result) in results.into_iter().enumerate() {
                    let refused = state
                        .invalid_items
                        .iter()
                        .find(|(item, _)| *item as usize == i)
                        .map(|(_, why)| why.clone());
                    outcomes.push(match refused {
                        Some(why) if result.is_ok() => Outcome::failed(FailureKind::InvalidPublish, why),
                        _ => self.classify(Ok(Ok(result)), state),
                    });
                }
                let mut publishes = state.take_item_publishes(n);
                let items = outcomes
                    .into_iter()
                    .zip(publishes.iter_mut())
                    .map(|(outcome, p)| (outcome, std::mem::take(p)))
                    .collect();
                (items, true, whole)
            }
            Err(e) => {
                let outcome = self.classify(Ok(Err(e)), warm.store.data_mut());
                let healthy = !matches!(&outcome, Outcome::Failed { kind, .. } if kind.is_host_detected());
                (all(outcome), healthy, true)
            }
        };
        let cut = warm.store.data().cut;
        if healthy {
            self.give_back(warm);
        }
        (items, cut, whole)
    }

    /// `handle` once per message, on one instance while it stays healthy.
    async fn run_each(
        &self,
        route: &str,
        msgs: &[&Message],
        until: Instant,
    ) -> (Vec<(Outcome, Vec<crate::message::Outbound>)>, Cut) {
        let mut items = Vec::with_capacity(msgs.len());
        let mut cut = Cut::default();
        let mut current: Option<Warm> = None;
        for msg in msgs {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                items.push((
                    Outcome::failed(
                        FailureKind::Timeout,
                        "the batch's deadline passed before this message ran",
                    ),
                    Vec::new(),
                ));
                continue;
            }
            let warm = match current.take() {
                Some(w) => w,
                None => match self.take_warm().await {
                    Ok(w) => w,
                    Err(outcome) => {
                        items.push((outcome, Vec::new()));
                        continue;
                    }
                },
            };
            let timeout = self.timeout.min(left);
            let (outcome, publishes, call_cut, kept) = self.call_once(warm, route, msg, timeout).await;
            cut.add(call_cut);
            items.push((outcome, publishes));
            current = kept;
        }
        if let Some(warm) = current {
            self.give_back(warm);
        }
        (items, cut)
    }

    /// One `handle` call on `warm`; the instance back if it may be used
    /// again (healthy, under `reuse_max_messages`).
    async fn call_once(
        &self,
        mut warm: Warm,
        route: &str,
        msg: &Message,
        timeout: Duration,
    ) -> (Outcome, Vec<crate::message::Outbound>, Cut, Option<Warm>) {
        warm.store.data_mut().reset(route, &msg.id);
        self.arm_for(&mut warm.store, timeout, 1);
        let deadline = warm.store.data().deadline;
        let call = warm.handler.handle(&mut warm.store, route, msg);
        // Timed out while waiting: the instance is dropped, never reused.
        let Ok(result) = tokio::time::timeout_at(deadline.into(), call).await else {
            return (self.timed_out(), Vec::new(), warm.store.data().cut, None);
        };
        let outcome = self.classify(Ok(result), warm.store.data_mut());
        let cut = warm.store.data().cut;
        let publishes = warm.store.data_mut().take_publishes();
        warm.uses += 1;
        // After a trap, a limit hit or a timeout the instance's state is
        // suspect (and wasmtime will not re-enter a trapped instance).
        let healthy = !matches!(&outcome, Outcome::Failed { kind, .. } if kind.is_host_detected());
        let kept = (healthy && warm.uses < self.reuse_max).then_some(warm);
        (outcome, publishes, cut, kept)
    }

    fn classify(&self, result: Result<HandleResult, std::convert::Infallible>, state: &mut HostState) -> Outcome {
        // A refused publish fails the message whatever the handler made of
        // the refusal: running it again would fail the same way.
        if let (Some(why), Ok(Ok(_))) = (&state.invalid_publish, &result) {
            return Outcome::failed(FailureKind::InvalidPublish, why.clone());
        }
        let err = match result {
            Err(never) => match never {},
            Ok(Ok(Ok(reply))) => {
                let Some(r) = reply else {
                    return Outcome::Ok { reply: None };
                };
                let mut headers: Vec<Header> = r.headers.into_iter().map(|h| Header::new(h.name, h.value)).collect();
                // Counted with the publishes' (the cut is read after this).
                let stripped = crate::headers::strip_reserved(&mut headers);
                state.cut.reserved_headers = state
                    .cut
                    .reserved_headers
                    .saturating_add(u32::try_from(stripped).unwrap_or(u32::MAX));
                if let Err(e) = crate::headers::check_plugin_headers(&headers) {
                    return Outcome::failed(FailureKind::InvalidPublish, format!("reply: {e}"));
                }
                if !state.admit_reply(r.payload.len()) {
                    return Outcome::failed(
                        FailureKind::InvalidPublish,
                        format!(
                            "reply and publishes exceed {} MiB in all",
                            state.publish_limits().1 >> 20
                        ),
                    );
                }
                return Outcome::Ok {
                    reply: Some(Reply {
                        headers,
                        payload: r.payload,
                    }),
                };
            }
            Ok(Ok(Err(types::HandlerError::Retryable(why)))) => return Outcome::failed(FailureKind::Retryable, why),
            Ok(Ok(Err(types::HandlerError::Permanent(why)))) => return Outcome::failed(FailureKind::Permanent, why),
            Ok(Err(err)) => err,
        };
        if err.downcast_ref::<DeadlineExceeded>().is_some()
            || matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt))
        {
            return self.timed_out();
        }
        if matches!(err.downcast_ref::<Trap>(), Some(Trap::OutOfFuel)) {
            return Outcome::failed(
                FailureKind::Timeout,
                format!("used up its fuel budget of {}", self.fuel.unwrap_or(0)),
            );
        }
        if state.limiter.hit {
            return Outcome::failed(
                FailureKind::Memory,
                format!("hit the memory cap of {} MiB", self.memory_cap >> 20),
            );
        }
        let cause = err.root_cause().to_string();
        let reason = match state.last_stderr_line() {
            Some(line) => format!("{line} ({cause})"),
            None => cause,
        };
        Outcome::failed(FailureKind::Trap, reason)
    }

    fn timed_out(&self) -> Outcome {
        Outcome::failed(
            FailureKind::Timeout,
            format!("exceeded its deadline of {} ms", self.timeout.as_millis()),
        )
    }
}

fn to_wit(route: &str, msg: &Message) -> types::Message {
    types::Message {
        id: msg.id.clone(),
        route: route.to_owned(),
        subject: msg.subject.clone(),
        key: msg.key.clone(),
        headers: msg
            .headers
            .iter()
            .map(|h| types::Header {
                name: h.name.clone(),
                value: h.value.clone(),
            })
            .collect(),
        payload: msg.payload.clone(),
        attempt: msg.attempt,
        timestamp_ms: msg.timestamp_ms,
        reply_to: msg.reply_to.clone(),
    }
}
