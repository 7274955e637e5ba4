//! The session over in-memory streams (`tokio::io::duplex`) with paused time: the test plays both
//! the client and the broker, byte for byte, and the WIoTP profile decides. Timers run in
//! virtual time, so a 60-second deadline takes no real time, and every assertion on time is
//! exact.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{run, Context};
use crate::auth::{hash_token_sha256, Verifier};
use crate::broker::{BrokerKind, Capabilities, EscapeSet};
use crate::codec::{
    decode_frame_header, encode_connect, encode_publish, encode_publish_parts, encode_subscribe,
    encode_unsubscribe, parse_connack, parse_connect, parse_subscribe, parse_unsubscribe, Connect,
    Property, PropertyValue, ProtocolVersion,
};
use crate::config::ProcessLimits;
use crate::coord::local::{LocalAdmission, LocalTenantBuckets};
use crate::coord::{Admission, ProcessSlots, Reporter, SessionId};
use crate::dispatch::Dispatch;
use crate::limits::{ConnectRates, Rate};
use crate::metrics::Metrics;
use crate::policy::load::parse_policy;
use crate::policy::PolicyStore;
use crate::profile::Publication;
use crate::refusal::{Cause, Refusal};
use crate::transport::ConnectionInfo;
use crate::upstream::memory::DuplexDialer;

/// Bytes each in-memory pipe holds before a writer waits.
const PIPE_BYTES: usize = 16 * 1024;
/// The longest any expected event may take, in virtual time: far beyond every deadline here.
const PATIENCE: Duration = Duration::from_secs(600);
/// The write deadline of these tests.
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);

/// What the session reported, in order.
#[derive(Debug)]
enum Reported {
    Connected(Vec<Publication>),
    Disconnected(Vec<Publication>),
    Published(Vec<Publication>),
}

struct TestReporter(mpsc::UnboundedSender<Reported>);

impl Reporter for TestReporter {
    fn connected(&self, _: SessionId, _: &str, _: Vec<u8>, statuses: Vec<Publication>) {
        let _ = self.0.send(Reported::Connected(statuses));
    }

    fn disconnected(&self, _: SessionId, _: &str, statuses: Vec<Publication>) {
        let _ = self.0.send(Reported::Disconnected(statuses));
    }

    fn publish(&self, publications: Vec<Publication>) {
        let _ = self.0.send(Reported::Published(publications));
    }
}

/// Generous limits, so that only the tests about limits meet any.
const OPEN_LIMITS: &str =
    "{ publish_rate: { device: \"100000/s\", gateway: \"100000/s\", application: \"100000/s\" } }";

fn policy_text(device_enabled: bool) -> String {
    policy_with(OPEN_LIMITS, device_enabled)
}

/// Org1 with `limits`: device d1 (token `d1-token`, group `line-1`), gateway g1 (`g1-token`),
/// and API key `a-org1-key0000001` (`app-token`, limited to `line-1`); and the quickstart org.
fn policy_with(limits: &str, device_enabled: bool) -> String {
    format!(
        "orgs:\n  org1:\n    limits: {limits}\n    device_types: {{ sensor: {{}}, gw: {{ class: gateway }} }}\n    devices:\n      sensor/d1: {{ token: \"{}\", enabled: {device_enabled}, groups: [line-1] }}\n      gw/g1: {{ token: \"{}\" }}\n    api_keys:\n      a-org1-key0000001: {{ token: \"{}\", groups: [line-1] }}\n  quickstart: {{ quickstart: true }}\n",
        hash_token_sha256(b"d1-token"),
        hash_token_sha256(b"g1-token"),
        hash_token_sha256(b"app-token"),
    )
}

struct Harness {
    context: Arc<Context<Dispatch, DuplexDialer>>,
    brokers: mpsc::UnboundedReceiver<DuplexStream>,
    reports: mpsc::UnboundedReceiver<Reported>,
    store: Arc<PolicyStore>,
    admission: Arc<LocalAdmission>,
}

fn harness(limits: ProcessLimits) -> Harness {
    harness_with(limits, &policy_text(true))
}

fn harness_with(limits: ProcessLimits, policy: &str) -> Harness {
    harness_escaping(limits, policy, EscapeSet::NONE)
}

/// A harness in front of a broker whose topics need `escaped` escaped.
fn harness_escaping(limits: ProcessLimits, policy: &str, escaped: EscapeSet) -> Harness {
    let policy = parse_policy(policy, Path::new("policy.yaml")).expect("policy");
    let store = Arc::new(PolicyStore::new(policy));
    let profile = Arc::new(Dispatch::new(store.clone(), Verifier::new(1, 1), "{org}/"));
    let (brokers_tx, brokers) = mpsc::unbounded_channel();
    let (reports_tx, reports) = mpsc::unbounded_channel();
    let admission = LocalAdmission::new();
    let context = Arc::new(Context {
        profile,
        dialer: Arc::new(DuplexDialer {
            brokers: brokers_tx,
            pipe_bytes: PIPE_BYTES,
        }),
        admission: admission.clone(),
        slots: ProcessSlots::new(100),
        buckets: Arc::new(LocalTenantBuckets::default()),
        reporter: Arc::new(TestReporter(reports_tx)),
        connect_rates: Arc::new(ConnectRates::new(
            Rate::per_second(1000),
            Rate::per_second(1000),
        )),
        metrics: Arc::new(Metrics::default()),
        limits,
        shutting_down: Arc::new(AtomicBool::new(false)),
        capabilities: Capabilities {
            escaped,
            ..Capabilities::default()
        },
        retained: None,
        shares: None,
    });
    Harness {
        context,
        brokers,
        reports,
        store,
        admission,
    }
}

fn limits() -> ProcessLimits {
    ProcessLimits {
        connect_timeout: Duration::from_secs(5),
        write_timeout: WRITE_TIMEOUT,
        ..ProcessLimits::default()
    }
}

fn info() -> ConnectionInfo {
    ConnectionInfo::loopback_for_tests(None)
}

fn connect_packet(version: ProtocolVersion, keep_alive: u16) -> BytesMut {
    connect_as(version, keep_alive, "d:org1:sensor:d1", b"d1-token")
}

fn connect_as(
    version: ProtocolVersion,
    keep_alive: u16,
    client_id: &str,
    token: &[u8],
) -> BytesMut {
    let username = if client_id.starts_with(['a', 'A']) {
        "a-org1-key0000001"
    } else {
        "use-token-auth"
    };
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version,
            // A:ORG:APP keeps a session; everyone else starts clean.
            clean_start: !client_id.starts_with('A'),
            keep_alive,
            properties: Vec::new(),
            client_id,
            will: None,
            username: (!client_id.contains(":quickstart:")).then_some(username),
            password: (!client_id.contains(":quickstart:")).then_some(token),
        },
    );
    out
}

/// Reads one whole MQTT frame, or `None` at the end of the stream, within [`PATIENCE`].
async fn read_frame(stream: &mut DuplexStream) -> Option<Vec<u8>> {
    tokio::time::timeout(PATIENCE, read_frame_now(stream))
        .await
        .expect("a frame or the end of the stream in time")
}

