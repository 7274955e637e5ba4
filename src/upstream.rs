//! Dialling the broker: one connection per client session, plus the monitor's control
//! connection, over TCP or TLS (`upstream.tls`), from the configured source addresses in turn
//! ([`Dialer`], behind the [`Dial`] trait), to a live node of the broker ([`nodes`]: selection
//! and health), and the CONNECT / CONNACK exchange ([`handshake`]).

pub mod nodes;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio_util::either::Either;
use tracing::debug;

use crate::codec::{decode_frame_header, CodecError, FrameHeader};
use crate::config::UpstreamConfig;
use crate::metrics::NodeMetrics;
use crate::transport::{TlsError, UpstreamTls};
use nodes::{Next, NodeLease, Nodes, Watch};

/// How long dialling the broker and its CONNACK may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dial to one node may take while another node is left to try.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a probe of a node (a TCP and TLS connect, no MQTT) may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// The largest CONNACK the proxy accepts from the broker, in bytes.
const MAX_CONNACK_BYTES: usize = 64 * 1024;
/// Initial capacity of a connection's read buffer, in bytes. Small, because most connections
/// are idle most of the time; a busy connection's buffer grows (see `session::bridge`).
pub const READ_BUFFER_BYTES: usize = 2048;

/// Why the configured way to the broker cannot be used (at start, and by `mqtt-warden check`).
#[derive(Debug, Error)]
pub enum DialerError {
    /// A file of `upstream.tls` did not load.
    #[error("upstream.tls: {0}")]
    Tls(#[from] TlsError),
    /// A source address cannot be bound on this host.
    #[error("upstream.source_addresses: cannot use {address} on this host: {source}")]
    SourceAddress {
        /// The address.
        address: IpAddr,
        /// The error binding it.
        source: io::Error,
    },
}

/// Why the broker could not be reached or did not answer.
#[derive(Debug, Error)]
pub enum UpstreamError {
    /// TCP connect or I/O failed.
    #[error("broker at {address}: {source}")]
    Io {
        /// The broker address.
        address: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The broker did not answer in time.
    #[error("broker did not answer within {0:?}")]
    Timeout(Duration),
    /// Writing the CONNECT or reading the CONNACK failed.
    #[error("broker handshake: {0}")]
    Handshake(#[source] std::io::Error),
    /// The broker closed the connection before CONNACK.
    #[error("broker closed the connection before CONNACK")]
    Closed,
    /// The broker's first packet was not a valid CONNACK.
    #[error("broker sent an invalid CONNACK: {0}")]
    BadConnack(#[from] CodecError),
    /// The broker's first packet was not a CONNACK.
    #[error("broker's first packet was not a CONNACK")]
    NotConnack,
    /// The TLS handshake with the broker failed.
    #[error("TLS with the broker at {address}: {source}")]
    Tls {
        /// The broker address.
        address: String,
        /// The I/O error from the handshake.
        source: std::io::Error,
    },
}

/// A connection to the broker: TCP, or TLS over TCP.
pub type UpstreamStream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A way to open connections to the broker. The session and the monitor dial through it; tests
/// dial in-memory streams.
pub trait Dial: Send + Sync + 'static {
    /// A connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Opens a connection (no MQTT yet).
    fn dial(&self) -> impl Future<Output = Result<Self::Stream, UpstreamError>> + Send;

    /// The proxy's user name on the broker.
    fn username(&self) -> Option<&str>;

    /// Its password.
    fn password(&self) -> Option<&[u8]>;
}

/// How to reach the broker, with the proxy's own credentials: the configured nodes
/// ([`nodes`]), each over TCP or TLS, from the source addresses in turn. Clones share the
/// nodes' state. Its `Debug` output hides the password.
#[derive(Clone)]
pub struct Dialer {
    shared: Arc<Shared>,
}

struct Shared {
    /// The broker's nodes, their health and connection counts.
    nodes: Arc<Nodes>,
    /// TLS towards each node (its own server name), if configured; by node index.
    tls: Option<Vec<UpstreamTls>>,
    /// The proxy's user name on the broker.
    username: Option<String>,
    /// Its password.
    password: Option<String>,
    /// Local addresses to dial from, in turn (`upstream.source_addresses`); empty: any.
    source_addresses: Arc<[IpAddr]>,
    /// The source address the next dial starts with.
    next_source: AtomicUsize,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = &self.shared;
        f.debug_struct("Dialer")
            .field("nodes", &shared.nodes)
            .field("username", &shared.username)
            .field("password", &shared.password.as_ref().map(|_| "<hidden>"))
            .field("tls", &shared.tls)
            .field("source_addresses", &shared.source_addresses)
            .finish()
    }
}

impl Dialer {
    /// A dialer for the configured broker; loads the TLS files when `upstream.tls` is set and
    /// checks that this host has every source address. Its node series are not registered
    /// anywhere (see [`Dialer::with_metrics`]).
    pub fn new(config: &UpstreamConfig) -> Result<Dialer, DialerError> {
        Self::with_metrics(config, &NodeMetrics::default())
    }

