//! Events per second over the HTTP messaging API (HTTP/1.1 keep-alive) against MQTT QoS 1,
//! through the same proxy in one run, reported as a ratio.
//!
//! Starts a private Mosquitto on a free loopback port (`mosquitto` must be on `PATH`) and the
//! proxy in this process in front of it, then for each round runs `--connections` clients of one
//! kind for `--duration` seconds, each with one request in flight (an HTTP request waits for its
//! `200`, which the proxy sends after the broker's PUBACK; an MQTT QoS 1 PUBLISH waits for its
//! PUBACK), MQTT and HTTP alternating for `--rounds` rounds. Every client is a device of its own.
//! The proxy's `limits.http_max_requests_per_connection` is raised so that HTTP clients keep
//! one connection for the whole run.
//!
//! ```text
//! cargo run --release --example http_bench -- --connections 4 --duration 5 --rounds 3
//! ```

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::Parser;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqtt_warden::codec::{encode_connect, encode_publish, Connect, ProtocolVersion};
use mqtt_warden::config::WardenConfig;

#[derive(Parser, Debug)]
struct Args {
    /// Concurrent clients of each kind.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds each measured window lasts.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Seconds of warm-up before the first round.
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// MQTT/HTTP pairs of windows.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Payload bytes.
    #[arg(long, default_value_t = 64)]
    payload: usize,
}

const TOKEN: &str = "bench-token";
/// Requests per HTTP connection: high enough that no client reconnects during a run (the default,
/// 1000, would close every connection after 1000 events).
const MAX_REQUESTS: u32 = 100_000_000;
const EVENT_PATH_PREFIX: &str = "/api/v0002/device/types/bench/devices";

fn sha256_token(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

fn policy(devices: usize) -> String {
    let mut policy = String::from(
        "orgs:\n  bench:\n    limits: { publish_rate: { device: \"1000000/s\" } }\n    device_types: { bench: {} }\n    devices:\n",
    );
    for kind in ["mqtt", "http"] {
        for n in 0..devices {
            policy.push_str(&format!(
                "      bench/{kind}{n}: {{ token: \"{}\" }}\n",
                sha256_token(TOKEN)
            ));
        }
    }
    policy
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_broker(dir: &std::path::Path) -> anyhow::Result<(tokio::process::Child, u16)> {
    let port = free_port()?;
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 100\nmax_queued_messages 0\nset_tcp_nodelay true\n"),
    )?;
    let child = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("mosquitto on PATH")?;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // sleep-ok: polling for the port
    }
    bail!("mosquitto did not listen on {port}")
}

/// One MQTT device publishing QoS 1, one in flight, until `stop`.
async fn mqtt_client(
    addr: SocketAddr,
    n: usize,
    payload: Vec<u8>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let client_id = format!("d:bench:bench:mqtt{n}");
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 60,
            properties: Vec::new(),
            client_id: &client_id,
            will: None,
            username: Some("use-token-auth"),
            password: Some(TOKEN.as_bytes()),
        },
    );
    stream.write_all(&out).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    if connack[3] != 0 {
        bail!("CONNACK {}", connack[3]);
    }
    let topic = b"iot-2/evt/load/fmt/bin";
    let mut id: u16 = 0;
    let mut ack = [0u8; 4];
    // The packet id, then the payload: what follows the topic in a QoS 1 PUBLISH.
    let mut after_topic = Vec::with_capacity(2 + payload.len());
    while !stop.load(Ordering::Relaxed) {
        id = id.wrapping_add(1).max(1);
        after_topic.clear();
        after_topic.extend_from_slice(&id.to_be_bytes());
        after_topic.extend_from_slice(&payload);
        out.clear();
        encode_publish(&mut out, 0x32, &[topic], &after_topic);
        stream.write_all(&out).await?;
        stream.read_exact(&mut ack).await?;
        if ack[0] != 0x40 {
            bail!("expected PUBACK, got {:#x}", ack[0]);
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
    stream.write_all(&[0xE0, 0]).await?;
    Ok(())
}

/// One HTTP device posting events on one kept-alive connection, one at a time, until `stop`.
async fn http_client(
    addr: SocketAddr,
    n: usize,
    payload: Vec<u8>,
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    use base64::Engine;
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let credentials =
        base64::engine::general_purpose::STANDARD.encode(format!("use-token-auth:{TOKEN}"));
    let mut request = format!(
        "POST {EVENT_PATH_PREFIX}/http{n}/events/load HTTP/1.1\r\nHost: bench.messaging.localhost\r\nAuthorization: Basic {credentials}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    )
    .into_bytes();
    request.extend_from_slice(&payload);
    let mut buf = BytesMut::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        stream.write_all(&request).await?;
        // The answer to an event is a head and an empty body.
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 200") {
                    bail!("{}", String::from_utf8_lossy(&buf[..end]));
                }
                let _ = buf.split_to(end + 4);
                break;
            }
            if stream.read_buf(&mut buf).await? == 0 {
                bail!("the proxy closed the connection");
            }
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Mqtt,
    Http,
}