async fn read_frame_now(stream: &mut DuplexStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    loop {
        if let Ok(Some(header)) = decode_frame_header(&buf, usize::MAX) {
            if buf.len() >= header.frame_len() {
                return Some(buf[..header.frame_len()].to_vec());
            }
        }
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(1) => buf.push(byte[0]),
            _ => return None,
        }
    }
}

impl Harness {
    /// Starts a session over a new in-memory client connection.
    fn spawn_session(&self) -> (DuplexStream, JoinHandle<()>) {
        let (client, session_end) = duplex(PIPE_BYTES);
        let task = tokio::spawn(run(session_end, info(), self.context.clone()));
        (client, task)
    }

    /// Plays the broker's part of a CONNECT: takes the dialled connection, reads the CONNECT
    /// and answers CONNACK.
    async fn accept_broker(&mut self) -> DuplexStream {
        let mut broker = self.brokers.recv().await.expect("the session dials");
        let connect = read_frame(&mut broker).await.expect("CONNECT");
        assert_eq!(connect[0], 0x10);
        let v5 = connect.windows(5).any(|w| w == b"MQTT\x05");
        let connack: &[u8] = if v5 {
            &[0x20, 0x03, 0x00, 0x00, 0x00]
        } else {
            &[0x20, 0x02, 0x00, 0x00]
        };
        broker.write_all(connack).await.unwrap();
        broker
    }

    /// Connects device d1: the client sends CONNECT, the broker accepts, the client gets its
    /// CONNACK. Returns the client's and the broker's ends.
    async fn connect(
        &mut self,
        version: ProtocolVersion,
        keep_alive: u16,
    ) -> (DuplexStream, DuplexStream, JoinHandle<()>) {
        self.connect_with(connect_packet(version, keep_alive)).await
    }

    /// Connects with this CONNECT packet (see [`Harness::connect`]).
    async fn connect_with(
        &mut self,
        connect: BytesMut,
    ) -> (DuplexStream, DuplexStream, JoinHandle<()>) {
        let (mut client, task) = self.spawn_session();
        client.write_all(&connect).await.unwrap();
        let broker = self.accept_broker().await;
        let connack = read_frame(&mut client).await.expect("CONNACK");
        assert_eq!(connack[0], 0x20, "CONNACK");
        assert_eq!(connack[3], 0, "accepted");
        let Reported::Connected(statuses) = self.report().await else {
            panic!("a Connect status first");
        };
        let status: serde_json::Value =
            serde_json::from_slice(&statuses[0].payload).expect("status JSON");
        assert_eq!(status["Action"], "Connect");
        (client, broker, task)
    }

    /// The next report, within [`PATIENCE`] of virtual time.
    async fn report(&mut self) -> Reported {
        tokio::time::timeout(PATIENCE, self.reports.recv())
            .await
            .expect("the session reports in time")
            .expect("the session reports")
    }

    /// The next Disconnect status: its closing code and reason.
    async fn disconnect_status(&mut self) -> (u64, String) {
        loop {
            if let Reported::Disconnected(statuses) = self.report().await {
                let status: serde_json::Value =
                    serde_json::from_slice(&statuses[0].payload).expect("status JSON");
                assert_eq!(status["Action"], "Disconnect");
                return (
                    status["CloseCode"].as_u64().unwrap_or_default(),
                    status["Reason"].as_str().unwrap_or_default().to_owned(),
                );
            }
        }
    }

    /// Tells every live session to close with `cause`.
    fn close_all(&self, cause: Cause) {
        for session in self.admission.sessions() {
            session.close(Refusal::new(cause));
        }
    }
}

/// An MQTT 5 DISCONNECT's reason code.
fn disconnect_reason(frame: &[u8]) -> u8 {
    assert_eq!(frame[0], 0xE0, "DISCONNECT: {frame:02X?}");
    frame[2]
}

