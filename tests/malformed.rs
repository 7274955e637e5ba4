//! The rows of `malformed-inputs.md` that apply to a proxy, sent as raw bytes. Each test checks
//! the answer the table requires, and that nothing of the bad packet reached the broker: a spy
//! subscribed to `#` directly on the broker must see the test's sentinel first.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqtt_warden::codec::{
    encode_connect, property, Connect, Property, PropertyValue, ProtocolVersion, Will,
};
use support::{standard_policy, v4, Broker, Warden, WAIT};

/// A broker, the proxy, and a spy subscribed to everything directly on the broker.
struct Rig {
    broker: Broker,
    warden: Warden,
    spy: v4::Client,
}

impl Rig {
    async fn new() -> Rig {
        let broker = Broker::start().await;
        let warden = Warden::start(&broker, &standard_policy()).await;
        let addr: SocketAddr = broker.addr().parse().unwrap();
        let mut spy = v4::connect(addr, "spy", None, None).await.unwrap();
        spy.subscribe("#", QoS::AtMostOnce).await;
        Rig {
            broker,
            warden,
            spy,
        }
    }

    /// Asserts that the broker saw no client traffic (other than the proxy's monitoring messages
    /// and ledger) before now.
    async fn assert_nothing_forwarded(&mut self) {
        let addr: SocketAddr = self.broker.addr().parse().unwrap();
        let sentinel = v4::connect(addr, "sentinel", None, None).await.unwrap();
        sentinel
            .client
            .publish("sentinel", QoS::AtMostOnce, false, "end")
            .await
            .unwrap();
        loop {
            let seen = self.spy.next_publish().await;
            if seen.topic == "sentinel" {
                return;
            }
            // Monitoring messages, the proxy's session ledger and its broker probe are the
            // proxy's own traffic.
            assert!(
                seen.topic.ends_with("/mon")
                    || seen.topic.starts_with(mqtt_warden::ledger::LEDGER_ROOT)
                    || seen.topic.starts_with(mqtt_warden::probe::PROBE_ROOT),
                "forwarded to the broker: {} {:?}",
                seen.topic,
                seen.payload
            );
        }
    }

    /// The proxy still serves a well-behaved client.
    async fn assert_alive(&self) {
        let client = v4::connect(
            self.warden.addr,
            "d:org1:sensor:dev2",
            Some("use-token-auth"),
            Some("dev2-token"),
        )
        .await;
        assert!(
            client.is_ok(),
            "the proxy must keep serving after hostile input"
        );
    }
}

fn connect_bytes(
    version: ProtocolVersion,
    client_id: &str,
    properties: Vec<Property<'_>>,
) -> BytesMut {
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version,
            clean_start: true,
            keep_alive: 60,
            properties,
            client_id,
            will: None,
            username: Some("use-token-auth"),
            password: Some(b"dev1-token"),
        },
    );
    out
}

/// Sends `bytes` and returns everything the proxy answered until it closed the connection.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    read_to_close(&mut stream).await
}

async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    let result = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "the proxy must close the connection (got {answer:02X?} so far)"
    );
    answer
}

/// Connects a valid device (MQTT 3.1.1 or 5), then sends `bytes`, and returns what came back
/// after the CONNACK until the close.
async fn after_connect(addr: SocketAddr, version: ProtocolVersion, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&connect_bytes(version, "d:org1:sensor:dev1", Vec::new()))
        .await
        .unwrap();
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; usize::from(header[1])];
    stream.read_exact(&mut rest).await.unwrap();
    // Byte 1 is the return code (3.x) or reason code (5) after the flags byte.
    let code = rest[1];
    assert_eq!(code, 0, "connected");
    stream.write_all(bytes).await.unwrap();
    read_to_close(&mut stream).await
}

/// The reason code of an MQTT 5 DISCONNECT at the start of `answer`.
fn disconnect_code(answer: &[u8]) -> u8 {
    assert_eq!(
        answer.first(),
        Some(&0xE0),
        "expected DISCONNECT, got {answer:02X?}"
    );
    answer[2]
}

/// The reason/return code of a CONNACK.
fn connack_code(answer: &[u8]) -> u8 {
    assert_eq!(
        answer.first(),
        Some(&0x20),
        "expected CONNACK, got {answer:02X?}"
    );
    answer[3]
}

