//! Property tests of the parsers and state machines that take input from
//! producers, plugins and operators, against small reference models. Kept
//! to a few seconds: a bounded number of cases each.

use crate::brokers::embedded::{parse_origin, EmbeddedBroker};
use crate::brokers::Source;
use crate::message::Outbound;
use crate::subject::{validate_subject, SubjectPattern};
use proptest::prelude::*;
use std::time::Duration;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// The reference: a pattern matches a subject token by token; `*` is one
/// token, a final `>` one or more.
fn model_matches(pattern: &[&str], subject: &[&str]) -> bool {
    match (pattern.split_first(), subject.split_first()) {
        (Some((&">", [])), Some(_)) => true,
        (Some((&"*", p)), Some((_, s))) => model_matches(p, s),
        (Some((t, p)), Some((u, s))) => t == u && model_matches(p, s),
        (None, None) => true,
        _ => false,
    }
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        "[a-c?&=%-]{1,3}".prop_map(|s| s),
    ]
}

fn subject() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(token(), 1..5)
}

fn pattern() -> impl Strategy<Value = Vec<String>> {
    (
        prop::collection::vec(prop_oneof![token(), Just("*".to_owned())], 0..4),
        any::<bool>(),
    )
        .prop_filter_map("a pattern has a token", |(mut tokens, tail)| {
            if tail {
                tokens.push(">".to_owned());
            }
            (!tokens.is_empty()).then_some(tokens)
        })
}

fn plain_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._-]{1,20}"
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn subject_patterns_match_like_the_model(p in pattern(), s in subject()) {
        let text = p.join(".");
        let parsed = SubjectPattern::parse(&text).expect("generated patterns are valid");
        let subject = s.join(".");
        prop_assert!(validate_subject(&subject).is_ok());
        let p: Vec<&str> = p.iter().map(String::as_str).collect();
        let s: Vec<&str> = s.iter().map(String::as_str).collect();
        prop_assert_eq!(parsed.matches(&subject), model_matches(&p, &s), "{} vs {}", text, subject);
    }

    #[test]
    fn subject_parsing_never_panics(text in "\\PC{0,40}") {
        let _ = SubjectPattern::parse(&text).map(|p| p.matches(&text));
        let _ = validate_subject(&text);
        let _ = crate::headers::check_subject(&text);
    }

    #[test]
    fn embedded_origins_round_trip(s in subject(), queue in plain_name(), seq in any::<u64>()) {
        let subject = s.join(".");
        let origin = crate::brokers::embedded::origin(&subject, &queue, seq);
        prop_assert_eq!(parse_origin(&origin), Some((subject.as_str(), queue.as_str())));
        prop_assert_eq!(crate::brokers::origin_subject(&origin), Some(subject.as_str()));
    }

    #[test]
    fn rabbitmq_origins_round_trip(queue in plain_name(), key in "[a-z.#*?&=]{0,20}", exchange in "[a-z&=?]{0,10}") {
        let origin = format!("rabbitmq://{queue}?routing_key={key}&exchange={exchange}");
        prop_assert_eq!(
            crate::brokers::rabbitmq::parse_origin(&origin),
            Some((queue.as_str(), key.as_str()))
        );
    }

    #[test]
    fn config_parsing_never_panics(text in "(\\PC|\n){0,200}") {
        let _ = crate::config::parse_str(&text, std::path::Path::new("fuzz.toml"));
    }

    #[test]
    fn config_shaped_input_never_panics(
        key in prop_oneof![Just("timeout"), Just("max_memory_mb"), Just("concurrency"), Just("listen"), Just("token")],
        value in prop_oneof![
            "\"[0-9]{1,30}(ms|s|h|years)\"",
            "-?[0-9]{1,25}",
            "\"\\PC{0,20}\"",
            Just("[]".to_owned()),
        ],
    ) {
        let text = format!("[admin]\n{key} = {value}\n[plugins.p]\npath = \"p.wasm\"\n{key} = {value}\n[[routes]]\nname = \"r\"\nplugin = \"p\"\n{key} = {value}\n");
        let _ = crate::config::parse_str(&text, std::path::Path::new("fuzz.toml"));
    }

    #[test]
    fn plugin_headers_either_pass_every_rule_or_are_refused(
        name in prop_oneof!["[!-~]{0,8}", "\\PC{0,8}", "[a-z :]{0,8}"],
        value in "(\\PC|\r|\n|\0){0,8}",
    ) {
        let headers = [crate::message::Header::new(name.clone(), value.clone())];
        if crate::headers::check_plugin_headers(&headers).is_ok() {
            // What the host accepts, NATS accepts.
            prop_assert!(crate::brokers::nats::to_header_map(&headers).is_ok());
        }
    }
}