    /// [`Dialer::new`], with each node's series in `metrics`.
    pub fn with_metrics(
        config: &UpstreamConfig,
        metrics: &NodeMetrics,
    ) -> Result<Dialer, DialerError> {
        for &address in &config.source_addresses {
            // A typo here would otherwise only show as every dial passing the address over.
            std::net::TcpListener::bind(SocketAddr::new(address, 0))
                .map_err(|source| DialerError::SourceAddress { address, source })?;
        }
        let tls = match &config.tls {
            Some(tls) => Some(
                config
                    .addresses
                    .iter()
                    .map(|address| {
                        let host = address
                            .rsplit_once(':')
                            .map_or(address.as_str(), |(host, _)| host);
                        UpstreamTls::load(tls, host)
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            None => None,
        };
        Ok(Dialer {
            shared: Arc::new(Shared {
                nodes: Arc::new(Nodes::new(&config.addresses, metrics)),
                tls,
                username: config.username.clone(),
                password: config.password.clone(),
                source_addresses: config.source_addresses.as_slice().into(),
                next_source: AtomicUsize::new(0),
            }),
        })
    }

    /// The broker's nodes: their health and connections (for `/readyz`).
    pub fn nodes(&self) -> &Nodes {
        &self.shared.nodes
    }

    /// Opens a connection to a live node (TCP with Nagle off, as the proxy batches its own
    /// writes; then TLS if configured): the best node first ([`Nodes::order`]), and the next one
    /// when a dial fails, which also marks its node down. Within [`UPSTREAM_CONNECT_TIMEOUT`]
    /// in all, and [`NODE_CONNECT_TIMEOUT`] per node while another is left to try.
    pub async fn dial_stream(&self) -> Result<NodeStream, UpstreamError> {
        let shared = &self.shared;
        let deadline = tokio::time::Instant::now() + UPSTREAM_CONNECT_TIMEOUT;
        let order = shared.nodes.order();
        let mut last_error = None;
        for (turn, &index) in order.iter().enumerate() {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                break;
            }
            let limit = if turn + 1 < order.len() {
                remaining.min(NODE_CONNECT_TIMEOUT)
            } else {
                remaining
            };
            // Counted from the start of the dial, so that a burst of dials spreads.
            let lease = shared.nodes.lease(index);
            let error = match tokio::time::timeout(limit, shared.connect(index)).await {
                Ok(Ok(stream)) => {
                    return Ok(NodeStream {
                        inner: stream,
                        lease,
                        shared: shared.clone(),
                        answered: false,
                    });
                }
                Ok(Err(error)) => error,
                Err(_) => UpstreamError::Timeout(limit),
            };
            let node = shared.nodes.get(index);
            debug!(node = index, address = %node.address, %error, "dial to a broker node failed");
            let watch = shared.nodes.dial_failed(index, &error.to_string());
            shared.watch(index, watch);
            last_error = Some(error);
        }
        Err(last_error.unwrap_or(UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT)))
    }
}

impl Shared {
    /// Opens a TCP (then TLS) connection to node `index`, without a deadline of its own.
    async fn connect(&self, index: usize) -> Result<UpstreamStream, UpstreamError> {
        let address = &self.nodes.get(index).address;
        let io_error = |source| UpstreamError::Io {
            address: address.clone(),
            source,
        };
        let stream = if self.source_addresses.is_empty() {
            TcpStream::connect(address).await
        } else {
            self.connect_from_source(address).await
        }
        .map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;
        let Some(tls) = self.tls.as_ref().and_then(|tls| tls.get(index)) else {
            return Ok(Either::Left(stream));
        };
        let stream = tls
            .connector
            .connect(tls.server_name.clone(), stream)
            .await
            .map_err(|source| UpstreamError::Tls {
                address: address.clone(),
                source,
            })?;
        Ok(Either::Right(Box::new(stream)))
    }

