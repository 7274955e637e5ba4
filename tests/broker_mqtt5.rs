//! MQTT 5 clients and QoS 2 through the proxy in front of brokers that have neither: RabbitMQ
//! 3.10 (one node for this binary, a virtual host per test) and NATS (Debian's 2.9 and the
//! current server). The proxy speaks MQTT 3.1.1 and QoS 1 to them, and MQTT 5 and QoS 2 to its
//! clients, as docs/brokers.md says.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, Filter, Packet, PubAckReason, PublishProperties,
    SubscribeReasonCode,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;

use support::brokers::{AnyBroker, BrokerKind};
use support::{standard_policy, Warden, WAIT};

/// The brokers without MQTT 5 and without QoS 2 (NATS 2.10 and later has QoS 2, but
/// `upstream.broker: nats` does not assume it).
const WITHOUT_MQTT5: [BrokerKind; 3] = [BrokerKind::RabbitMq, BrokerKind::Nats29, BrokerKind::Nats];

/// How long a test waits to be sure something does not arrive, after a later message that
/// would come behind it did.
const QUIET: Duration = Duration::from_millis(300);

/// An MQTT 5 client (rumqttc v5) and the packets it received.
struct Client5 {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
    /// Which broker and client this is, for failure messages.
    label: String,
}

async fn connect5(
    kind: BrokerKind,
    addr: SocketAddr,
    id: &str,
    user: &str,
    password: &str,
) -> Result<(Client5, ConnAck), ConnectionError> {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, password);
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let connack = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(connack))) => return Ok(connack),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    })
    .await
    .expect("CONNACK in time")?;
    let (tx, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(packet)) => {
                    if tx.send(Ok(packet)).is_err() {
                        return;
                    }
                }
                Ok(Event::Outgoing(_)) => {}
                Err(error) => {
                    let _ = tx.send(Err(error.to_string()));
                    return;
                }
            }
        }
    });
    let label = format!("{kind:?}, {id}");
    Ok((
        Client5 {
            client,
            events,
            label,
        },
        connack,
    ))
}

impl Client5 {
    /// The next packet of the kind `pick` accepts, within [`WAIT`].
    async fn next<T>(&mut self, what: &str, mut pick: impl FnMut(Packet) -> Option<T>) -> T {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(packet)) => {
                        if let Some(found) = pick(packet) {
                            return found;
                        }
                    }
                    other => panic!(
                        "{}: the connection ended before {what}: {other:?}",
                        self.label
                    ),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{}: {what} in time", self.label))
    }

    async fn publish(&mut self) -> (String, Vec<u8>) {
        self.next("a PUBLISH", |packet| match packet {
            Packet::Publish(publish) => Some((
                String::from_utf8_lossy(&publish.topic).into_owned(),
                publish.payload.to_vec(),
            )),
            _ => None,
        })
        .await
    }

    /// Waits for the connection to end, and returns the error that ended it.
    async fn closed(&mut self) -> String {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return error,
                    None => return String::new(),
                }
            }
        })
        .await
        .expect("the connection ends in time")
    }

    async fn puback(&mut self) -> PubAckReason {
        self.next("a PUBACK", |packet| match packet {
            Packet::PubAck(ack) => Some(ack.reason),
            _ => None,
        })
        .await
    }

    async fn suback(&mut self) -> Vec<SubscribeReasonCode> {
        self.next("a SUBACK", |packet| match packet {
            Packet::SubAck(ack) => Some(ack.return_codes),
            _ => None,
        })
        .await
    }
}

fn alias(alias: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    }
}

