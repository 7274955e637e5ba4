//! The full access model: groups narrowing deliveries, the reject violation policy, gateway
//! notifications, and scalable applications sharing a load.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rumqttc::{QoS, SubscribeReasonCode};
use support::{mon, sha256_token, v4, Broker, Warden};

fn policy(on_violation: &str) -> String {
    format!(
        r#"
orgs:
  org1:
    on_violation: {on_violation}
    limits: {{ publish_rate: {{ device: "100000/s", gateway: "100000/s", application: "100000/s" }} }}
    device_types:
      sensor: {{}}
      edge-gw: {{ class: gateway }}
    devices:
      sensor/dev1: {{ token: "{t}", groups: [line-1] }}
      sensor/dev2: {{ token: "{t}", groups: [line-2] }}
      edge-gw/std: {{ token: "{t}", role: standard, groups: [line-1] }}
    api_keys:
      a-org1-allgroups1: {{ token: "{t}" }}
      a-org1-line1only1: {{ token: "{t}", groups: [line-1] }}
      a-org1-viewer0001: {{ token: "{t}", role: visualization }}
"#,
        t = sha256_token("t"),
    )
}

async fn app(warden: &Warden, id: &str, key: &str) -> v4::Client {
    v4::connect(warden.addr, id, Some(key), Some("t"))
        .await
        .expect("app connects")
}

async fn device(warden: &Warden, id: &str) -> v4::Client {
    v4::connect(warden.addr, id, Some("use-token-auth"), Some("t"))
        .await
        .expect("device connects")
}

#[tokio::test]
async fn group_limited_keys_receive_only_their_groups() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("disconnect")).await;
    let mut limited = app(&warden, "a:org1:limited", "a-org1-line1only1").await;
    limited
        .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    limited
        .subscribe("iot-2/type/+/id/+/mon", QoS::AtLeastOnce)
        .await;
    let mut everything = app(&warden, "a:org1:all", "a-org1-allgroups1").await;
    everything
        .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;

    let dev2 = device(&warden, "d:org1:sensor:dev2").await;
    dev2.client
        .publish(
            "iot-2/evt/other-group/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "line-2",
        )
        .await
        .unwrap();
    assert_eq!(
        everything.next_publish().await.topic,
        "iot-2/type/sensor/id/dev2/evt/other-group/fmt/txt"
    );
    let dev1 = device(&warden, "d:org1:sensor:dev1").await;
    dev1.client
        .publish(
            "iot-2/evt/own-group/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "line-1",
        )
        .await
        .unwrap();

    // The limited key sees dev1's status and event, and nothing of dev2 (which came first).
    loop {
        let seen = limited.next_publish().await;
        assert!(!seen.topic.contains("/dev2/"), "group leak: {}", seen.topic);
        if seen.topic.ends_with("/evt/own-group/fmt/txt") {
            break;
        }
    }
    // Publishing for a device outside the groups is denied.
    limited
        .client
        .publish(
            "iot-2/type/sensor/id/dev2/cmd/c/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    limited.closed().await;
}

