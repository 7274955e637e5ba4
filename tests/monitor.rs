//! Monitoring messages: Connect, FailedConnect and Disconnect with all 16 fields, retain rules,
//! takeover order and exact counters, seen by a real subscriber.

mod support;

use rumqttc::QoS;
use support::{mon, standard_policy, v4, Broker, Warden};

async fn watcher(warden: &Warden, filter: &str) -> v4::Client {
    let mut app = v4::org1_app(warden.addr, "a:org1:watcher").await;
    app.subscribe(filter, QoS::AtMostOnce).await;
    app
}

/// The next monitoring message on a topic, skipping others.
async fn next_on(client: &mut v4::Client, topic: &str) -> (serde_json::Value, bool) {
    loop {
        let publish = client.next_publish().await;
        if publish.topic == topic {
            return (mon::parse(&publish.payload), publish.retain);
        }
    }
}

#[tokio::test]
async fn device_connect_and_disconnect_are_reported_with_all_fields() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = watcher(&warden, "iot-2/type/+/id/+/mon").await;
    let topic = "iot-2/type/sensor/id/dev1/mon";

    let device = v4::org1_device(warden.addr, "dev1").await;
    let (connect, _) = next_on(&mut app, topic).await;
    assert_eq!(connect["Action"], "Connect");
    assert_eq!(connect["ClientID"], "d:org1:sensor:dev1");
    assert_eq!(connect["ClientAddr"], "127.0.0.1");
    assert_eq!(connect["Port"], warden.addr.port());
    assert_eq!(connect["Secure"], false);
    assert_eq!(connect["Protocol"], "mqtt4");
    assert_eq!(connect["User"], "use-token-auth");
    assert_eq!(connect.as_object().unwrap().len(), 16);

    // Three QoS 0 events of known size, then DISCONNECT.
    for _ in 0..3 {
        device
            .client
            .publish(
                "iot-2/evt/e/fmt/txt",
                QoS::AtMostOnce,
                false,
                vec![b'x'; 10],
            )
            .await
            .unwrap();
    }
    device.disconnect().await;
    let (disconnect, _) = next_on(&mut app, topic).await;
    assert_eq!(disconnect["Action"], "Disconnect");
    assert_eq!(disconnect["CloseCode"], 0);
    assert_eq!(disconnect["ReadMsg"], 3);
    assert_eq!(disconnect["WriteMsg"], 0);
    // CONNECT (rumqttc: 2+10+2+18+2+14+2+10 = 60 bytes) + 3 × PUBLISH (2+2+19+10 = 33) + DISCONNECT (2).
    let connect_len = 2
        + 10
        + 2
        + "d:org1:sensor:dev1".len()
        + 2
        + "use-token-auth".len()
        + 2
        + "dev1-token".len();
    assert_eq!(disconnect["ReadBytes"], (connect_len + 3 * 33 + 2) as u64);
    assert_eq!(disconnect["WriteBytes"], 4, "CONNACK only");

    // A later subscriber sees the retained Disconnect as the device's state.
    let mut late = v4::org1_app(warden.addr, "a:org1:late").await;
    late.subscribe(topic, QoS::AtMostOnce).await;
    let publish = late.next_publish().await;
    assert!(publish.retain);
    assert_eq!(mon::parse(&publish.payload)["Action"], "Disconnect");
}

#[tokio::test]
async fn vanished_client_is_91_and_failed_connect_is_reported() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = watcher(&warden, "iot-2/type/+/id/+/mon").await;
    let topic = "iot-2/type/sensor/id/dev1/mon";

    let refused = v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("wrong"),
    )
    .await;
    assert_eq!(
        refused.err(),
        Some(v4::Refused::Code(
            rumqttc::ConnectReturnCode::BadUserNamePassword
        ))
    );
    let (failed, retained) = next_on(&mut app, topic).await;
    assert_eq!(failed["Action"], "FailedConnect");
    assert_eq!(failed["CloseCode"], 180);
    assert!(!retained);
    assert!(
        !failed.to_string().contains("wrong"),
        "the presented token must not be reported"
    );

    // A raw TCP client that connects and then drops the socket.
    let stream = raw_connect(warden.addr, "d:org1:sensor:dev1", "dev1-token").await;
    let (connect, _) = next_on(&mut app, topic).await;
    assert_eq!(connect["Action"], "Connect");
    drop(stream);
    let (disconnect, _) = next_on(&mut app, topic).await;
    assert_eq!(disconnect["Action"], "Disconnect");
    assert_eq!(disconnect["CloseCode"], 91);
    assert_eq!(
        disconnect["Reason"],
        "The connection was closed by the client"
    );
}

#[tokio::test]
async fn takeover_reports_288_before_the_new_connect() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = watcher(&warden, "iot-2/type/+/id/+/mon").await;
    let topic = "iot-2/type/sensor/id/dev1/mon";

    let mut first = v4::org1_device(warden.addr, "dev1").await;
    assert_eq!(next_on(&mut app, topic).await.0["Action"], "Connect");
    let _second = v4::org1_device(warden.addr, "dev1").await;
    first.closed().await;
    let (old, _) = next_on(&mut app, topic).await;
    assert_eq!(old["Action"], "Disconnect");
    assert_eq!(old["CloseCode"], 288);
    let (new, _) = next_on(&mut app, topic).await;
    assert_eq!(new["Action"], "Connect");
}

#[tokio::test]
async fn application_status_is_cleared_on_disconnect() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut watcher = watcher(&warden, "iot-2/app/+/mon").await;
    let topic = "iot-2/app/app9/mon";
    let app = v4::org1_app(warden.addr, "a:org1:app9").await;
    assert_eq!(next_on(&mut watcher, topic).await.0["Action"], "Connect");
    app.disconnect().await;
    // The zero-length clearing publish is never delivered; the next message is the Disconnect.
    let publish = loop {
        let publish = watcher.next_publish().await;
        if publish.topic == topic {
            break publish;
        }
    };
    assert!(!publish.retain);
    assert_eq!(mon::parse(&publish.payload)["Action"], "Disconnect");

    // Nothing retained remains for the app: a new subscriber sees only its own sentinel.
    let mut late = v4::org1_app(warden.addr, "a:org1:late").await;
    late.subscribe(topic, QoS::AtMostOnce).await;
    late.subscribe("iot-2/app/late/mon", QoS::AtMostOnce).await;
    let first = late.next_publish().await;
    assert_eq!(
        first.topic, "iot-2/app/late/mon",
        "no retained state for app9"
    );
}

async fn raw_connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    token: &str,
) -> tokio::net::TcpStream {
    let (stream, connack) = support::raw::connect(
        addr,
        mqtt_warden::codec::ProtocolVersion::V311,
        client_id,
        Some("use-token-auth"),
        Some(token.as_bytes()),
        60,
    )
    .await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    stream
}
