//! Crash recovery: a proxy process killed with SIGKILL and started again settles the clients it
//! had connected (Disconnect 92), and only its own, when several instances share one broker.

mod support;

use std::net::SocketAddr;

use rumqttc::QoS;

use support::{mon, standard_policy, v4, Broker, ProxyProcess};

async fn start_proxy(dir: &std::path::Path, broker: &Broker, instance: &str) -> ProxyProcess {
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\n  control_client_id: \"{instance}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n",
        broker.addr()
    );
    ProxyProcess::start(dir, instance, &config, &[]).await
}

async fn next_status(spy: &mut v4::Client) -> serde_json::Value {
    mon::parse(&spy.next_publish().await.payload)
}

/// A broker, a folder with the standard policy, and a spy on org1's device statuses.
async fn rig() -> (Broker, tempfile::TempDir, v4::Client) {
    let broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let broker_addr: SocketAddr = broker.addr().parse().unwrap();
    let mut spy = v4::connect(broker_addr, "spy", None, None).await.unwrap();
    spy.subscribe("org1/iot-2/type/+/id/+/mon", QoS::AtMostOnce)
        .await;
    (broker, dir, spy)
}

#[tokio::test]
async fn a_killed_proxy_settles_its_own_clients_after_restart() {
    let (broker, dir, mut spy) = rig().await;
    let broker_addr: SocketAddr = broker.addr().parse().unwrap();

    let mut first = start_proxy(dir.path(), &broker, "instance-a").await;
    let other = start_proxy(dir.path(), &broker, "instance-b").await;
    let _dev1 = v4::org1_device(first.addr, "dev1").await;
    assert_eq!(
        next_status(&mut spy).await["ClientID"],
        "d:org1:sensor:dev1"
    );
    let _dev2 = v4::org1_device(other.addr, "dev2").await;
    assert_eq!(
        next_status(&mut spy).await["ClientID"],
        "d:org1:sensor:dev2"
    );

    // SIGKILL: no Disconnect can be sent by the dying process.
    first.child.start_kill().unwrap();
    first.child.wait().await.unwrap();

    let _restarted = start_proxy(dir.path(), &broker, "instance-a").await;
    let status = next_status(&mut spy).await;
    assert_eq!(status["Action"], "Disconnect");
    assert_eq!(status["ClientID"], "d:org1:sensor:dev1");
    assert_eq!(status["CloseCode"], 92);

    // dev2 belongs to the other instance and is still connected: a sentinel status published
    // now is the next message, with nothing about dev2 before it.
    let _sentinel = v4::org1_device(other.addr, "dev1").await;
    let status = next_status(&mut spy).await;
    assert_eq!(
        (status["ClientID"].as_str(), status["Action"].as_str()),
        (Some("d:org1:sensor:dev1"), Some("Connect"))
    );

    // The retained state of dev1 as a new subscriber sees it is the latest: connected.
    let mut late = v4::connect(broker_addr, "late", None, None).await.unwrap();
    late.subscribe("org1/iot-2/type/sensor/id/+/mon", QoS::AtMostOnce)
        .await;
    for _ in 0..2 {
        let status = mon::parse(&late.next_publish().await.payload);
        assert_eq!(status["Action"], "Connect", "{status}");
    }
}

/// Two processes with the same config (so the same ledger namespace) in front of one broker:
/// the one that starts second must neither take the first one's control connection over nor
/// settle the first one's live clients.
#[tokio::test]
async fn a_second_instance_with_the_same_config_leaves_the_first_alone() {
    let (broker, dir, mut spy) = rig().await;
    // No control_client_id: both derive the same namespace from the same bind address.
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n",
        broker.addr()
    );
    let first = ProxyProcess::start(dir.path(), "first", &config, &[]).await;
    let dev1 = v4::org1_device(first.addr, "dev1").await;
    assert_eq!(next_status(&mut spy).await["Action"], "Connect");

    let second = ProxyProcess::start(dir.path(), "second", &config, &[]).await;
    // The second process settles whatever it settles before it publishes anything else, so
    // once dev2's Connect arrives through it, any settlement would have come first.
    let _dev2 = v4::org1_device(second.addr, "dev2").await;
    let status = next_status(&mut spy).await;
    assert_eq!(
        (status["ClientID"].as_str(), status["Action"].as_str()),
        (Some("d:org1:sensor:dev2"), Some("Connect")),
        "nothing about the first instance's dev1 before it"
    );
    // The first instance still publishes through its own control connection.
    dev1.disconnect().await;
    let status = next_status(&mut spy).await;
    assert_eq!(
        (
            status["ClientID"].as_str(),
            status["Action"].as_str(),
            status["CloseCode"].as_u64()
        ),
        (Some("d:org1:sensor:dev1"), Some("Disconnect"), Some(0))
    );
    drop(first);
}

/// A mistaken second start of the same config (same fixed port) fails on the port before it
/// dials the broker, so the running instance is not disturbed.
#[tokio::test]
async fn a_second_start_on_the_same_port_fails_before_it_dials_the_broker() {
    let mut broker = Broker::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:{port}\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json }}\n",
        broker.addr()
    );
    let _running = ProxyProcess::start(dir.path(), "first", &config, &[]).await;
    let new_client = |line: &str| line.contains("New client connected");
    tokio::time::timeout(support::WAIT, async {
        while let Some(line) = broker.log.recv().await {
            if new_client(&line) && line.contains("mqtt-warden-") && !line.contains("-probe ") {
                return;
            }
        }
    })
    .await
    .expect("the first instance's control connection");

    let second = tokio::process::Command::new(env!("CARGO_BIN_EXE_mqtt-warden"))
        .args(["run", "--config"])
        .arg(dir.path().join("first.yaml"))
        .output()
        .await
        .unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");

    // A client connected now is the next one the broker sees: the second start dialled nothing.
    // (The first instance's broker probe connects on its own schedule and is passed over; a
    // second start that dialled would have dialled its control connection too.)
    let broker_addr: SocketAddr = broker.addr().parse().unwrap();
    let _sentinel = v4::connect(broker_addr, "sentinel", None, None)
        .await
        .unwrap();
    let next = tokio::time::timeout(support::WAIT, async {
        loop {
            let line = broker.log.recv().await.expect("broker log");
            if new_client(&line) && !line.contains("-probe ") {
                return line;
            }
        }
    })
    .await
    .expect("the sentinel's connection is logged");
    assert!(next.contains("sentinel"), "{next}");
}