#[tokio::test(start_paused = true)]
async fn a_silent_client_is_closed_at_one_and_a_half_keep_alives_with_160() {
    let mut harness = harness(limits());
    let (mut client, _broker, task) = harness.connect(ProtocolVersion::V5, 10).await;
    let silent_since = Instant::now();
    let disconnect = read_frame(&mut client).await.expect("DISCONNECT");
    assert_eq!(disconnect_reason(&disconnect), 0x8D, "Keep Alive timeout");
    assert_eq!(silent_since.elapsed(), Duration::from_secs(15));
    assert_eq!(harness.disconnect_status().await.0, 160);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_packet_that_never_completes_is_closed_after_the_partial_packet_timeout() {
    let mut harness = harness(limits());
    let (mut client, _broker, _task) = harness.connect(ProtocolVersion::V311, 0).await;
    // A PUBLISH that announces 16 bytes and sends one.
    client.write_all(&[0x30, 0x10, 0x00]).await.unwrap();
    let started = Instant::now();
    assert_eq!(read_frame(&mut client).await, None, "MQTT 3: closed");
    assert_eq!(started.elapsed(), limits().partial_packet_timeout);
    let (code, reason) = harness.disconnect_status().await;
    assert_eq!(code, 160);
    assert!(reason.contains("not completed"), "{reason}");
}

#[tokio::test(start_paused = true)]
async fn a_connection_without_connect_ends_at_the_connect_deadline_with_164() {
    let harness = harness(limits());
    let (mut client, task) = harness.spawn_session();
    let started = Instant::now();
    let mut buf = [0u8; 1];
    assert_eq!(
        client.read(&mut buf).await.unwrap(),
        0,
        "closed without a word"
    );
    assert_eq!(started.elapsed(), limits().connect_timeout);
    task.await.unwrap();
    let metrics = harness.context.metrics.render();
    assert!(
        metrics.contains("warden_closes_total{code=\"164\",org=\"\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_second_connection_takes_the_client_id_over_with_288_in_order() {
    let mut harness = harness(limits());
    let (mut first, _first_broker, _first_task) = harness.connect(ProtocolVersion::V5, 60).await;
    let (mut second, _second_task) = harness.spawn_session();
    second
        .write_all(&connect_packet(ProtocolVersion::V5, 60))
        .await
        .unwrap();
    let disconnect = read_frame(&mut first).await.expect("DISCONNECT");
    assert_eq!(disconnect_reason(&disconnect), 0x8E, "Session taken over");
    // The old session's Disconnect (288) is reported before the new one dials the broker.
    assert_eq!(harness.disconnect_status().await.0, 288);
    let _second_broker = harness.accept_broker().await;
    assert_eq!(read_frame(&mut second).await.expect("CONNACK")[0], 0x20);
    assert!(matches!(harness.report().await, Reported::Connected(_)));
}

#[tokio::test(start_paused = true)]
async fn shutdown_closes_a_session_with_93() {
    let mut harness = harness(limits());
    let (mut client, _broker, task) = harness.connect(ProtocolVersion::V5, 60).await;
    harness.close_all(Cause::Shutdown);
    let disconnect = read_frame(&mut client).await.expect("DISCONNECT");
    assert_eq!(disconnect_reason(&disconnect), 0x8B, "Server shutting down");
    assert_eq!(harness.disconnect_status().await.0, 93);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_policy_edit_that_disables_the_device_closes_it_with_94() {
    let mut harness = harness(limits());
    let (mut client, _broker, _task) = harness.connect(ProtocolVersion::V5, 60).await;
    let edited = parse_policy(&policy_text(false), Path::new("policy.yaml")).expect("policy");
    harness.store.replace(edited);
    for session in harness.admission.sessions() {
        session.reevaluate();
    }
    let disconnect = read_frame(&mut client).await.expect("DISCONNECT");
    assert_eq!(
        disconnect_reason(&disconnect),
        0x98,
        "Administrative action"
    );
    let (code, reason) = harness.disconnect_status().await;
    assert_eq!(code, 94);
    assert!(reason.contains("disabled"), "{reason}");
}

/// Floods the client with command PUBLISHes from the broker until the broker's writes wait:
/// returns how many bytes got out.
async fn flood_from_broker(broker: &mut DuplexStream) -> usize {
    let mut frame = BytesMut::new();
    encode_publish(
        &mut frame,
        0x30,
        &[b"org1/iot-2/type/sensor/id/d1/cmd/c/fmt/bin"],
        &[0u8; 1024],
    );
    let mut sent = 0;
    while tokio::time::timeout(Duration::from_millis(100), broker.write_all(&frame))
        .await
        .is_ok()
    {
        sent += frame.len();
    }
    sent
}

/// Subscribes device d1 to its commands, with the broker's SUBACK.
async fn subscribe_to_commands(client: &mut DuplexStream, broker: &mut DuplexStream) {
    let mut subscribe = BytesMut::new();
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V311,
        1,
        &[],
        &[(&[b"iot-2/cmd/+/fmt/+"], 0)],
    );
    client.write_all(&subscribe).await.unwrap();
    let forwarded = read_frame(broker).await.expect("SUBSCRIBE");
    assert_eq!(forwarded[0], 0x82);
    broker
        .write_all(&[0x90, 0x03, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    assert_eq!(read_frame(client).await.expect("SUBACK")[0], 0x90);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_holds_bounded_memory_and_is_closed_at_the_write_deadline() {
    let mut harness = harness(limits());
    let (mut client, mut broker, task) = harness.connect(ProtocolVersion::V311, 0).await;
    subscribe_to_commands(&mut client, &mut broker).await;
    let stalled_from = Instant::now();
    let sent = flood_from_broker(&mut broker).await;
    // Back-pressure: the session stopped reading the broker once its output was full, so what
    // it holds is bounded by the high-water mark and the pipes, not by what the broker has.
    assert!(sent < 512 * 1024, "the broker could write {sent} bytes");
    let (code, reason) = harness.disconnect_status().await;
    let waited = stalled_from.elapsed();
    assert_eq!(code, 92);
    assert!(reason.contains("client read nothing"), "{reason}");
    assert!(
        waited >= WRITE_TIMEOUT && waited < WRITE_TIMEOUT + Duration::from_secs(3),
        "{waited:?}"
    );
    task.await.unwrap();
    assert_eq!(
        harness.admission.tenant_connections("org1"),
        0,
        "slot given back"
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_still_taken_over_at_once() {
    let mut harness = harness(limits());
    let (mut first, mut broker, first_task) = harness.connect(ProtocolVersion::V311, 0).await;
    subscribe_to_commands(&mut first, &mut broker).await;
    flood_from_broker(&mut broker).await;
    let takeover_at = Instant::now();
    let (mut second, _second_task) = harness.spawn_session();
    second
        .write_all(&connect_packet(ProtocolVersion::V311, 60))
        .await
        .unwrap();
    assert_eq!(harness.disconnect_status().await.0, 288);
    let _second_broker = harness.accept_broker().await;
    assert_eq!(read_frame(&mut second).await.expect("CONNACK")[0], 0x20);
    // The stalled session gave up its farewell within the close deadline, not the write one.
    assert!(takeover_at.elapsed() <= super::FAREWELL_TIMEOUT);
    first_task.await.unwrap();
    drop(first);
}

/// Floods the broker with event PUBLISHes from the client until the client's writes wait.
async fn flood_from_client(client: &mut DuplexStream) {
    let mut frame = BytesMut::new();
    encode_publish(&mut frame, 0x30, &[b"iot-2/evt/e/fmt/bin"], &[0u8; 1024]);
    while tokio::time::timeout(Duration::from_millis(100), client.write_all(&frame))
        .await
        .is_ok()
    {}
}

#[tokio::test(start_paused = true)]
async fn a_broker_that_stops_reading_closes_the_session_at_the_write_deadline() {
    let mut harness = harness(limits());
    let (mut client, _broker, task) = harness.connect(ProtocolVersion::V311, 0).await;
    let stalled_from = Instant::now();
    flood_from_client(&mut client).await;
    let (code, reason) = harness.disconnect_status().await;
    assert_eq!(code, 92);
    assert!(reason.contains("broker read nothing"), "{reason}");
    assert!(stalled_from.elapsed() < WRITE_TIMEOUT + Duration::from_secs(3));
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn shutdown_acts_at_once_while_the_broker_stalls() {
    let mut harness = harness(limits());
    let (mut client, _broker, task) = harness.connect(ProtocolVersion::V311, 0).await;
    flood_from_client(&mut client).await;
    let shutdown_at = Instant::now();
    harness.close_all(Cause::Shutdown);
    assert_eq!(harness.disconnect_status().await.0, 93);
    assert!(shutdown_at.elapsed() <= super::FAREWELL_TIMEOUT);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn what_the_session_accepted_reaches_a_slow_broker_after_the_close() {
    let mut harness = harness(limits());
    let (mut client, mut broker, task) = harness.connect(ProtocolVersion::V311, 0).await;
    // More than the broker's pipe holds, while the broker reads nothing: the session holds
    // the rest, then a QoS 1 PUBLISH, then the client goes away.
    let mut batch = BytesMut::new();
    while batch.len() < PIPE_BYTES + 4096 {
        encode_publish(&mut batch, 0x30, &[b"iot-2/evt/e/fmt/bin"], &[0u8; 1024]);
    }
    encode_publish(
        &mut batch,
        0x32,
        &[b"iot-2/evt/last/fmt/txt"],
        b"\x00\x07kept",
    );
    client.write_all(&batch).await.unwrap();
    client.shutdown().await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::time::timeout(super::FAREWELL_TIMEOUT, broker.read_to_end(&mut received)).await;
    assert!(
        received.windows(4).any(|w| w == b"kept"),
        "the held QoS 1 PUBLISH reached the broker ({} bytes)",
        received.len()
    );
    assert_eq!(harness.disconnect_status().await.0, 91);
    task.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_gateway_refusal_keeps_the_connection_and_is_reported_through_the_profile() {
    let mut harness = harness(limits());
    let connect = connect_as(ProtocolVersion::V311, 60, "g:org1:gw:g1", b"g1-token");
    let (mut client, _broker, _task) = harness.connect_with(connect).await;
    let mut subscribe = BytesMut::new();
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V311,
        7,
        &[],
        &[(&[b"iot-2/type/gw/id/other/notify"], 0)],
    );
    client.write_all(&subscribe).await.unwrap();
    assert_eq!(
        read_frame(&mut client).await.expect("SUBACK"),
        [0x90, 0x03, 0x00, 0x07, 0x80]
    );
    let Reported::Published(notifications) = harness.report().await else {
        panic!("a notification");
    };
    assert_eq!(notifications[0].topic, "org1/iot-2/type/gw/id/g1/notify");
}

#[tokio::test(start_paused = true)]
async fn a_publish_held_back_by_the_org_costs_nothing_in_the_connection_bucket() {
    // The device may publish once per 10 s; the org twice per second, and the gateway has just
    // used both. The device's PUBLISH waits for the org only: had the refused attempt cost
    // the device its one token, it would wait 10 s for the next.
    let limits_yaml =
        "{ publish_rate: { device: \"1/10s\", gateway: \"1000/s\" }, org_publish_rate: \"2/s\" }";
    let mut harness = harness_with(limits(), &policy_with(limits_yaml, true));
    let gateway = connect_as(ProtocolVersion::V311, 0, "g:org1:gw:g1", b"g1-token");
    let (mut gateway, mut gateway_broker, _gateway_task) = harness.connect_with(gateway).await;
    let (mut device, mut device_broker, _device_task) =
        harness.connect(ProtocolVersion::V311, 0).await;
    let mut batch = BytesMut::new();
    for _ in 0..2 {
        encode_publish(
            &mut batch,
            0x30,
            &[b"iot-2/type/gw/id/g1/evt/e/fmt/t"],
            b"x",
        );
    }
    gateway.write_all(&batch).await.unwrap();
    for _ in 0..2 {
        assert_eq!(
            read_frame(&mut gateway_broker).await.expect("PUBLISH")[0],
            0x30
        );
    }
    let mut event = BytesMut::new();
    encode_publish(&mut event, 0x30, &[b"iot-2/evt/e/fmt/t"], b"x");
    let sent_at = Instant::now();
    device.write_all(&event).await.unwrap();
    assert_eq!(
        read_frame(&mut device_broker).await.expect("PUBLISH")[0],
        0x30
    );
    assert_eq!(sent_at.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn subscriptions_count_against_a_rate() {
    let limits_yaml = "{ subscribe_rate: \"10/s\" }";
    let mut harness = harness_with(limits(), &policy_with(limits_yaml, true));
    let (mut client, mut broker, _task) = harness.connect(ProtocolVersion::V311, 0).await;
    let started = Instant::now();
    let mut batch = BytesMut::new();
    for packet_id in 1..=30u16 {
        encode_subscribe(
            &mut batch,
            ProtocolVersion::V311,
            packet_id,
            &[],
            &[(&[b"iot-2/cmd/c/fmt/t"], 0)],
        );
    }
    client.write_all(&batch).await.unwrap();
    for _ in 1..=30u16 {
        let subscribe = read_frame(&mut broker).await.expect("SUBSCRIBE");
        assert_eq!(subscribe[0], 0x82);
    }
    // Ten at once (the burst), the other twenty at 10/s.
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    drop(client);
}

#[tokio::test(start_paused = true)]
async fn no_local_is_cleared_on_the_shared_subscription_of_a_scalable_application() {
    let mut harness = harness(limits());
    let connect = connect_as(ProtocolVersion::V5, 60, "A:org1:app", b"app-token");
    let (mut client, mut broker, _task) = harness.connect_with(connect).await;
    let mut subscribe = BytesMut::new();
    // Options: QoS 1, No Local.
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        3,
        &[],
        &[(&[b"iot-2/type/+/id/+/evt/+/fmt/+"], 0x05)],
    );
    client.write_all(&subscribe).await.unwrap();
    let forwarded = read_frame(&mut broker).await.expect("SUBSCRIBE");
    let filter = b"$share/wiotp.org1.app.app/org1/iot-2/type/+/id/+/evt/+/fmt/+";
    let at = forwarded
        .windows(filter.len())
        .position(|w| w == filter)
        .expect("the shared filter");
    assert_eq!(forwarded[at + filter.len()], 0x01, "QoS 1 without No Local");
}

/// Nothing is allocated per forwarded PUBLISH, at QoS 0 or QoS 1, in either direction, for a
/// group-limited API key (the identity whose checks look devices up), once the buffers have
/// grown.
#[test]
fn forwarding_allocates_nothing_per_publish() {
    let connect = connect_as(ProtocolVersion::V311, 0, "a:org1:app", b"app-token");
    forwarding_allocates_nothing(
        &policy_text(true),
        connect,
        EscapeSet::NONE,
        b"org1/",
        b"iot-2/type/sensor/id/d1/evt/e/fmt/t",
    );
}

/// In front of a broker that needs `.` escaped, a topic without one costs nothing either: only
/// a topic that holds an escaped character is copied.
#[test]
fn forwarding_allocates_nothing_per_publish_when_escaping_finds_nothing() {
    let connect = connect_as(ProtocolVersion::V311, 0, "a:org1:app", b"app-token");
    forwarding_allocates_nothing(
        &policy_text(true),
        connect,
        EscapeSet::DOT,
        b"org1/",
        b"iot-2/type/sensor/id/d1/evt/e/fmt/t",
    );
}

/// With `.` escaped, a dotted event ID goes to the broker as `%2E` and comes back to the client
/// as it was sent.
#[tokio::test(start_paused = true)]
async fn a_dotted_topic_is_escaped_at_the_broker_and_restored_for_the_client() {
    let mut harness = harness_escaping(limits(), &policy_text(true), EscapeSet::DOT);
    let connect = connect_as(ProtocolVersion::V311, 0, "a:org1:app", b"app-token");
    let (mut client, mut broker, _task) = harness.connect_with(connect).await;
    let mut publish = BytesMut::new();
    encode_publish(
        &mut publish,
        0x30,
        &[b"iot-2/type/sensor/id/d1/evt/temp.c/fmt/t"],
        b"x",
    );
    client.write_all(&publish).await.unwrap();
    let mut expected = BytesMut::new();
    encode_publish(
        &mut expected,
        0x30,
        &[b"org1/iot-2/type/sensor/id/d1/evt/temp%2Ec/fmt/t"],
        b"x",
    );
    let mut forwarded = vec![0u8; expected.len()];
    broker.read_exact(&mut forwarded).await.unwrap();
    assert_eq!(forwarded, expected);
    broker.write_all(&expected).await.unwrap();
    let mut delivered = vec![0u8; publish.len()];
    client.read_exact(&mut delivered).await.unwrap();
    assert_eq!(delivered, publish);
}

/// The same for a client of a generic tenant with 50 rules: the rule trie, the receive check
/// and the mount rewrite allocate nothing per message either.
#[test]
fn generic_forwarding_allocates_nothing_per_publish() {
    let mut rules = String::new();
    for i in 0..49 {
        rules.push_str(&format!(
            "      - {{ allow: [publish, subscribe], topic: \"site/{i}/%c/+\" }}\n"
        ));
    }
    rules.push_str("      - { deny: [receive], topic: \"secret/#\" }\n");
    let policy = format!(
        "{}tenants:\n  lab:\n    users:\n      u: {{ token: \"{}\" }}\n    limits: {OPEN_LIMITS}\n    events: {{ topic: \"$events/%c\" }}\n    rules:\n{rules}",
        policy_text(true),
        hash_token_sha256(b"u-token"),
    );
    let mut connect = BytesMut::new();
    encode_connect(
        &mut connect,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 0,
            properties: Vec::new(),
            client_id: "dev1",
            will: None,
            username: Some("u@lab"),
            password: Some(b"u-token"),
        },
    );
    forwarding_allocates_nothing(
        &policy,
        connect,
        EscapeSet::NONE,
        b"lab/",
        b"site/7/dev1/temp",
    );
}

/// Connects with `connect` under `policy` and forwards PUBLISHes to `topic` (`prefix` in front
/// at the broker) both ways at QoS 0 and 1, counting allocations once the buffers have grown.
fn forwarding_allocates_nothing(
    policy: &str,
    connect: BytesMut,
    escaped: EscapeSet,
    prefix: &[u8],
    topic: &[u8],
) {
    const MESSAGES: usize = 2_000;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (mut client, mut broker, mut harness) = runtime.block_on(async {
        let mut harness = harness_escaping(limits(), policy, escaped);
        let (client, broker, _task) = harness.connect_with(connect).await;
        (client, broker, harness)
    });
    for qos in [0u8, 1] {
        // QoS 1 carries packet id 7 in front of the payload, and both sides acknowledge.
        let after_topic: &[u8] = if qos == 0 {
            b"payload"
        } else {
            b"\x00\x07payload"
        };
        let first_byte = 0x30 | (qos << 1);
        let mut upstream = BytesMut::new();
        encode_publish(&mut upstream, first_byte, &[topic], after_topic);
        let mut downstream = BytesMut::new();
        encode_publish(&mut downstream, first_byte, &[prefix, topic], after_topic);
        let puback = [0x40, 0x02, 0x00, 0x07];
        let mut forwarded = vec![0u8; upstream.len() + prefix.len()];
        let mut delivered = vec![0u8; downstream.len() - prefix.len()];
        let mut ack = [0u8; 4];
        let mut exchange = |count: usize| {
            runtime.block_on(async {
                for _ in 0..count {
                    client.write_all(&upstream).await.unwrap();
                    broker.read_exact(&mut forwarded).await.unwrap();
                    // The broker form, checked without allocating.
                    assert!(forwarded[..] == downstream[..]);
                    if qos == 1 {
                        broker.write_all(&puback).await.unwrap();
                        client.read_exact(&mut ack).await.unwrap();
                    }
                    broker.write_all(&downstream).await.unwrap();
                    client.read_exact(&mut delivered).await.unwrap();
                    assert!(delivered[..] == upstream[..]);
                    if qos == 1 {
                        client.write_all(&puback).await.unwrap();
                        broker.read_exact(&mut ack).await.unwrap();
                    }
                }
            })
        };
        // Buffers, maps and the runtime's own structures grow to their working size first.
        exchange(MESSAGES);
        let counted = allocation_counter::measure(|| exchange(MESSAGES));
        // The one allocation allowed is the runtime's, not the session's: a current-thread
        // `block_on` starts with an empty list of deferred wake-ups, which the session's first
        // deferred write (`yield_now`) grows once. A worker thread keeps its list for good.
        assert!(
            counted.count_total <= 1,
            "{} allocations while forwarding {MESSAGES} QoS {qos} messages each way",
            counted.count_total
        );
    }
    drop(harness.reports.try_recv());
}

/// A `MakeWriter` that keeps every log line in memory.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Refused requests are logged within the process's log budget (50 lines a second), however
/// many a client sends; all of them are counted in the metrics.
#[test]
fn refusal_logging_has_a_budget() {
    const REFUSED: usize = 500;
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let metrics = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let mut harness = harness(limits());
            // Quickstart refuses without closing: its devices have no commands.
            let connect = connect_as(ProtocolVersion::V311, 0, "d:quickstart:sensor:q1", b"");
            let (mut client, _broker, _task) = harness.connect_with(connect).await;
            let mut batch = BytesMut::new();
            for packet_id in 1..=REFUSED as u16 {
                encode_subscribe(
                    &mut batch,
                    ProtocolVersion::V311,
                    packet_id,
                    &[],
                    &[(&[b"iot-2/cmd/+/fmt/+"], 0)],
                );
            }
            client.write_all(&batch).await.unwrap();
            for _ in 0..REFUSED {
                let suback = read_frame(&mut client).await.expect("SUBACK");
                assert_eq!(suback[4], 0x80, "refused");
            }
            harness.context.metrics.render()
        })
    });
    let denials = format!("warden_denials_total{{org=\"quickstart\",rule=\"subscription not allowed for this client class\"}} {REFUSED}");
    assert!(metrics.lines().any(|line| line == denials), "{metrics}");
    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let logged = log
        .lines()
        .filter(|l| l.contains("operation refused"))
        .count();
    // The budget's burst of 50, and what it refills in the real second the test may take.
    assert!(
        (1..=100).contains(&logged),
        "{logged} refusal lines for {REFUSED} refusals"
    );
}

/// What a session's task holds for its whole life stays small: the connect phase, the close and
/// the established session's state live behind pointers, not in the task's own memory.
#[test]
fn a_session_task_is_small() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let harness = harness(limits());
        let (_client, server) = duplex(64);
        let session = run(server, info(), harness.context.clone());
        let bytes = std::mem::size_of_val(&session);
        assert!(bytes <= 1024, "a session future of {bytes} bytes");
    });
}

/// A harness whose broker has the given capabilities and, optionally, a record of retained
/// statuses.
fn harness_for_broker(
    capabilities: Capabilities,
    retained: Option<Arc<crate::retained::RetainedRecord>>,
) -> Harness {
    let mut harness = harness(limits());
    let context = Arc::get_mut(&mut harness.context).expect("nothing else holds the context yet");
    context.capabilities = capabilities;
    context.retained = retained;
    harness
}

#[tokio::test(start_paused = true)]
async fn a_shared_subscription_the_broker_cannot_serve_is_refused_with_a_reason() {
    let capabilities = Capabilities {
        shared_subscriptions: false,
        ..Capabilities::default()
    };
    // No distributor either (as if the proxy could not serve the group itself).
    let mut harness = harness_for_broker(capabilities, None);
    let connect = connect_as(ProtocolVersion::V5, 60, "A:org1:app", b"app-token");
    let (mut client, mut broker, _task) = harness.connect_with(connect).await;
    let mut subscribe = BytesMut::new();
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        3,
        &[],
        &[(&[b"iot-2/type/+/id/+/evt/+/fmt/+"], 0x01)],
    );
    client.write_all(&subscribe).await.unwrap();
    let suback = read_frame(&mut client).await.expect("SUBACK");
    assert_eq!(suback[0], 0x90);
    assert_eq!(
        suback.last(),
        Some(&0x9E),
        "Shared Subscriptions not supported"
    );
    let text = String::from_utf8_lossy(&suback);
    assert!(
        text.contains("shared subscriptions are not available"),
        "{text}"
    );
    // Nothing reached the broker: a PINGREQ is the next thing it sees.
    client.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_frame(&mut broker).await.expect("PINGREQ")[0], 0xC0);
}

#[tokio::test(start_paused = true)]
async fn a_wildcard_subscription_gets_the_recorded_statuses_after_its_suback() {
    let capabilities = Capabilities {
        retained_to_wildcards: false,
        ..Capabilities::default()
    };
    let record = Arc::new(crate::retained::RetainedRecord::default());
    record.record(&[
        Publication {
            topic: "org1/iot-2/type/sensor/id/d1/mon".into(),
            payload: "{\"Action\":\"Connect\"}".into(),
            retain: true,
        },
        Publication {
            topic: "org2/iot-2/type/sensor/id/d1/mon".into(),
            payload: "another org".into(),
            retain: true,
        },
    ]);
    let mut harness = harness_for_broker(capabilities, Some(record));
    let connect = connect_as(ProtocolVersion::V311, 60, "a:org1:app", b"app-token");
    let (mut client, mut broker, _task) = harness.connect_with(connect).await;
    let mut subscribe = BytesMut::new();
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V311,
        4,
        &[],
        &[(&[b"iot-2/type/+/id/+/mon"], 0x00)],
    );
    client.write_all(&subscribe).await.unwrap();
    assert_eq!(read_frame(&mut broker).await.expect("SUBSCRIBE")[0], 0x82);
    broker
        .write_all(&[0x90, 0x03, 0x00, 0x04, 0x00])
        .await
        .unwrap();
    assert_eq!(read_frame(&mut client).await.expect("SUBACK")[0], 0x90);
    let replayed = read_frame(&mut client).await.expect("the recorded status");
    assert_eq!(replayed[0], 0x31, "QoS 0, retained");
    let topic = b"iot-2/type/sensor/id/d1/mon";
    assert_eq!(&replayed[4..4 + topic.len()], topic);
    assert!(replayed.ends_with(b"{\"Action\":\"Connect\"}"));
    // Only that one: the other org's status is not the client's.
    client.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_frame(&mut broker).await.expect("PINGREQ")[0], 0xC0);
    broker.write_all(&[0xD0, 0x00]).await.unwrap();
    assert_eq!(read_frame(&mut client).await.expect("PINGRESP")[0], 0xD0);
}

