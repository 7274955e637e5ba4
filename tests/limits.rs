//! Quotas and resource bounds: publish rates with back-pressure or disconnect, the org aggregate,
//! CONNECT rates, filters per SUBSCRIBE, in-flight bounds, slowloris and the keep-alive cap.

mod support;

use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqtt_warden::codec::ProtocolVersion;
use support::{mon, sha256_token, v4, Broker, Warden, WAIT};

fn policy(limits: &str, extra: &str) -> String {
    format!(
        "orgs:\n  org1:\n    {extra}\n    limits: {limits}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/a: {{ token: \"{t}\" }}\n      sensor/b: {{ token: \"{t}\" }}\n    api_keys:\n      a-org1-watcher001: {{ token: \"{t}\" }}\n",
        t = sha256_token("t")
    )
}

async fn device(warden: &Warden, id: &str) -> v4::Client {
    v4::connect(
        warden.addr,
        &format!("d:org1:sensor:{id}"),
        Some("use-token-auth"),
        Some("t"),
    )
    .await
    .expect("connects")
}

async fn watcher(warden: &Warden) -> v4::Client {
    let mut app = v4::connect(
        warden.addr,
        "a:org1:watcher",
        Some("a-org1-watcher001"),
        Some("t"),
    )
    .await
    .unwrap();
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    app.subscribe("iot-2/type/+/id/+/mon", QoS::AtLeastOnce)
        .await;
    app
}

/// Receives `count` events (skipping status messages) and returns when the last one arrived.
async fn receive_events(app: &mut v4::Client, count: usize) -> Instant {
    let mut seen = 0;
    while seen < count {
        if app.next_publish().await.topic.contains("/evt/") {
            seen += 1;
        }
    }
    Instant::now()
}

#[tokio::test]
async fn publish_rate_pushes_back_and_loses_nothing() {
    let broker = Broker::start().await;
    let warden = Warden::start(
        &broker,
        &policy("{ publish_rate: { device: \"20/s\" } }", ""),
    )
    .await;
    let mut app = watcher(&warden).await;
    let device = device(&warden, "a").await;
    let started = Instant::now();
    for n in 0..60 {
        device
            .client
            .publish("iot-2/evt/n/fmt/t", QoS::AtLeastOnce, false, n.to_string())
            .await
            .unwrap();
    }
    let finished = receive_events(&mut app, 60).await;
    // A burst of 20, then 20 per second: the other 40 need about two seconds.
    let took = finished - started;
    assert!(
        took >= Duration::from_millis(1500),
        "rate not enforced: {took:?}"
    );
    assert!(took < Duration::from_secs(8), "too slow: {took:?}");
}

#[tokio::test]
async fn org_rate_is_shared_by_its_connections() {
    let broker = Broker::start().await;
    let limits = "{ publish_rate: { device: \"1000/s\" }, org_publish_rate: \"20/s\" }";
    let warden = Warden::start(&broker, &policy(limits, "")).await;
    let mut app = watcher(&warden).await;
    let (a, b) = (device(&warden, "a").await, device(&warden, "b").await);
    let started = Instant::now();
    for n in 0..30 {
        a.client
            .publish("iot-2/evt/n/fmt/t", QoS::AtLeastOnce, false, n.to_string())
            .await
            .unwrap();
        b.client
            .publish("iot-2/evt/n/fmt/t", QoS::AtLeastOnce, false, n.to_string())
            .await
            .unwrap();
    }
    let took = receive_events(&mut app, 60).await - started;
    assert!(
        took >= Duration::from_millis(1500),
        "org aggregate not enforced: {took:?}"
    );
}

#[tokio::test]
async fn rate_exceeded_can_disconnect_with_92() {
    let broker = Broker::start().await;
    let warden = Warden::start(
        &broker,
        &policy(
            "{ publish_rate: { device: \"2/s\" } }",
            "on_rate_exceeded: disconnect",
        ),
    )
    .await;
    let mut app = watcher(&warden).await;
    let mut flooder = device(&warden, "a").await;
    for _ in 0..10 {
        let _ = flooder
            .client
            .publish("iot-2/evt/n/fmt/t", QoS::AtMostOnce, false, "x")
            .await;
    }
    flooder.closed().await;
    loop {
        let publish = app.next_publish().await;
        if !publish.topic.ends_with("/mon") {
            continue;
        }
        let status = mon::parse(&publish.payload);
        if status["Action"] == "Disconnect" {
            assert_eq!(status["CloseCode"], 92);
            assert!(status["Reason"]
                .as_str()
                .unwrap()
                .contains("rate limit exceeded"));
            break;
        }
    }
}

