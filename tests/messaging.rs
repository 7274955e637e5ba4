//! Events, commands, QoS flows, retained flags and org isolation, end to end through a real
//! Mosquitto with real MQTT 3.1.1 clients.

mod support;

use std::time::Duration;

use rumqttc::QoS;
use support::{standard_policy, v4, Broker, Warden};

const DEV1: (&str, &str, &str) = ("d:org1:sensor:dev1", "use-token-auth", "dev1-token");
const APP1: (&str, &str, &str) = ("a:org1:app1", "a-org1-key0000001", "app-token");
const APP2: (&str, &str, &str) = ("a:org2:app2", "a-org2-key0000002", "org2-app-token");

async fn connect(warden: &Warden, who: (&str, &str, &str)) -> v4::Client {
    v4::connect(warden.addr, who.0, Some(who.1), Some(who.2))
        .await
        .expect("connects")
}

#[tokio::test]
async fn device_events_reach_a_wildcard_application_in_full_form() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = connect(&warden, APP1).await;
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let device = connect(&warden, DEV1).await;

    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let payload = format!("{{\"qos\":{}}}", qos as u8);
        device
            .client
            .publish("iot-2/evt/temp/fmt/json", qos, false, payload.clone())
            .await
            .unwrap();
        let received = app.next_publish().await;
        assert_eq!(
            received.topic,
            "iot-2/type/sensor/id/dev1/evt/temp/fmt/json"
        );
        assert_eq!(&received.payload[..], payload.as_bytes());
        let expected = if qos == QoS::AtMostOnce {
            QoS::AtMostOnce
        } else {
            QoS::AtLeastOnce
        };
        assert_eq!(received.qos, expected);
    }
}

#[tokio::test]
async fn application_commands_reach_the_device_in_short_form() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut device = connect(&warden, DEV1).await;
    device
        .subscribe("iot-2/cmd/+/fmt/+", QoS::ExactlyOnce)
        .await;
    let app = connect(&warden, APP1).await;
    app.client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/reboot/fmt/json",
            QoS::ExactlyOnce,
            false,
            "{\"delay\":0}",
        )
        .await
        .unwrap();
    let command = device.next_publish().await;
    assert_eq!(command.topic, "iot-2/cmd/reboot/fmt/json");
    assert_eq!(&command.payload[..], b"{\"delay\":0}");
    assert_eq!(command.qos, QoS::ExactlyOnce);

    // A command for another device of the same org never reaches dev1.
    app.client
        .publish(
            "iot-2/type/sensor/id/dev2/cmd/reboot/fmt/json",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    app.client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/after/fmt/json",
            QoS::AtLeastOnce,
            false,
            "y",
        )
        .await
        .unwrap();
    assert_eq!(
        device.next_publish().await.topic,
        "iot-2/cmd/after/fmt/json"
    );
}

#[tokio::test]
async fn retained_flags_are_stripped() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut live = connect(&warden, APP1).await;
    live.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let device = connect(&warden, DEV1).await;
    device
        .client
        .publish(
            "iot-2/evt/state/fmt/json",
            QoS::AtLeastOnce,
            true,
            "retained?",
        )
        .await
        .unwrap();
    let received = live.next_publish().await;
    assert!(!received.retain);

    // A later subscriber gets no retained copy: the sentinel published after subscribing arrives first.
    let mut late = v4::connect(warden.addr, "a:org1:late", Some(APP1.1), Some(APP1.2))
        .await
        .unwrap();
    late.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    device
        .client
        .publish("iot-2/evt/sentinel/fmt/json", QoS::AtLeastOnce, false, "s")
        .await
        .unwrap();
    assert_eq!(
        late.next_publish().await.topic,
        "iot-2/type/sensor/id/dev1/evt/sentinel/fmt/json"
    );
}

