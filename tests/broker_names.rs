//! Names that survive every broker, the broker probe, and failures that show (issue 11, points
//! 1, 2 and 8), on Mosquitto, RabbitMQ (one node for this binary), NATS 2.9 and current NATS.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::brokers::{AnyBroker, BrokerKind};
use support::{poll_until, v4, Warden, WAIT};

const ADMIN: &str = "admin: { bind: \"127.0.0.1:0\" }\n";

async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("admin endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

/// What each broker's probe must find, as `/readyz` writes it.
fn expected_probe(kind: BrokerKind) -> &'static str {
    match kind {
        BrokerKind::Mosquitto => "probed: mqtt5=true max_qos=2 shared_subscriptions=true retained_to_wildcards=true dot_rejected=false",
        BrokerKind::RabbitMq => "probed: mqtt5=false max_qos=1 shared_subscriptions=false retained_to_wildcards=false dot_rejected=true",
        BrokerKind::Nats29 => "probed: mqtt5=false max_qos=1 shared_subscriptions=false retained_to_wildcards=true dot_rejected=true",
        // NATS 2.10 brought QoS 2 and maps `.` itself: more than `nats` declares.
        BrokerKind::Nats => "probed: mqtt5=false max_qos=2 shared_subscriptions=false retained_to_wildcards=true dot_rejected=false",
    }
}

/// A `.` in an event ID reaches a subscribing application intact on every broker, the device's
/// Connect status reaches it too (the ledger and status topics hold dots of their own), and the
/// probe of each broker finds what its kind declares.
#[tokio::test]
async fn a_dot_in_an_event_id_arrives_intact_and_statuses_appear_on_each_broker() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let warden =
            Warden::start_in_front(&broker, &support::standard_policy(), "", ADMIN).await;
        let admin = warden.running.admin_addr.expect("admin endpoint bound");
        let mut app = v4::org1_app(warden.addr, "a:org1:watcher").await;
        app.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/json", QoS::AtLeastOnce)
            .await;
        app.subscribe("iot-2/type/+/id/+/mon", QoS::AtLeastOnce).await;
        let mut device = v4::org1_device(warden.addr, "dev1").await;
        let status = tokio::time::timeout(WAIT, app.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no Connect status"));
        assert_eq!(status.topic, "iot-2/type/sensor/id/dev1/mon", "{kind:?}");
        assert!(
            device
                .publish_acked("iot-2/evt/temp.c/fmt/json", b"{\"t\":1}".to_vec())
                .await,
            "{kind:?}: PUBACK"
        );
        let message = tokio::time::timeout(WAIT, app.next_publish())
            .await
            .unwrap_or_else(|_| panic!("{kind:?}: no delivery"));
        assert_eq!(
            message.topic, "iot-2/type/sensor/id/dev1/evt/temp.c/fmt/json",
            "{kind:?}"
        );
        let body = poll_until(WAIT, "the broker probe", || async {
            let (status, body) = http_get(admin, "/readyz").await;
            (status == 200 && !body.contains("probed: not yet")).then_some(body)
        })
        .await;
        assert!(body.contains(expected_probe(kind)), "{kind:?}: {body}");
        broker.stop().await;
    }
}