    /// Connects from the next source address in turn. Each source address has its own range of
    /// ephemeral ports towards the broker; one whose ports are used up (or that this host does
    /// not have) is passed over for the next.
    async fn connect_from_source(&self, address: &str) -> io::Result<TcpStream> {
        let broker: Vec<SocketAddr> = lookup_host(address).await?.collect();
        let count = self.source_addresses.len();
        let first = self.next_source.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for turn in 0..count {
            let source = self.source_addresses[(first + turn) % count];
            let Some(target) = broker
                .iter()
                .find(|addr| addr.is_ipv4() == source.is_ipv4())
            else {
                last_error = Some(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("the broker has no address of the family of source {source}"),
                ));
                continue;
            };
            let socket = match source {
                IpAddr::V4(_) => TcpSocket::new_v4()?,
                IpAddr::V6(_) => TcpSocket::new_v6()?,
            };
            if let Err(error) = socket.bind(SocketAddr::new(source, 0)) {
                last_error = Some(io::Error::new(
                    error.kind(),
                    format!("source address {source}: {error}"),
                ));
                continue;
            }
            return socket.connect(*target).await;
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("no source address")))
    }

    /// Starts the probe task of node `index` when `watch` says so: it probes (a TCP and TLS
    /// connect within [`PROBE_TIMEOUT`]) after the wait, and again with a growing backoff while
    /// the node stays down. Outside a runtime (`mqtt-warden check`) nothing is started.
    fn watch(self: &Arc<Self>, index: usize, watch: Watch) {
        let Watch::Start(first_wait) = watch else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.clone();
        runtime.spawn(async move {
            let mut wait = first_wait;
            loop {
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                shared.nodes.probing(index);
                let outcome = match tokio::time::timeout(PROBE_TIMEOUT, shared.connect(index)).await
                {
                    Ok(Ok(_probe)) => Ok(()),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err(format!("no connection within {PROBE_TIMEOUT:?}")),
                };
                match shared.nodes.probed(index, outcome) {
                    Next::Stop => return,
                    Next::ProbeAfter(next) => wait = next,
                }
            }
        });
    }
}

/// A connection to one broker node. It counts in its node's connections while it lives. Until
/// the node's first bytes it is still a dial: its end (or its drop) before them, or a CONNACK
/// that says the node cannot serve (MQTT 3 code 3; MQTT 5 0x88, 0x89), marks the node down like
/// a failed TCP connect. Later, its end by the broker's doing (end of stream, or an I/O error)
/// has the node probed, so that a node that went away is marked down before the next dial has
/// to find out.
pub struct NodeStream {
    inner: UpstreamStream,
    lease: NodeLease,
    shared: Arc<Shared>,
    /// The node sent its first bytes (or the dial already counted as failed).
    answered: bool,
}

impl NodeStream {
    /// The node's index in `upstream.addresses` and its address.
    pub fn node(&self) -> (usize, &str) {
        let node = self.lease.node();
        (node.index, &node.address)
    }

    /// The connection ended, by the broker's doing or an I/O error.
    fn ended(&mut self, why: &str) {
        if !self.answered {
            self.failed(why);
            return;
        }
        let watch = self.lease.lost();
        self.shared.watch(self.lease.node().index, watch);
    }

    /// The node's first bytes: the CONNACK's start (fixed header, flags, code).
    fn first_answer(&mut self, bytes: &[u8]) {
        if let [0x20, length, _, code, ..] = *bytes {
            if length < 0x80 && matches!(code, 3 | 0x88 | 0x89) {
                self.failed(&format!("CONNACK {code:#04x}: the node cannot serve"));
                return;
            }
        }
        self.answered = true;
        self.shared.nodes.dialled(self.lease.node().index);
    }