/// Runs `connections` clients of `kind` for `window` and returns events per second.
async fn measure(
    kind: Kind,
    addr: SocketAddr,
    args: &Args,
    window: Duration,
) -> anyhow::Result<f64> {
    let count = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let payload = vec![b'x'; args.payload];
    let mut tasks = Vec::new();
    for n in 0..args.connections {
        let (count, stop, payload) = (count.clone(), stop.clone(), payload.clone());
        tasks.push(tokio::spawn(async move {
            match kind {
                Kind::Mqtt => mqtt_client(addr, n, payload, count, stop).await,
                Kind::Http => http_client(addr, n, payload, count, stop).await,
            }
        }));
    }
    // Counted from when the clients are connected and running.
    tokio::time::sleep(Duration::from_millis(200)).await; // sleep-ok: a measurement window
    let start_count = count.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(window).await; // sleep-ok: a measurement window
    let events = count.load(Ordering::Relaxed) - start_count;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await??;
    }
    Ok(events as f64 / elapsed.as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (_broker, broker_port) = start_broker(dir.path()).await?;
    std::fs::write(dir.path().join("policy.yaml"), policy(args.connections))?;
    let config_path = dir.path().join("warden.yaml");
    let config = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:{broker_port}\"\n  topic_prefix: \"{{org}}/\"\npolicies: policy.yaml\nlimits: {{ http_max_requests_per_connection: {MAX_REQUESTS} }}\n"
    );
    std::fs::write(&config_path, &config)?;
    let config = WardenConfig::from_yaml(&config, &config_path).context("config")?;
    let proxy = mqtt_warden::proxy::start(config).await.context("proxy")?;
    let addr = proxy.listen_addrs[0];

    measure(Kind::Mqtt, addr, &args, Duration::from_secs(args.warmup)).await?;
    measure(Kind::Http, addr, &args, Duration::from_secs(args.warmup)).await?;
    let window = Duration::from_secs(args.duration);
    let (mut mqtt, mut http) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let m = measure(Kind::Mqtt, addr, &args, window).await?;
        let h = measure(Kind::Http, addr, &args, window).await?;
        println!(
            "round {round}: MQTT QoS 1 {m:.0} events/s, HTTP {h:.0} events/s, HTTP/MQTT {:.2}",
            h / m
        );
        mqtt.push(m);
        http.push(h);
    }
    let median = |values: &mut Vec<f64>| {
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (m, h) = (median(&mut mqtt), median(&mut http));
    println!(
        "median of {} rounds, {} connections each, {} B payloads: MQTT QoS 1 {m:.0} events/s, HTTP/1.1 keep-alive {h:.0} events/s, HTTP/MQTT {:.2}",
        args.rounds,
        args.connections,
        args.payload,
        h / m
    );
    proxy.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