/// The frame's body, after its fixed header.
fn body_of(frame: &[u8]) -> &[u8] {
    let header = decode_frame_header(frame, usize::MAX)
        .expect("a frame")
        .expect("a whole header");
    &frame[header.header_len..]
}

fn publish_frame(
    first_byte: u8,
    topic: &[u8],
    packet_id: Option<u16>,
    properties: Option<&[Property<'_>]>,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode_publish_parts(
        &mut out,
        first_byte,
        &[topic],
        packet_id,
        properties,
        payload,
    );
    out.to_vec()
}

/// Device d1's MQTT 5 CONNECT with these properties.
fn connect_v5_with(properties: Vec<Property<'_>>) -> BytesMut {
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: 60,
            properties,
            client_id: "d:org1:sensor:d1",
            will: None,
            username: Some("use-token-auth"),
            password: Some(b"d1-token"),
        },
    );
    out
}

const D1_EVENT: &[u8] = b"iot-2/evt/temp/fmt/json";
const D1_EVENT_AT_BROKER: &[u8] = b"org1/iot-2/type/sensor/id/d1/evt/temp/fmt/json";

/// An MQTT 5 client in front of a 3.1.1 broker: the broker sees only MQTT 3.1.1, the client
/// only MQTT 5, and what 3.1.1 cannot carry is dropped, resolved at the proxy or refused with
/// the reason code of the table in docs/brokers.md.
#[tokio::test(start_paused = true)]
async fn an_mqtt5_client_over_a_311_broker_is_translated_both_ways() {
    use crate::codec::property::*;
    let mut harness = harness_for_broker(BrokerKind::Rabbitmq.declared(), None);
    let (mut client, task) = harness.spawn_session();
    // Resume and keep the session: the one case a 3.1.1 broker keeps it (Clean Session 0).
    let connect = connect_v5_with(vec![
        Property {
            id: SESSION_EXPIRY_INTERVAL,
            value: PropertyValue::U32(3600),
        },
        Property {
            id: RECEIVE_MAXIMUM,
            value: PropertyValue::U16(10),
        },
        Property {
            id: USER_PROPERTY,
            value: PropertyValue::Pair("k", "v"),
        },
    ]);
    client.write_all(&connect).await.unwrap();
    let mut broker = harness.brokers.recv().await.expect("the session dials");
    let upstream = read_frame(&mut broker).await.expect("CONNECT");
    let upstream = parse_connect(upstream[0], body_of(&upstream)).expect("a valid CONNECT");
    assert_eq!(upstream.version, ProtocolVersion::V311);
    assert!(!upstream.clean_start, "Clean Session 0");
    broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
    let connack = read_frame(&mut client).await.expect("CONNACK");
    let connack = parse_connack(body_of(&connack), ProtocolVersion::V5).expect("an MQTT 5 CONNACK");
    assert_eq!(connack.code, 0);
    let announced = |id| {
        connack
            .properties
            .iter()
            .find(|p| p.id == id)
            .map(|p| p.value)
    };
    assert_eq!(announced(MAXIMUM_QOS), Some(PropertyValue::Byte(1)));
    assert_eq!(announced(TOPIC_ALIAS_MAXIMUM), Some(PropertyValue::U16(64)));
    assert_eq!(
        announced(SUBSCRIPTION_IDENTIFIER_AVAILABLE),
        Some(PropertyValue::Byte(0))
    );
    assert!(matches!(harness.report().await, Reported::Connected(_)));

    // A PUBLISH that sets topic alias 1, with properties the broker cannot carry (dropped),
    // then one that uses the alias: the broker gets both in full, without properties.
    let alias = Property {
        id: TOPIC_ALIAS,
        value: PropertyValue::U16(1),
    };
    let dropped = [
        alias,
        Property {
            id: CONTENT_TYPE,
            value: PropertyValue::Str("application/json"),
        },
        Property {
            id: USER_PROPERTY,
            value: PropertyValue::Pair("k", "v"),
        },
        Property {
            id: MESSAGE_EXPIRY_INTERVAL,
            value: PropertyValue::U32(60),
        },
    ];
    client
        .write_all(&publish_frame(
            0x32,
            D1_EVENT,
            Some(1),
            Some(&dropped),
            b"{}",
        ))
        .await
        .unwrap();
    client
        .write_all(&publish_frame(0x32, b"", Some(2), Some(&[alias]), b"{}"))
        .await
        .unwrap();
    for packet_id in [1, 2] {
        assert_eq!(
            read_frame(&mut broker).await.expect("PUBLISH"),
            publish_frame(0x32, D1_EVENT_AT_BROKER, Some(packet_id), None, b"{}")
        );
        broker
            .write_all(&[0x40, 0x02, 0x00, packet_id as u8])
            .await
            .unwrap();
        assert_eq!(
            read_frame(&mut client).await.expect("PUBACK"),
            [0x40, 0x02, 0x00, packet_id as u8]
        );
    }

    // A request whose answer could not find its way back is refused, and the broker gets
    // nothing (the next thing it reads is the SUBSCRIBE below).
    let response_topic = Property {
        id: RESPONSE_TOPIC,
        value: PropertyValue::Str("iot-2/evt/reply/fmt/json"),
    };
    client
        .write_all(&publish_frame(
            0x32,
            D1_EVENT,
            Some(3),
            Some(&[response_topic]),
            b"{}",
        ))
        .await
        .unwrap();
    let puback = read_frame(&mut client).await.expect("PUBACK");
    assert_eq!((puback[0], &puback[2..5]), (0x40, &[0x00, 0x03, 0x83][..]));

    // No Local and Subscription Identifiers are refused; Retain As Published and Retain
    // Handling are dropped, and QoS 2 is granted 1.
    let commands: &[&[u8]] = &[b"iot-2/cmd/+/fmt/+"];
    let mut subscribe = BytesMut::new();
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        4,
        &[],
        &[(commands, 0x05)],
    );
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        5,
        &[Property {
            id: SUBSCRIPTION_IDENTIFIER,
            value: PropertyValue::Varint(7),
        }],
        &[(commands, 0x01)],
    );
    encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        6,
        &[],
        &[(commands, 0x2A)],
    );
    client.write_all(&subscribe).await.unwrap();
    for (packet_id, code) in [(4u8, 0x83), (5, 0xA1)] {
        let suback = read_frame(&mut client).await.expect("SUBACK");
        assert_eq!((suback[0], suback[3]), (0x90, packet_id));
        assert_eq!(suback.last(), Some(&code), "{suback:02X?}");
    }
    let forwarded = read_frame(&mut broker).await.expect("SUBSCRIBE");
    let forwarded = parse_subscribe(forwarded[0], body_of(&forwarded), ProtocolVersion::V311)
        .expect("an MQTT 3.1.1 SUBSCRIBE");
    assert_eq!(forwarded.packet_id, 6);
    assert_eq!(
        forwarded.filters[0].filter,
        "org1/iot-2/type/sensor/id/d1/cmd/+/fmt/+"
    );
    assert_eq!(forwarded.filters[0].options, 0x01);
    broker
        .write_all(&[0x90, 0x03, 0x00, 0x06, 0x01])
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut client).await.expect("SUBACK"),
        [0x90, 0x04, 0x00, 0x06, 0x00, 0x01]
    );

    // A delivery gets an empty property list; the client's acknowledgement loses its reason
    // code on the way up.
    broker
        .write_all(&publish_frame(
            0x32,
            b"org1/iot-2/type/sensor/id/d1/cmd/reboot/fmt/json",
            Some(9),
            None,
            b"go",
        ))
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut client).await.expect("PUBLISH"),
        publish_frame(
            0x32,
            b"iot-2/cmd/reboot/fmt/json",
            Some(9),
            Some(&[]),
            b"go"
        )
    );
    client
        .write_all(&[0x40, 0x03, 0x00, 0x09, 0x10])
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut broker).await.expect("PUBACK"),
        [0x40, 0x02, 0x00, 0x09]
    );

    // UNSUBACK: one reason code per filter.
    let mut unsubscribe = BytesMut::new();
    encode_unsubscribe(&mut unsubscribe, ProtocolVersion::V5, 10, &[], &[commands]);
    client.write_all(&unsubscribe).await.unwrap();
    let forwarded = read_frame(&mut broker).await.expect("UNSUBSCRIBE");
    parse_unsubscribe(forwarded[0], body_of(&forwarded), ProtocolVersion::V311)
        .expect("an MQTT 3.1.1 UNSUBSCRIBE");
    broker.write_all(&[0xB0, 0x02, 0x00, 0x0A]).await.unwrap();
    assert_eq!(
        read_frame(&mut client).await.expect("UNSUBACK"),
        [0xB0, 0x04, 0x00, 0x0A, 0x00, 0x00]
    );

    // DISCONNECT with will: the broker connection ends without DISCONNECT, so that the broker
    // publishes the will.
    client.write_all(&[0xE0, 0x01, 0x04]).await.unwrap();
    assert_eq!(
        read_frame(&mut broker).await,
        None,
        "no DISCONNECT upstream"
    );
    task.await.unwrap();
}

