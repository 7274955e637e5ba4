//! Measures the proxy's memory per idle client connection.
//!
//! Opens `--count` idle MQTT connections (quickstart devices, keep-alive 600 s) to the proxy at
//! `--target`, waits for every CONNACK, then reads the proxy's resident set size from
//! `/proc/PID/status` for each step in `--steps`, and prints the per-connection slope.
//!
//! ```text
//! cargo run --release --example idle_connections -- --target 127.0.0.1:1883 --pid $(pgrep -f 'mqtt-warden run') --steps 1000,9000
//! ```

use std::time::Duration;

use bytes::BytesMut;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use mqtt_warden::codec::{encode_connect, Connect, ProtocolVersion};

#[derive(Parser)]
struct Args {
    /// The proxy's client address.
    #[arg(long)]
    target: String,
    /// The proxy's process ID.
    #[arg(long)]
    pid: u32,
    /// Connection counts at which to measure, ascending.
    #[arg(long, value_delimiter = ',', default_value = "1000,9000")]
    steps: Vec<usize>,
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .ok_or_else(|| anyhow::anyhow!("no VmRSS"))?;
    Ok(line.split_whitespace().nth(1).unwrap_or("0").parse()?)
}

async fn connect(target: &str, n: usize) -> anyhow::Result<TcpStream> {
    let client_id = format!("d:quickstart:idle:c{n}");
    let mut out = BytesMut::new();
    encode_connect(
        &mut out,
        &Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 600,
            properties: Vec::new(),
            client_id: &client_id,
            will: None,
            username: None,
            password: None,
        },
    );
    let mut stream = TcpStream::connect(target).await?;
    stream.write_all(&out).await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    anyhow::ensure!(
        connack == [0x20, 0x02, 0x00, 0x00],
        "refused: {connack:02X?}"
    );
    Ok(stream)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let baseline = rss_kib(args.pid)?;
    println!("connections,rss_kib,kib_per_connection_since_baseline");
    println!("0,{baseline},");
    let mut streams = Vec::new();
    let mut previous: Option<(usize, u64)> = None;
    for step in args.steps {
        while streams.len() < step {
            // Connect in parallel batches so 9,000 connections take seconds, not minutes.
            let batch: Vec<_> = (streams.len()..step.min(streams.len() + 200))
                .map(|n| {
                    let target = args.target.clone();
                    tokio::spawn(async move { connect(&target, n).await })
                })
                .collect();
            for handle in batch {
                streams.push(handle.await??);
            }
        }
        // Let the proxy settle after the burst (allocator, monitor queue).
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_kib(args.pid)?;
        let per = (rss.saturating_sub(baseline)) as f64 / step as f64;
        println!("{step},{rss},{per:.2}");
        if let Some((count, rss_before)) = previous {
            let slope = (rss.saturating_sub(rss_before)) as f64 / (step - count) as f64;
            eprintln!("marginal cost between {count} and {step} connections: {slope:.2} KiB per connection");
        }
        previous = Some((step, rss));
    }
    drop(streams);
    Ok(())
}
