//! The HTTP messaging API on the MQTT listener, against a real Mosquitto: events from devices,
//! applications and gateways reach MQTT subscribers; commands reach MQTT devices; 401, 403, 413,
//! 415, 429 and 175 are answered as documented; malformed requests get 400 and never hurt the
//! proxy; the connection limits and deadlines hold. Clients: reqwest, curl, and raw TCP where a
//! test needs one exact connection.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::{sha256_token, standard_policy, v4, Broker, Warden, WAIT};

const ORG1_HOST: &str = "org1.messaging.example.com";
const EVENT_PATH: &str = "/api/v0002/device/types/sensor/devices/dev1/events/temp";
const DEV1: Option<(&str, &str)> = Some(("use-token-auth", "dev1-token"));

/// The standard policy and two orgs of this test's own: `small` (64-byte payloads, one publish
/// a minute per device) and `secure` (TLS required).
fn policy() -> String {
    format!(
        "{}  small:\n    limits: {{ max_payload_bytes: 64, publish_rate: {{ device: \"1/min\" }} }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/s1: {{ token: \"{}\" }}\n  secure:\n    security: tls-token\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/t1: {{ token: \"{}\" }}\n",
        standard_policy(),
        sha256_token("s1-token"),
        sha256_token("t1-token"),
    )
}

/// A subscriber on the broker itself (behind the proxy), seeing every topic of org1.
async fn broker_watcher(broker: &Broker, filter: &str) -> v4::Client {
    let mut watcher = v4::connect(broker.addr().parse().unwrap(), "http-watcher", None, None)
        .await
        .expect("the broker accepts the watcher");
    watcher.subscribe(filter, QoS::AtLeastOnce).await;
    watcher
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(WAIT)
        .build()
        .expect("reqwest client")
}

async fn post(
    addr: SocketAddr,
    path: &str,
    host: &str,
    credentials: Option<(&str, &str)>,
    content_type: &str,
    body: &'static [u8],
) -> reqwest::Response {
    let mut request = client()
        .post(format!("http://{addr}{path}"))
        .header("Host", host)
        .header("Content-Type", content_type)
        .body(body);
    if let Some((user, password)) = credentials {
        request = request.basic_auth(user, Some(password));
    }
    request.send().await.expect("the proxy answers")
}

/// dev1's JSON event `body` to org1, on a new connection.
async fn dev1_event(addr: SocketAddr, body: &'static [u8]) -> reqwest::Response {
    post(addr, EVENT_PATH, ORG1_HOST, DEV1, "application/json", body).await
}

/// One HTTP/1.1 response read off a raw connection: status, lower-case head, body.
struct RawResponse {
    status: u16,
    head: String,
    body: String,
}

/// Reads one response (with a Content-Length body) within [`WAIT`]; `None` if the connection
/// closed first.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<RawResponse> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().expect("length"));
                if buf.len() >= end + 4 + length {
                    let status = head[9..12].parse().expect("status");
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + length]).into();
                    buf.drain(..end + 4 + length);
                    return Some(RawResponse { status, head, body });
                }
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .expect("an answer or a close within the wait")
}

/// Whether the peer closes the connection within `limit` (reading and discarding what comes).
async fn closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 1024];
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Sends `request` on a raw connection and reads its answer.
async fn exchange(stream: &mut TcpStream, buf: &mut Vec<u8>, request: &str) -> RawResponse {
    stream.write_all(request.as_bytes()).await.unwrap();
    read_response(stream, buf)
        .await
        .expect("an answer before the close")
}

