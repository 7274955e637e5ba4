//! Load generator for mqtt-warden: N publishers, M subscribers, QoS 0/1, fixed rate or
//! saturation, end-to-end latency percentiles.
//!
//! Every subscriber receives every message (fan-out M). The first 8 bytes of each payload carry
//! the send time (nanoseconds since a process-wide `Instant`), so latency is measured by one clock.
//!
//! ```text
//! cargo run --release --example loadgen -- --target 127.0.0.1:1883 --mode warden --org org1 \
//!     --publishers 1 --subscribers 1 --qos 0 --payload 64 --rate 10000 --duration 5 --warmup 2
//! cargo run --release --example loadgen -- --print-policy 4 --org org1 > policy.yaml
//! ```
//!
//! Modes:
//! - `direct`: anonymous clients straight to the broker; topics already carry the org prefix
//!   (`ORG/iot-2/type/loadgen/id/pubI/evt/load/fmt/bin`).
//! - `warden`: WIoTP identities through the proxy: publishers are devices `d:ORG:loadgen:pubI`
//!   publishing `iot-2/evt/load/fmt/bin`, subscribers are apps `a:ORG:subJ` subscribing
//!   `iot-2/type/loadgen/id/+/evt/load/fmt/bin`. `--print-policy N` prints the matching policy.
//!
//! `--sub-filter all` subscribes to every event of the org instead (`iot-2/type/+/id/+/evt/+/fmt/+`).
//! `--sub-target`/`--sub-mode` connect the subscribers elsewhere than the publishers, for example
//! straight to the broker so that a proxy in front carries only the publish direction.
//!
//! Runs are timed (`--duration` after `--warmup`) unless `--count N` is given: then exactly N
//! messages are sent in lockstep, each step (`--burst` messages from one publisher, the publishers
//! taking turns) only after the previous one reached every subscriber and, at QoS 1, was
//! acknowledged to its publisher. Every client then disconnects and waits for the far end to
//! close. The work a proxy does is then the same from run to run, which is what an instruction
//! count (benches/callgrind.sh) needs; `--count 0` only connects, subscribes and disconnects.
//!
//! The hot path uses a minimal hand framing (PUBLISH, PUBACK); CONNECT, SUBSCRIBE and their acks
//! go through `mqttbytes`.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{Buf, BytesMut};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use mqttbytes::v4;
use mqttbytes::QoS;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};

/// Publishes per write in saturation mode.
const SATURATION_BATCH: u64 = 64;
/// The API key every subscriber uses in warden mode, after `a-ORG-`.
const API_KEY_SUFFIX: &str = "loadgen0001";
/// The API token in warden mode.
const API_TOKEN: &str = "loadgen-app";
/// Longest wait for the last messages after the measured window.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

#[derive(Parser, Debug, Clone)]
#[command(
    name = "loadgen",
    about = "MQTT load generator: N publishers, M subscribers, throughput and end-to-end latency"
)]
struct Args {
    /// The broker or proxy to connect to.
    #[arg(long, default_value = "127.0.0.1:1883")]
    target: String,
    /// `direct`: anonymous clients, org-prefixed topics; `warden`: WIoTP identities.
    #[arg(long, value_enum, default_value = "direct")]
    mode: Mode,
    /// The org ID.
    #[arg(long, default_value = "org1")]
    org: String,
    /// Where the subscribers connect (default: `--target`).
    #[arg(long)]
    sub_target: Option<String>,
    /// The subscribers' mode (default: `--mode`).
    #[arg(long, value_enum)]
    sub_mode: Option<Mode>,
    /// What the subscribers subscribe to: `type` = the loadgen devices' `load` events
    /// (`iot-2/type/loadgen/id/+/evt/load/fmt/bin`), `all` = every device event of the org
    /// (`iot-2/type/+/id/+/evt/+/fmt/+`).
    #[arg(long, value_enum, default_value = "type")]
    sub_filter: SubFilter,
    /// Number of publishers.
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Number of subscribers; each receives every message.
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// QoS of publishes and subscriptions.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    qos: u8,
    /// Payload size in bytes (at least 16: send timestamp and sequence number).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    payload: u32,
    /// Total publish rate over all publishers in msg/s; 0 = saturation.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Length of the measured window in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unmeasured time before the window in seconds.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// QoS 1: unacknowledged publishes allowed per publisher.
    #[arg(long, default_value_t = 100)]
    inflight: u64,
    /// Saturation: publishers pause while the slowest point of the pipeline is this many messages
    /// behind (sent × M − received), so no queue grows without bound anywhere.
    #[arg(long, default_value_t = 20_000)]
    max_lag: u64,
    /// Fixed rate: the pacing tick in microseconds; each tick releases the messages that are due.
    #[arg(long, default_value_t = 100)]
    tick_us: u64,
    /// Send exactly N messages in lockstep instead of a timed run (see the module docs); 0 only
    /// connects, subscribes and disconnects.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// With `--count`: messages per lockstep step, written at once by one publisher.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    burst: u64,
    /// With `--count`: pause between lockstep steps, in microseconds, so that what the last
    /// step left in flight (a subscriber's PUBACK on its way to the broker) is done before the
    /// next step starts.
    #[arg(long, default_value_t = 0, value_name = "US")]
    step_pause_us: u64,
    /// Keep-alive announced at CONNECT, in seconds; in timed runs subscribers ping at a third of it.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u16).range(3..))]
    keep_alive: u16,
    /// Runtime worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// Print every message slower than this many microseconds to stderr (send time, latency).
    #[arg(long, value_name = "US")]
    trace_slow: Option<u64>,
    /// A label copied into the result.
    #[arg(long, default_value = "")]
    label: String,
    /// Print a policy YAML for `--org` with N loadgen devices and the loadgen API key, and exit.
    #[arg(long, value_name = "N")]
    print_policy: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Direct,
    Warden,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Warden => "warden",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SubFilter {
    Type,
    All,
}

impl Args {
    fn sub_target(&self) -> &str {
        self.sub_target.as_deref().unwrap_or(&self.target)
    }

