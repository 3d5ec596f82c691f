//! The host side of the plugin interface: per-store state and the `host`
//! imports (`log`, `publish`, `request`, `config`).

use super::bindings::sluice::plugin::{host, types};
use super::stderr::StderrTail;
use crate::headers;
use crate::message::{Header, Outbound};
pub use crate::request::{RequestError, Requester};
use crate::subject::SubjectPattern;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Publishes one handler invocation may queue, and their total size
/// (payloads, headers and the reply): a runaway handler must not be able to
/// exhaust host memory.
const MAX_PUBLISHES: usize = 1_000;
pub(crate) const MAX_PUBLISH_BYTES: usize = 16 << 20;
/// The same for a whole batch: the per-message count times its size, up to
/// this many, and this many bytes in all.
const MAX_BATCH_PUBLISHES: usize = 100_000;
pub(crate) const MAX_BATCH_PUBLISH_BYTES: usize = 64 << 20;
/// Log lines one message may write, and the length of each; the rest is cut
/// (and counted), so a plugin cannot flood the host's log.
const MAX_LOG_LINES: u32 = 100;
const MAX_LOG_LINE_BYTES: usize = 4096;

/// What a plugin may do: fixed per plugin version, shared by its instances.
pub struct PluginContext {
    pub name: String,
    pub publish_allow: Vec<SubjectPattern>,
    pub request_allow: Vec<SubjectPattern>,
    pub settings: BTreeMap<String, String>,
    pub requester: Option<Arc<dyn Requester>>,
    /// Subjects a wildcard allow-list never reaches (dead-letter and retry
    /// subjects of the routes): only a pattern whose first token names them
    /// does.
    pub protected: Vec<SubjectPattern>,
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
    stderr: StderrTail,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<PluginContext>,
    /// Route and message id of the message being handled, for log lines.
    pub(crate) route: String,
    pub(crate) message_id: String,
    pub(crate) publishes: Vec<Outbound>,
    /// In `handle-batch`: the item each of `publishes` belongs to.
    publish_items: Vec<u32>,
    publish_bytes: usize,
    /// The first publish the host refused as malformed: the message (in a
    /// batch, every message) then fails as `invalid-publish`, whatever the
    /// handler returns.
    pub(crate) invalid_publish: Option<String>,
    /// In `handle-batch`: the first refused publish of each item.
    pub(crate) invalid_items: Vec<(u32, String)>,
    /// In `handle-batch`: how many messages the batch holds.
    pub(crate) batch: Option<u32>,
    /// Plugin output cut by the host's bounds during this message.
    pub(crate) cut: super::outcome::Cut,
    /// When the current message's time is up; waiting host calls stop here.
    pub(crate) deadline: std::time::Instant,
    /// State of the `wasi:messaging` interface (unused by sluice plugins).
    pub(crate) messaging: super::messaging::MessagingState,
}

