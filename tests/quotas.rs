//! Connection caps (104 per process, 173 per org), the subscription limit (154) and the open
//! quickstart org.

mod support;

use rumqttc::{ConnectReturnCode, QoS};
use support::{mon, sha256_token, standard_policy, v4, Broker, Warden};

#[tokio::test]
async fn process_connection_cap_answers_104() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &standard_policy(),
        "limits:\n  max_connections: 1\n",
    )
    .await;
    let _first = v4::org1_device(warden.addr, "dev1").await;
    let second = v4::connect(
        warden.addr,
        "d:org1:sensor:dev2",
        Some("use-token-auth"),
        Some("dev2-token"),
    )
    .await;
    assert_eq!(
        second.err(),
        Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable))
    );
}

#[tokio::test]
async fn org_connection_quota_answers_173() {
    let broker = Broker::start().await;
    let policy = format!(
        "orgs:\n  small:\n    limits: {{ max_connections: 1 }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/a: {{ token: \"{a}\" }}\n      sensor/b: {{ token: \"{b}\" }}\n    api_keys:\n      a-small-watcher01: {{ token: \"{a}\" }}\n",
        a = sha256_token("a"),
        b = sha256_token("b"),
    );
    let warden = Warden::start(&broker, &policy).await;
    let _a = v4::connect(
        warden.addr,
        "d:small:sensor:a",
        Some("use-token-auth"),
        Some("a"),
    )
    .await
    .unwrap();
    let b = v4::connect(
        warden.addr,
        "d:small:sensor:b",
        Some("use-token-auth"),
        Some("b"),
    )
    .await;
    assert_eq!(
        b.err(),
        Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable))
    );
    // Reconnecting with the same client ID is a takeover, not a second connection.
    let _again = v4::connect(
        warden.addr,
        "d:small:sensor:a",
        Some("use-token-auth"),
        Some("a"),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn subscription_limit_closes_with_154() {
    let broker = Broker::start().await;
    let policy = format!(
        "orgs:\n  org1:\n    limits: {{ max_subscriptions: {{ device: 50, gateway: 500, application: 2 }} }}\n    api_keys:\n      a-org1-key0000001: {{ token: \"{t}\" }}\n      a-org1-watcher001: {{ token: \"{t}\" }}\n",
        t = sha256_token("t"),
    );
    let warden = Warden::start(&broker, &policy).await;
    let mut watcher = v4::connect(
        warden.addr,
        "a:org1:watcher",
        Some("a-org1-watcher001"),
        Some("t"),
    )
    .await
    .unwrap();
    watcher.subscribe("iot-2/app/+/mon", QoS::AtMostOnce).await;
    let mut app = v4::connect(
        warden.addr,
        "a:org1:greedy",
        Some("a-org1-key0000001"),
        Some("t"),
    )
    .await
    .unwrap();
    app.subscribe("iot-2/type/a/id/+/evt/+/fmt/+", QoS::AtMostOnce)
        .await;
    app.subscribe("iot-2/type/b/id/+/evt/+/fmt/+", QoS::AtMostOnce)
        .await;
    // Subscribing again to an existing filter does not count twice.
    app.subscribe("iot-2/type/b/id/+/evt/+/fmt/+", QoS::AtMostOnce)
        .await;
    app.client
        .subscribe("iot-2/type/c/id/+/evt/+/fmt/+", QoS::AtMostOnce)
        .await
        .unwrap();
    app.closed().await;
    loop {
        let publish = watcher.next_publish().await;
        let status = mon::parse(&publish.payload);
        if status["ClientID"] == "a:org1:greedy" && status["Action"] == "Disconnect" {
            assert_eq!(status["CloseCode"], 154);
            break;
        }
    }
}

#[tokio::test]
async fn quickstart_needs_no_credentials_and_downgrades_qos() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = v4::connect(warden.addr, "a:quickstart:viewer", None, None)
        .await
        .unwrap();
    app.subscribe("iot-2/type/thermo/id/qs-1/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let device = v4::connect(warden.addr, "d:quickstart:thermo:qs-1", None, None)
        .await
        .unwrap();
    // QoS 1 from the device is acknowledged by the proxy and delivered at QoS 0.
    device
        .client
        .publish(
            "iot-2/evt/temp/fmt/json",
            QoS::AtLeastOnce,
            false,
            "{\"t\":20}",
        )
        .await
        .unwrap();
    let event = app.next_publish().await;
    assert_eq!(event.topic, "iot-2/type/thermo/id/qs-1/evt/temp/fmt/json");
    assert_eq!(event.qos, QoS::AtMostOnce);

    // No + over device IDs and no commands: refused, and the connection stays (the SDKs'
    // devices subscribe to commands on every connect). No scalable applications.
    let mut peeker = v4::connect(warden.addr, "a:quickstart:peeker", None, None)
        .await
        .unwrap();
    assert_eq!(
        peeker
            .subscribe_codes("iot-2/type/thermo/id/+/evt/+/fmt/+", QoS::AtMostOnce)
            .await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    let mut qs_device = v4::connect(warden.addr, "d:quickstart:thermo:qs-2", None, None)
        .await
        .unwrap();
    assert_eq!(
        qs_device
            .subscribe_codes("iot-2/cmd/+/fmt/+", QoS::AtMostOnce)
            .await,
        vec![rumqttc::SubscribeReasonCode::Failure]
    );
    // A refused command publish is dropped: the viewer's next message is the device's event.
    peeker
        .client
        .publish(
            "iot-2/type/thermo/id/qs-1/cmd/c/fmt/json",
            QoS::AtMostOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    device
        .client
        .publish("iot-2/evt/after/fmt/json", QoS::AtMostOnce, false, "{}")
        .await
        .unwrap();
    assert_eq!(
        app.next_publish().await.topic,
        "iot-2/type/thermo/id/qs-1/evt/after/fmt/json"
    );
    let scalable = v4::connect(warden.addr, "A:quickstart:app", None, None).await;
    assert_eq!(
        scalable.err(),
        Some(v4::Refused::Code(ConnectReturnCode::NotAuthorized))
    );
}

#[tokio::test]
async fn sockets_without_connect_do_not_take_connection_slots() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &standard_policy(),
        "limits:\n  max_connections: 1\n",
    )
    .await;
    // A slowloris socket that never sends CONNECT, then a real client: the slot is the client's.
    let _idle = tokio::net::TcpStream::connect(warden.addr).await.unwrap();
    let client = v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token"),
    )
    .await;
    assert!(client.is_ok(), "{:?}", client.err());
}