fn raw_post(path: &str, authorization: &str, body: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {ORG1_HOST}\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// `Basic` credentials.
fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn a_device_event_reaches_an_mqtt_subscriber() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut watcher = broker_watcher(&broker, "org1/iot-2/#").await;

    let response = dev1_event(warden.addr, b"{\"t\":21.5}").await;
    assert_eq!(response.status(), 200);
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "org1/iot-2/type/sensor/id/dev1/evt/temp/fmt/json"
    );
    assert_eq!(&publish.payload[..], b"{\"t\":21.5}");
    assert_eq!(publish.qos, QoS::AtLeastOnce);

    // The format follows the content type; the org may come from the path instead of Host.
    let response = post(
        warden.addr,
        "/api/v0002/org/org1/device/types/sensor/devices/dev1/events/raw",
        &warden.addr.to_string(),
        DEV1,
        "application/octet-stream",
        b"\x00\x01",
    )
    .await;
    assert_eq!(response.status(), 200);
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "org1/iot-2/type/sensor/id/dev1/evt/raw/fmt/bin"
    );
    // No Connect or Disconnect status for HTTP clients (the watcher sees org1's mon topics too).
    assert!(watcher
        .next_publish_within(Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test]
async fn refusals_are_answered_with_their_status_and_closing_code() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut watcher = broker_watcher(&broker, "small/iot-2/#").await;

    let wrong_token = post(
        warden.addr,
        EVENT_PATH,
        ORG1_HOST,
        Some(("use-token-auth", "not-the-token")),
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(wrong_token.status(), 401);
    assert!(wrong_token.headers().contains_key("www-authenticate"));
    assert!(wrong_token.text().await.unwrap().starts_with("180 "));

    let no_credentials = post(warden.addr, EVENT_PATH, ORG1_HOST, None, "text/plain", b"x").await;
    assert_eq!(no_credentials.status(), 401);

    // dev1's token in org2, where dev1 has another token: the org is org2's (from Host).
    let other_org = post(
        warden.addr,
        "/api/v0002/device/types/nosuchtype/devices/dev1/events/temp",
        "org2.messaging.example.com",
        DEV1,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(other_org.status(), 403);
    assert!(other_org.text().await.unwrap().starts_with("180 "));

    let too_large = post(
        warden.addr,
        EVENT_PATH
            .replace("sensor/devices/dev1", "sensor/devices/s1")
            .as_str(),
        "small.messaging.example.com",
        Some(("use-token-auth", "s1-token")),
        "application/json",
        &[b'x'; 65],
    )
    .await;
    assert_eq!(too_large.status(), 413);
    assert!(too_large.text().await.unwrap().starts_with("287 "));

    let form = post(
        warden.addr,
        EVENT_PATH,
        ORG1_HOST,
        DEV1,
        "application/x-www-form-urlencoded",
        b"a=b",
    )
    .await;
    assert_eq!(form.status(), 415);

    // One publish a minute for small's devices: the second waits, and is told how long.
    let s1_path = EVENT_PATH.replace("sensor/devices/dev1", "sensor/devices/s1");
    let small = "small.messaging.example.com";
    let first = post(
        warden.addr,
        &s1_path,
        small,
        Some(("use-token-auth", "s1-token")),
        "text/plain",
        b"1",
    )
    .await;
    assert_eq!(first.status(), 200);
    let second = post(
        warden.addr,
        &s1_path,
        small,
        Some(("use-token-auth", "s1-token")),
        "text/plain",
        b"2",
    )
    .await;
    assert_eq!(second.status(), 429);
    let retry: u64 = second.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // Only the one accepted publish reached the broker.
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "small/iot-2/type/sensor/id/s1/evt/temp/fmt/text"
    );
    assert_eq!(&publish.payload[..], b"1");
    assert!(watcher
        .next_publish_within(Duration::from_millis(300))
        .await
        .is_none());
}

#[tokio::test]
async fn a_changed_authorization_closes_the_connection_with_175() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(&broker, &policy(), "admin: { bind: \"127.0.0.1:0\" }\n").await;
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    let mut buf = Vec::new();
    let dev1 = basic("use-token-auth", "dev1-token");
    assert_eq!(
        exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}"))
            .await
            .status,
        200
    );
    assert_eq!(
        exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}"))
            .await
            .status,
        200
    );

    let dev2 = basic("use-token-auth", "dev2-token");
    let path2 = EVENT_PATH.replace("dev1", "dev2");
    let refused = exchange(&mut stream, &mut buf, &raw_post(&path2, &dev2, "{}")).await;
    assert_eq!(refused.status, 400);
    assert!(refused.body.starts_with("175 "), "{}", refused.body);
    assert!(refused.head.contains("connection: close"));
    assert!(closes_within(&mut stream, WAIT).await);

    // Counted like every other close.
    let admin = warden.running.admin_addr.unwrap();
    let metrics = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "warden_closes_total{code=\"175\",org=\"org1\"} 1"),
        "{metrics}"
    );
    assert!(metrics
        .lines()
        .any(|l| l == "warden_http_requests_total{org=\"org1\",status=\"200\"} 2"));
}

