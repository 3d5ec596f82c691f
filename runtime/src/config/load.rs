//! Reading, interpolating, parsing and validating a config file.

use super::interpolate::interpolate;
use super::locate::KeyLines;
use super::{BrokerKind, Config, GateStore, Ordering, RouteConfig};
use crate::subject::{validate_subject, SubjectPattern};
use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

/// A config problem, located: `file:line: key: message`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read the config file: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{}", .0)]
    Invalid(Located),
}

/// An error with the file, line and key it concerns.
#[derive(Debug)]
pub struct Located {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": key `{}`: {}", self.key, self.message)
        }
    }
}

/// Reads and validates the config at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path, PluginFiles::MustExist)
}

/// Reads and validates the config at `path` except that plugin files may
/// be missing: `sluice dev` builds them.
pub fn load_unbuilt(path: &Path) -> Result<Config, ConfigError> {
    parse(&read(path)?, path, PluginFiles::MayBeMissing)
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PluginFiles {
    MustExist,
    MayBeMissing,
}

/// Parses config text as if read from `path` (relative paths resolve against
/// its folder).
pub fn parse_str(raw: &str, path: &Path) -> Result<Config, ConfigError> {
    parse(raw, path, PluginFiles::MustExist)
}

fn parse(raw: &str, path: &Path, plugin_files: PluginFiles) -> Result<Config, ConfigError> {
    let invalid = |line: Option<usize>, key: &str, message: String| {
        ConfigError::Invalid(Located {
            file: path.to_owned(),
            line,
            key: key.to_owned(),
            message,
        })
    };
    let text = interpolate(raw, |name| std::env::var(name).ok()).map_err(|e| invalid(Some(e.line), "", e.message))?;
    let lines = KeyLines::scan(&text);

    let deserializer = toml::de::Deserializer::parse(&text)
        .map_err(|e| invalid(e.span().map(|s| line_at(&text, s.start)), "", e.message().to_owned()))?;
    let mut config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = dotted(e.path());
        let inner = e.into_inner();
        let line = inner
            .span()
            .map(|s| line_at(&text, s.start))
            .or_else(|| lines.line_of(&segments(&key)));
        invalid(line, &key, inner.message().to_owned())
    })?;

    let base = path.parent().unwrap_or(Path::new("."));
    config.file = path.to_owned();
    config.data_dir = base.join(&config.data_dir);
    for plugin in config.plugins.values_mut() {
        plugin.path = base.join(&plugin.path);
        if let Some(source) = &mut plugin.source {
            *source = base.join(&*source);
        }
    }

    validate(&config, plugin_files).map_err(|(key, message)| invalid(lines.line_of(&segments(&key)), &key, message))?;
    Ok(config)
}

