//! Prometheus metrics of the pipeline and the engine.

mod outcome;
pub use outcome::MessageOutcome;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutcome {
    pub route: String,
    pub outcome: MessageOutcome,
}

/// `sluice_broker_errors_total`, one family for the process: the brokers
/// count their own background failures in it (they hold no `Metrics`), and
/// every `Metrics` registers this same family.
pub fn broker_errors() -> &'static Family<BrokerErrorLabel, Counter> {
    static FAMILY: std::sync::OnceLock<Family<BrokerErrorLabel, Counter>> = std::sync::OnceLock::new();
    FAMILY.get_or_init(Family::default)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BrokerErrorLabel {
    /// The broker's name (`kafka`, `nats`, ...).
    pub broker: String,
    /// receive | ack | retry | dead_lettered | publish | publish_dead_letter | error_reply
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOutput {
    pub route: String,
    /// `log_lines` (dropped) | `log_bytes` (lines shortened)
    pub what: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteFailure {
    pub route: String,
    /// retryable | permanent | trap | timeout | memory
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginReload {
    pub plugin: String,
    /// ok | refused
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabel {
    pub instance_id: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginVersion {
    pub plugin: String,
    /// SHA-256 of the `.wasm`, hex.
    pub hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadResult {
    /// ok | refused
    pub result: String,
}

/// Handles on one route's series.
#[derive(Clone)]
pub struct RouteMetrics {
    pub ok: Counter,
    pub retry: Counter,
    pub dead_letter: Counter,
    pub duplicate: Counter,
    pub in_flight: Gauge,
    pub duration: Histogram,
}

impl RouteMetrics {
    /// The counter of `outcome` (those not counted share `retry`'s, never
    /// incremented for them).
    pub fn counter(&self, outcome: MessageOutcome) -> &Counter {
        match outcome {
            MessageOutcome::Ok => &self.ok,
            MessageOutcome::DeadLetter => &self.dead_letter,
            MessageOutcome::Duplicate => &self.duplicate,
            MessageOutcome::Retry | MessageOutcome::Interrupted | MessageOutcome::Panic => &self.retry,
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub messages: Family<RouteOutcome, Counter>,
    pub failures: Family<RouteFailure, Counter>,
    pub in_flight: Family<RouteLabel, Gauge>,
    /// Messages of a route its broker holds unsettled (see `Source::backlog`).
    pub route_lag: Family<RouteLabel, Gauge>,
    /// Age of the oldest message a route's broker holds unsettled.
    pub route_oldest_unacked: Family<RouteLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Partitions of a route's source this replica holds (Kafka).
    pub route_partitions: Family<RouteLabel, Gauge>,
    pub handler_duration: Family<RouteLabel, Histogram>,
    /// Messages per batch, on routes with `batch`.
    pub batch_size: Family<RouteLabel, Histogram>,
    pub settle_errors: Family<RouteLabel, Counter>,
    /// Broker operations that failed, by broker and operation.
    pub broker_errors: Family<BrokerErrorLabel, Counter>,
    /// Panics caught while handling a message (the worker lives on).
    pub panics: Family<RouteLabel, Counter>,
    /// Plugin output the host cut to its bounds, by route and what.
    pub output_cut: Family<RouteOutput, Counter>,
    pub plugin_reloads: Family<PluginReload, Counter>,
    pub config_reloads: Family<ReloadResult, Counter>,
    pub plugin_info: Family<PluginVersion, Gauge>,
    /// Which task reports each route's backlog series: a route rebuilt by
    /// a reload starts a new one before the old one stops, and only the
    /// latest may remove the series.
    backlog_reporters: Mutex<std::collections::HashMap<String, u64>>,
    next_reporter: std::sync::atomic::AtomicU64,
    encode_lock: Mutex<()>,
}

fn batch_size_histogram() -> Histogram {
    // 1 .. 8192
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1.0, 2.0, 14))
}

fn duration_histogram() -> Histogram {
    // 50 µs .. ~26 s
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.000_05, 2.0, 20,
    ))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let messages = Family::<RouteOutcome, Counter>::default();
        let failures = Family::<RouteFailure, Counter>::default();
        let in_flight = Family::<RouteLabel, Gauge>::default();
        let handler_duration =
            Family::<RouteLabel, Histogram>::new_with_constructor(duration_histogram as fn() -> Histogram);
        let settle_errors = Family::<RouteLabel, Counter>::default();
        let batch_size =
            Family::<RouteLabel, Histogram>::new_with_constructor(batch_size_histogram as fn() -> Histogram);
        registry.register(
            "batch_size",
            "Messages per batch handed to the plugin, by route (routes with `batch`)",
            batch_size.clone(),
        );
        registry.register("messages", "Messages settled, by route and outcome", messages.clone());
        registry.register(
            "handler_failures",
            "Handler failures, by route and kind",
            failures.clone(),
        );
        registry.register("in_flight", "Messages being handled now, by route", in_flight.clone());
        let route_lag = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_lag",
            "Messages of the route its broker holds not yet settled (JetStream pending + ack pending, Kafka end offset - first unsettled of this replica's partitions, RabbitMQ ready + taken unsettled, embedded queue length), read every 5 s; absent where the broker keeps no backlog (core NATS)",
            route_lag.clone(),
        );
        let route_oldest_unacked = Family::<RouteLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "route_oldest_unacked_seconds",
            "Age of the oldest message of the route its broker holds not yet settled, by the broker's (JetStream, embedded) or the record's (Kafka, of the records this replica has read) timestamp; 0 when nothing is held; absent where the broker does not tell (RabbitMQ, core NATS), read every 5 s",
            route_oldest_unacked.clone(),
        );
        let route_partitions = Family::<RouteLabel, Gauge>::default();
        registry.register(
            "route_partitions",
            "Partitions of the route's source this replica holds (Kafka consumer groups; 0 for long: an idle replica), read every 5 s",
            route_partitions.clone(),
        );
        registry.register(
            "handler_duration_seconds",
            "Time spent in the handler per message (per batch on routes with `batch`), by route",
            handler_duration.clone(),
        );
        registry.register(
            "settle_errors",
            "Acks, retries or publishes the broker refused (the message is redelivered)",
            settle_errors.clone(),
        );
        let broker_errors = broker_errors().clone();
        registry.register(
            "broker_errors",
            "Broker operations that failed, by broker and operation",
            broker_errors.clone(),
        );
        let panics = Family::<RouteLabel, Counter>::default();
        let output_cut = Family::<RouteOutput, Counter>::default();
        registry.register(
            "worker_panics",
            "Panics caught while handling a message, by route (the message is redelivered or dead-lettered; the worker lives on)",
            panics.clone(),
        );
        registry.register(
            "plugin_output_cut",
            "Plugin output cut to the host's bounds, by route and what (log_lines dropped, log_bytes: lines shortened)",
            output_cut.clone(),
        );
        let plugin_reloads = Family::<PluginReload, Counter>::default();
        let config_reloads = Family::<ReloadResult, Counter>::default();
        let plugin_info = Family::<PluginVersion, Gauge>::default();
        registry.register(
            "plugin_reloads",
            "Hot reloads of a plugin's .wasm, by plugin and result (ok | refused)",
            plugin_reloads.clone(),
        );
        registry.register(
            "config_reloads",
            "Reloads of the config file, by result (ok | refused)",
            config_reloads.clone(),
        );
        let instance_info = Family::<InstanceLabel, Gauge>::default();
        instance_info
            .get_or_create(&InstanceLabel {
                instance_id: crate::message::instance_id().to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        registry.register(
            "instance_info",
            "This replica: 1, labelled with its instance_id and sluice's version",
            instance_info,
        );
        registry.register(
            "plugin_info",
            "The version each plugin runs: 1 for its current content hash",
            plugin_info.clone(),
        );
        // Known label values exist from the start: "none refused" reads 0,
        // not a missing series.
        for result in ["ok", "refused"] {
            drop(config_reloads.get_or_create(&ReloadResult {
                result: result.to_owned(),
            }));
        }
        Self {
            registry,
            plugin_reloads,
            config_reloads,
            plugin_info,
            messages,
            failures,
            in_flight,
            route_lag,
            route_oldest_unacked,
            route_partitions,
            handler_duration,
            batch_size,
            settle_errors,
            broker_errors,
            panics,
            output_cut,
            backlog_reporters: Mutex::default(),
            next_reporter: std::sync::atomic::AtomicU64::new(0),
            encode_lock: Mutex::new(()),
        }
    }

    /// Makes the caller the reporter of `route`'s backlog series.
    pub fn report_backlog(&self, route: &str) -> u64 {
        let id = self.next_reporter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut reporters) = self.backlog_reporters.lock() {
            reporters.insert(route.to_owned(), id);
        }
        id
    }

    /// Whether `id` still reports `route`'s backlog (then forgotten): only
    /// then may it remove the series.
    pub fn stop_reporting_backlog(&self, route: &str, id: u64) -> bool {
        let Ok(mut reporters) = self.backlog_reporters.lock() else {
            return false;
        };
        if reporters.get(route) == Some(&id) {
            reporters.remove(route);
            true
        } else {
            false
        }
    }

    /// The series of one route, looked up once: the per-message path then
    /// touches atomics only.
    pub fn route(&self, route: &str) -> RouteMetrics {
        let outcome = |outcome: MessageOutcome| {
            self.messages
                .get_or_create(&RouteOutcome {
                    route: route.to_owned(),
                    outcome,
                })
                .clone()
        };
        let label = RouteLabel {
            route: route.to_owned(),
        };
        RouteMetrics {
            ok: outcome(MessageOutcome::Ok),
            retry: outcome(MessageOutcome::Retry),
            dead_letter: outcome(MessageOutcome::DeadLetter),
            duplicate: outcome(MessageOutcome::Duplicate),
            in_flight: self.in_flight.get_or_create(&label).clone(),
            duration: self.handler_duration.get_or_create(&label).clone(),
        }
    }

    /// Counts a reload of `plugin`'s file.
    pub fn plugin_reloaded(&self, plugin: &str, result: &str) {
        self.plugin_reloads
            .get_or_create(&PluginReload {
                plugin: plugin.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Shows `hash` as the version `plugin` runs, in place of `old`.
    pub fn plugin_version(&self, plugin: &str, old: Option<&str>, hash: &str) {
        for result in ["ok", "refused"] {
            drop(self.plugin_reloads.get_or_create(&PluginReload {
                plugin: plugin.to_owned(),
                result: result.to_owned(),
            }));
        }
        if let Some(old) = old {
            self.plugin_info.remove(&PluginVersion {
                plugin: plugin.to_owned(),
                hash: old.to_owned(),
            });
        }
        self.plugin_info
            .get_or_create(&PluginVersion {
                plugin: plugin.to_owned(),
                hash: hash.to_owned(),
            })
            .set(1);
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let _guard = self.encode_lock.lock();
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}
