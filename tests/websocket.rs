//! MQTT over WebSocket and secure WebSocket on the same ports as raw MQTT and TLS: real clients
//! (paho-mqtt over ws and wss, MQTT.js from npm over ws, the official wiotp-sdk on 8883 and 443),
//! the `Protocol` field (`mqtt3-ws`, `mqtt4-ws`, `mqttv5-ws`), and the WebSocket rules a raw
//! tungstenite client can probe: subprotocols, frames split and joined, ping/pong, text frames.

mod support;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use rumqttc::QoS;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use support::pki::TestPki;
use support::{mon, python, standard_policy, v4, Broker, Warden, WAIT};

/// A client of the broker itself watching org1's raw monitoring topics.
async fn broker_watch(broker: &Broker) -> v4::Client {
    let addr = broker.addr().parse().unwrap();
    let mut watcher = v4::connect(addr, "test-broker-watcher", None, None)
        .await
        .unwrap();
    watcher.subscribe("org1/iot-2/#", QoS::AtMostOnce).await;
    watcher
}

/// The next Connect monitoring message for `client_id`.
async fn next_connect(watcher: &mut v4::Client, client_id: &str) -> serde_json::Value {
    loop {
        let publish = watcher.next_publish().await;
        if publish.topic.ends_with("/mon") && !publish.payload.is_empty() {
            let report = mon::parse(&publish.payload);
            if report["ClientID"] == client_id && report["Action"] == "Connect" {
                return report;
            }
        }
    }
}

async fn run_script(program: impl AsRef<std::ffi::OsStr>, args: &[String], ok_line: &str) {
    let program = program.as_ref();
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program).args(args).output(),
    )
    .await
    .expect("the client flow finishes")
    .unwrap_or_else(|error| panic!("{} runs: {error}", program.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(ok_line),
        "stdout: {stdout}\nstderr: {stderr}"
    );
}

fn script(name: &str) -> String {
    format!("{}/tests/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn paho_over_ws_and_wss_reports_ws_protocols() {
    let broker = Broker::start().await;
    let pki = TestPki::new("paho");
    let warden = Warden::start_tls(&broker, &standard_policy(), &pki, "").await;
    let mut watcher = broker_watch(&broker).await;
    run_script(
        python(),
        &[
            script("python/paho_ws_flow.py"),
            warden.addr.port().to_string(),
            warden.tls_addr().port().to_string(),
            pki.ca_path.display().to_string(),
        ],
        "paho ws flow ok",
    )
    .await;
    let app = next_connect(&mut watcher, "a:org1:paho-wss").await;
    assert_eq!(
        (&app["Protocol"], &app["Secure"]),
        (&"mqttv5-ws".into(), &true.into())
    );
    let dev1 = next_connect(&mut watcher, "d:org1:sensor:dev1").await;
    assert_eq!(
        (&dev1["Protocol"], &dev1["Secure"]),
        (&"mqtt4-ws".into(), &false.into())
    );
    let dev2 = next_connect(&mut watcher, "d:org1:sensor:dev2").await;
    assert_eq!(dev2["Protocol"], "mqtt3-ws");
}

#[tokio::test]
async fn mqtt_js_over_websocket() {
    let node_modules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js/node_modules/mqtt");
    assert!(
        node_modules.exists(),
        "MQTT.js is not installed: run `npm ci` in tests/js (scripts/test.sh does)"
    );
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let mut watcher = broker_watch(&broker).await;
    run_script(
        "node",
        &[script("js/ws_flow.mjs"), warden.addr.port().to_string()],
        "mqtt.js flow ok",
    )
    .await;
    let app = next_connect(&mut watcher, "a:org1:mqttjs").await;
    assert_eq!(app["Protocol"], "mqttv5-ws");
    let device = next_connect(&mut watcher, "d:org1:sensor:dev1").await;
    assert_eq!(device["Protocol"], "mqtt4-ws");
}

#[tokio::test]
async fn wiotp_sdk_over_tls_on_8883_and_secure_websocket_on_443() {
    let broker = Broker::start().await;
    let pki = TestPki::new("wiotp-sdk");
    let warden = Warden::start_tls(&broker, &standard_policy(), &pki, "").await;
    run_script(
        python(),
        &[
            script("python/wiotp_sdk_tls_flow.py"),
            warden.tls_addr().port().to_string(),
            pki.ca_path.display().to_string(),
        ],
        "wiotp-sdk tls flow ok",
    )
    .await;
}

/// A CONNECT for `d:org1:sensor:dev1` with its token (MQTT 3.1.1).
fn connect_packet() -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in [&b"d:org1:sensor:dev1"[..], b"use-token-auth", b"dev1-token"] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test]
async fn websocket_framing_rules() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &standard_policy()).await;
    let url = format!("ws://{}/whatever/path?x=1", warden.addr);

    // A subprotocol the proxy does not serve: the upgrade is refused.
    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("chat"));
    assert!(tokio_tungstenite::connect_async(request).await.is_err());

    // mqttv3.1 is answered as asked; the CONNECT split over two frames, then a ping.
    let mut request = url.as_str().into_client_request().unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static("mqttv3.1"),
    );
    let (mut ws, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "mqttv3.1");
    let connect = connect_packet();
    let (head, tail) = connect.split_at(7);
    ws.send(Message::Binary(Bytes::copy_from_slice(head)))
        .await
        .unwrap();
    ws.send(Message::Binary(Bytes::copy_from_slice(tail)))
        .await
        .unwrap();
    let connack = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    match connack {
        Some(Ok(Message::Binary(data))) => assert_eq!(&data[..], &[0x20, 0x02, 0x00, 0x00]),
        other => panic!("expected a CONNACK frame, got {other:?}"),
    }
    ws.send(Message::Ping(Bytes::from_static(b"are you there")))
        .await
        .unwrap();
    // PINGREQ and the answer to the WebSocket ping.
    ws.send(Message::Binary(Bytes::from_static(&[0xC0, 0x00])))
        .await
        .unwrap();
    let (mut pong, mut pingresp) = (false, false);
    while !(pong && pingresp) {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(data))) => {
                assert_eq!(&data[..], b"are you there");
                pong = true;
            }
            Some(Ok(Message::Binary(data))) => {
                assert_eq!(&data[..], &[0xD0, 0x00]);
                pingresp = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    // A text frame is a protocol error: the proxy closes (1003) and the session ends.
    ws.send(Message::Text("hello".into())).await.unwrap();
    match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a Close frame, got {other:?}"),
    }

    // Without a subprotocol header the upgrade is still served (some clients omit it), and a
    // client Close ends the session cleanly.
    let (mut ws, response) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    assert!(response.headers().get("sec-websocket-protocol").is_none());
    ws.send(Message::Binary(connect_packet().into()))
        .await
        .unwrap();
    assert!(matches!(
        tokio::time::timeout(WAIT, ws.next()).await.unwrap(),
        Some(Ok(Message::Binary(_)))
    ));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn websocket_on_a_tls_listener_needs_tls() {
    let broker = Broker::start().await;
    let pki = TestPki::new("ws-on-tls");
    let warden = Warden::start_tls(&broker, &standard_policy(), &pki, "").await;
    let url = format!("ws://{}/mqtt", warden.tls_addr());
    assert!(tokio_tungstenite::connect_async(url.as_str())
        .await
        .is_err());
    let running = &warden.running;
    tokio::time::timeout(WAIT, async {
        while running.tls_handshake_failures() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await; // sleep-ok: polls a counter, which has no event to await
        }
    })
    .await
    .expect("counted as a failed TLS handshake");
}
