//! A blind TCP forwarder, for measuring what the I/O mechanism alone is worth.
//!
//! It forwards every accepted connection to one upstream address and never looks at the bytes,
//! like HAProxy in `mode tcp`, in one thread, in one of three ways:
//!
//! - `--mode epoll`: tokio's current-thread runtime and `copy_bidirectional` (readiness through
//!   `epoll`, one `recv` or `send` system call per operation);
//! - `--mode uring`: an `io_uring` loop. Every connection always has one `recv` or one `send` in
//!   flight per direction, and everything queued in a pass goes to the kernel in the one
//!   `io_uring_enter` that also waits for the next completions: no `epoll_wait`, and one system
//!   call per pass instead of one per operation;
//! - `--mode uring-defer`: the same, with the ring set up `DEFER_TASKRUN`: the kernel runs a
//!   completed poll's `recv` only when the loop next enters the ring, not as the bytes arrive, so
//!   a `recv` takes everything that came meanwhile, as a readiness loop's does.
//!
//! `benches/compare.sh` runs it in place of a warden through `benches/blind_forward.sh` (see
//! BENCHMARKS.md, "tenth session"): the modes side by side tell whether an `io_uring` data path
//! could put a proxy ahead of HAProxy where a readiness-based one is level with it. (It could not:
//! both `io_uring` modes delivered less than the `epoll` one.)
//!
//! ```sh
//! cargo build --release --example blind_forward
//! target/release/examples/blind_forward --mode uring --listen 127.0.0.1:1884 --upstream 127.0.0.1:1883
//! ```

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use anyhow::{bail, Context};

/// Bytes a direction reads at once (HAProxy's default `tune.bufsize`).
const BUFFER_BYTES: usize = 16 * 1024;

fn main() -> anyhow::Result<()> {
    let mut mode = String::from("uring");
    let mut listen: Option<SocketAddr> = None;
    let mut upstream: Option<SocketAddr> = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--mode" => mode = value,
            "--listen" => listen = Some(value.parse().context("--listen")?),
            "--upstream" => upstream = Some(value.parse().context("--upstream")?),
            other => bail!("unknown argument {other}"),
        }
    }
    let listen = listen.context("--listen is required")?;
    let upstream = upstream.context("--upstream is required")?;
    match mode.as_str() {
        "epoll" => epoll::run(listen, upstream),
        "uring" => uring::run(listen, upstream, false),
        "uring-defer" => uring::run(listen, upstream, true),
        other => bail!("--mode is epoll, uring or uring-defer, not {other}"),
    }
}

/// Connects to the upstream for the `io_uring` loop: blocking (the benchmark's clients connect
/// before it measures), with Nagle off on both sides, as in the `epoll` mode.
fn pair(client: &TcpStream, upstream: SocketAddr) -> io::Result<TcpStream> {
    client.set_nodelay(true)?;
    let server = TcpStream::connect(upstream)?;
    server.set_nodelay(true)?;
    Ok(server)
}

mod epoll {
    use super::*;

    pub fn run(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            loop {
                let (client, _) = listener.accept().await?;
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    if client.set_nodelay(true).is_err() || server.set_nodelay(true).is_err() {
                        return;
                    }
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut server,
                        BUFFER_BYTES,
                        BUFFER_BYTES,
                    )
                    .await;
                });
            }
        })
    }
}

mod uring {
    use super::*;
    use io_uring::{opcode, squeue, types, IoUring};

    /// One direction of a connection: bytes read from `from` wait in `buf[sent..filled]` to be
    /// written to `to`.
    struct Direction {
        from: RawFd,
        to: RawFd,
        buf: Box<[u8]>,
        filled: usize,
        sent: usize,
        in_flight: bool,
    }

    struct Connection {
        directions: [Direction; 2],
        closing: bool,
    }

    const ACCEPT: u64 = u64::MAX;

    fn token(connection: usize, direction: usize) -> u64 {
        ((connection as u64) << 1) | direction as u64
    }