impl HostState {
    pub fn new(plugin: Arc<PluginContext>, memory_cap: usize) -> Self {
        let stderr = StderrTail::new();
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
            publish_items: Vec::new(),
            publish_bytes: 0,
            invalid_publish: None,
            invalid_items: Vec::new(),
            batch: None,
            cut: Default::default(),
            deadline: std::time::Instant::now(),
            messaging: Default::default(),
        }
    }

    /// Prepares a (reused) store for the next message.
    pub fn reset(&mut self, route: &str, message_id: &str) {
        self.route.clear();
        self.route.push_str(route);
        self.message_id.clear();
        self.message_id.push_str(message_id);
        self.publishes.clear();
        self.publish_items.clear();
        self.publish_bytes = 0;
        self.invalid_publish = None;
        self.invalid_items.clear();
        self.batch = None;
        self.cut = Default::default();
        self.limiter.hit = false;
        self.stderr.clear();
        self.messaging.reset();
    }

    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    pub fn take_publishes(&mut self) -> Vec<Outbound> {
        self.publish_bytes = 0;
        self.publish_items.clear();
        std::mem::take(&mut self.publishes)
    }

    /// A batch's publishes, grouped by the item they belong to.
    pub fn take_item_publishes(&mut self, items: usize) -> Vec<Vec<Outbound>> {
        let mut grouped: Vec<Vec<Outbound>> = (0..items).map(|_| Vec::new()).collect();
        let owners = std::mem::take(&mut self.publish_items);
        for (item, outbound) in owners.into_iter().zip(self.take_publishes()) {
            // Checked against the batch size when queued.
            if let Some(group) = grouped.get_mut(item as usize) {
                group.push(outbound);
            }
        }
        grouped
    }

    /// What the plugin wrote to stderr before it trapped: the panic message
    /// if there is one, else the last line.
    pub fn last_stderr_line(&self) -> Option<String> {
        let bytes = self.stderr.contents();
        // The kept tail may start inside a character.
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

/// True if `pattern` names `subject`'s first token literally: how a
/// protected subject (server APIs, dead-letter subjects) must be allowed.
fn names_first_token(pattern: &SubjectPattern, subject: &str) -> bool {
    let first = |s: &str| s.split('.').next().unwrap_or_default().to_owned();
    let p = first(pattern.as_str());
    p != "*" && p != ">" && p == first(subject)
}

fn check_allowed(
    ctx: &PluginContext,
    allow: &[SubjectPattern],
    subject: &str,
    what: &str,
) -> Result<(), types::HostError> {
    let protected = headers::is_system_subject(subject) || ctx.protected.iter().any(|p| p.matches(subject));
    let allowed = allow
        .iter()
        .any(|p| p.matches(subject) && (!protected || names_first_token(p, subject)));
    if allowed {
        Ok(())
    } else if protected {
        Err(types::HostError::Denied(format!(
            "{what} to {subject:?} is reserved (server API or dead-letter subject); only an allow-list entry naming its first token reaches it"
        )))
    } else {
        Err(types::HostError::Denied(format!(
            "{what} to {subject:?} is not in the plugin's `{what}` allow-list"
        )))
    }
}

impl HostState {
    /// Notes a malformed publish (the message will fail as
    /// `invalid-publish`) and tells the guest why.
    fn refuse_publish(&mut self, item: Option<u32>, why: String) -> types::HostError {
        match item {
            Some(item) if self.batch.is_some() => {
                if !self.invalid_items.iter().any(|(i, _)| *i == item) {
                    self.invalid_items.push((item, why.clone()));
                }
            }
            _ => {
                if self.invalid_publish.is_none() {
                    self.invalid_publish = Some(why.clone());
                }
            }
        }
        types::HostError::Failed(why)
    }

    /// Counts a reply's bytes against the call's bound; false if over.
    pub(crate) fn admit_reply(&mut self, bytes: usize) -> bool {
        let total = self.publish_bytes.saturating_add(bytes);
        if total > self.publish_limits().1 {
            return false;
        }
        if self.batch.is_some() {
            self.publish_bytes = total;
        }
        true
    }

    /// How many publishes, and bytes, the current call may queue.
    pub(crate) fn publish_limits(&self) -> (usize, usize) {
        match self.batch {
            None => (MAX_PUBLISHES, MAX_PUBLISH_BYTES),
            Some(n) => (
                MAX_PUBLISHES.saturating_mul(n as usize).min(MAX_BATCH_PUBLISHES),
                MAX_BATCH_PUBLISH_BYTES,
            ),
        }
    }
}

/// A plugin's log text as one bounded line: control characters escaped, so
/// a `\n` cannot forge a log line of its own.
fn one_log_line(text: &str, cut: &mut super::outcome::Cut) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_LOG_LINE_BYTES));
    for c in text.chars() {
        if out.len() >= MAX_LOG_LINE_BYTES {
            cut.log_bytes += 1;
            out.push_str("...");
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&c.escape_default().to_string()),
            c => out.push(c),
        }
    }
    cut.logged += 1;
    out
}

impl HostState {
    /// Checks a publish and queues it until the handler has returned Ok:
    /// the one path of every send, whatever interface the plugin uses.
    pub(crate) fn queue_publish(
        &mut self,
        subject: String,
        headers: Vec<Header>,
        payload: Vec<u8>,
    ) -> Result<(), types::HostError> {
        if self.batch.is_some() {
            // An effect nobody owns could be neither sent with one item nor
            // dropped with another: the batch fails as a whole.
            return Err(self.refuse_publish(
                None,
                "`publish` inside `handle-batch`: a batch handler publishes with `publish-item`, on behalf of one message"
                    .into(),
            ));
        }
        self.queue_item_publish(None, subject, headers, payload)
    }

