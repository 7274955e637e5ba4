//! The same scenarios through the proxy in front of each supported broker: Mosquitto, RabbitMQ
//! (one node for this binary, a virtual host per test) and NATS (Debian's 2.9 and the current
//! server), all private processes on free loopback ports.

mod support;

use rumqttc::QoS;
use support::brokers::{AnyBroker, BrokerKind};
use support::WAIT;

/// The test harness itself: each broker starts and relays a message between two direct clients.
#[tokio::test]
async fn each_broker_starts_and_relays_a_message_between_direct_clients() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let mut subscriber = support::v4::connect_with(broker.client_options("observer"))
            .await
            .unwrap_or_else(|refused| panic!("{kind:?}: observer refused: {refused:?}"));
        subscriber.subscribe("harness/+", QoS::AtLeastOnce).await;
        let mut publisher = support::v4::connect_with(broker.client_options("publisher"))
            .await
            .unwrap_or_else(|refused| panic!("{kind:?}: publisher refused: {refused:?}"));
        assert!(
            publisher
                .publish_acked("harness/one", b"hello".to_vec())
                .await,
            "{kind:?}: PUBACK"
        );
        let message = tokio::time::timeout(WAIT, subscriber.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no delivery"));
        assert_eq!(message.topic, "harness/one", "{kind:?}");
        assert_eq!(&message.payload[..], b"hello", "{kind:?}");
        broker.stop().await;
    }
}

/// The proxy in front of each broker kind: a device's events at QoS 0 and 1 reach an
/// application, and the application's command reaches the device.
#[tokio::test]
async fn events_and_commands_pass_through_the_proxy_on_each_broker() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let warden =
            support::Warden::start_in_front(&broker, &support::standard_policy(), "", "").await;
        let mut app = support::v4::org1_app(warden.addr, "a:org1:watcher").await;
        app.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/json", QoS::AtLeastOnce)
            .await;
        let mut device = support::v4::org1_device(warden.addr, "dev1").await;
        device
            .subscribe("iot-2/cmd/+/fmt/+", QoS::AtLeastOnce)
            .await;

        device
            .client
            .publish(
                "iot-2/evt/fast/fmt/json",
                QoS::AtMostOnce,
                false,
                b"{}".to_vec(),
            )
            .await
            .expect("queued");
        let message = tokio::time::timeout(WAIT, app.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no QoS 0 delivery"));
        assert_eq!(
            message.topic, "iot-2/type/sensor/id/dev1/evt/fast/fmt/json",
            "{kind:?}"
        );

        assert!(
            device
                .publish_acked("iot-2/evt/temp/fmt/json", b"{\"t\":1}".to_vec())
                .await,
            "{kind:?}: PUBACK"
        );
        let message = tokio::time::timeout(WAIT, app.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no QoS 1 delivery"));
        assert_eq!(
            message.topic, "iot-2/type/sensor/id/dev1/evt/temp/fmt/json",
            "{kind:?}"
        );
        assert_eq!(message.qos, QoS::AtLeastOnce, "{kind:?}");

        assert!(
            app.publish_acked(
                "iot-2/type/sensor/id/dev1/cmd/reboot/fmt/json",
                b"{}".to_vec()
            )
            .await,
            "{kind:?}: command PUBACK"
        );
        let command = tokio::time::timeout(WAIT, device.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no command delivery"));
        assert_eq!(command.topic, "iot-2/cmd/reboot/fmt/json", "{kind:?}");
        broker.stop().await;
    }
}
