//! The README's examples, run as written against a real proxy with the example policy, so the
//! README cannot drift from the product: the mosquitto_sub/mosquitto_pub session, the Python SDK
//! device, the `curl` request to the HTTP messaging API, the `warden.yaml` reference with `check`,
//! and `hash-token`.
//!
//! The proxy listens on 127.0.0.2 as in the README, on a free port: the only change made to a
//! snippet is its port (`-p PORT` for the CLIs, the SDK client's `port` attribute).

mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use rumqttc::QoS;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use support::{mon, python, v4, Broker, Warden, WAIT};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).expect("README.md")
}

/// The fenced code blocks of `markdown` whose info string is `lang`, in order.
fn blocks(markdown: &str, lang: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) if info.trim() == lang => current = Some(String::new()),
            (Some(block), Some(_)) => {
                out.push(std::mem::take(block));
                current = None;
            }
            (Some(block), None) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    out
}

/// The one block of `lang` that contains `marker`.
fn block_with(lang: &str, marker: &str) -> String {
    let found: Vec<_> = blocks(&readme(), lang)
        .into_iter()
        .filter(|block| block.contains(marker))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "README.md has one ```{lang} block with {marker:?}"
    );
    found.into_iter().next().unwrap_or_default()
}

/// The shell commands of a block: comments dropped, `\` continuations joined.
fn commands(block: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in block.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
            }
            None => {
                pending.push_str(line);
                out.push(std::mem::take(&mut pending));
            }
        }
    }
    out
}

/// The example policy, as scripts/run-example.sh runs it.
fn example_policy() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("policies/example.yaml")).expect("example policy")
}

/// A proxy on 127.0.0.2 (the README's address), on a free port, with the example policy.
async fn readme_proxy(broker: &Broker) -> Warden {
    Warden::start_listeners(broker, &example_policy(), "  - bind: \"127.0.0.2:0\"", "").await
}

/// An application of the example policy watching dev001's events and status.
async fn watcher(warden: &Warden) -> v4::Client {
    let mut app = v4::connect(
        warden.addr,
        "a:myorg1:readme-test",
        Some("a-myorg1-k7x2p9q4zz"),
        Some("app-secret-token"),
    )
    .await
    .expect("the example application connects");
    app.subscribe("iot-2/type/sensor/id/dev001/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    app.subscribe("iot-2/type/sensor/id/dev001/mon", QoS::AtLeastOnce)
        .await;
    app
}

#[tokio::test]
async fn readme_mosquitto_commands_deliver_the_event_and_the_status() {
    let block = block_with("sh", "mosquitto_sub");
    let commands = commands(&block);
    assert_eq!(commands.len(), 2, "{commands:?}");
    let (sub, publish) = (&commands[0], &commands[1]);
    assert!(sub.starts_with("mosquitto_sub -h 127.0.0.2 "), "{sub}");
    assert!(
        publish.starts_with("mosquitto_pub -h 127.0.0.2 "),
        "{publish}"
    );

    let mut broker = Broker::start_with("log_type subscribe").await;
    let warden = readme_proxy(&broker).await;
    let port = format!("-h 127.0.0.2 -p {}", warden.addr.port());
    let mut subscriber = Command::new("sh")
        .arg("-c")
        .arg(sub.replacen("-h 127.0.0.2", &port, 1))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("sh runs mosquitto_sub");
    // Both subscriptions reach the broker before the device publishes.
    tokio::time::timeout(WAIT, async {
        let mut pending = vec![
            "myorg1/iot-2/type/+/id/+/evt/+/fmt/+",
            "myorg1/iot-2/type/+/id/+/mon",
        ];
        while !pending.is_empty() {
            let line = broker.log.recv().await.expect("the broker logs");
            pending.retain(|filter| !line.ends_with(filter));
        }
    })
    .await
    .expect("mosquitto_sub subscribes through the proxy");

    let status = Command::new("sh")
        .arg("-c")
        .arg(publish.replacen("-h 127.0.0.2", &port, 1))
        .status()
        .await
        .expect("sh runs mosquitto_pub");
    assert!(status.success(), "mosquitto_pub succeeds");

    let mut lines = BufReader::new(subscriber.stdout.take().expect("stdout piped")).lines();
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut event = false;
        let mut connect = false;
        while !(event && connect) {
            let line = lines
                .next_line()
                .await
                .expect("mosquitto_sub prints")
                .unwrap_or_else(|| panic!("mosquitto_sub ended: {seen:?}"));
            event |=
                line == "iot-2/type/sensor/id/dev001/evt/temperature/fmt/json {\"celsius\": 21.5}";
            connect |= line.starts_with("iot-2/type/sensor/id/dev001/mon {")
                && line.contains("\"Action\":\"Connect\"");
            seen.push(line);
        }
    })
    .await
    .expect("the watcher sees the event and the device's status");
}

