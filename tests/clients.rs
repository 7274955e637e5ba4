//! Real command-line clients (`mosquitto_pub`, `mosquitto_sub`) over MQTT 3.1, 3.1.1 and 5, and
//! the `mqtt-warden` binary's `check` and `hash-token` commands.

mod support;

use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use support::{standard_policy, Broker, Warden, WAIT};

/// Starts `mosquitto_sub` as application `a:org1:cli` and waits until its own retained Connect
/// status arrives, which proves its subscriptions are in place.
async fn subscriber(
    warden: &Warden,
    protocol: &str,
    filter: &str,
) -> (
    tokio::process::Child,
    tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) {
    let mut child = Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &warden.addr.port().to_string(),
            "-V",
            protocol,
        ])
        .args([
            "-i",
            "a:org1:cli",
            "-u",
            "a-org1-key0000001",
            "-P",
            "app-token",
        ])
        .args(["-t", "iot-2/app/cli/mon", "-t", filter, "-v"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto_sub is installed");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("status arrives")
        .unwrap()
        .unwrap();
    assert!(first.starts_with("iot-2/app/cli/mon "), "{first}");
    (child, lines)
}

async fn publish(warden: &Warden, protocol: &str, args: &[&str]) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &warden.addr.port().to_string(),
            "-V",
            protocol,
        ])
        .args(args)
        .output()
        .await
        .expect("mosquitto_pub is installed")
}

#[tokio::test]
async fn mosquitto_clients_over_every_protocol_version() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    for (sub_protocol, pub_protocol) in [
        ("mqttv311", "mqttv31"),
        ("mqttv5", "mqttv311"),
        ("mqttv31", "mqttv5"),
    ] {
        let (_child, mut lines) =
            subscriber(&warden, sub_protocol, "iot-2/type/+/id/+/evt/+/fmt/+").await;
        let output = publish(
            &warden,
            pub_protocol,
            &[
                "-i",
                "d:org1:sensor:dev1",
                "-u",
                "use-token-auth",
                "-P",
                "dev1-token",
                "-q",
                "1",
                "-t",
                "iot-2/evt/cli/fmt/txt",
                "-m",
                pub_protocol,
            ],
        )
        .await;
        assert!(
            output.status.success(),
            "{pub_protocol}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = loop {
            let line = tokio::time::timeout(WAIT, lines.next_line())
                .await
                .expect("event arrives")
                .unwrap()
                .unwrap();
            if !line.contains("/mon ") {
                break line;
            }
        };
        assert_eq!(
            line,
            format!("iot-2/type/sensor/id/dev1/evt/cli/fmt/txt {pub_protocol}"),
            "{sub_protocol} ← {pub_protocol}"
        );
    }
}

#[tokio::test]
async fn mosquitto_pub_sees_refusals() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let bad_password = publish(
        &warden,
        "mqttv311",
        &[
            "-i",
            "d:org1:sensor:dev1",
            "-u",
            "use-token-auth",
            "-P",
            "nope",
            "-t",
            "iot-2/evt/e/fmt/t",
            "-m",
            "x",
        ],
    )
    .await;
    assert!(!bad_password.status.success());
    let stderr = String::from_utf8_lossy(&bad_password.stderr).to_lowercase();
    assert!(
        stderr.contains("bad user name or password") || stderr.contains("not authorised"),
        "{stderr}"
    );

    let bad_id = publish(
        &warden,
        "mqttv5",
        &[
            "-i",
            "device-without-org",
            "-u",
            "x",
            "-P",
            "y",
            "-t",
            "iot-2/evt/e/fmt/t",
            "-m",
            "x",
        ],
    )
    .await;
    assert!(!bad_id.status.success());
    let stderr = String::from_utf8_lossy(&bad_id.stderr).to_lowercase();
    assert!(stderr.contains("client identifier not valid"), "{stderr}");
}

#[tokio::test]
async fn check_reports_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("warden.yaml"),
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:1\"\npolicies: policies/\n",
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/good.yaml"), standard_policy()).unwrap();
    let run_check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-warden"))
            .args(["check", "--config"])
            .arg(dir.path().join("warden.yaml"))
            .output()
            .unwrap()
    };
    let ok = run_check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    std::fs::write(
        dir.path().join("policies/bad.yaml"),
        "orgs:\n  org9:\n    device_types:\n      sensor: {}\n    devices:\n      sensor/d1: { token: \"plain-text\" }\n",
    )
    .unwrap();
    let bad = run_check();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("bad.yaml:6"), "file and line: {stderr}");
    assert!(stderr.contains("token"), "field: {stderr}");
}

#[tokio::test]
async fn hash_token_prints_verifiable_hashes() {
    for (flag, prefix) in [(None, "$argon2id$"), (Some("--sha256"), "sha256:")] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_mqtt-warden"));
        command
            .arg("hash-token")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if let Some(flag) = flag {
            command.arg(flag);
        }
        let mut child = command.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"s3cret-token\n")
            .await
            .unwrap();
        let output = child.wait_with_output().await.unwrap();
        assert!(output.status.success());
        let hash = String::from_utf8(output.stdout).unwrap();
        let hash = hash.trim();
        assert!(hash.starts_with(prefix), "{hash}");
        assert!(!hash.contains("s3cret"));
        let parsed = mqtt_warden::auth::TokenHash::parse(hash).unwrap();
        assert!(parsed.verify(b"s3cret-token"));
        assert!(!parsed.verify(b"s3cret-token2"));
    }
}