#[tokio::test]
async fn connect_rate_per_client_id_refuses_flapping_clients() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy("{}", ""),
        "limits:\n  connect_rate_per_client_id: \"3/min\"\n",
    )
    .await;
    for _ in 0..3 {
        let client = device(&warden, "a").await;
        client.disconnect().await;
    }
    let refused = v4::connect(
        warden.addr,
        "d:org1:sensor:a",
        Some("use-token-auth"),
        Some("t"),
    )
    .await;
    assert_eq!(
        refused.err(),
        Some(v4::Refused::Code(ConnectReturnCode::ServiceUnavailable))
    );
    // Another client ID is not affected.
    device(&warden, "b").await;
}

#[tokio::test]
async fn too_many_filters_in_one_subscribe_is_154() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy("{}", ""),
        "limits:\n  max_filters_per_subscribe: 2\n",
    )
    .await;
    let mut app = v4::connect(
        warden.addr,
        "a:org1:greedy",
        Some("a-org1-watcher001"),
        Some("t"),
    )
    .await
    .unwrap();
    let filters = ["a", "b", "c"].map(|t| {
        rumqttc::SubscribeFilter::new(format!("iot-2/type/{t}/id/+/evt/+/fmt/+"), QoS::AtMostOnce)
    });
    app.client.subscribe_many(filters).await.unwrap();
    app.closed().await;
}

/// Device `a` connects with raw bytes; returns the stream and the CONNACK.
async fn raw_connect(
    addr: std::net::SocketAddr,
    version: ProtocolVersion,
    keep_alive: u16,
) -> (TcpStream, Vec<u8>) {
    support::raw::connect(
        addr,
        version,
        "d:org1:sensor:a",
        Some("use-token-auth"),
        Some(b"t"),
        keep_alive,
    )
    .await
}

async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .unwrap();
    answer
}

#[tokio::test]
async fn a_trickled_packet_is_closed_in_bounded_time() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy("{}", ""),
        "limits:\n  partial_packet_timeout_secs: 1\n",
    )
    .await;
    // Keep-alive 0 (no keep-alive timer), then the first two bytes of a PUBLISH, and silence.
    let (mut stream, connack) = raw_connect(warden.addr, ProtocolVersion::V311, 0).await;
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    stream.write_all(&[0x30, 0x20]).await.unwrap();
    let started = Instant::now();
    read_until_closed(&mut stream).await;
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn unacknowledged_qos2_beyond_receive_maximum_is_0x93() {
    let broker = Broker::start().await;
    let warden =
        Warden::start_with(&broker, &policy("{}", ""), "limits:\n  max_inflight: 3\n").await;
    let (mut stream, connack) = raw_connect(warden.addr, ProtocolVersion::V5, 60).await;
    // The CONNACK announces Receive Maximum 3 (property 0x21).
    assert!(
        connack.windows(3).any(|w| w == [0x21, 0x00, 0x03]),
        "{connack:02X?}"
    );
    // Four QoS 2 PUBLISHes that are never released.
    for id in 1u8..=4 {
        let topic = b"iot-2/evt/q2/fmt/t";
        let mut publish = vec![
            0x34,
            (2 + topic.len() + 2 + 1 + 1) as u8,
            0,
            topic.len() as u8,
        ];
        publish.extend_from_slice(topic);
        publish.extend_from_slice(&[0, id, 0, b'x']);
        stream.write_all(&publish).await.unwrap();
    }
    let answer = read_until_closed(&mut stream).await;
    let disconnect = answer
        .windows(3)
        .position(|w| w[0] == 0xE0)
        .expect("DISCONNECT");
    assert_eq!(answer[disconnect + 2], 0x93, "{answer:02X?}");
}

