//! Running the proxy: the admin endpoint, live policy edits, and graceful shutdown.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::http_get;
use support::{mon, standard_policy, v4, Broker, ProxyProcess, Warden, WAIT};

const ADMIN: &str = "admin: { bind: \"127.0.0.1:0\" }\n";

#[tokio::test]
async fn admin_endpoint_reports_health_readiness_and_metrics() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(&broker, &standard_policy(), ADMIN).await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    warden.wait_monitor_connected().await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);

    let device = v4::org1_device(warden.addr, "dev1").await;
    device
        .client
        .publish("iot-2/evt/e/fmt/t", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    let _ = v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("bad"),
    )
    .await;
    let (status, metrics) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "warden_connections{org=\"org1\",protocol=\"mqtt4\"} 1",
        "warden_closes_total{code=\"180\",org=\"org1\"} 1",
        "warden_upstream_up 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line} in\n{metrics}"
        );
    }
    assert!(metrics.contains("warden_auth_seconds_count 2"), "{metrics}");

    broker.stop().await;
    tokio::time::timeout(WAIT, async {
        loop {
            if http_get(admin, "/readyz").await.0 == 503 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("/readyz turns red when the broker is gone");
    drop(device);
}

#[tokio::test]
async fn a_policy_edit_closes_revoked_sessions_with_94_and_keeps_others() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut watcher = v4::org1_app(warden.addr, "a:org1:watcher").await;
    watcher
        .subscribe("iot-2/type/+/id/+/mon", QoS::AtMostOnce)
        .await;
    let mut dev1 = v4::org1_device(warden.addr, "dev1").await;

    // Disable dev1 in the file; the watcher applies the edit.
    let edited =
        standard_policy().replace("groups: [line-1] }", "groups: [line-1], enabled: false }");
    assert_ne!(edited, standard_policy());
    std::fs::write(warden.policy_path(), edited).unwrap();
    dev1.closed().await;
    loop {
        let status = mon::parse(&watcher.next_publish().await.payload);
        if status["ClientID"] == "d:org1:sensor:dev1" && status["Action"] == "Disconnect" {
            assert_eq!(status["CloseCode"], 94);
            break;
        }
    }
    // The watcher itself was not touched, and dev1 can no longer connect.
    assert!(v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token")
    )
    .await
    .is_err());

    // A broken edit is rejected; the last good policy stays in force.
    std::fs::write(
        warden.policy_path(),
        "orgs:\n  org1:\n    devices: [not, a, map]\n",
    )
    .unwrap();
    assert!(warden.running.reload_policy().is_err());
    let dev2 = v4::connect(
        warden.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token"),
    )
    .await;
    assert!(dev2.is_ok(), "the last good policy still admits dev2");
    assert!(warden.running.metrics.policy_reload_failures.get() >= 1);
    watcher
        .client
        .publish(
            "iot-2/type/sensor/id/dev2/cmd/c/fmt/t",
            QoS::AtLeastOnce,
            false,
            "alive",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_policy_edit_revokes_subscriptions_in_reject_mode() {
    let broker = Broker::start().await;
    let token = support::sha256_token("app-token");
    let key = format!("a-org1-key0000001: {{ token: \"{token}\" }}");
    let policy = standard_policy()
        .replace("  org1:\n", "  org1:\n    on_violation: reject\n")
        .replace(
            &key,
            &format!("{key}\n      a-org1-commander1: {{ token: \"{token}\" }}"),
        );
    let warden = Warden::start(&broker, &policy).await;
    let mut app = v4::org1_app(warden.addr, "a:org1:app1").await;
    app.subscribe("iot-2/type/+/id/+/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;

    // The key becomes a visualization key: events only. Its command subscription is revoked
    // upstream, and the connection stays.
    let edited = policy.replace(
        &key,
        &format!("a-org1-key0000001: {{ token: \"{token}\", role: visualization }}"),
    );
    assert_ne!(edited, policy);
    std::fs::write(warden.policy_path(), edited).unwrap();
    warden.running.reload_policy().unwrap();

    let commander = v4::connect(
        warden.addr,
        "a:org1:cmd",
        Some("a-org1-commander1"),
        Some("app-token"),
    )
    .await
    .unwrap();
    let dev1 = v4::org1_device(warden.addr, "dev1").await;
    // A command (no longer visible to the key), then an event: only the event arrives.
    commander
        .client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/c/fmt/t",
            QoS::AtLeastOnce,
            false,
            "cmd",
        )
        .await
        .unwrap();
    let mut watcher = v4::connect(
        warden.addr,
        "a:org1:w",
        Some("a-org1-commander1"),
        Some("app-token"),
    )
    .await
    .unwrap();
    watcher
        .subscribe("iot-2/type/+/id/+/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    commander
        .client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/c2/fmt/t",
            QoS::AtLeastOnce,
            false,
            "cmd2",
        )
        .await
        .unwrap();
    assert_eq!(
        watcher.next_publish().await.topic,
        "iot-2/type/sensor/id/dev1/cmd/c2/fmt/t"
    );
    dev1.client
        .publish("iot-2/evt/after/fmt/t", QoS::AtLeastOnce, false, "evt")
        .await
        .unwrap();
    let next = app.next_publish().await;
    assert_eq!(
        next.topic, "iot-2/type/sensor/id/dev1/evt/after/fmt/t",
        "no command before the event"
    );
}

#[tokio::test]
async fn a_burst_of_edits_under_traffic_loses_nothing() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = v4::org1_app(warden.addr, "a:org1:app1").await;
    app.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let dev1 = v4::org1_device(warden.addr, "dev1").await;
    const MESSAGES: usize = 300;
    let publisher = tokio::spawn(async move {
        for n in 0..MESSAGES {
            dev1.client
                .publish("iot-2/evt/n/fmt/t", QoS::AtLeastOnce, false, n.to_string())
                .await
                .unwrap();
        }
        dev1
    });
    // 100 edits that toggle dev2 (not dev1) while dev1's traffic flows.
    for n in 0..100 {
        let policy = if n % 2 == 0 {
            standard_policy().replace("groups: [line-2] }", "groups: [line-2], enabled: false }")
        } else {
            standard_policy()
        };
        std::fs::write(warden.policy_path(), policy).unwrap();
        warden.running.reload_policy().unwrap();
    }
    let _dev1 = publisher.await.unwrap();
    for n in 0..MESSAGES {
        let publish = app.next_publish().await;
        assert_eq!(
            &publish.payload[..],
            n.to_string().as_bytes(),
            "in order, nothing lost"
        );
    }
    // The last edit re-enabled dev2; the denial side held throughout for a disabled org member.
    assert!(v4::connect(
        warden.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token")
    )
    .await
    .is_ok());
}

#[tokio::test]
async fn shutdown_closes_sessions_with_93_and_flushes_their_status() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let broker_addr: std::net::SocketAddr = broker.addr().parse().unwrap();
    let mut spy = v4::connect(broker_addr, "spy", None, None).await.unwrap();
    spy.subscribe("org1/iot-2/type/+/id/+/mon", QoS::AtMostOnce)
        .await;

    // An MQTT 5 device, as raw bytes, to read the DISCONNECT reason code.
    let (mut stream, _connack) = support::raw::connect(
        warden.addr,
        mqtt_warden::codec::ProtocolVersion::V5,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some(b"dev1-token"),
        60,
    )
    .await;
    assert_eq!(
        mon::parse(&spy.next_publish().await.payload)["Action"],
        "Connect"
    );

    let started = std::time::Instant::now();
    warden.running.shutdown(Duration::from_secs(5)).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    assert_eq!(answer.first(), Some(&0xE0), "DISCONNECT: {answer:02X?}");
    assert_eq!(answer.get(2), Some(&0x8B), "Server shutting down");
    // The Disconnect status reached the broker before shutdown returned.
    let status = mon::parse(&spy.next_publish().await.payload);
    assert_eq!(status["Action"], "Disconnect");
    assert_eq!(status["CloseCode"], 93);
}