    fn sub_mode(&self) -> Mode {
        self.sub_mode.unwrap_or(self.mode)
    }
}

/// The process-wide clock: timestamps are nanoseconds since this instant.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

fn device_token(index: usize) -> String {
    format!("loadgen-pub{index}")
}

fn sha256_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

fn policy_yaml(org: &str, devices: usize) -> String {
    let mut out = String::new();
    out.push_str("# Generated by `loadgen --print-policy`: the load generator's identities.\n");
    out.push_str(&format!("orgs:\n  {org}:\n"));
    out.push_str("    limits:\n");
    out.push_str("      publish_rate: { device: \"1000000000/s\", gateway: \"1000000000/s\", application: \"1000000000/s\" }\n");
    out.push_str("    device_types:\n      loadgen: {}\n");
    out.push_str("    devices:\n");
    for index in 0..devices {
        out.push_str(&format!(
            "      loadgen/pub{index}: {{ token: \"{}\" }}\n",
            sha256_token(&device_token(index))
        ));
    }
    out.push_str("    api_keys:\n");
    out.push_str(&format!(
        "      a-{org}-{API_KEY_SUFFIX}: {{ token: \"{}\" }}\n",
        sha256_token(API_TOKEN)
    ));
    out
}

/// Client ID, credentials, and topic (publish topic or subscription filter) of one client.
struct Identity {
    client_id: String,
    login: Option<(String, String)>,
    topic: String,
}

fn publisher_identity(args: &Args, index: usize) -> Identity {
    let org = &args.org;
    match args.mode {
        Mode::Direct => Identity {
            client_id: format!("loadgen-{}-pub{index}", std::process::id()),
            login: None,
            topic: format!("{org}/iot-2/type/loadgen/id/pub{index}/evt/load/fmt/bin"),
        },
        Mode::Warden => Identity {
            client_id: format!("d:{org}:loadgen:pub{index}"),
            login: Some(("use-token-auth".into(), device_token(index))),
            topic: "iot-2/evt/load/fmt/bin".into(),
        },
    }
}

fn subscriber_identity(args: &Args, index: usize) -> Identity {
    let org = &args.org;
    let filter = match args.sub_filter {
        SubFilter::Type => "iot-2/type/loadgen/id/+/evt/load/fmt/bin",
        SubFilter::All => "iot-2/type/+/id/+/evt/+/fmt/+",
    };
    match args.sub_mode() {
        Mode::Direct => Identity {
            client_id: format!("loadgen-{}-sub{index}", std::process::id()),
            login: None,
            topic: format!("{org}/{filter}"),
        },
        Mode::Warden => Identity {
            client_id: format!("a:{org}:sub{index}"),
            login: Some((format!("a-{org}-{API_KEY_SUFFIX}"), API_TOKEN.into())),
            topic: filter.into(),
        },
    }
}

fn qos_of(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

/// Reads until one whole packet is in `buf`, and decodes it with mqttbytes (setup only).
async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> anyhow::Result<v4::Packet> {
    loop {
        match v4::read(buf, 1 << 20) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(error) => bail!("bad packet: {error:?}"),
        }
        buf.reserve(4096);
        if stream.read_buf(buf).await? == 0 {
            bail!("connection closed");
        }
    }
}

/// Connects, sends CONNECT and waits for a successful CONNACK. Bytes that followed the CONNACK
/// stay in the returned buffer.
async fn connect(
    args: &Args,
    target: &str,
    identity: &Identity,
) -> anyhow::Result<(TcpStream, BytesMut)> {
    let mut stream = TcpStream::connect(target)
        .await
        .with_context(|| format!("connecting to {target}"))?;
    stream.set_nodelay(true)?;
    let mut connect = v4::Connect::new(identity.client_id.clone());
    connect.keep_alive = args.keep_alive;
    if let Some((user, password)) = &identity.login {
        connect.set_login(user.clone(), password.clone());
    }
    let mut out = BytesMut::new();
    connect
        .write(&mut out)
        .map_err(|e| anyhow::anyhow!("encoding CONNECT: {e:?}"))?;
    stream.write_all(&out).await?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    match read_packet(&mut stream, &mut buf).await? {
        v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {}
        v4::Packet::ConnAck(ack) => bail!("{}: CONNACK {:?}", identity.client_id, ack.code),
        other => bail!("{}: expected CONNACK, got {other:?}", identity.client_id),
    }
    Ok((stream, buf))
}

/// State shared by every task.
struct Shared {
    args: Args,
    /// End of warm-up: the measured window starts here (ns on the process clock).
    window_start: u64,
    /// End of the measured window; publishers stop here.
    window_end: u64,
    /// Publishes written, all publishers, whole run.
    sent_total: AtomicU64,
    /// Publishes received, all subscribers, whole run.
    received_total: AtomicU64,
    /// Set when subscribers should stop (after the drain).
    stop: AtomicBool,
    stop_tx: watch::Sender<bool>,
    /// Connection failures after setup.
    errors: AtomicUsize,
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }
}