#[tokio::test]
async fn reject_mode_refuses_the_operation_and_keeps_the_connection() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("reject")).await;
    let mut viewer = app(&warden, "a:org1:viewer", "a-org1-viewer0001").await;
    // One SUBSCRIBE with an allowed and two refused filters: codes in order, the allowed one live.
    viewer
        .client
        .subscribe_many(vec![
            rumqttc::SubscribeFilter::new("iot-2/type/+/id/+/mon".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("iot-2/type/+/id/+/evt/+/fmt/+".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("not/iot-2".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    let codes = viewer.suback().await;
    assert_eq!(
        codes,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure
        ]
    );
    // A refused QoS 1 publish is acknowledged and dropped; the connection stays.
    viewer
        .client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/c/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "no",
        )
        .await
        .unwrap();
    let dev1 = device(&warden, "d:org1:sensor:dev1").await;
    dev1.client
        .publish("iot-2/evt/e/fmt/txt", QoS::AtLeastOnce, false, "still here")
        .await
        .unwrap();
    let event = viewer.next_publish().await;
    assert_eq!(&event.payload[..], b"still here");
}

#[tokio::test]
async fn reject_mode_answers_mqtt5_reason_codes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("reject")).await;
    let (mut stream, connack) = support::raw::connect(
        warden.addr,
        mqtt_warden::codec::ProtocolVersion::V5,
        "a:org1:viewer5",
        Some("a-org1-viewer0001"),
        Some(b"t"),
        60,
    )
    .await;
    assert_eq!(connack[3], 0, "connected");
    // PUBLISH QoS 1 to a command topic (the role forbids it): PUBACK 0x87.
    let topic = b"iot-2/type/sensor/id/dev1/cmd/c/fmt/t";
    let mut publish = vec![
        0x32,
        (2 + topic.len() + 2 + 1 + 1) as u8,
        0,
        topic.len() as u8,
    ];
    publish.extend_from_slice(topic);
    publish.extend_from_slice(&[0x00, 0x07, 0x00, b'x']);
    // SUBSCRIBE to a non-WIoTP filter: SUBACK 0x8F.
    let subscribe = [
        0x82, 0x09, 0x00, 0x09, 0x00, 0x00, 0x03, b'a', b'/', b'b', 0x01,
    ];
    stream.write_all(&publish).await.unwrap();
    stream.write_all(&subscribe).await.unwrap();
    let mut puback = [0u8; 5];
    stream.read_exact(&mut puback).await.unwrap();
    assert_eq!(
        puback,
        [0x40, 0x03, 0x00, 0x07, 0x87],
        "PUBACK 0x87 Not authorized"
    );
    let mut suback = [0u8; 6];
    stream.read_exact(&mut suback).await.unwrap();
    assert_eq!(suback, [0x90, 0x04, 0x00, 0x09, 0x00, 0x8F]);
}

#[tokio::test]
async fn gateway_refusals_are_notified_and_the_gateway_stays() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("disconnect")).await;
    let mut gateway = device(&warden, "g:org1:edge-gw:std").await;
    gateway
        .subscribe("iot-2/type/edge-gw/id/std/notify", QoS::AtLeastOnce)
        .await;
    // A standard gateway limited to line-1 publishing for dev2 (line-2): dropped and notified.
    gateway
        .client
        .publish(
            "iot-2/type/sensor/id/dev2/evt/e/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    let notification = gateway.next_publish().await;
    assert_eq!(notification.topic, "iot-2/type/edge-gw/id/std/notify");
    let body = mon::parse(&notification.payload);
    assert_eq!(body["Request"], "Publish");
    assert_eq!(body["Topic"], "iot-2/type/sensor/id/dev2/evt/e/fmt/txt");
    assert_eq!(body["Type"], "sensor");
    assert_eq!(body["Id"], "dev2");
    assert_eq!(body["Client"], "g:org1:edge-gw:std");
    assert_eq!(body["RC"], 180);
    for field in ["Time", "Message"] {
        assert!(body[field].is_string(), "{field}");
    }
    // A refused subscription gets SUBACK 0x80 and a notification; the gateway stays connected.
    assert_eq!(
        gateway
            .subscribe_codes("iot-2/type/sensor/id/dev2/cmd/+/fmt/+", QoS::AtLeastOnce)
            .await,
        vec![SubscribeReasonCode::Failure]
    );
    assert_eq!(
        mon::parse(&gateway.next_publish().await.payload)["Request"],
        "Subscribe"
    );
    // Commands for its own group still arrive.
    gateway
        .subscribe("iot-2/type/sensor/id/dev1/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let commander = app(&warden, "a:org1:cmd", "a-org1-allgroups1").await;
    commander
        .client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/go/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "go",
        )
        .await
        .unwrap();
    assert_eq!(
        gateway.next_publish().await.topic,
        "iot-2/type/sensor/id/dev1/cmd/go/fmt/txt"
    );
}

