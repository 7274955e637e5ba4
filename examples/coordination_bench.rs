//! What coordination through Redis costs a CONNECT, against a real Mosquitto and a real
//! `redis-server` on loopback, with proxies run in this process: connects per second (CONNECT,
//! CONNACK, DISCONNECT, close) with `CONCURRENCY` clients at a time and distinct client IDs,
//!
//! - one instance without `coordination:` (the baseline),
//! - one instance with it,
//! - two instances with it, the clients taking turns between them,
//! - two instances with it and every client ID taken over from the other instance (each connect
//!   closes the session the previous connect of that ID holds on the other instance: 288).
//!
//! Each configuration runs `ROUNDS` times, interleaved; the median is reported, with its ratio to
//! the baseline's.
//!
//! ```sh
//! cargo run --release --example coordination_bench
//! ```
//!
//! Needs `mosquitto` and `redis-server` on PATH. Every loop is bounded in count and time.

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use mqtt_warden::codec::{encode_connect, Connect, ProtocolVersion};
use mqtt_warden::config::WardenConfig;
use mqtt_warden::proxy::{self, RunningProxy};

/// Connects per measurement.
const CONNECTS: usize = 4000;
/// Clients connecting at once.
const CONCURRENCY: usize = 32;
/// Takeovers per measurement (client IDs held open at once).
const TAKEOVERS: usize = 1000;
/// Devices in the policy (client IDs cycle through them).
const DEVICES: usize = 4000;
/// Measurements of each configuration.
const ROUNDS: usize = 3;
/// The longest one connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

async fn spawn(program: &str, args: &[&str]) -> Child {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("{program}: {error}"))
}

async fn wait_listening(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn policy() -> String {
    use sha2::{Digest, Sha256};
    let token = format!("sha256:{}", hex::encode(Sha256::digest(b"bench-token")));
    let mut text = String::from(
        "orgs:\n  org1:\n    limits: { max_connections: 100000 }\n    device_types: { bench: {} }\n    devices:\n",
    );
    for device in 0..DEVICES + TAKEOVERS {
        text.push_str(&format!(
            "      bench/d{device}: {{ token: \"{token}\" }}\n"
        ));
    }
    text
}

async fn start_proxy(
    dir: &std::path::Path,
    broker: u16,
    coordination: Option<(u16, &str)>,
) -> RunningProxy {
    let coordination = coordination
        .map(|(port, instance)| {
            format!(
                "coordination: {{ redis: \"redis://127.0.0.1:{port}/0\", instance_id: {instance} }}\n"
            )
        })
        .unwrap_or_default();
    let name = format!("warden-{}.yaml", rand_suffix());
    let text = format!(
        "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  address: \"127.0.0.1:{broker}\"\n  control_client_id: bench-{}\npolicies: policy.yaml\nlimits: {{ connect_rate_per_client_id: \"1000/s\", connect_rate_per_address: \"1000000/s\" }}\n{coordination}",
        rand_suffix()
    );
    let path = dir.join(name);
    std::fs::write(&path, &text).expect("write config");
    let config = WardenConfig::from_yaml(&text, &path).expect("valid config");
    proxy::start(config).await.expect("proxy starts")
}

fn rand_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// One client: CONNECT, CONNACK (must be accepted), then DISCONNECT and close, or (`hold`) a
/// task that keeps the connection until the proxy closes it (a takeover).
async fn connect_once(addr: SocketAddr, device: usize, hold: bool) {
    let client_id = format!("d:org1:bench:d{device}");
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 30,
            properties: Vec::new(),
            client_id: &client_id,
            will: None,
            username: Some("use-token-auth"),
            password: Some(b"bench-token"),
        },
    );
    let run = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&out).await?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await?;
        assert_eq!(connack[3], 0, "CONNACK refused {client_id}: {connack:?}");
        let mut rest = [0u8; 16];
        if hold {
            tokio::spawn(async move {
                let until_closed =
                    async { while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {} };
                let _ = tokio::time::timeout(Duration::from_secs(120), until_closed).await;
            });
            return Ok(());
        }
        stream.write_all(&[0xE0, 0]).await?;
        // The proxy closes after the DISCONNECT.
        while stream.read(&mut rest).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(CONNECT_TIMEOUT, run)
        .await
        .expect("a connect finishes in time")
        .expect("a connect succeeds");
}

