//! OpenTelemetry: the proxy exports its spans over OTLP/HTTP (JSON) to a receiver started by the
//! test, and an MQTT 5 `traceparent` user property continues through the proxy's publish span.

mod support;

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use support::{standard_policy, Broker, ProxyProcess, WAIT};

const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN_ID: &str = "b7ad6b7169203331";

/// A minimal OTLP/HTTP receiver: accepts POSTs and hands each JSON body to the test.
async fn otlp_receiver() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Value>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .and_then(|value| value.trim().parse().ok())
                        .unwrap_or(0);
                    while buf.len() < head_end + 4 + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf
                        .drain(..head_end + 4 + length)
                        .skip(head_end + 4)
                        .collect();
                    if let Ok(json) = serde_json::from_slice(&body) {
                        let _ = tx.send(json);
                    }
                    let reply = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Every span in an OTLP/JSON export.
fn spans(export: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for resource in export["resourceSpans"].as_array().into_iter().flatten() {
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            out.extend(scope["spans"].as_array().into_iter().flatten().cloned());
        }
    }
    out
}

fn attribute(span: &Value, key: &str) -> Option<Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| a["value"].clone())
}

async fn v5_client(
    addr: std::net::SocketAddr,
    id: &str,
    user: &str,
    password: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<Packet>) {
    let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    options.set_credentials(user, password);
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = eventloop.poll().await {
            if let Event::Incoming(packet) = event {
                let _ = tx.send(packet);
            }
        }
    });
    (client, rx)
}

async fn next_matching(
    rx: &mut mpsc::UnboundedReceiver<Packet>,
    want: impl Fn(&Packet) -> bool,
) -> Packet {
    tokio::time::timeout(WAIT, async {
        loop {
            let packet = rx.recv().await.expect("connection alive");
            if want(&packet) {
                return packet;
            }
        }
    })
    .await
    .expect("the packet arrives")
}

#[tokio::test]
async fn spans_are_exported_and_traceparent_is_continued() {
    let broker = Broker::start().await;
    let (receiver, mut exports) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("policy.yaml"), standard_policy()).unwrap();
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"{}\"\npolicies: policy.yaml\ntelemetry: {{ log_format: json, otlp_endpoint: \"http://{receiver}\" }}\n",
        broker.addr()
    );
    let proxy = ProxyProcess::start(
        dir.path(),
        "traced",
        &config,
        &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
    )
    .await;

    let (app, mut app_rx) = v5_client(
        proxy.addr,
        "a:org1:tracer",
        "a-org1-key0000001",
        "app-token",
    )
    .await;
    next_matching(&mut app_rx, |p| matches!(p, Packet::ConnAck(_))).await;
    app.subscribe("iot-2/type/+/id/+/evt/+/fmt/+", QoS::AtLeastOnce)
        .await
        .unwrap();
    next_matching(&mut app_rx, |p| matches!(p, Packet::SubAck(_))).await;

    let (device, mut device_rx) = v5_client(
        proxy.addr,
        "d:org1:sensor:dev1",
        "use-token-auth",
        "dev1-token",
    )
    .await;
    next_matching(&mut device_rx, |p| matches!(p, Packet::ConnAck(_))).await;
    let properties = PublishProperties {
        user_properties: vec![(
            "traceparent".into(),
            format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"),
        )],
        ..Default::default()
    };
    device
        .publish_with_properties(
            "iot-2/evt/traced/fmt/json",
            QoS::AtLeastOnce,
            false,
            "{}",
            properties,
        )
        .await
        .unwrap();

    // The subscriber sees the same trace, now parented by the proxy's publish span.
    let Packet::Publish(delivered) =
        next_matching(&mut app_rx, |p| matches!(p, Packet::Publish(_))).await
    else {
        unreachable!()
    };
    let forwarded = delivered.properties.expect("properties").user_properties;
    let (_, traceparent) = forwarded
        .iter()
        .find(|(key, _)| key == "traceparent")
        .expect("traceparent forwarded");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], TRACE_ID, "same trace");
    assert_ne!(parts[2], CLIENT_SPAN_ID, "the proxy's own span id");
    let proxy_span_id = parts[2].to_string();

    // The exported spans include that publish span, a child of the client's, and the connect
    // and authenticate spans with their decisions.
    let mut seen = std::collections::HashMap::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !(seen.contains_key("publish")
            && seen.contains_key("connect")
            && seen.contains_key("authenticate"))
        {
            let export = exports.recv().await.expect("receiver alive");
            for span in spans(&export) {
                let name = span["name"].as_str().unwrap_or_default().to_string();
                if name != "publish" || span["spanId"].as_str() == Some(proxy_span_id.as_str()) {
                    seen.insert(name, span);
                }
            }
        }
    })
    .await
    .expect("spans are exported");
    let publish = &seen["publish"];
    assert_eq!(publish["traceId"].as_str(), Some(TRACE_ID));
    assert_eq!(publish["parentSpanId"].as_str(), Some(CLIENT_SPAN_ID));
    assert_eq!(
        attribute(publish, "decision")
            .and_then(|v| v["stringValue"].as_str().map(str::to_string))
            .as_deref(),
        Some("allow")
    );
    assert!(attribute(publish, "topic").is_some());
    assert!(attribute(&seen["authenticate"], "class").is_some());
}
