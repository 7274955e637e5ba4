//! Authentication under load, against a real `mqtt-warden` process in front of a real Mosquitto,
//! all on loopback. Two measurements (BENCHMARKS-TLS.md has the figures):
//!
//! - `storm`: 10,000 CONNECTs with wrong argon2id tokens, for one identity and then spread over
//!   200, each twice, while a good client (argon2id token, verified once and then cached)
//!   connects every 50 ms. Reports the CONNACK codes of the storm (4: verified and refused; 3:
//!   closing code 176, the verifier queue was full), the good client's connect latency and
//!   failures, a cold good client's fate 1 s into the storm, and the proxy's RSS before, at its
//!   peak and after. `storm-sha256` runs the one-identity storm against a `sha256:` token.
//! - `rate`: connects per second and latency for argon2id tokens (cold, then cached), `sha256:`
//!   tokens, and Mosquitto's own `password_file` (mosquitto_passwd, sha512-pbkdf2), side by side
//!   on the same machine with the same client.
//!
//! ```sh
//! cargo build --release
//! cargo run --release --example auth_storm -- all      # or: storm | rate
//! ```
//!
//! Needs `mosquitto` and `mosquitto_passwd` on PATH. Every loop is bounded in count and time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::Semaphore;

use mqtt_warden::auth::{hash_token_argon2id, hash_token_sha256};

/// Bad-password CONNECTs in the storm.
const STORM_CONNECTS: usize = 10_000;
/// Storms run back to back in `storm` mode.
const STORM_ROUNDS: usize = 2;
/// Storm connections in flight at once.
const STORM_CONCURRENCY: usize = 500;
/// Pause between the good client's connects.
const GOOD_CLIENT_INTERVAL: Duration = Duration::from_millis(50);
/// Devices per token kind in the rate test.
const RATE_DEVICES: usize = 200;
/// Connects in flight at once in the rate test.
const RATE_CONCURRENCY: usize = 16;
/// Longest wait for any one connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the proxy's RSS is sampled during the storm.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

type Error = Box<dyn std::error::Error + Send + Sync>;
/// A client's (client ID, user name, password).
type Credentials = (String, String, String);

#[tokio::main]
async fn main() -> Result<(), Error> {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let warden_bin = warden_binary()?;
    println!("proxy binary: {}", warden_bin.display());
    let dir = tempfile::tempdir()?;

    // Tokens: hashing argon2id takes a while, so it is done once for both runs.
    eprintln!(
        "hashing {} argon2id tokens ...",
        RATE_DEVICES + 2 + STORM_ROUNDS * 2
    );
    let mut policy =
        String::from("orgs:\n  bench:\n    device_types: { sensor: {} }\n    devices:\n");
    let cold_names: Vec<String> = (1..=STORM_ROUNDS * 2).map(|n| format!("cold{n}")).collect();
    for name in ["good", "victim"]
        .into_iter()
        .chain(cold_names.iter().map(String::as_str))
    {
        let hash = hash_token_argon2id(format!("{name}-token").as_bytes())?;
        policy.push_str(&format!("      sensor/{name}: {{ token: \"{hash}\" }}\n"));
    }
    for n in 0..RATE_DEVICES {
        let argon = hash_token_argon2id(format!("a{n}-token").as_bytes())?;
        let sha = hash_token_sha256(format!("s{n}-token").as_bytes());
        policy.push_str(&format!("      sensor/a{n}: {{ token: \"{argon}\" }}\n"));
        policy.push_str(&format!("      sensor/s{n}: {{ token: \"{sha}\" }}\n"));
    }

    let broker = Mosquitto::start(dir.path(), "behind", "allow_anonymous true\n").await?;
    let warden = Warden::start(&warden_bin, dir.path(), broker.port, &policy).await?;
    println!(
        "machine: {} cores; proxy limits: auth_workers 2, auth_queue 256 (defaults)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    if mode == "storm" || mode == "all" {
        // Each twice, to show that a second storm does not add to the first one's memory: wrong
        // tokens for one identity, then spread over the 200 argon2id devices of the rate test.
        let one = vec!["victim".to_string()];
        let spread: Vec<String> = (0..RATE_DEVICES).map(|n| format!("a{n}")).collect();
        let mut cold = cold_names.iter();
        for (targets, label) in [(&one, "one identity"), (&spread, "200 identities")] {
            for round in 1..=STORM_ROUNDS {
                println!("\n# storm on {label}, round {round} of {STORM_ROUNDS}");
                let cold_name = cold.next().ok_or("not enough cold devices")?;
                storm(&warden, targets, cold_name).await?;
            }
        }
    }
    if mode == "storm-sha256" {
        // The same storm against a sha256 token, to tell the verifier's share from the rest.
        storm(&warden, &["s0".to_string()], "cold1").await?;
    }
    if mode == "rate" || mode == "all" {
        rate(&warden, &broker, dir.path()).await?;
    }
    drop(warden);
    drop(broker);
    Ok(())
}