/// Connects per second of `count` clients through `targets` in turn.
async fn measure(targets: &[SocketAddr], count: usize, hold: bool) -> f64 {
    let gate = Arc::new(Semaphore::new(CONCURRENCY));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let permit = gate.clone().acquire_owned().await.expect("open");
        let target = targets[i % targets.len()];
        tasks.push(tokio::spawn(async move {
            // Takeover runs use client IDs of their own: the other runs share the broker, where
            // the same client ID would take the held sessions over first.
            let device = if hold {
                DEVICES + i % TAKEOVERS
            } else {
                i % DEVICES
            };
            connect_once(target, device, hold).await;
            drop(permit);
        }));
    }
    for task in tasks {
        task.await.expect("no panic");
    }
    count as f64 / started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("policy.yaml"), policy()).expect("write policy");
    let broker = free_port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {broker} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"),
    )
    .expect("write mosquitto.conf");
    let _mosquitto = spawn("mosquitto", &["-c", conf.to_str().expect("utf-8 path")]).await;
    wait_listening(broker).await;
    let redis = free_port();
    let redis_port = redis.to_string();
    let _redis = spawn(
        "redis-server",
        &[
            "--bind",
            "127.0.0.1",
            "--port",
            &redis_port,
            "--save",
            "",
            "--appendonly",
            "no",
        ],
    )
    .await;
    wait_listening(redis).await;

    let local = start_proxy(dir.path(), broker, None).await;
    let one = start_proxy(dir.path(), broker, Some((redis, "bench-one"))).await;
    let a = start_proxy(dir.path(), broker, Some((redis, "bench-a"))).await;
    let b = start_proxy(dir.path(), broker, Some((redis, "bench-b"))).await;
    let (local, one) = (local.listen_addrs[0], one.listen_addrs[0]);
    let takeover_metrics = [a.metrics.clone(), b.metrics.clone()];
    let pair = [a.listen_addrs[0], b.listen_addrs[0]];

    // Warm-up: every configuration once; the takeover runs start with every client ID held
    // on instance a.
    measure(&[local], CONNECTS, false).await;
    measure(&[one], CONNECTS, false).await;
    measure(&pair, CONNECTS, false).await;
    measure(&pair[..1], TAKEOVERS, true).await;

    let mut results: [Vec<f64>; 4] = Default::default();
    for round in 0..ROUNDS {
        results[0].push(measure(&[local], CONNECTS, false).await);
        results[1].push(measure(&[one], CONNECTS, false).await);
        results[2].push(measure(&pair, CONNECTS, false).await);
        // Every client ID is held by the other instance: each connect takes one over (288).
        let through = &pair[(round + 1) % 2..][..1];
        results[3].push(measure(through, TAKEOVERS, true).await);
    }
    let names = [
        "1 instance, no coordination",
        "1 instance, coordination",
        "2 instances, coordination",
        "2 instances, each connect a takeover across them",
    ];
    let baseline = median(results[0].clone());
    println!(
        "connects per second ({CONNECTS} per run, {CONCURRENCY} at a time, median of {ROUNDS}):"
    );
    for (name, values) in names.iter().zip(results) {
        let value = median(values.clone());
        println!(
            "  {name:<52} {value:>8.0}/s  ratio {:.2}  runs {:?}",
            value / baseline,
            values.iter().map(|v| v.round()).collect::<Vec<_>>()
        );
    }
    let (answered, settled) = takeover_metrics.iter().fold((0, 0), |(a, s), m| {
        (
            a + m.coordination.remote_takeovers.get(),
            s + m.coordination.settled.get(),
        )
    });
    println!(
        "takeovers across the instances: {answered} answered by the holder, {settled} settled on its behalf"
    );
}