#[tokio::test]
async fn bad_first_packets_are_closed_without_answer() {
    let mut rig = Rig::new().await;
    let addr = rig.warden.addr;
    let cases: &[(&str, &[u8])] = &[
        (
            "row 1: five-byte remaining length",
            &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        ),
        ("row 2: non-minimal remaining length", &[0xC0, 0x80, 0x00]),
        ("row 4: PINGREQ first", &[0xC0, 0x00]),
        ("row 4: PUBACK first", &[0x40, 0x02, 0x00, 0x01]),
        (
            "row 4: PUBLISH first",
            &[0x30, 0x05, 0x00, 0x01, 0x61, 0x68, 0x69],
        ),
        ("row 5: reserved type 0", &[0x00, 0x00]),
        ("row 5: AUTH under v3", &[0xF0, 0x00]),
        ("row 6: CONNACK from a client", &[0x20, 0x02, 0x00, 0x00]),
        ("row 7: CONNECT with flags", &[0x11, 0x00]),
    ];
    for (what, bytes) in cases {
        let answer = exchange(addr, bytes).await;
        assert!(
            answer.is_empty(),
            "{what}: expected a plain close, got {answer:02X?}"
        );
    }
    rig.assert_nothing_forwarded().await;
    rig.assert_alive().await;
}

#[tokio::test]
async fn huge_declared_length_is_refused_before_buffering() {
    let rig = Rig::new().await;
    // Row 3: a CONNECT declaring ~256 MB; the proxy must close at once (165), not wait for it.
    let started = std::time::Instant::now();
    let answer = exchange(
        rig.warden.addr,
        &[0x10, 0xFF, 0xFF, 0xFF, 0x7F, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    )
    .await;
    assert!(answer.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed without waiting for the body"
    );
    rig.assert_alive().await;
}

#[tokio::test]
async fn bad_connects_get_the_specified_answer() {
    let mut rig = Rig::new().await;
    let addr = rig.warden.addr;

    // Row 12: wrong protocol name: close.
    let mut bad_name =
        connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
    bad_name[4..8].copy_from_slice(b"MQTX");
    assert!(exchange(addr, &bad_name).await.is_empty(), "row 12");

    // Row 13: level 6, and level 3 with "MQTT": CONNACK 0x01.
    for level in [6u8, 3] {
        let mut bytes =
            connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
        bytes[8] = level;
        let answer = exchange(addr, &bytes).await;
        let code = connack_code(&answer);
        assert!(
            code == 0x01 || code == 0x84,
            "row 13 level {level}: {answer:02X?}"
        );
    }

    // Row 14: reserved connect flag.
    let mut reserved =
        connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
    reserved[9] |= 0x01;
    assert!(exchange(addr, &reserved).await.is_empty(), "row 14");

    // Row 15: will QoS 3.
    let mut will_qos =
        connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
    will_qos[9] |= 0x04 | 0x18;
    assert!(exchange(addr, &will_qos).await.is_empty(), "row 15");

    // Row 16: v3 password without user name.
    let mut password_only =
        connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
    password_only[9] &= !0x80;
    assert!(exchange(addr, &password_only).await.is_empty(), "row 16");

    // Row 17: user name flag set but the payload ends early.
    let truncated = [
        0x10, 0x0E, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x82, 0x00, 0x3C, 0x00, 0x02, b'a',
        b'b',
    ];
    assert!(exchange(addr, &truncated).await.is_empty(), "row 17");

    // Row 18: zero-length client ID under v3: CONNACK 0x02.
    let empty_id = connect_bytes(ProtocolVersion::V311, "", Vec::new());
    assert_eq!(
        connack_code(&exchange(addr, &empty_id).await),
        0x02,
        "row 18"
    );

    // Row 26/27: invalid UTF-8 and NUL in the client ID: close (v3).
    let mut bad_utf8 =
        connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec();
    bad_utf8[14] = 0xFF;
    assert!(exchange(addr, &bad_utf8).await.is_empty(), "row 26");
    let nul = connect_bytes(ProtocolVersion::V311, "d:org1:sensor:de\u{0}", Vec::new());
    assert!(exchange(addr, &nul).await.is_empty(), "row 27");

    rig.assert_nothing_forwarded().await;
    rig.assert_alive().await;
}

#[tokio::test]
async fn bad_v5_connects_get_connack_reason_codes() {
    let rig = Rig::new().await;
    let addr = rig.warden.addr;
    let id = "d:org1:sensor:dev1";
    // Row 21: Receive Maximum twice → 0x82.
    let twice = vec![
        Property {
            id: property::RECEIVE_MAXIMUM,
            value: PropertyValue::U16(10),
        },
        Property {
            id: property::RECEIVE_MAXIMUM,
            value: PropertyValue::U16(10),
        },
    ];
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, id, twice)).await),
        0x82,
        "row 21"
    );
    // Row 22: Topic Alias in CONNECT → 0x81.
    let alias = vec![Property {
        id: property::TOPIC_ALIAS,
        value: PropertyValue::U16(1),
    }];
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, id, alias)).await),
        0x81,
        "row 22"
    );
    // Row 23: Receive Maximum 0 → 0x82.
    let zero = vec![Property {
        id: property::RECEIVE_MAXIMUM,
        value: PropertyValue::U16(0),
    }];
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, id, zero)).await),
        0x82,
        "row 23"
    );
    // Row 24: Authentication Data without Method → 0x82.
    let data = vec![Property {
        id: property::AUTHENTICATION_DATA,
        value: PropertyValue::Binary(b"x"),
    }];
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, id, data)).await),
        0x82,
        "row 24"
    );
    // Enhanced authentication is not supported: 0x8C.
    let method = vec![Property {
        id: property::AUTHENTICATION_METHOD,
        value: PropertyValue::Str("SCRAM-SHA-1"),
    }];
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, id, method)).await),
        0x8C
    );
    // Row 18 (v5): an empty client ID is not a WIoTP identity: 0x85.
    assert_eq!(
        connack_code(&exchange(addr, &connect_bytes(ProtocolVersion::V5, "", Vec::new())).await),
        0x85,
        "row 18 v5"
    );
    // Row 25: 10,000 user properties fit no CONNECT under the 64 KiB limit: closed as too large (165).
    let many: Vec<Property<'_>> = (0..10_000)
        .map(|_| Property {
            id: property::USER_PROPERTY,
            value: PropertyValue::Pair("k", "v"),
        })
        .collect();
    let answer = exchange(addr, &connect_bytes(ProtocolVersion::V5, id, many)).await;
    assert!(answer.is_empty(), "row 25: {answer:02X?}");
    rig.assert_alive().await;
}