#[tokio::test]
async fn malformed_requests_get_400_and_the_proxy_keeps_serving() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let long_header = format!("POST / HTTP/1.1\r\nX-Long: {}\r\n\r\n", "a".repeat(40_000));
    let cases: Vec<(Vec<u8>, &[u16])> = vec![
        (b"POST\r\n\r\n".to_vec(), &[400]),
        (b"POST / HTTP/9.9\r\n\r\n".to_vec(), &[400, 505]),
        (b"P\x00\x01\x02\r\n\r\n".to_vec(), &[400]),
        (b"POST / HTTP/1.1\r\nContent-Length: abc\r\n\r\n".to_vec(), &[400]),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec(),
            &[400],
        ),
        (b"POST / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), &[400]),
        (long_header.into_bytes(), &[431]),
        (b"POST / HTTP/1.1\r\n\r\n".to_vec(), &[404]),
        (b"PUT / HTTP/1.1\r\n\r\n".to_vec(), &[405]),
        (
            raw_post(EVENT_PATH, "Basic !!!", "{}").into_bytes(),
            &[400],
        ),
        (
            raw_post(EVENT_PATH, "Bearer abc", "{}").into_bytes(),
            &[400],
        ),
        (
            raw_post(
                "/api/v0002/device/types/sensor/devices/d%2Fx/events/temp",
                &basic("use-token-auth", "dev1-token"),
                "{}",
            )
            .into_bytes(),
            &[400],
        ),
        (
            raw_post(
                "/api/v0002/device/types/sensor/devices/dev1/events/temp",
                &basic("weird-user", "x"),
                "{}",
            )
            .into_bytes(),
            &[401],
        ),
        (
            format!(
                "POST {EVENT_PATH} HTTP/1.1\r\nHost: {ORG1_HOST}\r\nAuthorization: {}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                basic("use-token-auth", "dev1-token")
            )
            .into_bytes(),
            &[400],
        ),
    ];
    for (request, statuses) in cases {
        let mut stream = TcpStream::connect(warden.addr).await.unwrap();
        stream.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        let response = read_response(&mut stream, &mut buf).await;
        let shown = String::from_utf8_lossy(&request[..request.len().min(80)]).into_owned();
        let response = response.unwrap_or_else(|| panic!("no answer to {shown:?}"));
        assert!(
            statuses.contains(&response.status),
            "{shown:?}: {} not in {statuses:?}",
            response.status
        );
    }
    // Still serving.
    let response = dev1_event(warden.addr, b"{}").await;
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn connections_are_bounded_in_requests_idle_time_and_body_time() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy(),
        "limits: { connect_timeout_secs: 1, http_max_requests_per_connection: 3 }\n",
    )
    .await;
    let dev1 = basic("use-token-auth", "dev1-token");

    // The third request is the last: answered with Connection: close, then closed.
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    let mut buf = Vec::new();
    for n in 1..=3 {
        let response = exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}")).await;
        assert_eq!(response.status, 200);
        assert_eq!(response.head.contains("connection: close"), n == 3, "{n}");
    }
    assert!(closes_within(&mut stream, WAIT).await);

    // An idle kept-alive connection closes after the connect timeout.
    let mut idle = TcpStream::connect(warden.addr).await.unwrap();
    idle.write_all(raw_post(EVENT_PATH, &dev1, "{}").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        read_response(&mut idle, &mut buf).await.unwrap().status,
        200
    );
    assert!(closes_within(&mut idle, Duration::from_secs(5)).await);

    // A body that never completes: 408, then closed.
    let mut slow = TcpStream::connect(warden.addr).await.unwrap();
    let head = format!(
        "POST {EVENT_PATH} HTTP/1.1\r\nHost: {ORG1_HOST}\r\nAuthorization: {dev1}\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let response = read_response(&mut slow, &mut buf).await.unwrap();
    assert_eq!(response.status, 408);
    assert!(closes_within(&mut slow, WAIT).await);
}