fn line_at(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// serde_path_to_error's `routes[0].retry` as `routes.0.retry`.
fn dotted(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|seg| match seg {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn segments(key: &str) -> Vec<String> {
    key.split('.').map(str::to_owned).collect()
}

type Problem = (String, String);

fn validate(config: &Config, plugin_files: PluginFiles) -> Result<(), Problem> {
    if config.engine.max_instances == 0 {
        return Err(("engine.max_instances".into(), "must be at least 1".into()));
    }
    let admin = &config.admin;
    if !admin.listen.ip().is_loopback() && admin.token().is_none() && !admin.insecure {
        return Err((
            "admin.listen".into(),
            format!(
                "{} is reachable from other hosts, and without `[admin] token` anyone who reaches it can publish and replay; set `token = \"${{SLUICE_ADMIN_TOKEN}}\"`, listen on 127.0.0.1, or set `insecure = true`",
                admin.listen
            ),
        ));
    }
    if admin.token().is_some_and(|t| t.len() < 16) {
        return Err(("admin.token".into(), "must be at least 16 characters".into()));
    }
    for (name, plugin) in &config.plugins {
        let key = |k: &str| format!("plugins.{name}.{k}");
        if plugin_files == PluginFiles::MustExist && !plugin.path.is_file() {
            return Err((
                key("path"),
                format!(
                    "plugin file {} does not exist (build the plugins first?)",
                    plugin.path.display()
                ),
            ));
        }
        if plugin.max_memory_mb == 0 || plugin.max_memory_mb > 4096 {
            return Err((key("max_memory_mb"), "must be between 1 and 4096".into()));
        }
        if plugin.timeout.is_zero() {
            return Err((key("timeout"), "must be more than 0".into()));
        }
        for (list, patterns) in [("publish", &plugin.publish), ("request", &plugin.request)] {
            for (i, p) in patterns.iter().enumerate() {
                SubjectPattern::parse(p).map_err(|e| (format!("{}.{i}", key(list)), e.to_string()))?;
            }
        }
    }
    let mut names = BTreeSet::new();
    for (i, route) in config.routes.iter().enumerate() {
        let key = |k: &str| format!("routes.{i}.{k}");
        if !is_plain_name(&route.name) {
            return Err((key("name"), PLAIN_NAME.into()));
        }
        if !names.insert(route.name.as_str()) {
            return Err((key("name"), format!("route `{}` is defined twice", route.name)));
        }
        if !config.plugins.contains_key(&route.plugin) {
            let known: Vec<&str> = config.plugins.keys().map(String::as_str).collect();
            return Err((
                key("plugin"),
                format!("no plugin `{}` is defined (known: {})", route.plugin, known.join(", ")),
            ));
        }
        validate_route(route, &key)?;
        validate_source(config, route, &key)?;
        if let Some(idem) = &route.idempotency {
            let timeout = config.plugins.get(&route.plugin).map(|p| p.timeout).unwrap_or_default();
            if idem.lease <= timeout {
                return Err((
                    key("idempotency.lease"),
                    format!("must be longer than the plugin's timeout ({timeout:?}), or a slow handler would lose its lease"),
                ));
            }
            if idem.store == GateStore::Redis && config.stores.redis_url.is_none() {
                return Err((key("idempotency.store"), "\"redis\" needs `[stores] redis_url`".into()));
            }
        }
    }
    // Every worker may hold an instance at once (and reuse keeps them warm):
    // more workers than pool slots would fail healthy messages as traps.
    let workers: u64 = config.routes.iter().map(|r| u64::from(r.concurrency)).sum();
    if workers > u64::from(config.engine.max_instances) {
        return Err((
            "engine.max_instances".into(),
            format!(
                "is {}, below the {workers} workers the routes' `concurrency` adds up to: raise it or lower concurrency",
                config.engine.max_instances
            ),
        ));
    }
    if let Some(nats) = &config.brokers.nats {
        for (i, stream) in nats.streams.iter().enumerate() {
            for (j, s) in stream.subjects.iter().enumerate() {
                SubjectPattern::parse(s)
                    .map_err(|e| (format!("brokers.nats.streams.{i}.subjects.{j}"), e.to_string()))?;
            }
        }
    }
    for (i, q) in config.brokers.embedded.queues.iter().enumerate() {
        let key = |k: &str| format!("brokers.embedded.queues.{i}.{k}");
        if !is_plain_name(&q.name) {
            return Err((key("name"), PLAIN_NAME.into()));
        }
        if names.contains(q.name.as_str()) {
            return Err((key("name"), format!("queue `{}` has the name of a route", q.name)));
        }
        for (j, s) in q.subjects.iter().enumerate() {
            SubjectPattern::parse(s).map_err(|e| (format!("{}.{j}", key("subjects")), e.to_string()))?;
        }
    }
    Ok(())
}

fn validate_source(config: &Config, route: &RouteConfig, key: &dyn Fn(&str) -> String) -> Result<(), Problem> {
    let s = &route.source;
    let dead_letter_broker = route.dead_letter.as_ref().and_then(|d| d.broker);
    let uses = |kinds: &[BrokerKind]| {
        kinds.contains(&s.broker)
            || dead_letter_broker.is_some_and(|b| kinds.contains(&b))
            || route.publish_broker.is_some_and(|b| kinds.contains(&b))
    };
    if uses(&[BrokerKind::Nats, BrokerKind::Jetstream]) && config.brokers.nats.is_none() {
        return Err((key("source.broker"), "needs a `[brokers.nats]` table".into()));
    }
    if uses(&[BrokerKind::Rabbitmq]) && config.brokers.rabbitmq.is_none() {
        return Err((key("source.broker"), "needs a `[brokers.rabbitmq]` table".into()));
    }
    if uses(&[BrokerKind::Kafka]) && config.brokers.kafka.is_none() {
        return Err((key("source.broker"), "needs a `[brokers.kafka]` table".into()));
    }
    if s.broker == BrokerKind::Kafka {
        if s.topics.as_ref().is_none_or(|t| t.is_empty()) {
            return Err((key("source"), "a Kafka source needs `topics`".into()));
        }
        if !s.subject.is_empty() {
            return Err((
                key("source.subject"),
                "does not apply to Kafka: name the `topics`".into(),
            ));
        }
        if s.max_in_flight_per_partition == Some(0) {
            return Err((key("source.max_in_flight_per_partition"), "must be at least 1".into()));
        }
        if s.max_in_flight == Some(0) {
            return Err((key("source.max_in_flight"), "must be at least 1".into()));
        }
        if s.retry_topics == Some(true) {
            if route.ordering() != Ordering::None {
                return Err((
                    key("source.retry_topics"),
                    "needs `ordering = \"none\"`: records after a failing one overtake it while it waits in a retry topic".into(),
                ));
            }
            if s.topics.iter().flatten().any(|t| t.starts_with('^')) {
                return Err((
                    key("source.retry_topics"),
                    "needs topic names, not regexes (the retry topics are named after them)".into(),
                ));
            }
        }
    }
    if s.broker == BrokerKind::Rabbitmq {
        if s.queue.is_none() {
            return Err((key("source"), "a RabbitMQ source needs `queue`".into()));
        }
        if !s.subject.is_empty() {
            return Err((
                key("source.subject"),
                "does not apply to RabbitMQ: name the `queue`, and bind it to exchanges under [[brokers.rabbitmq.queues]]".into(),
            ));
        }
        if s.prefetch == Some(0) {
            return Err((key("source.prefetch"), "must be at least 1".into()));
        }
    } else if s.subject.is_empty() && s.broker != BrokerKind::Kafka {
        return Err((key("source.subject"), "is missing".into()));
    }
    if let Some(d) = &route.dead_letter {
        let dl_broker = d.broker.unwrap_or(s.broker);
        if d.exchange.is_some() && dl_broker != BrokerKind::Rabbitmq {
            return Err((
                key("dead_letter.exchange"),
                "only applies to RabbitMQ dead letters".into(),
            ));
        }
    }
    let only = |field: &str, set: bool, kind: &str| -> Result<(), Problem> {
        if set && s.broker.as_str() != kind {
            return Err((
                key(&format!("source.{field}")),
                format!("only applies to broker = \"{kind}\""),
            ));
        }
        Ok(())
    };
    only("queue_group", s.queue_group.is_some(), "nats")?;
    only("stream", s.stream.is_some(), "jetstream")?;
    only("consumer", s.consumer.is_some(), "jetstream")?;
    only("ack_wait", s.ack_wait.is_some(), "jetstream")?;
    only("max_deliver", s.max_deliver.is_some(), "jetstream")?;
    only("max_ack_pending", s.max_ack_pending.is_some(), "jetstream")?;
    only("queue", s.queue.is_some(), "rabbitmq")?;
    only("prefetch", s.prefetch.is_some(), "rabbitmq")?;
    only("retry_via", s.retry_via.is_some(), "rabbitmq")?;
    only("topics", s.topics.is_some(), "kafka")?;
    only("group", s.group.is_some(), "kafka")?;
    only("offset_reset", s.offset_reset.is_some(), "kafka")?;
    only("instance_id", s.instance_id.is_some(), "kafka")?;
    only("retry_topics", s.retry_topics.is_some(), "kafka")?;
    only("max_in_flight", s.max_in_flight.is_some(), "kafka")?;
    only(
        "max_in_flight_per_partition",
        s.max_in_flight_per_partition.is_some(),
        "kafka",
    )?;
    only("revoke_timeout", s.revoke_timeout.is_some(), "kafka")?;
    if s.broker == BrokerKind::Jetstream {
        if s.stream.is_none() {
            return Err((key("source"), "a JetStream source needs `stream`".into()));
        }
        if let Some(max) = s.max_deliver {
            if max > 0 && max < i64::from(route.retry.max_attempts) {
                return Err((
                    key("source.max_deliver"),
                    format!(
                        "is below retry.max_attempts ({}): JetStream would stop redelivering before sluice dead-letters",
                        route.retry.max_attempts
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn validate_route(route: &RouteConfig, key: &dyn Fn(&str) -> String) -> Result<(), Problem> {
    if !route.source.subject.is_empty() {
        SubjectPattern::parse(&route.source.subject).map_err(|e| (key("source.subject"), e.to_string()))?;
    }
    validate_subject(&route.dead_letter_subject()).map_err(|e| (key("dead_letter.subject"), e.to_string()))?;
    // Dead letters the route itself consumes would fail again, forever.
    let nats_family = |b: BrokerKind| matches!(b, BrokerKind::Nats | BrokerKind::Jetstream);
    let dead_letter_broker = route
        .dead_letter
        .as_ref()
        .and_then(|d| d.broker)
        .unwrap_or(route.source.broker);
    let same_broker = dead_letter_broker == route.source.broker
        || (nats_family(dead_letter_broker) && nats_family(route.source.broker));
    if same_broker && route.source.broker != BrokerKind::Rabbitmq && !route.source.subject.is_empty() {
        if let Ok(p) = SubjectPattern::parse(&route.source.subject) {
            if p.matches(&route.dead_letter_subject()) {
                return Err((
                    key("dead_letter.subject"),
                    format!(
                        "`{}` is matched by the route's own source `{}`: dead letters would be handled again, in a loop",
                        route.dead_letter_subject(),
                        route.source.subject
                    ),
                ));
            }
        }
    }
    if route.concurrency == 0 || route.concurrency > 10_000 {
        return Err((key("concurrency"), "must be between 1 and 10000".into()));
    }
    let retry = &route.retry;
    if retry.max_attempts == 0 {
        return Err((key("retry.max_attempts"), "must be at least 1".into()));
    }
    if !(retry.multiplier >= 1.0 && retry.multiplier.is_finite()) {
        return Err((key("retry.multiplier"), "must be a number >= 1".into()));
    }
    if retry.initial_backoff > retry.max_backoff {
        return Err((key("retry.initial_backoff"), "is larger than retry.max_backoff".into()));
    }
    Ok(())
}

const PLAIN_NAME: &str = "must be 1-200 of A-Z a-z 0-9 . _ -";

/// Route and queue names: they end up in subjects, metric labels and
/// `sluice-origin` headers, where other characters would need escaping.
pub(crate) fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_str(text, Path::new("conf/test.toml")).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let e = err("data_dir = \"x\"\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 3\n");
        assert!(e.starts_with("conf/test.toml:4:"), "{e}");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = err("[engine]\nmax_instances = \"many\"\n");
        assert!(e.starts_with("conf/test.toml:2:"), "{e}");
        assert!(e.contains("engine.max_instances"), "{e}");
    }

    #[test]
    fn missing_plugin_file_names_path_key() {
        let e = err("[plugins.p]\n# the file\npath = \"nope.wasm\"\n");
        assert!(e.starts_with("conf/test.toml:3: key `plugins.p.path`"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn empty_config_is_valid() {
        let c = parse_str("", Path::new("x/c.toml")).unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.data_dir, Path::new("x/.sluice"));
    }
}