/// The `mqtt-warden` binary next to this example's build (`target/<profile>/mqtt-warden`).
fn warden_binary() -> Result<PathBuf, Error> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot find the target folder")?;
    let bin = profile_dir.join("mqtt-warden");
    if !bin.exists() {
        return Err(format!(
            "{} is missing: run `cargo build --release` first",
            bin.display()
        )
        .into());
    }
    Ok(bin)
}

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_listening(port: u16) -> Result<(), Error> {
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("nothing listens on port {port}").into())
}

struct Mosquitto {
    _child: Child,
    port: u16,
}

impl Mosquitto {
    async fn start(dir: &Path, name: &str, extra: &str) -> Result<Mosquitto, Error> {
        let port = free_port()?;
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\npersistence false\nlog_dest none\n{extra}"),
        )?;
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        wait_listening(port).await?;
        Ok(Mosquitto {
            _child: child,
            port,
        })
    }
}

struct Warden {
    child: Child,
    addr: SocketAddr,
}

impl Warden {
    async fn start(
        bin: &Path,
        dir: &Path,
        broker_port: u16,
        policy: &str,
    ) -> Result<Warden, Error> {
        let port = free_port()?;
        std::fs::write(dir.join("policy.yaml"), policy)?;
        let config = dir.join("warden.yaml");
        std::fs::write(
            &config,
            format!(
                "listeners:\n  - bind: \"127.0.0.1:{port}\"\nupstream:\n  address: \"127.0.0.1:{broker_port}\"\npolicies: policy.yaml\n"
            ),
        )?;
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        wait_listening(port).await?;
        Ok(Warden {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    /// (VmRSS, VmHWM) of the proxy process, in KiB.
    fn memory_kib(&self) -> (u64, u64) {
        let Some(pid) = self.child.id() else {
            return (0, 0);
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kib| kib.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

/// An MQTT 3.1.1 CONNECT.
fn connect_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
    let flags = if user.is_empty() { 0x02 } else { 0xC2 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags, 0, 60];
    let fields: &[&str] = if user.is_empty() {
        &[client_id]
    } else {
        &[client_id, user, password]
    };
    for field in fields {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Connects, reads the CONNACK return code, disconnects. `None`: closed or timed out.
async fn connect_once(
    addr: SocketAddr,
    client_id: &str,
    user: &str,
    password: &str,
) -> (Option<u8>, Duration) {
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        stream.set_nodelay(true).ok()?;
        stream
            .write_all(&connect_packet(client_id, user, password))
            .await
            .ok()?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.ok()?;
        if connack[3] == 0 {
            let _ = stream.write_all(&[0xE0, 0x00]).await;
        }
        Some(connack[3])
    };
    let code = tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .ok()
        .flatten();
    (code, started.elapsed())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1000.0)
}

async fn storm(warden: &Warden, targets: &[String], cold_name: &str) -> Result<(), Error> {
    println!(
        "## storm: {STORM_CONNECTS} bad-token CONNECTs over {} identities, {STORM_CONCURRENCY} in flight",
        targets.len()
    );
    let (good_code, good_cold) = connect_once(
        warden.addr,
        "d:bench:sensor:good",
        "use-token-auth",
        "good-token",
    )
    .await;
    if good_code != Some(0) {
        return Err(format!("the good client does not connect: {good_code:?}").into());
    }
    println!(
        "good client, first (cold) connect before the storm: {}",
        ms(good_cold)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_before, _) = warden.memory_kib();

    let done = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(rss_before));
    let sampler = {
        let done = done.clone();
        let peak = peak_rss.clone();
        let pid_status = warden.child.id();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Some(pid) = pid_status {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Some(kib) = status
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|k| k.parse::<u64>().ok())
                    {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(RSS_SAMPLE_INTERVAL).await;
            }
        })
    };
    let good = {
        let done = done.clone();
        let addr = warden.addr;
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let (code, took) =
                    connect_once(addr, "d:bench:sensor:good", "use-token-auth", "good-token").await;
                match code {
                    Some(0) => latencies.push(took),
                    other => failures.push(other),
                }
                tokio::time::sleep(GOOD_CLIENT_INTERVAL).await;
            }
            (latencies, failures)
        })
    };
    let cold = {
        let addr = warden.addr;
        let cold_id = format!("d:bench:sensor:{cold_name}");
        let cold_token = format!("{cold_name}-token");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            connect_once(addr, &cold_id, "use-token-auth", &cold_token).await
        })
    };

    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(STORM_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..STORM_CONNECTS {
        let permit = slots.clone().acquire_owned().await?;
        let addr = warden.addr;
        let target_id = format!("d:bench:sensor:{}", targets[n % targets.len()]);
        tasks.spawn(async move {
            let password = format!("wrong-{n}");
            let (code, took) = connect_once(addr, &target_id, "use-token-auth", &password).await;
            drop(permit);
            (code, took)
        });
    }
    let mut codes = std::collections::BTreeMap::<String, usize>::new();
    let mut storm_latencies = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (code, took) = joined?;
        let key = match code {
            Some(4) => "4 (bad token, verified)".to_string(),
            Some(3) => "3 (176, queue full)".to_string(),
            Some(other) => other.to_string(),
            None => "closed/timeout".to_string(),
        };
        *codes.entry(key).or_default() += 1;
        storm_latencies.push(took);
    }
    let storm_time = started.elapsed();
    done.store(true, Ordering::Relaxed);
    let (mut good_latencies, good_failures) = good.await?;
    let (cold_code, cold_took) = cold.await?;
    sampler.await?;
    let (rss_after, _) = warden.memory_kib();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_settled, hwm) = warden.memory_kib();

    storm_latencies.sort();
    good_latencies.sort();
    println!(
        "storm: {} CONNECTs in {:.2} s ({:.0}/s); answers: {:?}",
        STORM_CONNECTS,
        storm_time.as_secs_f64(),
        STORM_CONNECTS as f64 / storm_time.as_secs_f64(),
        codes
    );
    println!(
        "storm answer latency: p50 {}, p99 {}, max {}",
        ms(percentile(&storm_latencies, 0.5)),
        ms(percentile(&storm_latencies, 0.99)),
        ms(percentile(&storm_latencies, 1.0))
    );
    println!(
        "good client (cached argon2id) during the storm: {} connects, {} failed {:?}; latency p50 {}, p99 {}, max {}",
        good_latencies.len() + good_failures.len(),
        good_failures.len(),
        good_failures,
        ms(percentile(&good_latencies, 0.5)),
        ms(percentile(&good_latencies, 0.99)),
        ms(percentile(&good_latencies, 1.0))
    );
    println!(
        "cold good client (argon2id, not cached) 1 s into the storm: CONNACK {:?} after {}",
        cold_code,
        ms(cold_took)
    );
    println!(
        "proxy RSS: before {} KiB, peak {} KiB (sampled), right after {} KiB, 2 s later {} KiB; VmHWM {} KiB",
        rss_before,
        peak_rss.load(Ordering::Relaxed),
        rss_after,
        rss_settled,
        hwm
    );
    Ok(())
}