#[tokio::test]
async fn scalable_application_instances_share_the_stream() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("disconnect")).await;
    let mut instances = Vec::new();
    for _ in 0..3 {
        let mut options = v4::options(
            warden.addr,
            "A:org1:shared",
            Some("a-org1-allgroups1"),
            Some("t"),
        );
        options.set_clean_session(false);
        let mut instance = v4::connect_with(options)
            .await
            .expect("scalable instance connects");
        instance
            .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
            .await;
        instances.push(instance);
    }
    // Clean session is required to be false for A:ORG:APP.
    let clean = v4::connect(
        warden.addr,
        "A:org1:shared",
        Some("a-org1-allgroups1"),
        Some("t"),
    )
    .await;
    assert!(clean.is_err());

    let dev1 = device(&warden, "d:org1:sensor:dev1").await;
    const EVENTS: usize = 60;
    for n in 0..EVENTS {
        dev1.client
            .publish(
                "iot-2/evt/n/fmt/txt",
                QoS::AtLeastOnce,
                false,
                n.to_string(),
            )
            .await
            .unwrap();
    }
    // Every event reaches exactly one instance.
    let mut seen = HashSet::new();
    let mut per_instance = [0usize; 3];
    while seen.len() < EVENTS {
        let mut progressed = false;
        for (i, instance) in instances.iter_mut().enumerate() {
            if let Some(publish) = instance
                .next_publish_within(Duration::from_millis(50))
                .await
            {
                let n: usize = std::str::from_utf8(&publish.payload)
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(seen.insert(n), "event {n} delivered twice");
                per_instance[i] += 1;
                progressed = true;
            }
        }
        assert!(
            progressed || seen.len() == EVENTS,
            "stalled after {} events",
            seen.len()
        );
    }
    assert!(
        per_instance.iter().all(|&count| count > 0),
        "load is shared: {per_instance:?}"
    );

    // Two instances unsubscribe; the remaining one then receives everything.
    for instance in &mut instances[1..] {
        instance
            .client
            .unsubscribe("iot-2/type/+/id/+/evt/+/fmt/+")
            .await
            .unwrap();
    }
    for instance in &mut instances[1..] {
        instance.unsuback().await;
    }
    for n in 0..10 {
        dev1.client
            .publish(
                "iot-2/evt/after/fmt/txt",
                QoS::AtLeastOnce,
                false,
                n.to_string(),
            )
            .await
            .unwrap();
    }
    for n in 0..10 {
        let publish = instances[0].next_publish().await;
        assert_eq!(publish.topic, "iot-2/type/sensor/id/dev1/evt/after/fmt/txt");
        assert_eq!(&publish.payload[..], n.to_string().as_bytes());
    }
}

#[tokio::test]
async fn scalable_application_status_is_cleared_by_the_last_instance() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy("disconnect")).await;
    let topic = "iot-2/app/pool/mon";
    let mut watcher = app(&warden, "a:org1:watcher", "a-org1-allgroups1").await;
    watcher.subscribe(topic, QoS::AtMostOnce).await;
    let first = app(&warden, "A:org1:pool:one", "a-org1-allgroups1").await;
    let second = app(&warden, "A:org1:pool:two", "a-org1-allgroups1").await;
    let mut actions = Vec::new();
    while actions.len() < 2 {
        actions.push(mon::parse(&watcher.next_publish().await.payload)["Action"].clone());
    }
    assert_eq!(actions, ["Connect", "Connect"]);

    first.disconnect().await;
    assert_eq!(
        mon::parse(&watcher.next_publish().await.payload)["Action"],
        "Disconnect"
    );
    // One instance is still live: its retained Connect stays for new subscribers.
    let mut late = app(&warden, "a:org1:late", "a-org1-allgroups1").await;
    late.subscribe(topic, QoS::AtMostOnce).await;
    let retained = late.next_publish().await;
    assert!(retained.retain);
    assert_eq!(mon::parse(&retained.payload)["Action"], "Connect");

    second.disconnect().await;
    assert_eq!(
        mon::parse(&watcher.next_publish().await.payload)["Action"],
        "Disconnect"
    );
    // The last instance left: no retained status remains (the sentinel is the first message).
    let mut later = app(&warden, "a:org1:later", "a-org1-allgroups1").await;
    later.subscribe(topic, QoS::AtMostOnce).await;
    later
        .subscribe("iot-2/app/later/mon", QoS::AtMostOnce)
        .await;
    assert_eq!(later.next_publish().await.topic, "iot-2/app/later/mon");
}