    /// The dial failed after all: no answer to the CONNECT, or a refusal only the node is to
    /// blame for.
    fn failed(&mut self, why: &str) {
        if std::mem::replace(&mut self.answered, true) {
            return;
        }
        let index = self.lease.node().index;
        let watch = self.shared.nodes.dial_failed(index, why);
        self.shared.watch(index, watch);
    }
}

impl Drop for NodeStream {
    fn drop(&mut self) {
        self.failed("no answer to the CONNECT");
    }
}

impl std::fmt::Debug for NodeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (index, address) = self.node();
        f.debug_struct("NodeStream")
            .field("node", &index)
            .field("address", &address)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for NodeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let room = buf.remaining();
        let filled = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - filled;
        match &poll {
            Poll::Ready(Ok(())) if read > 0 && !self.answered => {
                self.first_answer(&buf.filled()[filled..]);
            }
            Poll::Ready(Ok(())) if read == 0 && room > 0 => {
                self.ended("the node closed the connection")
            }
            Poll::Ready(Err(error)) => self.ended(&error.to_string()),
            _ => {}
        }
        poll
    }
}

impl AsyncWrite for NodeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Err(error)) = &poll {
            self.ended(&error.to_string());
        }
        poll
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(error)) = &poll {
            self.ended(&error.to_string());
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.inner).poll_flush(cx);
        if let Poll::Ready(Err(error)) = &poll {
            self.ended(&error.to_string());
        }
        poll
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Dial for Dialer {
    type Stream = NodeStream;

    async fn dial(&self) -> Result<NodeStream, UpstreamError> {
        self.dial_stream().await
    }

    fn username(&self) -> Option<&str> {
        self.shared.username.as_deref()
    }

    fn password(&self) -> Option<&[u8]> {
        self.shared.password.as_deref().map(str::as_bytes)
    }
}

/// Sends an encoded CONNECT and reads frames into `buf` until the broker's first packet is
/// complete, within [`UPSTREAM_CONNECT_TIMEOUT`]. Returns its header; the CONNACK is
/// `buf[..header.frame_len()]`, and anything after it (messages of a persistent session) stays in
/// `buf` for the bridge.
pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    connect: &[u8],
    buf: &mut BytesMut,
) -> Result<FrameHeader, UpstreamError> {
    let exchange = async {
        stream
            .write_all(connect)
            .await
            .map_err(UpstreamError::Handshake)?;
        stream.flush().await.map_err(UpstreamError::Handshake)?;
        loop {
            if let Some(header) = decode_frame_header(buf, MAX_CONNACK_BYTES)? {
                if buf.len() >= header.frame_len() {
                    if header.first_byte != 0x20 {
                        return Err(UpstreamError::NotConnack);
                    }
                    return Ok(header);
                }
            }
            buf.reserve(READ_BUFFER_BYTES);
            let read = stream
                .read_buf(buf)
                .await
                .map_err(UpstreamError::Handshake)?;
            if read == 0 {
                return Err(UpstreamError::Closed);
            }
        }
    };
    tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, exchange)
        .await
        .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
}

/// A connection of the proxy's own (control connection, probe, HTTP publisher, shared-group
/// distributor): dials, sends a clean CONNECT as `client_id` with the dialer's credentials and
/// `will`, and reads the CONNACK. Answers the stream, the CONNACK's return or reason code, and
/// what came behind the CONNACK.
pub async fn connect_own<D: Dial>(
    dialer: &D,
    client_id: &str,
    version: crate::codec::ProtocolVersion,
    keep_alive: u16,
    will: Option<crate::codec::Will<'_>>,
) -> Result<(D::Stream, u8, BytesMut), UpstreamError> {
    let mut stream = dialer.dial().await?;
    let connect = crate::codec::Connect {
        version,
        clean_start: true,
        keep_alive,
        properties: Vec::new(),
        client_id,
        will,
        username: dialer.username(),
        password: dialer.password(),
    };
    let mut out = BytesMut::new();
    crate::codec::encode_connect(&mut out, &connect);
    let mut inbound = BytesMut::with_capacity(64);
    let header = handshake(&mut stream, &out, &mut inbound).await?;
    let code = inbound.get(header.header_len + 1).copied().unwrap_or(0xFF);
    let _ = inbound.split_to(header.frame_len());
    Ok((stream, code, inbound))
}