#[tokio::test]
async fn curl_publishes_a_device_event() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut watcher = broker_watcher(&broker, "org1/iot-2/#").await;
    let output = tokio::process::Command::new("curl")
        .args([
            "--silent",
            "--show-error",
            "--fail-with-body",
            "--max-time",
            "10",
        ])
        .args(["-u", "use-token-auth:dev1-token"])
        .args(["-H", &format!("Host: {ORG1_HOST}")])
        .args(["-H", "Content-Type: text/plain"])
        .args(["--data-binary", "hello from curl"])
        .arg(format!("http://{}{EVENT_PATH}", warden.addr))
        .output()
        .await
        .expect("curl runs");
    assert!(output.status.success(), "{output:?}");
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "org1/iot-2/type/sensor/id/dev1/evt/temp/fmt/text"
    );
    assert_eq!(&publish.payload[..], b"hello from curl");
}

#[tokio::test]
async fn applications_publish_events_and_commands_that_reach_mqtt_devices() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut watcher = broker_watcher(&broker, "org1/iot-2/+/+/+/+/evt/#").await;
    let mut device = v4::org1_device(warden.addr, "dev1").await;
    device
        .subscribe("iot-2/cmd/+/fmt/+", QoS::AtLeastOnce)
        .await;
    let app = Some(("a-org1-key0000001", "app-token"));

    let event = post(
        warden.addr,
        "/api/v0002/application/types/sensor/devices/dev2/events/status",
        ORG1_HOST,
        app,
        "application/xml",
        b"<ok/>",
    )
    .await;
    assert_eq!(event.status(), 200);
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "org1/iot-2/type/sensor/id/dev2/evt/status/fmt/xml"
    );

    // The org from the API key alone (the host is an address).
    let command = post(
        warden.addr,
        "/api/v0002/application/types/sensor/devices/dev1/commands/reboot",
        &warden.addr.to_string(),
        app,
        "application/json",
        b"{\"delay\":0}",
    )
    .await;
    assert_eq!(command.status(), 200);
    let received = device.next_publish().await;
    assert_eq!(received.topic, "iot-2/cmd/reboot/fmt/json");
    assert_eq!(&received.payload[..], b"{\"delay\":0}");

    // An API key of org1 cannot act in org2, and applications do not use the device paths.
    let cross = post(
        warden.addr,
        "/api/v0002/org/org2/application/types/sensor/devices/dev1/commands/reboot",
        "127.0.0.1",
        app,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(
        cross.status(),
        400,
        "the path and the API key name different orgs"
    );
    let device_path = post(
        warden.addr,
        EVENT_PATH,
        ORG1_HOST,
        app,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(device_path.status(), 403);
}

#[tokio::test]
async fn gateways_publish_for_their_devices_and_devices_only_for_themselves() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut watcher = broker_watcher(&broker, "org1/iot-2/+/+/+/+/evt/#").await;

    let gateway = post(
        warden.addr,
        "/api/v0002/device/types/sensor/devices/dev2/events/temp",
        &warden.addr.to_string(),
        Some(("g/org1/edge-gw/gw1", "gw1-token")),
        "application/json",
        b"{\"via\":\"gw1\"}",
    )
    .await;
    assert_eq!(gateway.status(), 200);
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "org1/iot-2/type/sensor/id/dev2/evt/temp/fmt/json"
    );

    let wrong_gateway_token = post(
        warden.addr,
        "/api/v0002/device/types/sensor/devices/dev2/events/temp",
        ORG1_HOST,
        Some(("g/org1/edge-gw/gw1", "dev1-token")),
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(wrong_gateway_token.status(), 401);

    // dev1's token does not make it dev2.
    let impostor = post(
        warden.addr,
        "/api/v0002/device/types/sensor/devices/dev2/events/temp",
        ORG1_HOST,
        DEV1,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(impostor.status(), 401);
}

#[tokio::test]
async fn https_on_the_tls_listener_and_the_security_mode_and_quickstart_rules() {
    let broker = Broker::start().await;
    let pki = support::pki::TestPki::new("http");
    let warden = Warden::start_tls(&broker, &policy(), &pki, "").await;
    let mut watcher = broker_watcher(&broker, "+/iot-2/+/+/+/+/evt/#").await;
    let secure_path = "/api/v0002/device/types/sensor/devices/t1/events/temp";
    let secure_host = "secure.messaging.example.com";
    let t1 = Some(("use-token-auth", "t1-token"));

    // TLS required: plain HTTP is refused, HTTPS on the TLS listener is served.
    let plain = post(
        warden.addr,
        secure_path,
        secure_host,
        t1,
        "text/plain",
        b"x",
    )
    .await;
    assert_eq!(plain.status(), 403);
    assert!(plain.text().await.unwrap().contains("requires TLS"));

    let curl = |url: String, extra: Vec<String>| async move {
        tokio::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "10"])
            .args(["--output", "/dev/null", "--write-out", "%{http_code}"])
            .args(extra)
            .arg(url)
            .output()
            .await
            .expect("curl runs")
    };
    let tls = warden.tls_addr();
    let https = curl(
        format!("https://localhost:{}{secure_path}", tls.port()),
        vec![
            "--cacert".into(),
            pki.ca_path.display().to_string(),
            "-u".into(),
            "use-token-auth:t1-token".into(),
            "-H".into(),
            format!("Host: {secure_host}"),
            "-H".into(),
            "Content-Type: text/plain".into(),
            "--data-binary".into(),
            "over TLS".into(),
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&https.stdout), "200", "{https:?}");
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "secure/iot-2/type/sensor/id/t1/evt/temp/fmt/text"
    );
    assert_eq!(&publish.payload[..], b"over TLS");

    // Quickstart: no credentials, plain only, QoS 0.
    let quickstart_path = "/api/v0002/device/types/demo/devices/qs1/events/temp";
    let quickstart_host = "quickstart.messaging.example.com";
    let open = post(
        warden.addr,
        quickstart_path,
        quickstart_host,
        None,
        "application/json",
        b"{}",
    )
    .await;
    assert_eq!(open.status(), 200);
    let publish = watcher.next_publish().await;
    assert_eq!(
        publish.topic,
        "quickstart/iot-2/type/demo/id/qs1/evt/temp/fmt/json"
    );
    assert_eq!(publish.qos, QoS::AtMostOnce);
    let quickstart_tls = curl(
        format!("https://localhost:{}{quickstart_path}", tls.port()),
        vec![
            "--cacert".into(),
            pki.ca_path.display().to_string(),
            "-H".into(),
            format!("Host: {quickstart_host}"),
            "-H".into(),
            "Content-Type: application/json".into(),
            "--data-binary".into(),
            "{}".into(),
        ],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&quickstart_tls.stdout), "403");
}

