//! The host side of the plugin interface: per-store state and the `host`
//! imports (`log`, `publish`, `request`, `config`).

use super::bindings::sluice::plugin::{host, types};
use crate::message::{Header, Outbound};
use crate::subject::{validate_subject, SubjectPattern};
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Publishes one handler invocation may queue, and their total size: a
/// runaway handler must not be able to exhaust host memory.
const MAX_PUBLISHES: usize = 1_000;
const MAX_PUBLISH_BYTES: usize = 16 << 20;
/// What a plugin's stderr (panic messages) is kept of, for the trap reason.
const STDERR_CAPTURE: usize = 4096;

/// Sends a request and waits for the answer. Supplied by a broker that has
/// request/reply (NATS); the engine itself knows no broker.
pub trait Requester: Send + Sync {
    fn request(
        &self,
        subject: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, RequestError>> + Send>>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum RequestError {
    #[error("request timed out")]
    Timeout,
    #[error("{0}")]
    Failed(String),
}

/// What a plugin may do: fixed per plugin version, shared by its instances.
pub struct PluginContext {
    pub name: String,
    pub publish_allow: Vec<SubjectPattern>,
    pub request_allow: Vec<SubjectPattern>,
    pub settings: BTreeMap<String, String>,
    pub requester: Option<Arc<dyn Requester>>,
}

/// Counts linear-memory growth against the plugin's cap and remembers a hit,
/// so the resulting trap can be reported as `memory`.
pub struct MemoryLimiter {
    cap: usize,
    pub hit: bool,
}

impl MemoryLimiter {
    pub fn new(cap: usize) -> Self {
        Self { cap, hit: false }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Per-store state: one per instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    stderr: MemoryOutputPipe,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<PluginContext>,
    /// Route and message id of the message being handled, for log lines.
    pub(crate) route: String,
    pub(crate) message_id: String,
    pub(crate) publishes: Vec<Outbound>,
    publish_bytes: usize,
    /// When the current message's time is up; waiting host calls stop here.
    pub(crate) deadline: std::time::Instant,
}

impl HostState {
    pub fn new(plugin: Arc<PluginContext>, memory_cap: usize) -> Self {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        // No preopens, no environment, no arguments, no sockets: a plugin
        // gets clocks and randomness from WASI and nothing else.
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            stderr,
            limiter: MemoryLimiter::new(memory_cap),
            plugin,
            route: String::new(),
            message_id: String::new(),
            publishes: Vec::new(),
            publish_bytes: 0,
            deadline: std::time::Instant::now(),
        }
    }

    /// Prepares a (reused) store for the next message.
    pub fn reset(&mut self, route: &str, message_id: &str) {
        self.route.clear();
        self.route.push_str(route);
        self.message_id.clear();
        self.message_id.push_str(message_id);
        self.publishes.clear();
        self.publish_bytes = 0;
        self.limiter.hit = false;
    }

    pub fn take_publishes(&mut self) -> Vec<Outbound> {
        self.publish_bytes = 0;
        std::mem::take(&mut self.publishes)
    }

    /// What the plugin wrote to stderr before it trapped: the panic message
    /// if there is one, else the last line.
    pub fn last_stderr_line(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note: "))
            .collect();
        if let Some(i) = lines.iter().rposition(|l| l.contains("panicked at")) {
            let location = lines[i].trim_end_matches(':');
            return Some(match lines.get(i + 1) {
                Some(message) => format!("{location}: {message}"),
                None => location.to_owned(),
            });
        }
        lines.last().map(|l| (*l).to_owned())
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn headers_from_wit(headers: Vec<types::Header>) -> Vec<Header> {
    headers
        .into_iter()
        .map(|h| Header {
            name: h.name,
            value: h.value,
        })
        .collect()
}

fn check_allowed(allow: &[SubjectPattern], subject: &str, what: &str) -> Result<(), types::HostError> {
    validate_subject(subject).map_err(|e| types::HostError::Failed(e.to_string()))?;
    if allow.iter().any(|p| p.matches(subject)) {
        Ok(())
    } else {
        Err(types::HostError::Denied(format!(
            "{what} to {subject:?} is not in the plugin's `{what}` allow-list"
        )))
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    async fn log(&mut self, level: types::Level, text: String) {
        let plugin = self.plugin.name.as_str();
        let route = self.route.as_str();
        let id = self.message_id.as_str();
        match level {
            types::Level::Trace => {
                tracing::trace!(target: "sluice::plugin", plugin, route, id, "{text}")
            }
            types::Level::Debug => {
                tracing::debug!(target: "sluice::plugin", plugin, route, id, "{text}")
            }
            types::Level::Info => {
                tracing::info!(target: "sluice::plugin", plugin, route, id, "{text}")
            }
            types::Level::Warn => {
                tracing::warn!(target: "sluice::plugin", plugin, route, id, "{text}")
            }
            types::Level::Error => {
                tracing::error!(target: "sluice::plugin", plugin, route, id, "{text}")
            }
        }
    }

    async fn publish(
        &mut self,
        subject: String,
        headers: Vec<types::Header>,
        payload: Vec<u8>,
    ) -> Result<(), types::HostError> {
        check_allowed(&self.plugin.publish_allow, &subject, "publish")?;
        if self.publishes.len() >= MAX_PUBLISHES || self.publish_bytes + payload.len() > MAX_PUBLISH_BYTES {
            return Err(types::HostError::Failed(format!(
                "a handler may queue at most {MAX_PUBLISHES} publishes of {} MiB in all",
                MAX_PUBLISH_BYTES >> 20
            )));
        }
        self.publish_bytes += payload.len();
        self.publishes.push(Outbound {
            subject,
            headers: headers_from_wit(headers),
            payload,
        });
        Ok(())
    }

    async fn request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, types::HostError> {
        check_allowed(&self.plugin.request_allow, &subject, "request")?;
        let Some(requester) = self.plugin.requester.clone() else {
            return Err(types::HostError::Failed(
                "no broker with request/reply is configured".into(),
            ));
        };
        // Never past the message's own deadline.
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = Duration::from_millis(u64::from(timeout_ms)).min(left);
        if timeout.is_zero() {
            return Err(types::HostError::Timeout);
        }
        requester
            .request(&subject, payload, timeout)
            .await
            .map_err(|e| match e {
                RequestError::Timeout => types::HostError::Timeout,
                RequestError::Failed(why) => types::HostError::Failed(why),
            })
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.plugin.settings.get(&key).cloned()
    }
}
