//! Names that survive every broker, the broker probe, and failures that show (issue 11, points
//! 1, 2 and 8), on Mosquitto, RabbitMQ (one node for this binary), NATS 2.9 and current NATS.

mod support;

use std::time::{Duration, Instant};

use rumqttc::QoS;
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;

use support::brokers::{AnyBroker, BrokerKind};
use support::http_get;
use support::{mon, poll_until, v4, Warden, WAIT};

const ADMIN: &str = "admin: { bind: \"127.0.0.1:0\" }\n";

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

/// A `.` in an event ID reaches a subscribing application intact on every broker; the device's
/// Connect status, and a takeover's Disconnect (288) before the new Connect, reach it too (the
/// ledger and status topics hold dots of their own); and the probe of each broker finds what the
/// tests' brokers do.
#[tokio::test]
async fn a_dot_in_an_event_id_arrives_intact_and_statuses_appear_on_each_broker() {
    for kind in BrokerKind::ALL {
        let broker = AnyBroker::start(kind).await;
        let warden = Warden::start_in_front(&broker, &support::standard_policy(), "", ADMIN).await;
        let admin = warden.running.admin_addr.expect("admin endpoint bound");
        let mut app = v4::org1_app(warden.addr, "a:org1:watcher").await;
        app.subscribe("iot-2/type/sensor/id/dev1/evt/+/fmt/json", QoS::AtLeastOnce)
            .await;
        app.subscribe("iot-2/type/+/id/+/mon", QoS::AtLeastOnce)
            .await;
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
        // A takeover: the old session's Disconnect (288) comes before the new Connect.
        let _again = v4::org1_device(warden.addr, "dev1").await;
        let mut actions = Vec::new();
        while actions.len() < 2 {
            let status = tokio::time::timeout(WAIT, app.next_publish())
                .await
                .unwrap_or_else(|_| panic!("{kind:?}: takeover statuses {actions:?}"));
            let status = mon::parse(&status.payload);
            actions.push((status["Action"].clone(), status["CloseCode"].clone()));
        }
        assert_eq!(actions[0].0, "Disconnect", "{kind:?}: {actions:?}");
        assert_eq!(actions[0].1, 288, "{kind:?}: {actions:?}");
        assert_eq!(actions[1].0, "Connect", "{kind:?}: {actions:?}");
        drop(device);
        let body = poll_until(WAIT, "the broker probe", || async {
            let (status, body) = http_get(admin, "/readyz").await;
            (status == 200 && !body.contains("probed: not yet")).then_some(body)
        })
        .await;
        assert!(body.contains(expected_probe(kind)), "{kind:?}: {body}");
        broker.stop().await;
    }
}

