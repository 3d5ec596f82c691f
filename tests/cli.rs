//! The `sluice` command line: `invoke` and `check`, as a user runs them.

use serde_json::Value;
use sluice_tests::{plugin, sluice_bin};
use std::path::Path;
use std::process::{Command, Output};

fn sluice(args: &[&str]) -> Output {
    Command::new(sluice_bin())
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run sluice")
}

fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn invoke_order_processor_with_a_valid_payload_prints_ok_and_the_publish() {
    let wasm = plugin("order_processor");
    let out = sluice(&[
        "invoke",
        wasm.to_str().unwrap(),
        "--subject",
        "orders.created",
        "--header",
        "Idempotency-Key=k-1",
        "--payload",
        r#"{"order_id":"o-1","user_id":"u-1","amount_cents":1999,"event_type":"created"}"#,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = stdout_json(&out);
    assert_eq!(json["outcome"], "ok");
    let publishes = json["publishes"].as_array().unwrap();
    assert_eq!(publishes.len(), 1);
    assert_eq!(publishes[0]["subject"], "enriched.orders.created");
    let body: Value = serde_json::from_str(publishes[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(body["order_id"], "o-1");
    assert_eq!(body["amount"], "19.99");
    assert_eq!(json["plugin"]["name"], "order_processor");
    assert_eq!(json["plugin"]["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn invoke_order_processor_with_malformed_json_prints_a_permanent_failure() {
    let wasm = plugin("order_processor");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.json");
    std::fs::write(&file, "{\"order_id\": ").unwrap();
    let payload = format!("@{}", file.display());
    let out = sluice(&["invoke", wasm.to_str().unwrap(), "--payload", &payload]);
    assert_eq!(out.status.code(), Some(1), "a failed outcome exits 1");
    let json = stdout_json(&out);
    assert_eq!(json["outcome"], "failed");
    assert_eq!(json["kind"], "permanent");
    assert!(json["reason"].as_str().unwrap().contains("JSON"), "{json}");
    assert!(json["publishes"].as_array().unwrap().is_empty());
}

#[test]
fn invoke_pricing_prints_the_reply() {
    let wasm = plugin("pricing");
    for (product, price) in [("widget", 999), ("gadget", 2499), ("other", 100)] {
        let out = sluice(&[
            "invoke",
            wasm.to_str().unwrap(),
            "--payload",
            product,
            "--reply-to",
            "_INBOX.1",
        ]);
        assert!(out.status.success());
        let json = stdout_json(&out);
        let reply: Value = serde_json::from_str(json["reply"]["payload"].as_str().unwrap()).unwrap();
        assert_eq!(reply, serde_json::json!({ "price_cents": price }), "{product}");
    }
}

/// A component written for `wasi:messaging` only (no sluice SDK): found to
/// be one at load time, its sends buffered and shown, its content type and
/// metadata carried as headers, its reply kept, its error a retryable
/// failure, and a hoard of host-held messages cut by the host's bound.
#[test]
fn invoke_runs_a_plain_wasi_messaging_component_unchanged() {
    let wasm = plugin("fixture_messaging");
    let wasm = wasm.to_str().unwrap();
    let out = sluice(&[
        "invoke",
        wasm,
        "--subject",
        "orders.a",
        "--payload",
        "hi",
        "--reply-to",
        "_INBOX.x",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = stdout_json(&out);
    assert_eq!(
        json["plugin"]["world"],
        "wasi:messaging/messaging-request-reply@0.2.0-draft"
    );
    assert_eq!(json["plugin"]["language"], "rust");
    assert_eq!(
        json["publishes"],
        serde_json::json!([{
            "subject": "wm.out",
            "headers": [
                { "name": "content-type", "value": "text/plain" },
                { "name": "source-topic", "value": "orders.a" },
            ],
            "payload": "handled:hi",
        }])
    );
    assert_eq!(json["reply"]["payload"], "reply:hi");

    let out = sluice(&["invoke", wasm, "--payload", "hi", "--header", "mode=fail"]);
    assert_eq!(out.status.code(), Some(1));
    let json = stdout_json(&out);
    assert_eq!(
        (json["kind"].as_str(), json["reason"].as_str()),
        (Some("retryable"), Some("asked to fail"))
    );
    assert_eq!(
        json["publishes"],
        serde_json::json!([]),
        "a failed handler's sends are dropped"
    );

    let out = sluice(&["invoke", wasm, "--header", "mode=hoard", "--max-memory-mb", "16"]);
    let json = stdout_json(&out);
    assert_eq!(json["kind"], "trap", "{json}");
    assert!(
        json["reason"].as_str().unwrap().contains("32 MiB of message data"),
        "{json}"
    );
}

/// A `wasmcloud:messaging` component: its publish buffered, its publish to
/// the request's `reply-to` made the reply.
#[test]
fn invoke_runs_a_plain_wasmcloud_messaging_component_unchanged() {
    let wasm = plugin("fixture_wasmcloud");
    let out = sluice(&[
        "invoke",
        wasm.to_str().unwrap(),
        "--payload",
        "hi",
        "--reply-to",
        "_INBOX.x",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = stdout_json(&out);
    assert_eq!(json["plugin"]["world"], "wasmcloud:messaging/handler@0.2.0");
    assert_eq!(
        json["publishes"],
        serde_json::json!([{ "subject": "wc.out", "headers": [], "payload": "handled:hi" }])
    );
    assert_eq!(json["reply"]["payload"], "reply:hi");
}

#[test]
fn invoke_refuses_a_file_that_is_not_a_component() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("module.wasm");
    std::fs::write(&file, b"\0asm\x01\0\0\0").unwrap();
    let out = sluice(&["invoke", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("core WebAssembly module, not a component"), "{err}");
}

fn check(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, config).unwrap();
    let out = sluice(&["check", "--config", path.to_str().unwrap()]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn good_config() -> String {
    format!(
        "data_dir = \"data\"\n\
         [plugins.orders]\n\
         path = \"{}\"\n\
         publish = [\"enriched.>\"]\n\
         \n\
         [[routes]]\n\
         name = \"orders\"\n\
         plugin = \"orders\"\n\
         source = {{ subject = \"orders.>\" }}\n",
        plugin("order_processor").display()
    )
}

#[test]
fn check_accepts_a_good_config_and_loads_its_plugins() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, text) = check(dir.path(), &good_config());
    assert!(ok, "{text}");
    assert!(text.contains("ok (1 routes, 1 plugins)"), "{text}");
}

#[test]
fn check_names_file_line_and_key_of_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config().replace("plugin = \"orders\"\n", "plugin = \"orders\"\nconcurency = 4\n");
    let (ok, text) = check(dir.path(), &config);
    assert!(!ok);
    let file = dir.path().join("sluice.toml");
    assert!(text.contains(&format!("{}:9:", file.display())), "{text}");
    assert!(text.contains("concurency"), "{text}");
}

#[test]
fn check_names_file_line_and_key_of_a_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}concurrency = \"four\"\n", good_config());
    let (ok, text) = check(dir.path(), &config);
    assert!(!ok);
    assert!(text.contains("sluice.toml:10:"), "{text}");
    assert!(text.contains("routes.0.concurrency"), "{text}");
}

#[test]
fn check_names_file_line_and_key_of_a_missing_plugin_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config().replace(plugin("order_processor").to_str().unwrap(), "missing.wasm");
    let (ok, text) = check(dir.path(), &config);
    assert!(!ok);
    assert!(text.contains("sluice.toml:3: key `plugins.orders.path`"), "{text}");
    assert!(text.contains("does not exist"), "{text}");
}

#[test]
fn check_refuses_a_route_naming_an_unknown_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config().replace("plugin = \"orders\"", "plugin = \"ordrs\"");
    let (ok, text) = check(dir.path(), &config);
    assert!(!ok);
    assert!(text.contains("sluice.toml:8: key `routes.0.plugin`"), "{text}");
}

#[test]
fn check_refuses_a_plugin_that_is_not_a_component_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("fake.wasm");
    std::fs::write(&fake, b"not wasm at all").unwrap();
    let config = good_config().replace(plugin("order_processor").to_str().unwrap(), fake.to_str().unwrap());
    let (ok, text) = check(dir.path(), &config);
    assert!(!ok);
    assert!(text.contains("is not WebAssembly"), "{text}");
}

#[test]
fn the_shipped_configs_are_valid() {
    for name in ["sluice.toml", "nats.toml", "rabbitmq.toml", "kafka.toml"] {
        let config = sluice_tests::workspace().join("config").join(name);
        let out = Command::new(sluice_bin())
            .args(["check", "--config", config.to_str().unwrap()])
            .env("SLUICE_PLUGIN_DIR", plugin("noop").parent().unwrap())
            .env("SLUICE_DATA_DIR", tempfile::tempdir().unwrap().path())
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// `sluice invoke` of `wasm` with `payload`, its compiled code kept in
/// `cache` (a Python plugin compiles once, not once per call).
fn invoke_cached(wasm: &Path, cache: &Path, payload: &str) -> Value {
    let out = sluice(&[
        "invoke",
        wasm.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--subject",
        "orders.created",
        "--header",
        "Idempotency-Key=k-1",
        "--payload",
        payload,
    ]);
    assert!(
        matches!(out.status.code(), Some(0 | 1)),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout_json(&out)
}

/// What two implementations must agree on: the outcome and its kind, and
/// each publish's subject, headers and JSON body (field order aside).
fn observable(result: &Value) -> Value {
    let publishes: Vec<Value> = result["publishes"]
        .as_array()
        .expect("publishes")
        .iter()
        .map(|p| {
            let body = p["payload"].as_str().expect("text payload");
            serde_json::json!({
                "subject": p["subject"],
                "headers": p["headers"],
                "body": serde_json::from_str::<Value>(body).unwrap_or_else(|_| Value::from(body)),
            })
        })
        .collect();
    serde_json::json!({ "outcome": result["outcome"], "kind": result["kind"], "publishes": publishes })
}

#[test]
fn the_rust_python_and_javascript_order_processors_give_the_same_outcome_for_every_input() {
    let cache = tempfile::tempdir().unwrap();
    let order = |amount: &str, event: &str| {
        format!(r#"{{"order_id":"o-1","user_id":"u-1","amount_cents":{amount},"event_type":{event}}}"#)
    };
    let inputs = [
        order("1999", r#""created""#),
        order("5", r#""item_added""#),
        order("100000", r#""shipped""#),
        order("-1999", r#""refunded""#),
        order("0", r#""created""#),
        r#"{"order_id": "#.to_owned(),
        "not json at all".to_owned(),
        r#"{"order_id":"o-1","user_id":"u-1","event_type":"created"}"#.to_owned(),
        order(r#""12""#, r#""created""#),
        order("true", r#""created""#),
        order("1.5", r#""created""#),
        order("1", r#""a.b""#),
        order("1", r#""""#),
        order("1", r#""orders >""#),
        order("1", "7"),
        order("-0", r#""created""#),
        r#"["o-1","u-1",5,"created"]"#.to_owned(),
        r#"["o-1","u-1",5]"#.to_owned(),
        r#"["o-1","u-1",5,"created","more"]"#.to_owned(),
        // A lone surrogate escape is no character; a pair is one.
        r#"{"order_id":"\ud800","user_id":"u-1","amount_cents":1,"event_type":"created"}"#.to_owned(),
        r#"{"order_id":"\ud83d\ude00 é \u0001","user_id":"u-1","amount_cents":1,"event_type":"created"}"#.to_owned(),
    ];
    let rust = plugin("order_processor");
    let others = [
        ("python", plugin("order_processor_py")),
        ("javascript", plugin("order_processor_js")),
    ];
    let mut outcomes = std::collections::BTreeSet::new();
    for input in &inputs {
        let r = invoke_cached(&rust, cache.path(), input);
        assert_eq!(r["plugin"]["language"], "rust");
        for (language, wasm) in &others {
            let o = invoke_cached(wasm, cache.path(), input);
            assert_eq!(o["plugin"]["language"], *language);
            // Built with the SDK's batch export too (a route's batches in one call).
            assert_eq!(o["plugin"]["world"], "sluice:plugin/batch-handler@0.1.1");
            assert_eq!(
                observable(&r),
                observable(&o),
                "input {input}:\nRust {r}\n{language} {o}"
            );
        }
        outcomes.insert(format!("{}/{}", r["outcome"], r["kind"]));
    }
    // Both kinds of answer were exercised.
    assert_eq!(outcomes.len(), 2, "{outcomes:?}");
    // A repeated field: Python can see it (and refuses it, as serde does);
    // JSON.parse cannot (the README says so).
    let repeated =
        r#"{"order_id":"o-1","order_id":"o-2","user_id":"u-1","amount_cents":1,"event_type":"created","x":1,"x":2}"#;
    let (r, p) = (
        invoke_cached(&rust, cache.path(), repeated),
        invoke_cached(&others[0].1, cache.path(), repeated),
    );
    assert_eq!(observable(&r), observable(&p), "Rust {r}\nPython {p}");
    assert_eq!(r["kind"], "permanent");
}

/// The Kubernetes manifests beside the compose file: no cluster runs here,
/// so they are parsed, their wiring checked, and the config they carry run
/// through `sluice check`.
#[test]
fn the_kubernetes_manifests_parse_and_carry_a_valid_config() {
    use yaml_rust2::{Yaml, YamlLoader};
    let dir = sluice_tests::workspace().join("k8s");
    let docs: Vec<Yaml> = ["sluice.yaml", "keda-scaledobject.yaml"]
        .iter()
        .flat_map(|f| {
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"))
        })
        .collect();
    let of_kind = |kind: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    for d in &docs {
        assert!(
            d["apiVersion"].as_str().is_some() && d["metadata"]["name"].as_str().is_some(),
            "{d:?}"
        );
    }

    let deployment = of_kind("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"].as_str(), Some("/readyz"));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"].as_str(), Some("/healthz"));
    let selector = &deployment["spec"]["selector"]["matchLabels"];
    assert_eq!(&deployment["spec"]["template"]["metadata"]["labels"], selector);
    assert_eq!(
        &of_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        selector
    );
    assert_eq!(
        of_kind("ScaledObject")["spec"]["scaleTargetRef"]["name"].as_str(),
        deployment["metadata"]["name"].as_str()
    );
    assert!(of_kind("ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
        .as_str()
        .is_some_and(|q| q.contains("sluice_route_lag")));
    // Every volume mounted is declared, the config one from the ConfigMap.
    let volumes: Vec<&str> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for m in container["volumeMounts"].as_vec().unwrap() {
        assert!(volumes.contains(&m["name"].as_str().unwrap()), "{m:?}");
    }

    // The config: valid, and drained within the pod's grace period.
    let config_map = of_kind("ConfigMap");
    let text = config_map["data"]["sluice.toml"].as_str().unwrap();
    let grace: u64 = {
        let table: toml::Table = toml::from_str(text).unwrap();
        let g = table["shutdown_grace"].as_str().unwrap();
        g.strip_suffix('s').unwrap().parse().unwrap()
    };
    assert!(pod["terminationGracePeriodSeconds"].as_i64().unwrap() as u64 > grace);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(sluice_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .env("SLUICE_PLUGIN_DIR", plugin("noop").parent().unwrap())
        .env("POD_NAME", "sluice-7d9f-abcde")
        .env("SLUICE_ADMIN_TOKEN", "0123456789abcdef0123")
        .env("NATS_URL", "nats://127.0.0.1:4222")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