/// The number of sample lines of a metrics scrape.
fn series(scrape: &str) -> usize {
    scrape.lines().filter(|line| !line.starts_with('#')).count()
}

/// A label set comes from the policy and the config, never from what a client sends: CONNECTs
/// that name unknown orgs, over and over, add no series, neither when they are refused for
/// their org nor when the address's CONNECT rate refuses them first.
#[tokio::test]
async fn connects_naming_unknown_orgs_add_no_metric_series() {
    let broker = Broker::start().await;
    let config = format!("{ADMIN}limits: {{ connect_rate_per_address: \"20/min\" }}\n");
    let warden = Warden::start_with(&broker, &standard_policy(), &config).await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    let attempt = |n: usize| {
        let client_id = format!("d:unknown{n}:sensor:dev1");
        async move {
            v4::connect(
                warden.addr,
                &client_id,
                Some("use-token-auth"),
                Some("dev1-token"),
            )
            .await
        }
    };
    // Past the rate once, so that both kinds of refusal have been counted.
    for n in 0..25 {
        assert!(attempt(n).await.is_err());
    }
    let before = series(&http_get(admin, "/metrics").await.1);
    for n in 25..=125 {
        assert!(attempt(n).await.is_err(), "unknown org {n} is refused");
    }
    let after = http_get(admin, "/metrics").await.1;
    assert_eq!(series(&after), before, "{after}");
}