#[tokio::test]
async fn rejected_connect_forwards_nothing_pipelined_behind_it() {
    let mut rig = Rig::new().await;
    // Row 20: a CONNECT with a wrong token and a PUBLISH in the same segment.
    let mut bytes = BytesMut::new();
    encode_connect(
        &mut bytes,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 60,
            properties: Vec::new(),
            client_id: "d:org1:sensor:dev1",
            will: None,
            username: Some("use-token-auth"),
            password: Some(b"wrong"),
        },
    );
    let publish = [0x30, 0x18, 0x00, 0x13];
    bytes.extend_from_slice(&publish);
    bytes.extend_from_slice(b"iot-2/evt/e/fmt/txt");
    bytes.extend_from_slice(b"pipe");
    let answer = exchange(rig.warden.addr, &bytes).await;
    assert_eq!(connack_code(&answer), 0x04);
    assert_eq!(answer.len(), 4, "nothing after the CONNACK");
    rig.assert_nothing_forwarded().await;
}

fn publish(topic: &[u8], flags: u8, packet_id: Option<u16>, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if let Some(id) = packet_id {
        body.extend_from_slice(&id.to_be_bytes());
    }
    body.extend_from_slice(payload);
    let mut out = vec![0x30 | flags];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(&body);
    out
}

