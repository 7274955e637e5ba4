//! MQTT 5 clients (rumqttc v5, mosquitto_pub): properties pass through, reason codes and reason
//! strings on refusals and violations, and topic aliases stay correct while topics are rewritten.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;

use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, MqttOptions};
use tokio::sync::mpsc;

use support::{standard_policy, Broker, Warden, WAIT};

struct Client {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Packet, String>>,
}

async fn connect(
    addr: SocketAddr,
    id: &str,
    user: &str,
    password: &str,
) -> Result<Client, ConnectionError> {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, password);
    options.set_max_packet_size(Some(512 * 1024));
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let first = tokio::time::timeout(WAIT, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(error) => return Err(error),
            }
        }
    })
    .await
    .expect("CONNACK in time");
    first?;
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
    Ok(Client { client, events })
}

impl Client {
    async fn next(&mut self) -> Packet {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("a packet arrives")
            .expect("event loop alive")
            .expect("connection alive")
    }

    /// Waits for the connection to end and returns the error that ended it.
    async fn closed(&mut self) -> String {
        loop {
            match tokio::time::timeout(WAIT, self.events.recv())
                .await
                .expect("the connection closes")
            {
                Some(Ok(_)) => {}
                Some(Err(error)) => return error,
                None => return String::new(),
            }
        }
    }

    async fn next_publish(&mut self) -> rumqttc::v5::mqttbytes::v5::Publish {
        loop {
            if let Packet::Publish(publish) = self.next().await {
                return publish;
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            if let Packet::SubAck(ack) = self.next().await {
                assert!(
                    ack.return_codes.iter().all(|code| matches!(
                        code,
                        rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                    )),
                    "{ack:?}"
                );
                return;
            }
        }
    }
}

#[tokio::test]
async fn v5_events_keep_their_properties() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = connect(warden.addr, "a:org1:app5", "a-org1-key0000001", "app-token")
        .await
        .unwrap();
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+").await;
    let device = connect(
        warden.addr,
        "d:org1:sensor:dev1",
        "use-token-auth",
        "dev1-token",
    )
    .await
    .unwrap();
    let properties = PublishProperties {
        content_type: Some("application/json".into()),
        user_properties: vec![(
            "traceparent".into(),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into(),
        )],
        correlation_data: Some(bytes::Bytes::from_static(b"corr-1")),
        ..Default::default()
    };
    device
        .client
        .publish_with_properties(
            "iot-2/evt/temp/fmt/json",
            QoS::AtLeastOnce,
            false,
            "{}",
            properties,
        )
        .await
        .unwrap();
    let received = app.next_publish().await;
    assert_eq!(
        &received.topic[..],
        b"iot-2/type/sensor/id/dev1/evt/temp/fmt/json"
    );
    let props = received.properties.expect("properties forwarded");
    assert_eq!(props.content_type.as_deref(), Some("application/json"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(props.user_properties[0].0, "traceparent");
}

#[tokio::test]
async fn v5_refusals_carry_reason_codes() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let bad_token = connect(warden.addr, "d:org1:sensor:dev1", "use-token-auth", "wrong")
        .await
        .err();
    assert!(
        matches!(
            bad_token,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::BadUserNamePassword
            ))
        ),
        "{bad_token:?}"
    );
    let unknown = connect(warden.addr, "d:org1:sensor:nobody", "use-token-auth", "x")
        .await
        .err();
    assert!(
        matches!(
            unknown,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "{unknown:?}"
    );
    let bad_id = connect(warden.addr, "not-a-wiotp-id", "u", "p").await.err();
    assert!(
        matches!(
            bad_id,
            Some(ConnectionError::ConnectionRefused(
                ConnectReturnCode::ClientIdentifierNotValid
            ))
        ),
        "{bad_id:?}"
    );
}

#[tokio::test]
async fn v5_violation_gets_disconnect_with_reason_string() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut device = connect(
        warden.addr,
        "d:org1:sensor:dev1",
        "use-token-auth",
        "dev1-token",
    )
    .await
    .unwrap();
    device
        .client
        .publish(
            "iot-2/type/sensor/id/dev2/evt/spoof/fmt/json",
            QoS::AtLeastOnce,
            false,
            "x",
        )
        .await
        .unwrap();
    // rumqttc reports the server's DISCONNECT as the error that ends its event loop.
    let closed = device.closed().await;
    assert!(closed.contains("NotAuthorized"), "{closed}");
    assert!(
        closed.contains("The operation is not authorized"),
        "reason string: {closed}"
    );

    let mut device = connect(
        warden.addr,
        "d:org1:sensor:dev1",
        "use-token-auth",
        "dev1-token",
    )
    .await
    .unwrap();
    device
        .client
        .publish(
            "iot-2/evt/big/fmt/bin",
            QoS::AtMostOnce,
            false,
            vec![0u8; 131_073],
        )
        .await
        .unwrap();
    let closed = device.closed().await;
    assert!(closed.contains("PacketTooLarge"), "{closed}");
    assert!(closed.contains("The message size is too large"), "{closed}");
}

#[tokio::test]
async fn v5_topic_aliases_survive_the_rewrite() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut app = connect(warden.addr, "a:org1:app5", "a-org1-key0000001", "app-token")
        .await
        .unwrap();
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+").await;
    // mosquitto_pub sends the topic with the alias on the first message and an empty topic with
    // only the alias on the following ones.
    let output = tokio::process::Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &warden.addr.port().to_string(),
            "-V",
            "mqttv5",
        ])
        .args([
            "-i",
            "d:org1:sensor:dev1",
            "-u",
            "use-token-auth",
            "-P",
            "dev1-token",
        ])
        .args([
            "-t",
            "iot-2/evt/aliased/fmt/txt",
            "-D",
            "publish",
            "topic-alias",
            "1",
            "-q",
            "1",
            "-l",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = output;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"one\ntwo\nthree\n").await.unwrap();
    }
    for expected in ["one", "two", "three"] {
        let publish = app.next_publish().await;
        assert_eq!(
            &publish.topic[..],
            b"iot-2/type/sensor/id/dev1/evt/aliased/fmt/txt"
        );
        assert_eq!(&publish.payload[..], expected.as_bytes());
    }
    let status = child.wait().await.unwrap();
    assert!(status.success());
}