#[tokio::test]
async fn no_message_crosses_orgs() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app1 = connect(&warden, APP1).await;
    app1.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let mut app2 = connect(&warden, APP2).await;
    app2.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    app2.subscribe("iot-2/type/+/id/+/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    app2.subscribe("iot-2/type/+/id/+/mon", QoS::AtLeastOnce)
        .await;
    app2.subscribe("iot-2/app/+/mon", QoS::AtLeastOnce).await;

    // Org 1 traffic of every kind: a device connecting (mon), events, and commands.
    let device1 = connect(&warden, DEV1).await;
    device1
        .client
        .publish("iot-2/evt/secret/fmt/json", QoS::AtLeastOnce, false, "org1")
        .await
        .unwrap();
    app1.client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/c/fmt/json",
            QoS::AtLeastOnce,
            false,
            "org1",
        )
        .await
        .unwrap();
    loop {
        let seen = app1.next_publish().await;
        if seen.topic.ends_with("/evt/secret/fmt/json") {
            break;
        }
    }

    // The org 2 sentinel is published after all of that was handled by the broker, so any leak
    // would have reached app2 before it.
    let device2 = v4::connect(
        warden.addr,
        "d:org2:sensor:dev1",
        Some("use-token-auth"),
        Some("org2-dev-token"),
    )
    .await
    .unwrap();
    device2
        .client
        .publish(
            "iot-2/evt/sentinel/fmt/json",
            QoS::AtLeastOnce,
            false,
            "org2",
        )
        .await
        .unwrap();
    loop {
        let seen = app2.next_publish().await;
        assert_ne!(
            &seen.payload[..],
            b"org1",
            "org1 message leaked to org2 on {}",
            seen.topic
        );
        assert!(
            !seen.topic.contains("org1"),
            "org1 name leaked: {}",
            seen.topic
        );
        if seen.topic == "iot-2/type/sensor/id/dev1/evt/sentinel/fmt/json" {
            break;
        }
        // Only org2's own mon messages may come before.
        assert!(seen.topic.ends_with("/mon"), "unexpected {}", seen.topic);
        let status = support::mon::parse(&seen.payload);
        assert!(
            status["ClientID"].as_str().unwrap().contains(":org2:"),
            "{status}"
        );
    }
}

#[tokio::test]
async fn escape_attempts_are_refused() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    for filter in [
        "#",
        "+/#",
        "$SYS/#",
        "+/iot-2/type/+/id/+/evt/+/fmt/+",
        "$share/g/iot-2/type/+/id/+/evt/+/fmt/+",
        "iot-2/#",
        "org2/#",
        "../org2/#",
    ] {
        let mut app = connect(&warden, APP1).await;
        app.client.subscribe(filter, QoS::AtMostOnce).await.unwrap();
        let error = app.closed().await;
        assert!(!error.is_empty(), "{filter}: connection must close");
    }
    for topic in [
        "org2/iot-2/type/sensor/id/dev1/evt/e/fmt/f",
        "$SYS/x",
        "iot-2/type/sensor/id/dev1/mon",
        "iot-2/app/app2/mon",
    ] {
        let mut app = connect(&warden, APP1).await;
        app.client
            .publish(topic, QoS::AtLeastOnce, false, "x")
            .await
            .unwrap();
        app.closed().await;
    }
}

#[tokio::test]
async fn gateway_publishes_for_devices_and_receives_their_commands() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = connect(&warden, APP1).await;
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let mut gateway = v4::connect(
        warden.addr,
        "g:org1:edge-gw:gw1",
        Some("use-token-auth"),
        Some("gw1-token"),
    )
    .await
    .unwrap();
    gateway
        .subscribe("iot-2/type/+/id/+/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    gateway
        .client
        .publish(
            "iot-2/type/sensor/id/behind-gw/evt/temp/fmt/json",
            QoS::AtLeastOnce,
            false,
            "21.5",
        )
        .await
        .unwrap();
    assert_eq!(
        app.next_publish().await.topic,
        "iot-2/type/sensor/id/behind-gw/evt/temp/fmt/json"
    );
    app.client
        .publish(
            "iot-2/type/sensor/id/behind-gw/cmd/set/fmt/json",
            QoS::AtLeastOnce,
            false,
            "1",
        )
        .await
        .unwrap();
    assert_eq!(
        gateway.next_publish().await.topic,
        "iot-2/type/sensor/id/behind-gw/cmd/set/fmt/json"
    );
}

#[tokio::test]
async fn persistent_sessions_keep_qos1_messages_across_reconnects() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut options = v4::options(warden.addr, DEV1.0, Some(DEV1.1), Some(DEV1.2));
    options.set_clean_session(false);
    let mut device = v4::connect_with(options.clone()).await.unwrap();
    device
        .subscribe("iot-2/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    device.disconnect().await;
    device.closed().await;

    let app = connect(&warden, APP1).await;
    app.client
        .publish(
            "iot-2/type/sensor/id/dev1/cmd/queued/fmt/txt",
            QoS::AtLeastOnce,
            false,
            "while away",
        )
        .await
        .unwrap();
    // The app's PUBACK proves the broker stored the message for the offline session.
    let mut device = v4::connect_with(options).await.unwrap();
    let queued = device
        .next_publish_within(Duration::from_secs(10))
        .await
        .expect("queued command delivered");
    assert_eq!(queued.topic, "iot-2/cmd/queued/fmt/txt");
}