#[tokio::test]
async fn readme_curl_example_publishes_the_event_over_http() {
    let block = block_with("sh", "curl ");
    let commands = commands(&block);
    assert_eq!(commands.len(), 1, "{commands:?}");
    let curl = &commands[0];
    assert!(curl.contains("http://127.0.0.2:1883/"), "{curl}");

    let broker = Broker::start().await;
    let warden = readme_proxy(&broker).await;
    let mut app = watcher(&warden).await;
    let address = format!("127.0.0.2:{}", warden.addr.port());
    let output = tokio::time::timeout(
        WAIT,
        Command::new("sh")
            .arg("-c")
            .arg(curl.replacen("127.0.0.2:1883", &address, 1))
            .output(),
    )
    .await
    .expect("curl finishes")
    .expect("sh runs curl");
    assert!(output.status.success(), "{output:?}");
    let publish = app.next_publish().await;
    assert_eq!(
        publish.topic,
        "iot-2/type/sensor/id/dev001/evt/temperature/fmt/json"
    );
    assert_eq!(publish.payload.as_ref(), br#"{"celsius": 21.5}"#);
}

#[tokio::test]
async fn readme_python_sdk_example_sends_its_event_and_disconnects() {
    let code = block_with("python", "wiotp.sdk.device");
    assert!(code.contains("\"port\": 1883"), "{code}");
    assert!(code.contains("\"127.0.0.2\""), "{code}");

    let broker = Broker::start().await;
    let warden = readme_proxy(&broker).await;
    let mut app = watcher(&warden).await;
    // The SDK accepts only 1883 and 8883 in its options; the test's port goes in after it.
    let code = code.replacen(
        "device.address = \"127.0.0.2\"",
        &format!(
            "device.port = {}; device.address = \"127.0.0.2\"",
            warden.addr.port()
        ),
        1,
    );
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new(python()).arg("-c").arg(&code).output(),
    )
    .await
    .expect("the README's Python example finishes")
    .expect("python runs (scripts/test.sh installs wiotp-sdk in target/test-venv)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );

    // The event, then the device's Disconnect: a clean one (0) after reading one message.
    let mut event_seen = false;
    loop {
        let publish = app.next_publish().await;
        if publish.topic == "iot-2/type/sensor/id/dev001/evt/temperature/fmt/json" {
            assert_eq!(publish.payload.as_ref(), br#"{"celsius": 21.5}"#);
            event_seen = true;
            continue;
        }
        let status = mon::parse(&publish.payload);
        if status["Action"] == "Disconnect" {
            assert!(event_seen, "the event arrives before the Disconnect status");
            assert_eq!(status["CloseCode"], 0, "{status}");
            assert_eq!(status["ReadMsg"], 1, "{status}");
            break;
        }
    }
}

#[test]
fn readme_warden_yaml_passes_check_and_hash_token_works() {
    let config = block_with("yaml", "password_env: WARDEN_UPSTREAM_PASSWORD");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("warden.yaml"), &config).expect("write config");
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).expect("policies folder");
    std::fs::copy(
        Path::new(ROOT).join("policies/example.yaml"),
        policies.join("example.yaml"),
    )
    .expect("copy the example policy");

    // The README's commands, with the binary on PATH; `run` is the one left out.
    let block = block_with("sh", "mqtt-warden check --config warden.yaml");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_mqtt-warden"))
        .parent()
        .expect("binary folder")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for command in commands(&block) {
        if command.starts_with("mqtt-warden run") {
            continue;
        }
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .current_dir(dir.path())
            .env("PATH", &path)
            .env_remove("WARDEN_UPSTREAM_PASSWORD")
            .output()
            .expect("sh runs");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{command}\nstdout: {stdout}\nstderr: {stderr}"
        );
        if command.contains("check") {
            assert!(stdout.contains("warden.yaml: ok"), "{stdout}");
            assert!(stdout.contains("ok (3 orgs)"), "{stdout}");
            assert!(
                stderr.contains("warning: ") && stderr.contains("WARDEN_UPSTREAM_PASSWORD"),
                "{stderr}"
            );
        } else if command.contains("--sha256") {
            assert!(stdout.starts_with("sha256:"), "{stdout}");
        } else {
            assert!(stdout.starts_with("$argon2id$"), "{stdout}");
        }
        ran += 1;
    }
    assert_eq!(ran, 3, "check and two hash-token commands");
}

#[test]
fn run_example_suggests_the_readme_commands() {
    let script = std::fs::read_to_string(Path::new(ROOT).join("scripts/run-example.sh"))
        .expect("scripts/run-example.sh");
    let suggested = commands(&script);
    let readme_commands = [
        commands(&block_with("sh", "mosquitto_sub")),
        commands(&block_with("sh", "curl ")),
    ];
    for command in readme_commands.concat() {
        assert!(
            suggested.contains(&command),
            "scripts/run-example.sh does not suggest {command}"
        );
    }
}
