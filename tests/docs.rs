//! The reference in `docs/` and the Grafana dashboard, checked against the running code: every
//! metric documented is exported and every exported one documented, every metric the dashboard
//! queries exists, every key the config and policy loaders accept is documented, the closing-code
//! table matches the code's, and the monitoring fields are the ones a real message carries.

mod support;

use std::collections::BTreeSet;
use std::path::Path;

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqtt_warden::config::WardenConfig;
use mqtt_warden::policy::load::parse_policy;
use support::{mon, sha256_token, v4, Broker, Warden};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `warden_...` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(start) = rest.find("warden_") {
        let tail = &rest[start..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        // `mqtt_warden_...` or `wt_warden` would be another word.
        let preceded = rest[..start]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !preceded {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The sample names of a scrape, in the Prometheus text format or OpenMetrics: comment lines
/// skipped, labels and values stripped.
fn scraped_samples(body: &str) -> BTreeSet<String> {
    body.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// Whether sample `sample` belongs to metric `metric` (a histogram's `_bucket`, `_sum` and
/// `_count`, an OpenMetrics counter's `_total` and `_created`).
fn belongs(sample: &str, metric: &str) -> bool {
    let base = metric.strip_suffix("_total").unwrap_or(metric);
    sample == metric
        || ["_bucket", "_sum", "_count", "_total", "_created"]
            .iter()
            .any(|suffix| sample.strip_prefix(base) == Some(suffix))
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("admin endpoint");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("request sent");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response read");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

/// An org with room for one connection, and quickstart.
fn policy() -> String {
    format!(
        "orgs:\n  org1:\n    limits: {{ max_connections: 1 }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/dev1: {{ token: \"{}\" }}\n      sensor/dev2: {{ token: \"{}\" }}\n  quickstart: {{ quickstart: true }}\n",
        sha256_token("dev1-token"),
        sha256_token("dev2-token"),
    )
}

/// The documented metric names: the first column of docs/metrics.md's table.
fn documented_metrics() -> BTreeSet<String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|line| line.strip_prefix("| `warden_"))
        .filter_map(|rest| rest.split('`').next())
        .map(|name| format!("warden_{name}"))
        .collect()
}

#[tokio::test]
async fn metrics_docs_dashboard_and_monitoring_fields_match_a_live_proxy() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(&broker, &policy(), "admin: { bind: \"127.0.0.1:0\" }\n").await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    warden.wait_monitor_connected().await;
    let mut watcher = v4::connect(broker.addr().parse().unwrap(), "docs-watcher", None, None)
        .await
        .expect("the broker accepts the watcher");
    watcher.subscribe("org1/iot-2/#", QoS::AtMostOnce).await;

    // Something in every labelled series: a connection, a refused CONNECT that hits a limit
    // (173), and a refusal that keeps the connection (quickstart has no commands).
    let device = v4::org1_device(warden.addr, "dev1").await;
    device
        .client
        .publish("iot-2/evt/e/fmt/json", QoS::AtLeastOnce, false, "{}")
        .await
        .expect("publish queued");
    let refused = v4::connect(
        warden.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token"),
    )
    .await;
    assert!(refused.is_err(), "the org's quota is full");
    let mut quickstart = v4::connect(warden.addr, "d:quickstart:thermo:q1", None, None)
        .await
        .expect("quickstart connects");
    let codes = quickstart
        .subscribe_codes("iot-2/cmd/+/fmt/+", QoS::AtMostOnce)
        .await;
    assert!(matches!(
        codes.as_slice(),
        [rumqttc::SubscribeReasonCode::Failure]
    ));

    // An HTTP messaging request on the MQTT port (quickstart needs no credentials).
    let mut http = TcpStream::connect(warden.addr).await.expect("the proxy");
    http.write_all(
        b"POST /api/v0002/device/types/thermo/devices/q2/events/e HTTP/1.1\r\nHost: quickstart.messaging.x\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await
    .expect("request sent");
    let mut answer = String::new();
    http.read_to_string(&mut answer).await.expect("answer read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // The monitoring message of a real connection has exactly the documented fields.
    let connect = loop {
        let publish = watcher.next_publish().await;
        if !publish.payload.is_empty() {
            let message = mon::parse(&publish.payload);
            if message["ClientID"] == "d:org1:sensor:dev1" && message["Action"] == "Connect" {
                break message;
            }
        }
    };
    let fields: BTreeSet<String> = connect
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect();
    let monitoring = read("docs/monitoring.md");
    let documented_fields: BTreeSet<String> = monitoring
        .split("## Fields")
        .nth(1)
        .expect("docs/monitoring.md has a Fields section")
        .lines()
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .map(str::to_owned)
        .collect();
    assert_eq!(fields.len(), 16);
    assert_eq!(fields, documented_fields, "docs/monitoring.md fields");

    let body = http_get(admin, "/metrics").await;
    let samples = scraped_samples(&body);
    let documented = documented_metrics();
    assert!(documented.len() >= 15, "{documented:?}");
    for metric in &documented {
        assert!(
            samples.iter().any(|sample| belongs(sample, metric)),
            "docs/metrics.md names {metric}, which /metrics does not export:\n{body}"
        );
    }
    for sample in &samples {
        assert!(
            documented.iter().any(|metric| belongs(sample, metric)),
            "/metrics exports {sample}, which docs/metrics.md does not document"
        );
    }

    let dashboard = read("examples/grafana-dashboard.json");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    let queried = metric_names(&dashboard);
    assert!(queried.len() >= 10, "{queried:?}");
    for metric in &queried {
        assert!(
            samples.contains(metric),
            "examples/grafana-dashboard.json queries {metric}, which /metrics does not export"
        );
    }
    device.disconnect().await;
}

/// The keys a section accepts, from the loader's own answer to an unknown key there.
fn accepted_keys(error: &str) -> Vec<String> {
    let line = error
        .lines()
        .find(|line| line.contains("zz_probe"))
        .unwrap_or_else(|| panic!("no error about the probe key in:\n{error}"));
    let expected = line
        .split_once("expected one of ")
        .or_else(|| line.split_once("expected "))
        .map(|(_, list)| list)
        .unwrap_or_else(|| panic!("no list of keys in {line}"));
    expected
        .split(['`', ','])
        .map(str::trim)
        .filter(|key| !key.is_empty() && *key != "or")
        .map(str::to_owned)
        .collect()
}

/// Where the probe key goes in a template.
const PROBE: &str = "@PROBE@";

/// Inserts `zz_probe: 1` into `template` at [`PROBE`] and returns the error text.
fn config_probe(template: &str) -> String {
    std::env::set_var("WARDEN_DOCS_PROBE_SECRET", "x");
    let text = template.replace(PROBE, "zz_probe: 1");
    match WardenConfig::from_yaml(&text, Path::new("/tmp/warden.yaml")) {
        Ok(_) => panic!("a probe key was accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

fn policy_probe(template: &str) -> String {
    let text = template.replace(PROBE, "zz_probe: 1");
    match parse_policy(&text, Path::new("policy.yaml")) {
        Ok(_) => panic!("a probe key was accepted:\n{text}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn every_key_the_loaders_accept_is_in_docs_configuration() {
    let docs = read("docs/configuration.md");
    let mut missing = Vec::new();
    let mut check = |prefix: &str, error: String| {
        let keys = accepted_keys(&error);
        assert!(!keys.is_empty(), "{error}");
        for key in keys {
            let name = format!("{prefix}{key}");
            if !docs.contains(&format!("`{name}`")) && !docs.contains(&format!("`{name}:`")) {
                missing.push(name);
            }
        }
    };
    let listener = "listeners:\n  - bind: \"127.0.0.1:0\"\n";
    let upstream = "upstream:\n  address: \"h:1\"\n";
    let policies = "policies: p\n";
    check(
        "",
        config_probe(&format!("{listener}{upstream}{policies}{PROBE}\n")),
    );
    check(
        "listeners[].",
        config_probe(&format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\n    {PROBE}\n{upstream}{policies}"
        )),
    );
    check(
        "listeners[].tls.",
        config_probe(&format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\n    tls: {{ cert: c, key: k, {PROBE} }}\n{upstream}{policies}"
        )),
    );
    check(
        "upstream.",
        config_probe(&format!(
            "{listener}upstream:\n  address: \"h:1\"\n  {PROBE}\n{policies}"
        )),
    );
    check(
        "upstream.tls.",
        config_probe(&format!(
            "{listener}upstream:\n  address: \"h:1\"\n  tls: {{ ca: c, {PROBE} }}\n{policies}"
        )),
    );
    for (section, body) in [
        ("admin", format!("{{ bind: \"127.0.0.1:0\", {PROBE} }}")),
        ("telemetry", format!("{{ {PROBE} }}")),
        ("limits", format!("{{ {PROBE} }}")),
        (
            "coordination",
            format!("{{ redis: \"redis://h:1\", {PROBE} }}"),
        ),
    ] {
        check(
            &format!("{section}."),
            config_probe(&format!(
                "{listener}{upstream}{policies}{section}: {body}\n"
            )),
        );
    }

    let org = |inner: &str| {
        format!("orgs:\n  o1:\n    device_types: {{ t: {{}}, g: {{ class: gateway }} }}\n{inner}")
    };
    let hash = sha256_token("x");
    check("", policy_probe(&format!("{PROBE}\n")));
    check("", policy_probe(&org(&format!("    {PROBE}\n"))));
    check(
        "limits.",
        policy_probe(&org(&format!("    limits: {{ {PROBE} }}\n"))),
    );
    for per_class in ["max_subscriptions", "publish_rate", "byte_rate"] {
        check(
            &format!("limits.{per_class}."),
            policy_probe(&org(&format!(
                "    limits: {{ {per_class}: {{ {PROBE} }} }}\n"
            ))),
        );
    }
    check(
        "",
        policy_probe(&format!(
            "orgs:\n  o1:\n    device_types: {{ t: {{ {PROBE} }} }}\n"
        )),
    );
    check(
        "",
        policy_probe(&org(&format!(
            "    devices:\n      t/d1: {{ token: \"{hash}\", {PROBE} }}\n"
        ))),
    );
    check(
        "",
        policy_probe(&org(&format!(
            "    api_keys:\n      a-o1-key: {{ token: \"{hash}\", {PROBE} }}\n"
        ))),
    );
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not document {missing:?}"
    );
}

#[test]
fn closing_code_docs_match_the_table() {
    let docs = read("docs/closing-codes.md");
    for (cause, number, reason) in mqtt_warden::wiotp::codes::TABLE {
        let prefix = format!("| {number} | {reason} |");
        let line = docs
            .lines()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("docs/closing-codes.md has no row {prefix}"));
        let answers = cause.answers();
        for code in [answers.v5_connack, answers.v5_disconnect]
            .into_iter()
            .flatten()
        {
            let hex = format!("0x{code:02X}");
            assert!(line.contains(&hex), "{hex} missing in {line}");
        }
        if let mqtt_warden::refusal::V3Answer::Connack(rc) = answers.v3 {
            assert!(
                line.contains(&format!("CONNACK {rc}")),
                "CONNACK {rc} missing in {line}"
            );
        }
    }
}

#[test]
fn docs_link_only_inside_the_repository() {
    for entry in std::fs::read_dir(Path::new(ROOT).join("docs")).expect("docs/") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("readable");
        for link in text.split("](").skip(1) {
            let target = link.split(')').next().unwrap_or_default();
            assert!(
                !target.contains("://"),
                "{}: link outside the repository: {target}",
                path.display()
            );
            let file = target.split('#').next().unwrap_or_default();
            if !file.is_empty() {
                assert!(
                    path.parent().expect("folder").join(file).exists(),
                    "{}: broken link {target}",
                    path.display()
                );
            }
        }
    }
}