#[derive(Default)]
struct PublisherStats {
    sent_in_window: u64,
    sent_total: u64,
}

struct SubscriberStats {
    /// Messages whose send time lies in the window (for loss).
    received_sent_in_window: u64,
    /// Messages that arrived inside the window (for throughput).
    arrived_in_window: u64,
    latency_ns: Histogram<u64>,
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

fn encode_remaining_length(out: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.extend_from_slice(&[byte]);
        if len == 0 {
            break;
        }
    }
}

/// Appends one PUBLISH: topic, packet id (QoS 1), then the payload with timestamp and sequence.
fn encode_publish(
    out: &mut BytesMut,
    qos: u8,
    topic: &[u8],
    packet_id: u16,
    stamp: u64,
    seq: u64,
    payload_len: usize,
) {
    let id_len = if qos > 0 { 2 } else { 0 };
    let remaining = 2 + topic.len() + id_len + payload_len;
    out.reserve(5 + remaining);
    out.extend_from_slice(&[0x30 | (qos << 1)]);
    encode_remaining_length(out, remaining);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic);
    if qos > 0 {
        out.extend_from_slice(&packet_id.to_be_bytes());
    }
    out.extend_from_slice(&stamp.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let padding = payload_len - 16;
    let start = out.len();
    out.resize(start + padding, 0xA5);
}

/// A complete frame at the front of `buf`: (first byte, header length, frame length).
fn frame_at(buf: &[u8]) -> anyhow::Result<Option<(u8, usize, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut remaining = 0usize;
    let mut shift = 0;
    for (index, &byte) in buf[1..].iter().enumerate().take(4) {
        remaining |= usize::from(byte & 0x7F) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            let header = 2 + index;
            let total = header + remaining;
            return Ok((buf.len() >= total).then_some((first, header, total)));
        }
    }
    if buf.len() >= 5 {
        bail!("malformed remaining length");
    }
    Ok(None)
}

/// Saturation: one task per publisher writes batches as fast as the connection, the QoS 1 window
/// and `--max-lag` allow.
async fn run_publisher(
    index: usize,
    shared: Arc<Shared>,
    connection: (TcpStream, String),
) -> anyhow::Result<PublisherStats> {
    let args = &shared.args;
    let (stream, topic) = connection;
    let (reader, mut writer) = stream.into_split();
    let inflight = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(Notify::new());
    let reader_task = tokio::spawn(read_acks(
        reader,
        inflight.clone(),
        acked.clone(),
        shared.clone(),
    ));

    let topic = topic.as_bytes();
    let qos = args.qos;
    let payload = args.payload as usize;
    let subscribers = args.subscribers as u64;
    let max_lag = args.max_lag.saturating_mul(subscribers);
    let mut stats = PublisherStats::default();
    let mut packet_id: u16 = 0;
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        if now_ns() >= shared.window_end {
            break;
        }
        let sent = shared.sent_total.load(Ordering::Relaxed) * subscribers;
        let received = shared.received_total.load(Ordering::Relaxed);
        if sent.saturating_sub(received) > max_lag {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let mut count = SATURATION_BATCH;
        if qos > 0 {
            count = count.min(
                args.inflight
                    .saturating_sub(inflight.load(Ordering::Acquire)),
            );
            if count == 0 {
                // Never sleep past the end of the window.
                let _ = tokio::time::timeout(Duration::from_millis(5), acked.notified()).await;
                continue;
            }
        }
        let stamp = now_ns();
        out.clear();
        for _ in 0..count {
            packet_id = next_packet_id(packet_id, qos);
            encode_publish(
                &mut out,
                qos,
                topic,
                packet_id,
                stamp,
                stats.sent_total,
                payload,
            );
            stats.sent_total += 1;
        }
        if qos > 0 {
            inflight.fetch_add(count, Ordering::AcqRel);
        }
        if stamp >= shared.window_start && stamp < shared.window_end {
            stats.sent_in_window += count;
        }
        shared.sent_total.fetch_add(count, Ordering::Relaxed);
        writer
            .write_all(&out)
            .await
            .with_context(|| format!("publisher {index}: write"))?;
    }
    let _ = shared.stop_tx.subscribe().wait_for(|stop| *stop).await;
    let _ = writer.write_all(&[0xE0, 0x00]).await;
    let _ = writer.shutdown().await;
    reader_task.abort();
    Ok(stats)
}