/// An MQTT 5 device and application over each broker without MQTT 5: the CONNACK says what
/// the session offers, QoS 0 and 1 events arrive (the second by topic alias alone, with
/// properties the broker cannot carry), a request with a response topic is refused with 0x83,
/// a No Local subscription is refused, and a broker declared with MQTT 5 that has none makes
/// the proxy answer 0x84, not "server unavailable".
#[tokio::test]
async fn mqtt5_clients_over_each_broker_without_mqtt5() {
    for kind in WITHOUT_MQTT5 {
        let broker = AnyBroker::start(kind).await;
        let warden = Warden::start_in_front(&broker, &standard_policy(), "", "").await;
        let (mut app, _) = connect5(
            kind,
            warden.addr,
            "a:org1:app5",
            "a-org1-key0000001",
            "app-token",
        )
        .await
        .unwrap_or_else(|error| panic!("{kind:?}: app refused: {error:?}"));
        app.client
            .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::ExactlyOnce)
            .await
            .unwrap();
        assert_eq!(
            app.suback().await,
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            "{kind:?}: QoS 2 is granted 1"
        );
        let (mut device, connack) = connect5(
            kind,
            warden.addr,
            "d:org1:sensor:dev1",
            "use-token-auth",
            "dev1-token",
        )
        .await
        .unwrap_or_else(|error| panic!("{kind:?}: device refused: {error:?}"));
        let offered = connack.properties.expect("CONNACK properties");
        assert_eq!(offered.max_qos, Some(1), "{kind:?}");
        assert_eq!(offered.topic_alias_max, Some(64), "{kind:?}");
        assert_eq!(
            offered.subscription_identifiers_available,
            Some(0),
            "{kind:?}"
        );

        // QoS 0, setting topic alias 1.
        device
            .client
            .publish_with_properties(
                "iot-2/evt/temp/fmt/json",
                QoS::AtMostOnce,
                false,
                "zero",
                alias(1),
            )
            .await
            .unwrap();
        let expected_topic = "iot-2/type/sensor/id/dev1/evt/temp/fmt/json".to_owned();
        assert_eq!(
            app.publish().await,
            (expected_topic.clone(), b"zero".to_vec()),
            "{kind:?}"
        );
        // QoS 1 by the alias alone, with properties the broker cannot carry (dropped).
        let properties = PublishProperties {
            content_type: Some("application/json".into()),
            user_properties: vec![("k".into(), "v".into())],
            message_expiry_interval: Some(60),
            ..alias(1)
        };
        device
            .client
            .publish_with_properties("", QoS::AtLeastOnce, false, "one", properties)
            .await
            .unwrap();
        assert_eq!(device.puback().await, PubAckReason::Success, "{kind:?}");
        assert_eq!(
            app.publish().await,
            (expected_topic.clone(), b"one".to_vec()),
            "{kind:?}"
        );

        // A request whose answer could never come back is refused; the next event arrives
        // and nothing before it.
        let request = PublishProperties {
            response_topic: Some("iot-2/evt/reply/fmt/json".into()),
            ..Default::default()
        };
        device
            .client
            .publish_with_properties(
                "iot-2/evt/temp/fmt/json",
                QoS::AtLeastOnce,
                false,
                "request",
                request,
            )
            .await
            .unwrap();
        // rumqttc v5 ends its event loop on a PUBACK with a failure reason code.
        let refused = device.closed().await;
        assert!(
            refused.contains("ImplementationSpecificError"),
            "{kind:?}: {refused}"
        );
        let (mut device, _) = connect5(
            kind,
            warden.addr,
            "d:org1:sensor:dev1",
            "use-token-auth",
            "dev1-token",
        )
        .await
        .unwrap_or_else(|error| panic!("{kind:?}: device refused: {error:?}"));
        device
            .client
            .publish("iot-2/evt/temp/fmt/json", QoS::AtLeastOnce, false, "after")
            .await
            .unwrap();
        assert_eq!(device.puback().await, PubAckReason::Success, "{kind:?}");
        assert_eq!(
            app.publish().await,
            (expected_topic, b"after".to_vec()),
            "{kind:?}"
        );

        // No Local cannot be kept by a 3.1.1 broker: the filter is refused (and rumqttc v5
        // ends its event loop on the SUBACK).
        let mut no_local = Filter::new("iot-2/cmd/+/fmt/+", QoS::AtLeastOnce);
        no_local.nolocal = true;
        device.client.subscribe_many([no_local]).await.unwrap();
        let refused = device.closed().await;
        assert!(
            refused.contains("Subscribe failed with reason 'ImplementationSpecific'"),
            "{kind:?}: {refused}"
        );
        drop(warden);

        // Declared with MQTT 5, which the broker refuses: 0x84, not 0x88 (retry forever).
        let warden = Warden::start_in_front(
            &broker,
            &standard_policy(),
            "  capabilities: { mqtt5: true }\n",
            "",
        )
        .await;
        let refused = connect5(
            kind,
            warden.addr,
            "d:org1:sensor:dev2",
            "use-token-auth",
            "dev2-token",
        )
        .await
        .err();
        assert!(
            matches!(
                refused,
                Some(ConnectionError::ConnectionRefused(
                    ConnectReturnCode::UnsupportedProtocolVersion
                ))
            ),
            "{kind:?}: {refused:?}"
        );
        broker.stop().await;
    }
}