/// QoS 2 to a broker with QoS 1 only: the proxy completes the client's flow, and the PUBREC
/// comes only after the broker's PUBACK; a copy of the PUBLISH before the PUBREL is not
/// forwarded again. A QoS 2 subscription is granted 1.
#[tokio::test(start_paused = true)]
async fn qos2_is_completed_by_the_proxy_over_a_broker_with_qos1() {
    for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
        let mut harness = harness_for_broker(BrokerKind::Nats.declared(), None);
        let (mut client, mut broker, _task) = harness.connect(version, 60).await;
        let v5_props: Option<&[Property<'_>]> = version.is_v5().then_some(&[]);
        let publish = publish_frame(0x34, D1_EVENT, Some(7), v5_props, b"{}");
        client.write_all(&publish).await.unwrap();
        client.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(
            read_frame(&mut broker).await.expect("PUBLISH"),
            // MQTT 3.1.1 for both: NATS does not speak MQTT 5.
            publish_frame(0x32, D1_EVENT_AT_BROKER, Some(7), None, b"{}"),
            "{version:?}: forwarded at QoS 1"
        );
        assert_eq!(
            read_frame(&mut broker).await.expect("PINGREQ"),
            [0xC0, 0x00]
        );
        broker.write_all(&[0xD0, 0x00]).await.unwrap();
        // Nothing before the broker's PUBACK: the PINGRESP comes first.
        assert_eq!(
            read_frame(&mut client).await.expect("PINGRESP"),
            [0xD0, 0x00]
        );
        broker.write_all(&[0x40, 0x02, 0x00, 0x07]).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await.expect("PUBREC"),
            [0x50, 0x02, 0x00, 0x07],
            "{version:?}"
        );
        // The client sends its PUBLISH again (DUP) before its PUBREL: PUBREC again, and the
        // broker gets nothing more (the next thing it reads is the PINGREQ).
        let mut again = publish.clone();
        again[0] |= 0x08;
        client.write_all(&again).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await.expect("PUBREC"),
            [0x50, 0x02, 0x00, 0x07]
        );
        client.write_all(&[0x62, 0x02, 0x00, 0x07]).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await.expect("PUBCOMP"),
            [0x70, 0x02, 0x00, 0x07]
        );
        client.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(
            read_frame(&mut broker).await.expect("PINGREQ"),
            [0xC0, 0x00]
        );

        let mut subscribe = BytesMut::new();
        let commands: &[&[u8]] = &[b"iot-2/cmd/+/fmt/+"];
        encode_subscribe(&mut subscribe, version, 8, &[], &[(commands, 0x02)]);
        client.write_all(&subscribe).await.unwrap();
        let forwarded = read_frame(&mut broker).await.expect("SUBSCRIBE");
        let forwarded = parse_subscribe(forwarded[0], body_of(&forwarded), ProtocolVersion::V311)
            .expect("a SUBSCRIBE");
        assert_eq!(
            forwarded.filters[0].options & 0x03,
            1,
            "{version:?}: granted 1"
        );
    }
}