/// A [`Dial`] over in-memory pipes: each dial hands the broker's end to whoever plays the broker
/// (tests, and the in-process benchmark in `examples/bridge_bench.rs`).
pub mod memory {
    use tokio::io::{duplex, DuplexStream};
    use tokio::sync::mpsc;

    use super::{Dial, UpstreamError};

    /// Dials in-memory pipes of `pipe_bytes` each.
    #[derive(Debug)]
    pub struct DuplexDialer {
        /// Where the broker's end of each connection goes.
        pub brokers: mpsc::UnboundedSender<DuplexStream>,
        /// Bytes each pipe holds before a writer waits.
        pub pipe_bytes: usize,
    }

    impl Dial for DuplexDialer {
        type Stream = DuplexStream;

        async fn dial(&self) -> Result<DuplexStream, UpstreamError> {
            let (ours, theirs) = duplex(self.pipe_bytes);
            self.brokers
                .send(theirs)
                .map_err(|_| UpstreamError::Closed)?;
            Ok(ours)
        }

        fn username(&self) -> Option<&str> {
            None
        }

        fn password(&self) -> Option<&[u8]> {
            None
        }
    }
}

/// What a broker's CONNACK return code (MQTT 3.1.1) or reason code (MQTT 5) means, in the
/// specification's words, for logs and `/readyz`.
pub fn connack_meaning(v5: bool, code: u8) -> &'static str {
    match (v5, code) {
        (_, 0) => "accepted",
        (false, 1) => "unacceptable protocol version",
        (false, 2) => "identifier rejected",
        (false, 3) => "server unavailable",
        (false, 4) => "bad user name or password",
        (false, 5) => "not authorized",
        (true, 0x80) => "unspecified error",
        (true, 0x81) => "malformed packet",
        (true, 0x82) => "protocol error",
        (true, 0x83) => "implementation specific error",
        (true, 0x84) => "unsupported protocol version",
        (true, 0x85) => "client identifier not valid",
        (true, 0x86) => "bad user name or password",
        (true, 0x87) => "not authorized",
        (true, 0x88) => "server unavailable",
        (true, 0x89) => "server busy",
        (true, 0x8A) => "banned",
        (true, 0x8C) => "bad authentication method",
        (true, 0x90) => "topic name invalid",
        (true, 0x95) => "packet too large",
        (true, 0x97) => "quota exceeded",
        (true, 0x99) => "payload format invalid",
        (true, 0x9A) => "retain not supported",
        (true, 0x9B) => "QoS not supported",
        (true, 0x9C) => "use another server",
        (true, 0x9D) => "server moved",
        (true, 0x9F) => "connection rate exceeded",
        _ => "unknown code",
    }
}

/// The `code` label of `warden_upstream_refusals_total` for a failed dial or handshake: one of a
/// few words, never the error text, so the series stay bounded.
pub fn failure_label(error: &UpstreamError) -> &'static str {
    match error {
        UpstreamError::Io { .. } => "io",
        UpstreamError::Timeout(_) => "timeout",
        UpstreamError::Handshake(_) => "io",
        UpstreamError::Closed => "closed",
        UpstreamError::BadConnack(_) | UpstreamError::NotConnack => "invalid",
        UpstreamError::Tls { .. } => "tls",
    }
}