#[tokio::test]
async fn keep_alive_cap_refuses_mqtt3_and_tells_mqtt5() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy("{}", ""),
        "limits:\n  max_keep_alive_secs: 60\n",
    )
    .await;
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    stream
        .write_all(&support::raw::connect_packet(
            ProtocolVersion::V311,
            "d:org1:sensor:a",
            Some("use-token-auth"),
            Some(b"t"),
            0,
        ))
        .await
        .unwrap();
    assert_eq!(
        read_until_closed(&mut stream).await,
        [0x20, 0x02, 0x00, 0x05]
    );
    let (_stream, connack) = raw_connect(warden.addr, ProtocolVersion::V5, 600).await;
    assert_eq!(connack[3], 0, "connected");
    assert!(
        connack.windows(3).any(|w| w == [0x13, 0x00, 60]),
        "Server Keep Alive 60: {connack:02X?}"
    );
}

#[tokio::test]
async fn byte_rate_pushes_back_too() {
    let broker = Broker::start().await;
    // 2,000 bytes per second; each PUBLISH below is about 1,030 bytes, so 6 of them need ~2 s
    // after the first two (the bucket holds at least one maximal message).
    let limits = "{ max_payload_bytes: 1024, publish_rate: { device: \"1000/s\" }, byte_rate: { device: \"2000/s\" } }";
    let warden = Warden::start(&broker, &policy(limits, "")).await;
    let mut app = watcher(&warden).await;
    let device = device(&warden, "a").await;
    let started = Instant::now();
    for _ in 0..6 {
        device
            .client
            .publish(
                "iot-2/evt/big/fmt/bin",
                QoS::AtLeastOnce,
                false,
                vec![7u8; 1000],
            )
            .await
            .unwrap();
    }
    let took = receive_events(&mut app, 6).await - started;
    assert!(
        took >= Duration::from_millis(1200),
        "byte rate not enforced: {took:?}"
    );
}

#[tokio::test]
async fn a_subscriber_that_never_reads_slows_nobody_else() {
    let broker = Broker::start().await;
    let limits = "{ publish_rate: { device: \"100000/s\" } }";
    let warden = Warden::start(&broker, &policy(limits, "")).await;
    // A raw subscriber that subscribes and then never reads again.
    let mut stuck = TcpStream::connect(warden.addr).await.unwrap();
    let connect = support::raw::connect_packet(
        ProtocolVersion::V311,
        "a:org1:stuck",
        Some("a-org1-watcher001"),
        Some(b"t"),
        0,
    );
    stuck.write_all(&connect).await.unwrap();
    let filter = b"iot-2/type/+/id/+/evt/+/fmt/+";
    let mut subscribe = vec![
        0x82,
        (2 + 2 + filter.len() + 1) as u8,
        0,
        1,
        0,
        filter.len() as u8,
    ];
    subscribe.extend_from_slice(filter);
    subscribe.push(0);
    stuck.write_all(&subscribe).await.unwrap();
    let mut acks = [0u8; 9];
    stuck.read_exact(&mut acks).await.unwrap();
    assert_eq!(&acks[..4], &[0x20, 0x02, 0x00, 0x00], "CONNACK");
    assert_eq!(acks[4], 0x90, "SUBACK");

    // A reading subscriber receives every one of 2,000 16 KiB events (32 MiB, far more than
    // socket buffers hold for the stuck one), published in steps it keeps up with.
    let mut reader = watcher(&warden).await;
    let device = device(&warden, "a").await;
    const STEPS: usize = 40;
    const PER_STEP: usize = 50;
    for _ in 0..STEPS {
        for _ in 0..PER_STEP {
            device
                .client
                .publish(
                    "iot-2/evt/big/fmt/bin",
                    QoS::AtMostOnce,
                    false,
                    vec![1u8; 16 * 1024],
                )
                .await
                .unwrap();
        }
        let mut received = 0;
        while received < PER_STEP {
            let publish = reader.next_publish().await;
            if publish.topic.contains("/evt/") {
                received += 1;
            }
        }
    }
    drop(stuck);
}