/// Connects every `(client_id, user, password)` once with `RATE_CONCURRENCY` in flight.
async fn connect_all(
    addr: SocketAddr,
    clients: Vec<Credentials>,
) -> (usize, usize, Duration, Vec<Duration>) {
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(RATE_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (client_id, user, password) in clients {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        tasks.spawn(async move {
            let result = connect_once(addr, &client_id, &user, &password).await;
            drop(permit);
            result
        });
    }
    let (mut ok, mut failed, mut latencies) = (0, 0, Vec::new());
    while let Some(Ok((code, took))) = tasks.join_next().await {
        if code == Some(0) {
            ok += 1;
            latencies.push(took);
        } else {
            failed += 1;
        }
    }
    latencies.sort();
    (ok, failed, started.elapsed(), latencies)
}

async fn rate(warden: &Warden, broker: &Mosquitto, dir: &Path) -> Result<(), Error> {
    println!("\n## connect rate: {RATE_DEVICES} clients per row, {RATE_CONCURRENCY} in flight, CONNECT → CONNACK → DISCONNECT");
    let argon: Vec<_> = (0..RATE_DEVICES)
        .map(|n| {
            (
                format!("d:bench:sensor:a{n}"),
                "use-token-auth".to_string(),
                format!("a{n}-token"),
            )
        })
        .collect();
    let sha: Vec<_> = (0..RATE_DEVICES)
        .map(|n| {
            (
                format!("d:bench:sensor:s{n}"),
                "use-token-auth".to_string(),
                format!("s{n}-token"),
            )
        })
        .collect();

    // Mosquitto's own password file, hashed by mosquitto_passwd (its default, sha512-pbkdf2).
    let passwd = dir.join("mosquitto.passwd");
    let plain: String = (0..RATE_DEVICES)
        .map(|n| format!("user{n}:m{n}-token\n"))
        .collect();
    std::fs::write(&passwd, plain)?;
    let status = Command::new("mosquitto_passwd")
        .arg("-U")
        .arg(&passwd)
        .status()
        .await?;
    if !status.success() {
        return Err("mosquitto_passwd -U failed".into());
    }
    let direct = Mosquitto::start(
        dir,
        "passwd",
        &format!(
            "allow_anonymous false\npassword_file {}\n",
            passwd.display()
        ),
    )
    .await?;
    let direct_addr = SocketAddr::from(([127, 0, 0, 1], direct.port));
    let mosq: Vec<_> = (0..RATE_DEVICES)
        .map(|n| (format!("m{n}"), format!("user{n}"), format!("m{n}-token")))
        .collect();

    println!("| row | ok | failed | connects/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|");
    let broker_addr = SocketAddr::from(([127, 0, 0, 1], broker.port));
    let anonymous: Vec<_> = (0..RATE_DEVICES)
        .map(|n| (format!("n{n}"), String::new(), String::new()))
        .collect();
    let rows: [(&str, SocketAddr, Vec<Credentials>); 5] = [
        (
            "proxy, argon2id, cold (first connect per device)",
            warden.addr,
            argon.clone(),
        ),
        (
            "proxy, argon2id, cached (second connect)",
            warden.addr,
            argon,
        ),
        ("proxy, sha256 tokens", warden.addr, sha),
        (
            "Mosquitto alone, password_file (sha512-pbkdf2)",
            direct_addr,
            mosq,
        ),
        (
            "Mosquitto alone, anonymous (no check at all)",
            broker_addr,
            anonymous,
        ),
    ];
    for (name, addr, clients) in rows {
        let (ok, failed, took, latencies) = connect_all(addr, clients).await;
        println!(
            "| {name} | {ok} | {failed} | {:.0} | {} | {} |",
            ok as f64 / took.as_secs_f64(),
            ms(percentile(&latencies, 0.5)),
            ms(percentile(&latencies, 0.99))
        );
    }
    Ok(())
}