#[tokio::test]
async fn bad_packets_after_connect_close_the_session() {
    let mut rig = Rig::new().await;
    let addr = rig.warden.addr;
    let subscribe_with_flags = |flags: u8| {
        vec![
            0x80 | flags,
            0x08,
            0x00,
            0x01,
            0x00,
            0x03,
            b'a',
            b'/',
            b'b',
            0x00,
        ]
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("row 5: type 0", vec![0x00, 0x00]),
        (
            "row 6: SUBACK from client",
            vec![0x90, 0x03, 0x00, 0x01, 0x00],
        ),
        ("row 6: PINGRESP from client", vec![0xD0, 0x00]),
        ("row 7: PUBACK with flags", vec![0x41, 0x02, 0x00, 0x01]),
        ("row 7: PINGREQ with flags", vec![0xC1, 0x00]),
        ("row 8: SUBSCRIBE flags 0000", subscribe_with_flags(0x00)),
        ("row 8: PUBREL flags 0000", vec![0x60, 0x02, 0x00, 0x01]),
        (
            "row 9: PUBLISH QoS 3",
            publish(b"iot-2/evt/e/fmt/t", 0x06, Some(1), b"x"),
        ),
        (
            "row 10: QoS 0 with DUP",
            publish(b"iot-2/evt/e/fmt/t", 0x08, None, b"x"),
        ),
        ("row 11: PUBLISH RL 0", vec![0x30, 0x00]),
        (
            "row 11: PUBLISH RL 2, empty topic",
            vec![0x30, 0x02, 0x00, 0x00],
        ),
        (
            "row 11: QoS 1 without packet id",
            vec![0x32, 0x03, 0x00, 0x01, 0x61],
        ),
        (
            "row 11: topic length past the end",
            vec![0x30, 0x04, 0x00, 0x10, 0x61, 0x62],
        ),
        (
            "row 19: second CONNECT",
            connect_bytes(ProtocolVersion::V311, "d:org1:sensor:dev1", Vec::new()).to_vec(),
        ),
        (
            "row 26: invalid UTF-8 topic",
            publish(b"iot-2/evt/\xC0\xAF/fmt/t", 0, None, b"x"),
        ),
        (
            "row 26: surrogate in topic",
            publish(b"iot-2/evt/\xED\xA0\x80/fmt/t", 0, None, b"x"),
        ),
        (
            "row 27: NUL in topic",
            publish(b"iot-2/evt/a\0b/fmt/t", 0, None, b"x"),
        ),
        (
            "row 29: + in topic name",
            publish(b"iot-2/evt/+/fmt/t", 0, None, b"x"),
        ),
        ("row 29: # topic name", publish(b"#", 0, None, b"x")),
        (
            "row 30: a/#/b filter",
            vec![
                0x82, 0x0A, 0x00, 0x01, 0x00, 0x05, b'a', b'/', b'#', b'/', b'b', 0x00,
            ],
        ),
        (
            "row 30: sport+ filter",
            vec![
                0x82, 0x0B, 0x00, 0x01, 0x00, 0x06, b's', b'p', b'o', b'r', b't', b'+', 0x00,
            ],
        ),
        (
            "row 31: empty filter",
            vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x00, 0x00],
        ),
        (
            "row 32: SUBSCRIBE without filters",
            vec![0x82, 0x02, 0x00, 0x01],
        ),
        (
            "row 32: UNSUBSCRIBE without filters",
            vec![0xA2, 0x02, 0x00, 0x01],
        ),
        (
            "row 33: subscribe QoS 3",
            vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0x03],
        ),
        (
            "row 33: subscribe reserved bits",
            vec![0x82, 0x08, 0x00, 0x01, 0x00, 0x03, b'a', b'/', b'b', 0xC0],
        ),
        (
            "row 35: 300 levels",
            publish("a/".repeat(300).as_bytes(), 0, None, b"x"),
        ),
        (
            "row 37: QoS 1 packet id 0",
            publish(b"iot-2/evt/e/fmt/t", 0x02, Some(0), b"x"),
        ),
        (
            "row 37: SUBSCRIBE packet id 0",
            vec![0x82, 0x08, 0x00, 0x00, 0x00, 0x03, b'a', b'/', b'b', 0x00],
        ),
        (
            "row 46: $SYS publish",
            publish(b"$SYS/broker/x", 0, None, b"x"),
        ),
        (
            "row 50: payload over 131072 bytes",
            publish(b"iot-2/evt/e/fmt/t", 0, None, &vec![0u8; 131_073]),
        ),
    ];
    for (what, bytes) in cases {
        let answer = after_connect(addr, ProtocolVersion::V311, &bytes).await;
        assert!(
            answer.is_empty(),
            "{what}: MQTT 3 has no DISCONNECT; expected a plain close, got {answer:02X?}"
        );
    }
    rig.assert_nothing_forwarded().await;
    rig.assert_alive().await;
}