/// Publishes one QoS 2 message with rumqttc v4 and waits for its PUBCOMP: `false` when the
/// connection ended first or nothing came within [`WAIT`].
async fn publish_qos2_v4(
    addr: SocketAddr,
    device: &str,
    topic: &str,
    payload: &str,
) -> Result<(), String> {
    let options = support::v4::options(
        addr,
        &format!("d:org1:sensor:{device}"),
        Some("use-token-auth"),
        Some(&format!("{device}-token")),
    );
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(topic, rumqttc::QoS::ExactlyOnce, false, payload)
        .await
        .map_err(|error| format!("QoS 2 PUBLISH not queued: {error}"))?;
    let completed = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))) => return Ok(()),
                // A PUBACK for a QoS 2 PUBLISH (RabbitMQ's answer) is not a completion.
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                    return Err("PUBACK for a QoS 2 PUBLISH".to_owned())
                }
                Ok(_) => {}
                Err(error) => return Err(format!("before PUBCOMP: {error}")),
            }
        }
    })
    .await
    .unwrap_or_else(|_| Err("no PUBCOMP in time".to_owned()));
    // The connection is still alive after the flow: the broker did not close it.
    let alive = match completed {
        Err(why) => Err(why),
        Ok(()) => {
            client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, "marker")
                .await
                .map_err(|error| format!("marker not queued: {error}"))?;
            tokio::time::timeout(WAIT, async {
                loop {
                    match eventloop.poll().await {
                        Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return Ok(()),
                        Ok(_) => {}
                        Err(error) => return Err(format!("before the marker's PUBACK: {error}")),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| Err("no PUBACK for the marker in time".to_owned()))
        }
    };
    let _ = client.disconnect().await;
    alive
}

/// Publishes one QoS 2 message with `mosquitto_pub` (which exits 0 only after its PUBCOMP).
async fn mosquitto_pub_qos2(addr: SocketAddr, version: &str, payload: &str) -> bool {
    let status = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args([
            "-i",
            "d:org1:sensor:dev2",
            "-u",
            "use-token-auth",
            "-P",
            "dev2-token",
        ])
        .args([
            "-t",
            "iot-2/evt/q2/fmt/txt",
            "-q",
            "2",
            "-V",
            version,
            "-m",
            payload,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    matches!(tokio::time::timeout(WAIT, status).await, Ok(Ok(status)) if status.success())
}

/// QoS 2 over each broker without it: the proxy completes the client's flow (PUBREC after the
/// broker's PUBACK, then PUBREL / PUBCOMP) and forwards at QoS 1, the device's connection
/// stays up, the message arrives once, and a QoS 2 subscription is granted 1.
#[tokio::test]
async fn qos2_over_each_broker_without_qos2_completes_and_arrives_once() {
    for kind in WITHOUT_MQTT5 {
        let broker = AnyBroker::start(kind).await;
        let warden = Warden::start_in_front(&broker, &standard_policy(), "", "").await;
        let mut app = support::v4::org1_app(warden.addr, "a:org1:watcher").await;
        app.client
            .subscribe("iot-2/type/+/id/+/evt/+/fmt/+", rumqttc::QoS::ExactlyOnce)
            .await
            .unwrap();
        assert_eq!(
            app.suback().await,
            [rumqttc::SubscribeReasonCode::Success(
                rumqttc::QoS::AtLeastOnce
            )],
            "{kind:?}: granted 1"
        );

        if let Err(why) =
            publish_qos2_v4(warden.addr, "dev1", "iot-2/evt/q2/fmt/txt", "rumqttc").await
        {
            panic!("{kind:?}: rumqttc's QoS 2 flow completes and the connection stays: {why}");
        }
        let first = app.next_publish().await;
        assert_eq!(&first.payload[..], b"rumqttc", "{kind:?}");
        assert_eq!(first.qos, rumqttc::QoS::AtLeastOnce, "{kind:?}");
        // Exactly once: the next delivery is the marker sent after the flow completed.
        assert_eq!(&app.next_publish().await.payload[..], b"marker", "{kind:?}");

        // MQTT 3.1.1 only: an MQTT 5 mosquitto_pub is told Maximum QoS 1 and sends nothing.
        assert!(
            mosquitto_pub_qos2(warden.addr, "mqttv311", "mosquitto_pub").await,
            "{kind:?}: mosquitto_pub -q 2 completes"
        );
        assert_eq!(
            &app.next_publish().await.payload[..],
            b"mosquitto_pub",
            "{kind:?}"
        );
        assert!(
            app.next_publish_within(QUIET).await.is_none(),
            "{kind:?}: no copy"
        );
        broker.stop().await;
    }
}
