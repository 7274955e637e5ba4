//! The session in-process, over in-memory streams: one WIoTP application session (a
//! group-limited API key, the costliest checks), or with `--profile generic` one client of a
//! generic tenant with 50 rules, forwarding a fixed number of PUBLISHes in one direction, with
//! this program playing both the client and the broker. No sockets, no kernel: run it under
//! callgrind to count the proxy's own instructions per forwarded PUBLISH
//! (`benches/bridge_callgrind.sh` does, and subtracts a run with no messages;
//! `RULES=1 benches/bridge_callgrind.sh` compares the two profiles).
//!
//! ```sh
//! cargo build --release --example bridge_bench
//! target/release/examples/bridge_bench --direction in --qos 1 --messages 20000
//! ```

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;

use mqtt_warden::auth::{hash_token_sha256, Verifier};
use mqtt_warden::codec::{encode_connect, encode_publish, Connect, ProtocolVersion};
use mqtt_warden::config::ProcessLimits;
use mqtt_warden::coord::local::{LocalAdmission, LocalTenantBuckets};
use mqtt_warden::coord::{ProcessSlots, Reporter, SessionId};
use mqtt_warden::dispatch::Dispatch;
use mqtt_warden::limits::{ConnectRates, Rate};
use mqtt_warden::metrics::Metrics;
use mqtt_warden::policy::load::parse_policy;
use mqtt_warden::policy::PolicyStore;
use mqtt_warden::profile::Publication;
use mqtt_warden::session::{self, Context};
use mqtt_warden::transport::{ConnectionInfo, PeerCertificate};
use mqtt_warden::upstream::memory::DuplexDialer;