#[tokio::test]
async fn bad_v5_packets_get_disconnect_reason_codes() {
    let mut rig = Rig::new().await;
    let addr = rig.warden.addr;
    let with_props = |props: &[u8], topic: &[u8], packet_id: Option<u16>, flags: u8| {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic);
        if let Some(id) = packet_id {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.push(props.len() as u8);
        body.extend_from_slice(props);
        body.extend_from_slice(b"payload");
        let mut out = vec![0x30 | flags, body.len() as u8];
        out.extend_from_slice(&body);
        out
    };
    let topic: &[u8] = b"iot-2/evt/e/fmt/t";
    let cases: Vec<(&str, Vec<u8>, &[u8])> = vec![
        (
            "row 9: QoS 3",
            with_props(&[], topic, Some(1), 0x06),
            &[0x81],
        ),
        (
            "row 22: Session Expiry in PUBLISH",
            with_props(&[0x11, 0, 0, 0, 1], topic, None, 0),
            &[0x81, 0x82],
        ),
        (
            "row 22: unknown property 0x7F",
            with_props(&[0x7F, 0], topic, None, 0),
            &[0x81],
        ),
        (
            "row 29: wildcard topic",
            with_props(&[], b"iot-2/evt/+/fmt/t", None, 0),
            &[0x81, 0x90],
        ),
        (
            "row 31: empty topic without alias",
            with_props(&[], b"", None, 0),
            &[0x82],
        ),
        (
            "row 36: topic alias 0",
            with_props(&[0x23, 0, 0], topic, None, 0),
            &[0x82, 0x94],
        ),
        (
            "row 36: topic alias over the maximum",
            with_props(&[0x23, 0xFF, 0xFF], topic, None, 0),
            &[0x94],
        ),
        (
            "row 36: unknown alias, empty topic",
            with_props(&[0x23, 0, 1], b"", None, 0),
            &[0x82],
        ),
        (
            "row 37: packet id 0",
            with_props(&[], topic, Some(0), 0x02),
            &[0x81, 0x82],
        ),
        (
            "row 38: subscription id in PUBLISH",
            with_props(&[0x0B, 1], topic, None, 0),
            &[0x82],
        ),
        (
            "not authorized topic",
            with_props(&[], b"iot-2/type/x/id/y/evt/e/fmt/t", None, 0),
            &[0x87],
        ),
        (
            "payload too large",
            {
                let mut big = vec![0x30];
                let body_len = 2 + topic.len() + 1 + 131_073;
                let mut len = body_len;
                while len > 0 {
                    let mut byte = (len % 128) as u8;
                    len /= 128;
                    if len > 0 {
                        byte |= 0x80;
                    }
                    big.push(byte);
                }
                big.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                big.extend_from_slice(topic);
                big.push(0);
                big.extend_from_slice(&vec![0u8; 131_073]);
                big
            },
            &[0x95],
        ),
    ];
    for (what, bytes, codes) in cases {
        let answer = after_connect(addr, ProtocolVersion::V5, &bytes).await;
        let code = disconnect_code(&answer);
        assert!(
            codes.contains(&code),
            "{what}: DISCONNECT 0x{code:02X}, expected one of {codes:02X?}"
        );
    }
    rig.assert_nothing_forwarded().await;
    rig.assert_alive().await;
}

#[tokio::test]
async fn nothing_is_read_after_disconnect() {
    let mut rig = Rig::new().await;
    // Row 48: DISCONNECT then a PUBLISH in the same segment.
    let mut bytes = vec![0xE0, 0x00];
    bytes.extend_from_slice(&publish(b"iot-2/evt/after/fmt/t", 0, None, b"late"));
    let answer = after_connect(rig.warden.addr, ProtocolVersion::V311, &bytes).await;
    assert!(answer.is_empty());
    rig.assert_nothing_forwarded().await;
}