/// A broker that refuses the protocol version the proxy speaks is reported to the client as
/// CONNACK 1 (MQTT 3) or 0x84 (MQTT 5), never as "server unavailable", which makes clients
/// retry forever.
#[tokio::test(start_paused = true)]
async fn a_broker_that_refuses_the_protocol_version_is_not_server_unavailable() {
    for (version, expected) in [(ProtocolVersion::V311, 0x01), (ProtocolVersion::V5, 0x84)] {
        let mut harness = harness(limits());
        let (mut client, _task) = harness.spawn_session();
        client
            .write_all(&connect_packet(version, 60))
            .await
            .unwrap();
        let mut broker = harness.brokers.recv().await.expect("the session dials");
        read_frame(&mut broker).await.expect("CONNECT");
        // A 3.1.1 broker answers an MQTT 5 CONNECT in 3.1.1 form.
        broker.write_all(&[0x20, 0x02, 0x00, 0x01]).await.unwrap();
        let connack = read_frame(&mut client).await.expect("CONNACK");
        assert_eq!(connack[3], expected, "{version:?}: {connack:02X?}");
        assert_eq!(read_frame(&mut client).await, None, "then closed");
    }
}

/// A broker that closes the connection on an MQTT 5 CONNECT (RabbitMQ 3) and accepts the
/// proxy's 3.1.1 probe does not speak MQTT 5: 0x84. One that closes the probe too is only
/// unavailable: 0x88.
#[tokio::test(start_paused = true)]
async fn a_broker_that_closes_an_mqtt5_connect_is_probed_before_the_answer() {
    for (probe_accepted, expected) in [(true, 0x84), (false, 0x88)] {
        let mut harness = harness(limits());
        let (mut client, _task) = harness.spawn_session();
        client
            .write_all(&connect_packet(ProtocolVersion::V5, 60))
            .await
            .unwrap();
        let mut broker = harness.brokers.recv().await.expect("the session dials");
        read_frame(&mut broker).await.expect("CONNECT");
        drop(broker);
        let mut probe = harness.brokers.recv().await.expect("the probe dials");
        let connect = read_frame(&mut probe).await.expect("the probe's CONNECT");
        let connect = parse_connect(connect[0], body_of(&connect)).expect("a valid CONNECT");
        assert_eq!(connect.version, ProtocolVersion::V311);
        assert!(connect.client_id.starts_with("mqtt-warden-probe-"));
        if probe_accepted {
            probe.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
            assert_eq!(
                read_frame(&mut probe).await.expect("DISCONNECT"),
                [0xE0, 0x00]
            );
        } else {
            drop(probe);
        }
        let connack = read_frame(&mut client).await.expect("CONNACK");
        let connack = parse_connack(body_of(&connack), ProtocolVersion::V5).expect("CONNACK");
        assert_eq!(connack.code, expected, "probe accepted: {probe_accepted}");
    }
}