/// Bytes each in-memory pipe holds.
const PIPE_BYTES: usize = 64 * 1024;
/// The event topic, as the application writes it.
const TOPIC: &[u8] = b"iot-2/type/sensor/id/d1/evt/e/fmt/bin";
/// The generic tenant's topic: as long as [`TOPIC`], decided by rule 43 of 50 (its mount is as
/// long as the org's prefix too).
const GENERIC_TOPIC: &[u8] = b"site/42/dev1/sensor/evt/temps/fmt/bin";
/// Rules of the generic tenant.
const GENERIC_RULES: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ProfileKind {
    /// A WIoTP application (group-limited API key) of org1.
    Wiotp,
    /// A user of a generic tenant with 50 rules.
    Generic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Direction {
    /// Connect and disconnect only: the baseline to subtract.
    None,
    /// Client → broker: the application publishes events.
    In,
    /// Broker → client: the application receives events.
    Out,
}

#[derive(Parser)]
#[command(about = "The session in-process over in-memory streams, for instruction counts")]
struct Args {
    /// Which way the PUBLISHes go.
    #[arg(long, value_enum, default_value = "in")]
    direction: Direction,
    /// PUBLISHes to forward.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// QoS 0 or 1 (QoS 1 with its PUBACK through the proxy).
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Which profile the session's client belongs to.
    #[arg(long, value_enum, default_value = "wiotp")]
    profile: ProfileKind,
}

/// Status messages go nowhere: the benchmark measures the data path.
struct NoReporter;

impl Reporter for NoReporter {
    fn connected(&self, _: SessionId, _: &str, _: Vec<u8>, _: Vec<Publication>) {}
    fn disconnected(&self, _: SessionId, _: &str, _: Vec<Publication>) {}
    fn publish(&self, _: Vec<Publication>) {}
}

async fn read_frame(stream: &mut DuplexStream, buf: &mut Vec<u8>) -> anyhow::Result<u8> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).await?;
    let mut len = usize::from(header[1] & 0x7F);
    let mut shift = 7;
    let mut byte = header[1];
    while byte & 0x80 != 0 {
        let mut next = [0u8; 1];
        stream.read_exact(&mut next).await?;
        byte = next[0];
        len |= usize::from(byte & 0x7F) << shift;
        shift += 7;
    }
    buf.resize(len, 0);
    stream.read_exact(buf).await?;
    Ok(header[0])
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.qos > 1 {
        bail!("--qos is 0 or 1");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The generic tenant: rules that each name a site and the client, a deny of receiving
    // secrets, and one catch-all; the benchmark's topic is decided by the 43rd.
    let mut rules = String::new();
    for i in 0..GENERIC_RULES - 2 {
        rules.push_str(&format!(
            "      - {{ allow: [publish, subscribe], topic: \"site/{i}/%c/#\" }}\n"
        ));
    }
    rules.push_str("      - { deny: [receive], topic: \"site/+/+/secret/#\" }\n");
    rules.push_str("      - { allow: [subscribe], topic: \"status/#\", groups: [ops] }\n");
    let policy = format!(
        "orgs:\n  org1:\n    limits: {{ publish_rate: {{ application: \"1000000/s\" }} }}\n    device_types: {{ sensor: {{}} }}\n    devices:\n      sensor/d1: {{ token: \"{}\", groups: [line-1] }}\n    api_keys:\n      a-org1-key0000001: {{ token: \"{}\", groups: [line-1] }}\ntenants:\n  lab:\n    mount: \"lab1/\"\n    limits: {{ publish_rate: {{ application: \"1000000/s\" }} }}\n    users:\n      u: {{ token: \"{}\" }}\n    rules:\n{rules}",
        hash_token_sha256(b"d1-token"),
        hash_token_sha256(b"app-token"),
        hash_token_sha256(b"u-token"),
    );
    let policy =
        parse_policy(&policy, Path::new("bench.yaml")).map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::new(PolicyStore::new(policy));
    let (brokers_tx, mut brokers) = mpsc::unbounded_channel();
    let context = Arc::new(Context {
        profile: Arc::new(Dispatch::new(store, Verifier::new(1, 0), "{org}/")),
        dialer: Arc::new(DuplexDialer {
            brokers: brokers_tx,
            pipe_bytes: PIPE_BYTES,
        }),
        admission: LocalAdmission::new(),
        slots: ProcessSlots::new(10),
        buckets: Arc::new(LocalTenantBuckets::default()),
        reporter: Arc::new(NoReporter),
        connect_rates: Arc::new(ConnectRates::new(
            Rate::per_second(1000),
            Rate::per_second(1000),
        )),
        metrics: Arc::new(Metrics::default()),
        limits: ProcessLimits::default(),
        shutting_down: Arc::new(AtomicBool::new(false)),
        capabilities: Default::default(),
        retained: None,
        shares: None,
    });
    let (mut client, session_end) = duplex(PIPE_BYTES);
    let info = ConnectionInfo {
        peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
        local: SocketAddr::from(([127, 0, 0, 1], 1883)),
        secure: false,
        websocket: false,
        certname: None,
        certificate: PeerCertificate::Absent,
        connected_at: SystemTime::now(),
        tenant: None,
    };
    let session = tokio::spawn(session::run(session_end, info, context));

    let generic = args.profile == ProfileKind::Generic;
    let (topic, prefix): (&[u8], &[u8]) = if generic {
        (GENERIC_TOPIC, b"lab1/")
    } else {
        (TOPIC, b"org1/")
    };
    let (client_id, username, password): (&str, &str, &[u8]) = if generic {
        ("dev1", "u@lab", b"u-token")
    } else {
        ("a:org1:bench", "a-org1-key0000001", b"app-token")
    };
    let mut connect = BytesMut::new();
    encode_connect(
        &mut connect,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 0,
            properties: Vec::new(),
            client_id,
            will: None,
            username: Some(username),
            password: Some(password),
        },
    );
    client.write_all(&connect).await?;
    let mut broker = tokio::time::timeout(Duration::from_secs(10), brokers.recv())
        .await?
        .context("the session dials")?;
    let mut frame = Vec::new();
    read_frame(&mut broker, &mut frame).await?;
    broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
    if read_frame(&mut client, &mut frame).await? != 0x20 {
        bail!("no CONNACK");
    }

    let payload = vec![0x5Au8; args.payload];
    let mut after_topic = Vec::new();
    if args.qos == 1 {
        after_topic.extend_from_slice(&[0x00, 0x07]);
    }
    after_topic.extend_from_slice(&payload);
    let first_byte = 0x30 | (args.qos << 1);
    let count = if args.direction == Direction::None {
        0
    } else {
        args.messages
    };
    match args.direction {
        Direction::In | Direction::None => {
            let mut publish = BytesMut::new();
            encode_publish(&mut publish, first_byte, &[topic], &after_topic);
            forward(&mut client, &mut broker, &publish, args.qos, count).await?;
        }
        Direction::Out => {
            let mut publish = BytesMut::new();
            encode_publish(&mut publish, first_byte, &[prefix, topic], &after_topic);
            forward(&mut broker, &mut client, &publish, args.qos, count).await?;
        }
    }
    client.write_all(&[0xE0, 0x00]).await?;
    session.await?;
    drop(broker);
    Ok(())
}

/// Sends `publish` `count` times from one end, reading each at the other (and at QoS 1 the
/// PUBACK back), one at a time.
async fn forward(
    sender: &mut DuplexStream,
    receiver: &mut DuplexStream,
    publish: &[u8],
    qos: u8,
    count: usize,
) -> anyhow::Result<()> {
    const PUBACK: [u8; 4] = [0x40, 0x02, 0x00, 0x07];
    let mut frame = Vec::new();
    for _ in 0..count {
        sender.write_all(publish).await?;
        read_frame(receiver, &mut frame).await?;
        if qos == 1 {
            receiver.write_all(&PUBACK).await?;
            read_frame(sender, &mut frame).await?;
        }
    }
    Ok(())
}