#[tokio::test]
async fn a_device_fetches_its_commands_over_http() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let dev1 = DEV1;
    let fetch_any = "/api/v0002/device/types/sensor/devices/dev1/commands/+/request";
    let addr = warden.addr;
    let fetch = move |path: &'static str| async move {
        post(addr, path, ORG1_HOST, dev1, "application/json", b"").await
    };

    // The first fetch opens the mailbox: nothing is waiting yet.
    assert_eq!(fetch(fetch_any).await.status(), 204);

    let send = move |command: &'static str, body: &'static [u8]| {
        let path = format!("/api/v0002/application/types/sensor/devices/dev1/commands/{command}");
        async move {
            let sent = post(
                addr,
                &path,
                ORG1_HOST,
                Some(("a-org1-key0000001", "app-token")),
                "application/json",
                body,
            )
            .await;
            assert_eq!(sent.status(), 200);
        }
    };
    send("reboot", b"{\"delay\":1}").await;
    send("blink", b"{\"times\":3}").await;

    // Commands come out oldest first, each once; then 204 again.
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, async {
        while got.len() < 2 {
            let response = fetch(fetch_any).await;
            if response.status() == 204 {
                // The broker's delivery to the proxy is still on its way, and the command
                // endpoint has no event to wait for: poll it.
                tokio::time::sleep(Duration::from_millis(20)).await; // sleep-ok: polling an endpoint
                continue;
            }
            assert_eq!(response.status(), 200);
            let topic = response.headers()["x-topic"].to_str().unwrap().to_owned();
            got.push((topic, response.bytes().await.unwrap()));
        }
    })
    .await
    .expect("both commands are fetched");
    assert_eq!(got[0].0, "iot-2/cmd/reboot/fmt/json");
    assert_eq!(&got[0].1[..], b"{\"delay\":1}");
    assert_eq!(got[1].0, "iot-2/cmd/blink/fmt/json");
    assert_eq!(fetch(fetch_any).await.status(), 204);

    // Another device's token does not open dev1's mailbox.
    let other = post(
        warden.addr,
        fetch_any,
        ORG1_HOST,
        Some(("use-token-auth", "dev2-token")),
        "application/json",
        b"",
    )
    .await;
    assert_eq!(other.status(), 401);
}