/// A 3.1.1 QoS 1 PUBLISH from the broker to org1's app: device d1's event `e`, packet id `id`.
fn broker_event_qos1(id: u16) -> Vec<u8> {
    let topic = b"org1/iot-2/type/sensor/id/d1/evt/e/fmt/txt";
    let mut frame = vec![0x32, (2 + topic.len() + 2 + 1) as u8];
    frame.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    frame.extend_from_slice(topic);
    frame.extend_from_slice(&id.to_be_bytes());
    frame.push(b'x');
    frame
}

/// The packet id of a QoS 1 PUBLISH frame with a one-byte remaining length.
fn delivered_id(frame: &[u8]) -> u16 {
    assert_eq!(frame[0] & 0xF6, 0x32, "a QoS 1 PUBLISH: {frame:?}");
    let topic_len = usize::from(u16::from_be_bytes([frame[2], frame[3]]));
    u16::from_be_bytes([frame[4 + topic_len], frame[5 + topic_len]])
}

/// An MQTT 5 client of a 3.1.1 broker gets no more QoS 1 deliveries at once than its Receive
/// Maximum: the third waits, with everything behind it, until the client acknowledges one.
#[tokio::test(start_paused = true)]
async fn a_downgraded_client_gets_no_more_deliveries_in_flight_than_its_receive_maximum() {
    let capabilities = Capabilities {
        mqtt5: false,
        ..Capabilities::default()
    };
    let mut harness = harness_for_broker(capabilities, None);
    let mut connect = BytesMut::new();
    encode_connect(
        &mut connect,
        &Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 60,
            properties: vec![Property {
                id: crate::codec::property::RECEIVE_MAXIMUM,
                value: PropertyValue::U16(2),
            }],
            client_id: "a:org1:app",
            will: None,
            username: Some("a-org1-key0000001"),
            password: Some(b"app-token"),
        },
    );
    let (mut client, mut broker, _task) = harness.connect_with(connect).await;
    let mut burst = Vec::new();
    for id in 1..=3 {
        burst.extend_from_slice(&broker_event_qos1(id));
    }
    // A QoS 0 delivery behind them keeps its place.
    let mut qos0 = broker_event_qos1(0);
    qos0[0] = 0x30;
    qos0[1] -= 2;
    let at = qos0.len() - 3;
    qos0.drain(at..at + 2);
    burst.extend_from_slice(&qos0);
    broker.write_all(&burst).await.unwrap();

    assert_eq!(delivered_id(&read_frame(&mut client).await.expect("1")), 1);
    assert_eq!(delivered_id(&read_frame(&mut client).await.expect("2")), 2);
    let early = tokio::time::timeout(Duration::from_secs(5), read_frame_now(&mut client)).await;
    assert!(early.is_err(), "a third delivery in flight: {early:?}");

    // The client acknowledges the first: the third and the QoS 0 one follow.
    client.write_all(&[0x40, 0x02, 0x00, 0x01]).await.unwrap();
    assert_eq!(
        read_frame(&mut broker).await.expect("PUBACK"),
        [0x40, 0x02, 0x00, 0x01]
    );
    assert_eq!(delivered_id(&read_frame(&mut client).await.expect("3")), 3);
    assert_eq!(read_frame(&mut client).await.expect("QoS 0")[0], 0x30);
}