    pub fn run(listen: SocketAddr, upstream: SocketAddr, defer: bool) -> anyhow::Result<()> {
        let listener = TcpListener::bind(listen)?;
        let mut ring: IoUring = if defer {
            IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .build(4096)?
        } else {
            IoUring::new(4096)?
        };
        let mut connections: Vec<Option<Connection>> = Vec::new();
        let mut queue: Vec<squeue::Entry> = Vec::new();
        let mut completions: Vec<(u64, i32)> = Vec::new();
        queue.push(accept(&listener));
        loop {
            {
                let mut submission = ring.submission();
                for entry in queue.drain(..) {
                    // SAFETY: every buffer an entry points into lives in `connections` until its
                    // completion arrives (a connection is dropped only with nothing in flight).
                    // The ring is sized far above what the benchmark's connections can queue.
                    unsafe { submission.push(&entry) }.context("submission queue full")?;
                }
            }
            ring.submit_and_wait(1)?;
            completions.clear();
            completions.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(user_data, result) in &completions {
                if user_data == ACCEPT {
                    queue.push(accept(&listener));
                    if result < 0 {
                        continue;
                    }
                    // SAFETY: a successful accept's result is a new descriptor that nothing else owns.
                    let client =
                        unsafe { <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(result) };
                    let Ok(server) = pair(&client, upstream) else {
                        continue;
                    };
                    let (client, server) = (client.into_raw_fd(), server.into_raw_fd());
                    let index = connections
                        .iter()
                        .position(Option::is_none)
                        .unwrap_or_else(|| {
                            connections.push(None);
                            connections.len() - 1
                        });
                    let direction = |from, to| Direction {
                        from,
                        to,
                        buf: vec![0; BUFFER_BYTES].into_boxed_slice(),
                        filled: 0,
                        sent: 0,
                        in_flight: false,
                    };
                    let mut connection = Connection {
                        directions: [direction(client, server), direction(server, client)],
                        closing: false,
                    };
                    for (d, dir) in connection.directions.iter_mut().enumerate() {
                        queue.push(recv(dir, token(index, d)));
                    }
                    connections[index] = Some(connection);
                    continue;
                }
                let (index, d) = ((user_data >> 1) as usize, (user_data & 1) as usize);
                let Some(Some(connection)) = connections.get_mut(index) else {
                    continue;
                };
                let dir = &mut connection.directions[d];
                dir.in_flight = false;
                if connection.closing || result <= 0 {
                    if !connection.closing {
                        connection.closing = true;
                        for dir in &connection.directions {
                            // SAFETY: the descriptors stay open until the connection is dropped.
                            unsafe { libc::shutdown(dir.from, libc::SHUT_RDWR) };
                        }
                    }
                    if connection.directions.iter().all(|dir| !dir.in_flight) {
                        for dir in &connection.directions {
                            // SAFETY: nothing is in flight on them any more, and they are closed once.
                            unsafe { libc::close(dir.from) };
                        }
                        connections[index] = None;
                    }
                    continue;
                }
                let n = result as usize;
                if dir.filled == 0 {
                    // A recv completed.
                    dir.filled = n;
                    dir.sent = 0;
                } else {
                    dir.sent += n;
                }
                let entry = if dir.sent < dir.filled {
                    send(dir, token(index, d))
                } else {
                    dir.filled = 0;
                    recv(dir, token(index, d))
                };
                queue.push(entry);
            }
        }
    }

    fn accept(listener: &TcpListener) -> squeue::Entry {
        opcode::Accept::new(
            types::Fd(listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .build()
        .user_data(ACCEPT)
    }

    fn recv(dir: &mut Direction, user_data: u64) -> squeue::Entry {
        dir.in_flight = true;
        opcode::Recv::new(
            types::Fd(dir.from),
            dir.buf.as_mut_ptr(),
            dir.buf.len() as u32,
        )
        .build()
        .user_data(user_data)
    }

    fn send(dir: &mut Direction, user_data: u64) -> squeue::Entry {
        dir.in_flight = true;
        let pending = &dir.buf[dir.sent..dir.filled];
        opcode::Send::new(types::Fd(dir.to), pending.as_ptr(), pending.len() as u32)
            .build()
            .user_data(user_data)
    }
}