#[derive(Debug, Clone)]
enum Op {
    /// Publish this payload, with this dedup id.
    Publish(u8, Option<u8>),
    /// Take one and ack it.
    Ack,
    /// Take one and have it redelivered at once.
    Retry,
    /// Take one and drop it unsettled (handed back).
    Drop,
    /// Close and open the file again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (any::<u8>(), prop::option::of(0u8..4)).prop_map(|(p, d)| Op::Publish(p, d)),
        2 => Just(Op::Ack),
        1 => Just(Op::Retry),
        1 => Just(Op::Drop),
        1 => Just(Op::Reopen),
    ]
}

fn open(path: &std::path::Path) -> EmbeddedBroker {
    let broker = EmbeddedBroker::open(path, Duration::from_secs(3600)).expect("open");
    broker.declare_queue("q", vec![SubjectPattern::parse("s").expect("pattern")], None);
    broker
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..config() })]

    /// The embedded store holds exactly what a multiset model says, across
    /// acks, retries, hand-backs, duplicates and reopening the file.
    #[test]
    fn embedded_store_keeps_what_the_model_keeps(ops in prop::collection::vec(op(), 1..25)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("e.redb");
        rt.block_on(async {
            let mut broker = open(&path);
            let mut model: Vec<u8> = Vec::new();
            let mut seen_ids = std::collections::BTreeSet::new();
            for op in ops {
                match op {
                    Op::Publish(payload, id) => {
                        let mut headers = Vec::new();
                        if let Some(id) = id {
                            headers.push(crate::message::Header::new(crate::message::DEDUP_HEADER, id.to_string()));
                        }
                        broker.publish(vec![Outbound { subject: "s".into(), headers, payload: vec![payload] }]).await.expect("publish");
                        if id.is_none_or(|id| seen_ids.insert(id)) {
                            model.push(payload);
                        }
                    }
                    Op::Ack | Op::Retry | Op::Drop => {
                        if model.is_empty() {
                            continue;
                        }
                        let source = broker.source("q");
                        let delivery = tokio::time::timeout(Duration::from_secs(5), source.next())
                            .await
                            .expect("a message is ready")
                            .expect("delivery");
                        let payload = delivery.message().payload[0];
                        prop_assert!(model.contains(&payload));
                        match op {
                            Op::Ack => {
                                delivery.ack().await.expect("ack");
                                // The deletion is queued for the next commit.
                                broker.sync().await.expect("sync");
                                let at = model.iter().position(|p| *p == payload).expect("in model");
                                model.remove(at);
                            }
                            Op::Retry => delivery.retry(Duration::ZERO).await.expect("retry"),
                            _ => drop(delivery),
                        }
                    }
                    Op::Reopen => {
                        broker.close();
                        drop(broker);
                        broker = open(&path);
                    }
                }
                let mut held: Vec<u8> = broker.peek("q", 1000).expect("peek").into_iter().map(|(_, s)| s.payload[0]).collect();
                held.sort_unstable();
                let mut want = model.clone();
                want.sort_unstable();
                prop_assert_eq!(held, want);
            }
            broker.close();
            Ok(())
        })?;
    }
}