fn next_packet_id(current: u16, qos: u8) -> u16 {
    match (qos, current) {
        (0, _) => 0,
        (_, u16::MAX) => 1,
        _ => current + 1,
    }
}

/// A publisher's read side: counts PUBACKs; anything unexpected or a close is an error.
async fn read_acks(
    mut reader: OwnedReadHalf,
    inflight: Arc<AtomicU64>,
    acked: Arc<Notify>,
    shared: Arc<Shared>,
) {
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => {
                if !shared.stopped() {
                    eprintln!("loadgen: a publisher's connection was closed");
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Ok(_) => {}
        }
        let mut acks = 0;
        loop {
            match frame_at(&buf) {
                Ok(Some((first, _, total))) => {
                    if first == 0x40 {
                        acks += 1;
                    }
                    buf.advance(total);
                }
                Ok(None) => break,
                Err(error) => {
                    eprintln!("loadgen: publisher read: {error}");
                    shared.errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        if acks > 0 {
            inflight.fetch_sub(acks, Ordering::AcqRel);
            acked.notify_one();
        }
    }
}

async fn subscribe(args: &Args, index: usize) -> anyhow::Result<(std::net::TcpStream, BytesMut)> {
    let identity = subscriber_identity(args, index);
    let (mut stream, mut buf) = connect(args, args.sub_target(), &identity).await?;
    let mut subscribe = v4::Subscribe::new(identity.topic.clone(), qos_of(args.qos));
    subscribe.pkid = 1;
    let mut out = BytesMut::new();
    subscribe
        .write(&mut out)
        .map_err(|e| anyhow::anyhow!("encoding SUBSCRIBE: {e:?}"))?;
    stream.write_all(&out).await?;
    match read_packet(&mut stream, &mut buf).await? {
        v4::Packet::SubAck(ack)
            if ack
                .return_codes
                .iter()
                .all(|code| *code != v4::SubscribeReasonCode::Failure) => {}
        other => bail!("{}: subscribe refused: {other:?}", identity.client_id),
    }
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    Ok((stream, buf))
}

/// One thread per subscriber with blocking reads: one system call per arrival, no event loop
/// in between, so the receive timestamp is taken as early as possible.
fn run_subscriber(
    index: usize,
    shared: Arc<Shared>,
    mut stream: std::net::TcpStream,
    early: BytesMut,
) -> anyhow::Result<SubscriberStats> {
    use std::io::{ErrorKind, Read, Write};
    let mut stats = SubscriberStats {
        received_sent_in_window: 0,
        arrived_in_window: 0,
        latency_ns: new_histogram(),
    };
    let (window_start, window_end) = (shared.window_start, shared.window_end);
    let trace_slow = shared.args.trace_slow.map(|us| us * 1000);
    stream.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut writer = stream.try_clone()?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut filled = early.len();
    buf[..filled].copy_from_slice(&early);
    let mut out = Vec::with_capacity(16 * 1024);
    let ping_every = Duration::from_secs(u64::from(shared.args.keep_alive) / 3);
    let mut last_ping = Instant::now();
    loop {
        if shared.stopped() {
            break;
        }
        if last_ping.elapsed() >= ping_every {
            out.extend_from_slice(&[0xC0, 0x00]);
            last_ping = Instant::now();
        }
        if filled == buf.len() {
            let larger = buf.len() * 2;
            buf.resize(larger, 0);
        }
        let read = match stream.read(&mut buf[filled..]) {
            Ok(0) => bail!("subscriber {index}: connection closed"),
            Ok(read) => read,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => 0,
            Err(error) if error.kind() == ErrorKind::Interrupted => 0,
            Err(error) => bail!("subscriber {index}: {error}"),
        };
        let now = now_ns();
        filled += read;
        let mut consumed = 0;
        let mut received = 0;
        while let Some((first, header, total)) =
            frame_at(&buf[consumed..filled]).with_context(|| format!("subscriber {index}"))?
        {
            let frame = &buf[consumed..consumed + total];
            consumed += total;
            if first >> 4 != 3 {
                continue;
            }
            let qos = (first >> 1) & 0x03;
            let body = &frame[header..];
            if body.len() < 2 {
                bail!("subscriber {index}: short PUBLISH");
            }
            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
            let mut at = 2 + topic_len;
            if qos > 0 {
                let id = body
                    .get(at..at + 2)
                    .with_context(|| format!("subscriber {index}: short PUBLISH"))?;
                out.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
                at += 2;
            }
            let stamp = body
                .get(at..at + 8)
                .with_context(|| format!("subscriber {index}: payload shorter than 8 bytes"))?;
            let stamp = u64::from_le_bytes(stamp.try_into().expect("8 bytes"));
            if stamp >= window_start && stamp < window_end {
                stats.received_sent_in_window += 1;
                let latency = now.saturating_sub(stamp).max(1);
                stats.latency_ns.saturating_record(latency);
                if trace_slow.is_some_and(|slow| latency > slow) {
                    eprintln!(
                        "slow: sent at {:.6} s, latency {} µs",
                        (stamp - window_start) as f64 / 1e9,
                        latency / 1000
                    );
                }
            }
            received += 1;
        }
        buf.copy_within(consumed..filled, 0);
        filled -= consumed;
        if received > 0 {
            if now >= window_start && now < window_end {
                stats.arrived_in_window += received;
            }
            shared.received_total.fetch_add(received, Ordering::Relaxed);
        }
        if !out.is_empty() {
            writer
                .write_all(&out)
                .with_context(|| format!("subscriber {index}: write"))?;
            out.clear();
        }
    }
    let _ = writer.write_all(&[0xE0, 0x00]);
    let _ = writer.shutdown(std::net::Shutdown::Write);
    Ok(stats)
}

/// A publisher driven by the pacer: it owns a non-blocking clone of the socket for writing,
/// while a task reads the acknowledgements from the original.
struct PacedPublisher {
    stream: std::net::TcpStream,
    topic: Vec<u8>,
    pending: Vec<u8>,
    written: usize,
    packet_id: u16,
    inflight: Arc<AtomicU64>,
    stats: PublisherStats,
}

impl PacedPublisher {
    /// Writes what the socket takes now; the rest waits for the next tick.
    fn flush(&mut self) -> std::io::Result<()> {
        use std::io::{ErrorKind, Write};
        while self.written < self.pending.len() {
            match self.stream.write(&self.pending[self.written..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pending.clear();
        self.written = 0;
        Ok(())
    }
}

/// Fixed rate: one thread ticks every `--tick-us` and writes to each publisher's socket what is
/// due by now, so a late tick is caught up by a larger batch and the average rate stays exact.
/// Writing from the ticking thread itself spares a wake-up of another thread per tick.
fn run_pacer(
    shared: Arc<Shared>,
    mut publishers: Vec<PacedPublisher>,
) -> anyhow::Result<Vec<PublisherStats>> {
    let args = &shared.args;
    let count = publishers.len() as u64;
    let tick = Duration::from_micros(args.tick_us.max(1));
    let payload = args.payload as usize;
    let start = now_ns();
    let mut next = Instant::now();
    let mut batch = BytesMut::with_capacity(64 * 1024);
    loop {
        let now = now_ns();
        if now >= shared.window_end {
            break;
        }
        let due_total = (u128::from(now - start) * u128::from(args.rate) / 1_000_000_000) as u64;
        for (index, publisher) in publishers.iter_mut().enumerate() {
            publisher
                .flush()
                .with_context(|| format!("publisher {index}: write"))?;
            if !publisher.pending.is_empty() {
                continue;
            }
            // Publisher i sends messages i, i+N, i+2N, ... of the whole schedule.
            let index = index as u64;
            let due = due_total / count + u64::from(index < due_total % count);
            let mut n = due.saturating_sub(publisher.stats.sent_total);
            if args.qos > 0 {
                let inflight = publisher.inflight.load(Ordering::Acquire);
                n = n.min(args.inflight.saturating_sub(inflight));
            }
            if n == 0 {
                continue;
            }
            let stamp = now_ns();
            batch.clear();
            for _ in 0..n {
                publisher.packet_id = next_packet_id(publisher.packet_id, args.qos);
                encode_publish(
                    &mut batch,
                    args.qos,
                    &publisher.topic,
                    publisher.packet_id,
                    stamp,
                    publisher.stats.sent_total,
                    payload,
                );
                publisher.stats.sent_total += 1;
            }
            if args.qos > 0 {
                publisher.inflight.fetch_add(n, Ordering::AcqRel);
            }
            if stamp >= shared.window_start && stamp < shared.window_end {
                publisher.stats.sent_in_window += n;
            }
            shared.sent_total.fetch_add(n, Ordering::Relaxed);
            publisher.pending.extend_from_slice(&batch);
            publisher
                .flush()
                .with_context(|| format!("publisher {index}: write"))?;
        }
        next += tick;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    // Finish what is queued, then leave once the subscribers are done.
    while !shared.stopped() {
        for publisher in &mut publishers {
            let _ = publisher.flush();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(publishers
        .into_iter()
        .map(|mut publisher| {
            publisher.pending.clear();
            publisher.written = 0;
            publisher.pending.extend_from_slice(&[0xE0, 0x00]);
            let _ = publisher.flush();
            publisher.stats
        })
        .collect())
}

#[derive(Debug)]
struct Report {
    sent: u64,
    sent_total: u64,
    expected: u64,
    received: u64,
    loss: i64,
    send_rate: f64,
    throughput: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    p999: f64,
    max: f64,
    errors: usize,
    /// Seconds over which `send_rate` and `throughput` were counted.
    elapsed: f64,
}

async fn run(args: Args) -> anyhow::Result<Report> {
    epoch();
    // Subscribers first, so that no message is published before everyone listens.
    let mut connections = Vec::with_capacity(args.subscribers);
    for index in 0..args.subscribers {
        connections.push(subscribe(&args, index).await?);
    }
    // Then publishers; the clock starts once everyone is connected.
    let mut publisher_connections = Vec::with_capacity(args.publishers);
    for index in 0..args.publishers {
        let identity = publisher_identity(&args, index);
        let (stream, _) = connect(&args, &args.target, &identity).await?;
        publisher_connections.push((stream, identity.topic));
    }
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let window_start = now_ns() + warmup.as_nanos() as u64;
    let shared = Arc::new(Shared {
        args: args.clone(),
        window_start,
        window_end: window_start + duration.as_nanos() as u64,
        sent_total: AtomicU64::new(0),
        received_total: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        stop_tx: watch::channel(false).0,
        errors: AtomicUsize::new(0),
    });

    let mut subscribers = Vec::new();
    for (index, (stream, early)) in connections.into_iter().enumerate() {
        let shared = shared.clone();
        subscribers.push(
            std::thread::Builder::new()
                .name(format!("sub{index}"))
                .spawn(move || run_subscriber(index, shared, stream, early))?,
        );
    }
    let mut publishers = Vec::new();
    let mut pacer = None;
    if args.rate == 0 {
        for (index, connection) in publisher_connections.into_iter().enumerate() {
            publishers.push(tokio::spawn(run_publisher(
                index,
                shared.clone(),
                connection,
            )));
        }
    } else {
        let mut paced = Vec::with_capacity(args.publishers);
        let mut readers = Vec::with_capacity(args.publishers);
        for (stream, topic) in publisher_connections {
            let stream = stream.into_std()?;
            let writer = stream.try_clone()?;
            // Keep the write half: dropping it would shut the socket's sending side down.
            let (reader, write_half) = TcpStream::from_std(stream)?.into_split();
            let inflight = Arc::new(AtomicU64::new(0));
            readers.push((
                tokio::spawn(read_acks(
                    reader,
                    inflight.clone(),
                    Arc::new(Notify::new()),
                    shared.clone(),
                )),
                write_half,
            ));
            paced.push(PacedPublisher {
                stream: writer,
                topic: topic.into_bytes(),
                pending: Vec::with_capacity(64 * 1024),
                written: 0,
                packet_id: 0,
                inflight,
                stats: PublisherStats::default(),
            });
        }
        let shared = shared.clone();
        pacer = Some((
            std::thread::Builder::new()
                .name("pacer".into())
                .spawn(move || run_pacer(shared, paced))?,
            readers,
        ));
    }

    // Wait for the window to end, then drain what is still under way.
    let end = Instant::now() + Duration::from_nanos(shared.window_end.saturating_sub(now_ns()));
    tokio::time::sleep_until(end.into()).await;
    let drain_deadline = Instant::now() + DRAIN_LIMIT;
    loop {
        let sent = shared.sent_total.load(Ordering::Relaxed) * args.subscribers as u64;
        let received = shared.received_total.load(Ordering::Relaxed);
        if received >= sent || Instant::now() >= drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.stop.store(true, Ordering::Release);
    shared.stop_tx.send_replace(true);

    let mut publisher_stats = Vec::new();
    for publisher in publishers {
        publisher_stats.push(publisher.await??);
    }
    if let Some((pacer, readers)) = pacer {
        let stats = pacer
            .join()
            .map_err(|_| anyhow::anyhow!("the pacer panicked"))??;
        publisher_stats.extend(stats);
        for (reader, write_half) in readers {
            reader.abort();
            drop(write_half);
        }
    }
    let sent: u64 = publisher_stats.iter().map(|s| s.sent_in_window).sum();
    let sent_total: u64 = publisher_stats.iter().map(|s| s.sent_total).sum();
    let mut received = 0;
    let mut arrived = 0;
    let mut latency = new_histogram();
    for subscriber in subscribers {
        let stats = subscriber
            .join()
            .map_err(|_| anyhow::anyhow!("a subscriber panicked"))??;
        received += stats.received_sent_in_window;
        arrived += stats.arrived_in_window;
        latency.add(&stats.latency_ns)?;
    }
    let expected = sent * args.subscribers as u64;
    let seconds = duration.as_secs_f64();
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        sent,
        sent_total,
        expected,
        received,
        loss: expected as i64 - received as i64,
        send_rate: sent as f64 / seconds,
        throughput: arrived as f64 / seconds,
        p50: us(0.50),
        p90: us(0.90),
        p99: us(0.99),
        p999: us(0.999),
        max: latency.max() as f64 / 1000.0,
        errors: shared.errors.load(Ordering::Relaxed),
        elapsed: seconds,
    })
}

/// One client's socket in a `--count` run, read with blocking calls.
struct LockstepClient {
    stream: std::net::TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// PUBACKs owed to the broker, written before the next blocking read.
    out: Vec<u8>,
}

/// What `LockstepClient::await_frames` counts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Awaited {
    Publishes,
    PubAcks,
}

impl LockstepClient {
    fn new(stream: std::net::TcpStream, early: &[u8]) -> anyhow::Result<LockstepClient> {
        stream.set_nonblocking(false)?;
        let mut buf = vec![0u8; 64 * 1024];
        buf[..early.len()].copy_from_slice(early);
        Ok(LockstepClient {
            stream,
            buf,
            start: 0,
            end: early.len(),
            out: Vec::with_capacity(4096),
        })
    }

    /// Reads until `wanted` frames of the given kind arrived. PUBLISHes record their latency and,
    /// at QoS 1, are acknowledged.
    fn await_frames(
        &mut self,
        mut wanted: u64,
        kind: Awaited,
        latency: &mut Histogram<u64>,
    ) -> anyhow::Result<()> {
        use std::io::{Read, Write};
        loop {
            let now = now_ns();
            while wanted > 0 {
                let Some((first, header, total)) = frame_at(&self.buf[self.start..self.end])?
                else {
                    break;
                };
                let body = &self.buf[self.start + header..self.start + total];
                self.start += total;
                match (kind, first >> 4) {
                    (Awaited::PubAcks, 4) => wanted -= 1,
                    (Awaited::Publishes, 3) => {
                        let qos = (first >> 1) & 0x03;
                        let topic_len = usize::from(u16::from_be_bytes([
                            *body.first().context("short PUBLISH")?,
                            *body.get(1).context("short PUBLISH")?,
                        ]));
                        let mut at = 2 + topic_len;
                        if qos > 0 {
                            let id = body.get(at..at + 2).context("short PUBLISH")?;
                            self.out.extend_from_slice(&[0x40, 0x02, id[0], id[1]]);
                            at += 2;
                        }
                        let stamp = body.get(at..at + 8).context("payload under 8 bytes")?;
                        let stamp = u64::from_le_bytes(stamp.try_into().expect("8 bytes"));
                        latency.saturating_record(now.saturating_sub(stamp).max(1));
                        wanted -= 1;
                    }
                    _ => {}
                }
            }
            if !self.out.is_empty() {
                self.stream.write_all(&self.out)?;
                self.out.clear();
            }
            if wanted == 0 {
                return Ok(());
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.end == self.buf.len() {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if self.end == self.buf.len() {
                    let larger = self.buf.len() * 2;
                    self.buf.resize(larger, 0);
                }
            }
            match self.stream.read(&mut self.buf[self.end..])? {
                0 => bail!("connection closed"),
                read => self.end += read,
            }
        }
    }

    /// DISCONNECT, then wait (up to 5 s) until the far end closes, so that the proxy has finished
    /// with this client when the load generator exits.
    fn disconnect(mut self) {
        use std::io::{Read, Write};
        let _ = self.stream.write_all(&[0xE0, 0x00]);
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let _ = self.stream.set_read_timeout(Some(Duration::from_secs(5)));
        while let Ok(read) = self.stream.read(&mut self.buf) {
            if read == 0 {
                break;
            }
        }
    }
}

/// `--count N`: the subscribers connect and subscribe, then the publishers connect; N messages
/// go through in lockstep steps; every client disconnects.
async fn connect_lockstep(
    args: &Args,
) -> anyhow::Result<(Vec<LockstepClient>, Vec<(LockstepClient, String)>)> {
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for index in 0..args.subscribers {
        let (stream, early) = subscribe(args, index).await?;
        subscribers.push(LockstepClient::new(stream, &early)?);
    }
    let mut publishers = Vec::with_capacity(args.publishers);
    for index in 0..args.publishers {
        let identity = publisher_identity(args, index);
        let (stream, early) = connect(args, &args.target, &identity).await?;
        publishers.push((
            LockstepClient::new(stream.into_std()?, &early)?,
            identity.topic,
        ));
    }
    Ok((subscribers, publishers))
}

fn run_lockstep(
    args: &Args,
    count: u64,
    mut subscribers: Vec<LockstepClient>,
    mut publishers: Vec<(LockstepClient, String)>,
) -> anyhow::Result<Report> {
    use std::io::Write;
    let payload = args.payload as usize;
    let mut latency = new_histogram();
    let mut acks = new_histogram();
    let mut packet_ids = vec![0u16; publishers.len()];
    let mut out = BytesMut::with_capacity(64 * 1024);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut step = 0usize;
    while sent < count {
        let index = step % publishers.len();
        let (publisher, topic) = &mut publishers[index];
        let burst = args.burst.min(count - sent);
        let stamp = now_ns();
        out.clear();
        for _ in 0..burst {
            packet_ids[index] = next_packet_id(packet_ids[index], args.qos);
            encode_publish(
                &mut out,
                args.qos,
                topic.as_bytes(),
                packet_ids[index],
                stamp,
                sent,
                payload,
            );
            sent += 1;
        }
        publisher
            .stream
            .write_all(&out)
            .with_context(|| format!("publisher {index}: write"))?;
        for (sub, subscriber) in subscribers.iter_mut().enumerate() {
            subscriber
                .await_frames(burst, Awaited::Publishes, &mut latency)
                .with_context(|| format!("subscriber {sub}"))?;
        }
        if args.qos > 0 {
            publisher
                .await_frames(burst, Awaited::PubAcks, &mut acks)
                .with_context(|| format!("publisher {index}"))?;
        }
        step += 1;
        if args.step_pause_us > 0 {
            std::thread::sleep(Duration::from_micros(args.step_pause_us));
        }
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    for (publisher, _) in publishers {
        publisher.disconnect();
    }
    for subscriber in subscribers {
        subscriber.disconnect();
    }
    let received = latency.len();
    let expected = count * args.subscribers as u64;
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    Ok(Report {
        sent: count,
        sent_total: count,
        expected,
        received,
        loss: expected as i64 - received as i64,
        send_rate: count as f64 / elapsed,
        throughput: received as f64 / elapsed,
        p50: us(0.50),
        p90: us(0.90),
        p99: us(0.99),
        p999: us(0.999),
        max: latency.max() as f64 / 1000.0,
        errors: 0,
        elapsed,
    })
}

fn print_report(args: &Args, report: &Report) {
    let mode = args.mode.name();
    if args.json {
        let line = serde_json::json!({
            "label": args.label,
            "target": args.target,
            "mode": mode,
            "sub_target": args.sub_target(),
            "sub_mode": args.sub_mode().name(),
            "publishers": args.publishers,
            "subscribers": args.subscribers,
            "qos": args.qos,
            "payload": args.payload,
            "rate": args.rate,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "inflight": args.inflight,
            "count": args.count,
            "burst": args.burst,
            "elapsed_s": report.elapsed,
            "sent": report.sent,
            "sent_total": report.sent_total,
            "expected": report.expected,
            "received": report.received,
            "loss": report.loss,
            "send_rate": report.send_rate.round(),
            "throughput": report.throughput.round(),
            "p50_us": report.p50,
            "p90_us": report.p90,
            "p99_us": report.p99,
            "p999_us": report.p999,
            "max_us": report.max,
            "errors": report.errors,
        });
        println!("{line}");
        return;
    }
    let rate = match (args.count, args.rate) {
        (Some(count), _) => format!("{count} messages in lockstep steps of {}", args.burst),
        (None, 0) => "saturation".to_string(),
        (None, rate) => format!("{rate} msg/s"),
    };
    let mut out = std::io::stdout().lock();
    let timing = match args.count {
        Some(_) => format!("in {:.2} s", report.elapsed),
        None => format!("{} s after {} s warm-up", args.duration, args.warmup),
    };
    let _ = writeln!(
        out,
        "{} {mode} {}→{} QoS {} payload {} B, {rate}, {timing}",
        args.target, args.publishers, args.subscribers, args.qos, args.payload,
    );
    let loss_pct = if report.expected > 0 {
        100.0 * report.loss as f64 / report.expected as f64
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "  sent {}  expected {}  received {}  loss {} ({loss_pct:.3}%)",
        report.sent, report.expected, report.received, report.loss
    );
    let _ = writeln!(
        out,
        "  publish {:.0} msg/s  receive throughput {:.0} msg/s",
        report.send_rate, report.throughput
    );
    let _ = writeln!(
        out,
        "  latency µs: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
        report.p50, report.p90, report.p99, report.p999, report.max
    );
    if report.errors > 0 {
        let _ = writeln!(out, "  connection errors: {}", report.errors);
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(devices) = args.print_policy {
        print!("{}", policy_yaml(&args.org, devices));
        return Ok(());
    }
    if args.publishers == 0 || args.subscribers == 0 {
        bail!("--publishers and --subscribers must be at least 1");
    }
    if args.qos > 0 && args.inflight == 0 {
        bail!("--inflight must be at least 1");
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(threads) = args.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = builder.build()?;
    let report = match args.count {
        Some(count) => {
            let (subscribers, publishers) = runtime.block_on(connect_lockstep(&args))?;
            run_lockstep(&args, count, subscribers, publishers)?
        }
        None => runtime.block_on(run(args.clone()))?,
    };
    print_report(&args, &report);
    runtime.shutdown_timeout(Duration::from_millis(100));
    if report.errors > 0 {
        std::process::exit(2);
    }
    Ok(())
}