/// The `warden_upstream_refusals_total` sample for `connection` and `code`, if any.
fn refusals(metrics: &str, connection: &str, code: &str) -> Option<u64> {
    let prefix =
        format!("warden_upstream_refusals_total{{connection=\"{connection}\",code=\"{code}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

/// Failures that used to be silent. RabbitMQ refuses the proxy's credentials: `/readyz` says so
/// in the broker's words, and both the control connection's and a client's refusals are counted
/// by CONNACK code. NATS 2.9 declared `generic` (so `.` is not escaped): the probe's finding that
/// `.` must be escaped is a mismatch in `/readyz` and the metrics, with the key to set.
#[tokio::test]
async fn refusals_and_a_wrong_declaration_show_in_readyz_and_metrics() {
    let rabbit = AnyBroker::start(BrokerKind::RabbitMq).await;
    let (user, _) = rabbit.credentials.clone().expect("RabbitMQ has users");
    let upstream = format!("  broker: rabbitmq\n  username: \"{user}\"\n  password: \"wrong\"\n");
    let warden = Warden::start_at(
        &rabbit.addr(),
        &support::standard_policy(),
        "  - bind: \"127.0.0.1:0\"",
        &upstream,
        ADMIN,
    )
    .await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    let body = poll_until(WAIT, "a refusal in /readyz", || async {
        let (status, body) = http_get(admin, "/readyz").await;
        (status == 503 && body.contains("CONNACK")).then_some(body)
    })
    .await;
    assert!(
        body.starts_with("not ready: the control connection to the broker is down"),
        "{body}"
    );
    assert!(
        body.contains("the broker refused the control connection: CONNACK"),
        "{body}"
    );
    let device = v4::connect(
        warden.addr,
        "d:org1:sensor:dev1",
        Some("use-token-auth"),
        Some("dev1-token"),
    )
    .await;
    assert!(device.is_err(), "the device got through");
    let (_, metrics) = http_get(admin, "/metrics").await;
    let count = |connection| -> u64 {
        ["0x04", "0x05"]
            .iter()
            .filter_map(|code| refusals(&metrics, connection, code))
            .sum()
    };
    assert!(count("control") >= 1 && count("session") == 1, "{metrics}");
    assert!(metrics.contains("warden_upstream_up 0"), "{metrics}");
    rabbit.stop().await;

    let nats = AnyBroker::start(BrokerKind::Nats29).await;
    let warden = Warden::start_at(
        &nats.addr(),
        &support::standard_policy(),
        "  - bind: \"127.0.0.1:0\"",
        "  broker: generic\n",
        ADMIN,
    )
    .await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    let body = poll_until(WAIT, "the mismatch in /readyz", || async {
        // The proxy's own names hold no `.` any more (the ledger's levels are dot-free), so
        // the control connection comes up even under the wrong declaration; the probe still
        // finds the broker rejecting `.` in client topics.
        let (_, body) = http_get(admin, "/readyz").await;
        body.contains("mismatch: escape").then_some(body)
    })
    .await;
    assert!(
        body.contains("(set upstream.capabilities.escape)"),
        "{body}"
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("warden_broker_capability_mismatch{capability=\"escape\"} 1"),
        "{metrics}"
    );
    nats.stop().await;
}

/// A broker that closes the connection during CONNECT: `/readyz` says so, the refusals are
/// counted as `closed`, and the control connection backs off instead of redialling at once.
#[tokio::test]
async fn a_broker_closing_during_connect_is_reported_and_redialled_with_backoff() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let closer = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let at = Instant::now();
                let mut buf = [0u8; 512];
                let read = stream.read(&mut buf).await.unwrap_or(0);
                // The probe's connections are not the control connection's redials, and neither
                // are the dialer's node probes (a TCP connect that sends nothing).
                if read > 0 && !buf[..read].windows(6).any(|w| w == b"-probe") {
                    accepted.lock().expect("not poisoned").push(at);
                }
                drop(stream);
            }
        })
    };
    let warden = Warden::start_at(
        &address.to_string(),
        &support::standard_policy(),
        "  - bind: \"127.0.0.1:0\"",
        "",
        ADMIN,
    )
    .await;
    let admin = warden.running.admin_addr.expect("admin endpoint bound");
    let body = poll_until(WAIT, "the closed connection in /readyz", || async {
        let (status, body) = http_get(admin, "/readyz").await;
        (status == 503 && body.contains("closed the connection before CONNACK")).then_some(body)
    })
    .await;
    assert!(body.contains("control connection"), "{body}");
    // Five redials take 0.1 + 0.2 + 0.4 + 0.8 s at least; ten a second would take 0.5 s.
    poll_until(WAIT, "five dials", || async {
        (accepted.lock().expect("not poisoned").len() >= 5).then_some(())
    })
    .await;
    let times = accepted.lock().expect("not poisoned").clone();
    assert!(
        times[4] - times[0] >= Duration::from_millis(1400),
        "{:?}",
        times[4] - times[0]
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        refusals(&metrics, "control", "closed").is_some_and(|n| n >= 4),
        "{metrics}"
    );
    closer.abort();
}