#[tokio::test]
async fn will_is_checked_and_its_retain_flag_cleared() {
    let rig = Rig::new().await;
    let addr = rig.warden.addr;
    let with_will = |topic: &'static str| {
        let mut out = BytesMut::new();
        encode_connect(
            &mut out,
            &Connect {
                version: ProtocolVersion::V311,
                clean_start: true,
                keep_alive: 60,
                properties: Vec::new(),
                client_id: "d:org1:sensor:dev1",
                will: Some(Will {
                    properties: Vec::new(),
                    topic,
                    payload: b"gone",
                    qos: 1,
                    retain: true,
                }),
                username: Some("use-token-auth"),
                password: Some(b"dev1-token"),
            },
        );
        out
    };
    // A will on a topic the device may not publish: CONNACK 5 (180).
    assert_eq!(
        connack_code(&exchange(addr, &with_will("iot-2/type/sensor/id/other/evt/e/fmt/t")).await),
        0x05
    );

    // An allowed will is published by the broker, under the org prefix and without retain.
    let broker_addr: SocketAddr = rig.broker.addr().parse().unwrap();
    let mut spy = v4::connect(broker_addr, "will-spy", None, None)
        .await
        .unwrap();
    spy.subscribe(
        "org1/iot-2/type/sensor/id/dev1/evt/+/fmt/+",
        QoS::AtLeastOnce,
    )
    .await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(&with_will("iot-2/evt/lastwill/fmt/txt"))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
    drop(stream);
    let will = spy.next_publish().await;
    assert_eq!(
        will.topic,
        "org1/iot-2/type/sensor/id/dev1/evt/lastwill/fmt/txt"
    );
    assert_eq!(&will.payload[..], b"gone");
    assert!(!will.retain);
}

#[tokio::test]
async fn keep_alive_and_connect_deadlines_close_idle_clients() {
    let broker = Broker::start().await;
    let warden = Warden::start_with(
        &broker,
        &standard_policy(),
        "limits:\n  connect_timeout_secs: 1\n",
    )
    .await;
    // Row 44: a socket that never sends CONNECT is closed at the deadline (164).
    let mut idle = TcpStream::connect(warden.addr).await.unwrap();
    assert!(read_to_close(&mut idle).await.is_empty());

    // Row 43: keep-alive 1 s and then silence: closed after 1.5 s (160); MQTT 5 gets 0x8D.
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 1,
            properties: Vec::new(),
            client_id: "d:org1:sensor:dev1",
            will: None,
            username: Some("use-token-auth"),
            password: Some(b"dev1-token"),
        },
    );
    let mut stream = TcpStream::connect(warden.addr).await.unwrap();
    stream.write_all(&out).await.unwrap();
    let answer = read_to_close(&mut stream).await;
    assert_eq!(answer[0], 0x20, "CONNACK first");
    let connack_len = 2 + usize::from(answer[1]);
    assert_eq!(disconnect_code(&answer[connack_len..]), 0x8D);
}

/// A topic valid at the client, but longer than MQTT allows once the org prefix is put in front,
/// is refused as an invalid topic (276; MQTT 5 DISCONNECT 0x90, filters 0x8F): never forwarded
/// cut short.
#[tokio::test]
async fn a_topic_too_long_with_the_org_prefix_is_refused_not_cut_short() {
    let mut rig = Rig::new().await;
    let addr = rig.warden.addr;
    let event = "e".repeat(65_535 - "iot-2/evt//fmt/f".len());
    let topic = format!("iot-2/evt/{event}/fmt/f");
    assert_eq!(topic.len(), 65_535, "the longest topic MQTT can carry");
    // MQTT 5 PUBLISH at QoS 0: an empty property list, then the payload.
    let answer = after_connect(
        addr,
        ProtocolVersion::V5,
        &publish(topic.as_bytes(), 0, None, &[0x00, b'x']),
    )
    .await;
    assert_eq!(disconnect_code(&answer), 0x90, "Topic Name invalid");

    let filter = format!("iot-2/cmd/{event}/fmt/+");
    let mut subscribe = BytesMut::new();
    mqtt_warden::codec::encode_subscribe(
        &mut subscribe,
        ProtocolVersion::V5,
        1,
        &[],
        &[(&[filter.as_bytes()], 0)],
    );
    let answer = after_connect(addr, ProtocolVersion::V5, &subscribe).await;
    assert_eq!(disconnect_code(&answer), 0x8F, "Topic Filter invalid");
    rig.assert_nothing_forwarded().await;
    rig.assert_alive().await;
}