    /// Queues a publish for item `item` of the batch (none: the message of a
    /// single `handle`, which is item 0 of a batch of one).
    pub(crate) fn queue_item_publish(
        &mut self,
        item: Option<u32>,
        subject: String,
        mut headers: Vec<Header>,
        payload: Vec<u8>,
    ) -> Result<(), types::HostError> {
        let items = self.batch.unwrap_or(1);
        if let Some(i) = item.filter(|i| *i >= items) {
            return Err(self.refuse_publish(None, format!("publish-item for item {i} of a batch of {items}")));
        }
        if let Err(why) = headers::check_subject(&subject) {
            return Err(self.refuse_publish(item, why));
        }
        check_allowed(&self.plugin, &self.plugin.publish_allow, &subject, "publish")?;
        self.cut.reserved_headers += u32::try_from(headers::strip_reserved(&mut headers)).unwrap_or(u32::MAX);
        let header_bytes = match headers::check_plugin_headers(&headers) {
            Ok(n) => n,
            Err(e) => return Err(self.refuse_publish(item, format!("publish to {:?}: {e}", headers::shown(&subject)))),
        };
        let size = payload.len().saturating_add(header_bytes).saturating_add(subject.len());
        let (max_count, max_bytes) = self.publish_limits();
        if self.publishes.len() >= max_count || self.publish_bytes.saturating_add(size) > max_bytes {
            // The bound is the call's, not the item's: the whole call fails.
            return Err(self.refuse_publish(
                None,
                format!(
                    "a handler may queue at most {max_count} publishes of {} MiB in all",
                    max_bytes >> 20
                ),
            ));
        }
        self.publish_bytes += size;
        if self.batch.is_some() {
            self.publish_items.push(item.unwrap_or(0));
        }
        self.publishes.push(Outbound {
            subject,
            headers,
            payload,
        });
        Ok(())
    }

    /// Sends a request at once and waits for its answer, never past the
    /// message's deadline (`timeout_ms` none: until the deadline).
    pub(crate) async fn send_request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        timeout_ms: Option<u32>,
    ) -> Result<Vec<u8>, types::HostError> {
        headers::check_subject(&subject).map_err(types::HostError::Failed)?;
        check_allowed(&self.plugin, &self.plugin.request_allow, &subject, "request")?;
        let Some(requester) = self.plugin.requester.clone() else {
            return Err(types::HostError::Failed(
                "no broker with request/reply is configured".into(),
            ));
        };
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        let timeout = timeout_ms.map_or(left, |ms| Duration::from_millis(u64::from(ms)).min(left));
        if timeout.is_zero() {
            return Err(types::HostError::Timeout);
        }
        requester
            .request(&subject, payload, timeout)
            .await
            .map_err(|e| match e {
                RequestError::Timeout => types::HostError::Timeout,
                RequestError::Failed(cause) => types::HostError::Failed(crate::error::report(&*cause)),
            })
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    async fn log(&mut self, level: types::Level, text: String) {
        if self.cut.logged >= MAX_LOG_LINES {
            self.cut.log_lines += 1;
            return;
        }
        let text = one_log_line(&text, &mut self.cut);
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
        self.queue_publish(subject, headers_from_wit(headers), payload)
    }

    async fn publish_item(
        &mut self,
        item: u32,
        subject: String,
        headers: Vec<types::Header>,
        payload: Vec<u8>,
    ) -> Result<(), types::HostError> {
        self.queue_item_publish(Some(item), subject, headers_from_wit(headers), payload)
    }

    async fn request(
        &mut self,
        subject: String,
        payload: Vec<u8>,
        timeout_ms: u32,
    ) -> Result<Vec<u8>, types::HostError> {
        self.send_request(subject, payload, Some(timeout_ms)).await
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.plugin.settings.get(&key).cloned()
    }
}