#[tokio::test]
async fn authentications_count_against_the_address_connect_rate() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &policy(),
        "limits: { connect_rate_per_address: \"1/min\" }\n",
    )
    .await;
    // One authentication a minute from this address: the first request's connection, and its
    // next requests (already authenticated), are served; a second connection is held back.
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    let mut buf = Vec::new();
    let dev1 = basic("use-token-auth", "dev1-token");
    for _ in 0..2 {
        assert_eq!(
            exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}"))
                .await
                .status,
            200
        );
    }
    let held_back = dev1_event(warden.addr, b"{}").await;
    assert_eq!(held_back.status(), 429);
    assert!(held_back.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn a_policy_edit_applies_to_a_kept_alive_connection_and_gateway_groups_hold() {
    let broker = Broker::start().await;
    let extra = format!(
        "  gwo:\n    device_types: {{ sensor: {{}}, edge-gw: {{ class: gateway }} }}\n    devices:\n      sensor/in: {{ token: \"{t}\", groups: [line-1] }}\n      sensor/out: {{ token: \"{t}\", groups: [line-2] }}\n      edge-gw/std: {{ token: \"{t}\", role: standard, groups: [line-1] }}\n",
        t = sha256_token("gwo-token")
    );
    let warden = Warden::start(&broker, &(policy() + &extra)).await;

    // A standard gateway acts only for the devices of its groups, as over MQTT.
    let gateway = Some(("g/gwo/edge-gw/std", "gwo-token"));
    let path = |device: &str| format!("/api/v0002/device/types/sensor/devices/{device}/events/e");
    let host = "gwo.messaging.example.com";
    let inside = post(warden.addr, &path("in"), host, gateway, "text/plain", b"x").await;
    assert_eq!(inside.status(), 200);
    let outside = post(warden.addr, &path("out"), host, gateway, "text/plain", b"x").await;
    assert_eq!(outside.status(), 403);

    // dev1 is admitted on a kept-alive connection; the policy then drops it: the next request
    // on the same connection is refused.
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    let mut buf = Vec::new();
    let dev1 = basic("use-token-auth", "dev1-token");
    assert_eq!(
        exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}"))
            .await
            .status,
        200
    );
    let edited = (policy() + &extra).replace("      sensor/dev1: {", "      sensor/dev9: {");
    std::fs::write(warden.policy_path(), edited).unwrap();
    warden
        .running
        .reload_policy()
        .expect("the edited policy loads");
    let refused = exchange(&mut stream, &mut buf, &raw_post(EVENT_PATH, &dev1, "{}")).await;
    assert_eq!(refused.status, 403, "{}", refused.body);
}

#[tokio::test]
async fn shutdown_closes_idle_http_connections_at_once() {
    let broker = Broker::start().await;
    let warden = Warden::start(&broker, &policy()).await;
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    let mut buf = Vec::new();
    assert_eq!(
        exchange(
            &mut stream,
            &mut buf,
            &raw_post(EVENT_PATH, &basic("use-token-auth", "dev1-token"), "{}")
        )
        .await
        .status,
        200
    );
    // The kept-alive connection would otherwise stay for the connect timeout (60 s).
    tokio::time::timeout(
        Duration::from_secs(5),
        warden.running.shutdown(Duration::from_secs(30)),
    )
    .await
    .expect("shutdown does not wait for idle HTTP connections");
    assert!(closes_within(&mut stream, WAIT).await);
}