/// The `code` label of `warden_upstream_refusals_total` for a CONNACK that refused: the code in
/// hex (at most 256 values).
pub fn connack_label(code: u8) -> String {
    format!("0x{code:02x}")
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::WardenConfig;

    /// How long a test waits for a probe that starts after [`nodes::DOWN_BACKOFF_MIN`].
    const PROBE_WAIT: Duration = Duration::from_secs(5);

    fn dialer(addresses: &[SocketAddr]) -> Dialer {
        let list: String = addresses
            .iter()
            .map(|address| format!("    - \"{address}\"\n"))
            .collect();
        let text = format!(
            "listeners:\n  - bind: \"127.0.0.1:0\"\nupstream:\n  addresses:\n{list}policies: p\n"
        );
        let config = WardenConfig::from_yaml(&text, Path::new("/tmp/warden.yaml")).unwrap();
        Dialer::new(&config.upstream).unwrap()
    }

    /// A loopback address where nothing listens (a port that was just free).
    async fn closed_address() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + PROBE_WAIT;
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            // sleep-ok: the probe task runs on its own timer and signals nothing.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_dial_passes_a_dead_node_over_and_marks_it_down_until_it_answers_again() {
        let dead = closed_address().await;
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialer = dialer(&[dead, live.local_addr().unwrap()]);
        let mut streams = Vec::new();
        for _ in 0..3 {
            let stream = dialer.dial().await.expect("the live node answers");
            assert_eq!(stream.node().0, 1);
            streams.push(stream);
        }
        let nodes = dialer.nodes();
        assert!(!nodes.get(0).is_up());
        assert_eq!(nodes.get(0).connections(), 0);
        assert_eq!(nodes.get(1).connections(), 3);
        assert!(nodes
            .report()
            .contains(&format!("node 0 {dead} down connections=0")));
        assert!(nodes.any_up());

        // The node comes back: its probe finds it, and new connections go there again.
        let Ok(_back) = TcpListener::bind(dead).await else {
            return; // The port was taken in between by another process: nothing to check.
        };
        until("the node is probed up", || nodes.get(0).is_up()).await;
        let stream = dialer.dial().await.unwrap();
        assert_eq!(stream.node().0, 0, "the node with fewest connections");
    }

    #[tokio::test]
    async fn a_connection_the_node_ends_has_the_node_probed_and_marked_down() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialer = dialer(&[address, other.local_addr().unwrap()]);
        let mut stream = dialer.dial().await.unwrap();
        assert_eq!(stream.node().0, 0);
        let (mut accepted, _) = listener.accept().await.unwrap();
        accepted.write_all(&[0x20, 2, 0, 0]).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.unwrap();
        // The node goes away: its listener and its end of the connection.
        drop((listener, accepted));
        let mut byte = [0u8; 1];
        assert_eq!(stream.read(&mut byte).await.unwrap(), 0);
        let nodes = dialer.nodes();
        until("the lost connection's node is marked down", || {
            !nodes.get(0).is_up()
        })
        .await;
        assert_eq!(
            nodes.get(0).series_dial_failures(),
            0,
            "a loss, not a failed dial"
        );
        let next = dialer.dial().await.unwrap();
        assert_eq!(next.node().0, 1);
        drop(stream);
        assert_eq!(nodes.get(0).connections(), 0);
    }

    #[tokio::test]
    async fn a_node_that_cannot_serve_the_connect_counts_as_a_failed_dial() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialer = dialer(&[address, other.local_addr().unwrap()]);
        let nodes = dialer.nodes();

        // CONNACK 3, server unavailable.
        let mut stream = dialer.dial().await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        accepted.write_all(&[0x20, 2, 0, 3]).await.unwrap();
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await.unwrap();
        assert!(!nodes.get(0).is_up());
        assert_eq!(nodes.get(0).series_dial_failures(), 1);
        drop(stream);
        assert_eq!(nodes.get(0).series_dial_failures(), 1, "counted once");

        // A connection dropped before the node said anything (the CONNECT's deadline passed).
        let unanswered = dialer.dial().await.unwrap();
        assert_eq!(unanswered.node().0, 1);
        drop(unanswered);
        assert!(!nodes.get(1).is_up());
        assert!(!nodes.any_up());
    }

    #[tokio::test]
    async fn with_every_node_down_a_dial_still_tries_them_and_says_why_it_failed() {
        let dialer = dialer(&[closed_address().await, closed_address().await]);
        for _ in 0..2 {
            match dialer.dial().await {
                Err(UpstreamError::Io { source, .. }) => {
                    assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused)
                }
                other => panic!("expected a refused connection, got {other:?}"),
            }
        }
        assert!(!dialer.nodes().any_up());
    }
}