/// `warden_bytes_out_total` counts each byte written to a client once.
#[tokio::test]
async fn bytes_written_to_clients_are_counted_once() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(&broker, &standard_policy(), ADMIN).await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    let (mut stream, connack) = support::raw::connect(
        warden.addr,
        mqtt_warden::codec::ProtocolVersion::V311,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some(b"dev1-token"),
        60,
    )
    .await;
    let mut received = connack.len();
    // SUBSCRIBE to its commands, then a command from an app directly on the broker.
    let mut subscribe = bytes::BytesMut::new();
    mqtt_warden::codec::encode_subscribe(
        &mut subscribe,
        mqtt_warden::codec::ProtocolVersion::V311,
        1,
        &[],
        &[(&[b"iot-2/cmd/+/fmt/+"], 0)],
    );
    stream.write_all(&subscribe).await.unwrap();
    let mut suback = [0u8; 5];
    stream.read_exact(&mut suback).await.unwrap();
    received += suback.len();
    let broker_addr: std::net::SocketAddr = broker.addr().parse().unwrap();
    let app = v4::connect(broker_addr, "direct", None, None)
        .await
        .unwrap();
    app.client
        .publish(
            "org1/iot-2/type/sensor/id/dev1/cmd/reboot/fmt/txt",
            QoS::AtMostOnce,
            false,
            "now",
        )
        .await
        .unwrap();
    let command_len = 2 + 2 + "iot-2/cmd/reboot/fmt/txt".len() + "now".len();
    let mut command = vec![0u8; command_len];
    stream.read_exact(&mut command).await.unwrap();
    received += command.len();
    // A DISCONNECT ends the session, which reports its traffic.
    stream.write_all(&[0xE0, 0x00]).await.unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    let expected = format!("warden_bytes_out_total {received}");
    tokio::time::timeout(WAIT, async {
        loop {
            let scrape = http_get(admin, "/metrics").await.1;
            if scrape.contains("warden_connections{org=\"org1\",protocol=\"mqtt4\"} 0") {
                return scrape;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .map(|scrape| {
        assert!(
            scrape.lines().any(|l| l == expected),
            "{expected}\n{scrape}"
        )
    })
    .expect("the session closes");
}

/// The scheduling policy of every thread of process `pid`, by name, from `/proc`.
fn thread_policies(pid: u32) -> Vec<&'static str> {
    let mut policies = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the process's threads") {
        let stat = std::fs::read_to_string(task.expect("a thread").path().join("stat"))
            .expect("the thread's stat");
        // The command name (field 2) may hold spaces; the fields after its ')' are plain.
        let after_name = &stat[stat.rfind(')').expect("stat has a name") + 2..];
        // `policy` is field 41; `after_name` starts at field 3.
        let policy: i32 = after_name
            .split(' ')
            .nth(41 - 3)
            .and_then(|field| field.parse().ok())
            .expect("stat has a policy");
        policies.push(mqtt_warden::runtime::policy_name(policy));
    }
    policies
}

#[tokio::test]
async fn every_thread_of_the_proxy_runs_under_sched_batch_unless_told_to_inherit() {
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let config = |runtime: &str| {
        format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n{runtime}",
            broker.addr()
        )
    };
    let batch = ProxyProcess::start(dir.path(), "batch", &config(""), &[]).await;
    let inherit = ProxyProcess::start(
        dir.path(),
        "inherit",
        &config("runtime: { scheduling: inherit, worker_threads: 2 }\n"),
        &[],
    )
    .await;
    // A session makes the runtime start what it starts lazily (blocking-pool threads).
    let mut device = v4::org1_device(batch.addr, "dev1").await;
    assert!(
        device
            .publish_acked("iot-2/evt/t/fmt/json", b"{}".to_vec())
            .await
    );
    let batch_threads = thread_policies(batch.child.id().expect("running"));
    assert!(batch_threads.len() >= 2, "{batch_threads:?}");
    assert!(
        batch_threads.iter().all(|policy| *policy == "SCHED_BATCH"),
        "{batch_threads:?}\n{}",
        batch.kept_log()
    );
    assert!(
        batch.kept_log().contains("SCHED_BATCH"),
        "{}",
        batch.kept_log()
    );
    let inherit_threads = thread_policies(inherit.child.id().expect("running"));
    assert!(inherit_threads.len() >= 3, "{inherit_threads:?}");
    // The child inherits the policy of the test thread that started it.
    let started_with = mqtt_warden::runtime::current_policy();
    assert!(
        inherit_threads.iter().all(|policy| *policy == started_with),
        "{inherit_threads:?} (started under {started_with})"
    );
}
