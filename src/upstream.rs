//! Dialling the broker: one connection per client session, plus the monitor's control
//! connection, over TCP or TLS (`upstream.tls`), from the configured source addresses in turn
//! ([`Dialer`], behind the [`Dial`] trait), and the CONNECT / CONNACK exchange ([`handshake`]).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{lookup_host, TcpSocket, TcpStream};
use tokio_util::either::Either;

use crate::codec::{decode_frame_header, CodecError, FrameHeader};
use crate::config::UpstreamConfig;
use crate::transport::{TlsError, UpstreamTls};

/// How long dialling the broker and its CONNACK may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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

/// How to reach the broker, with the proxy's own credentials. Its `Debug` output hides the
/// password.
#[derive(Clone)]
pub struct Dialer {
    /// Broker address.
    pub address: String,
    /// The proxy's user name on the broker.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
    /// TLS towards the broker, if configured.
    pub tls: Option<UpstreamTls>,
    /// Local addresses to dial from, in turn (`upstream.source_addresses`); empty: any.
    source_addresses: Arc<[IpAddr]>,
    /// The source address the next dial starts with, shared by every clone.
    next_source: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("address", &self.address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .field("source_addresses", &self.source_addresses)
            .finish()
    }
}

impl Dialer {
    /// A dialer for the configured broker; loads the TLS files when `upstream.tls` is set and
    /// checks that this host has every source address.
    pub fn new(config: &UpstreamConfig) -> Result<Dialer, DialerError> {
        for &address in &config.source_addresses {
            // A typo here would otherwise only show as every dial passing the address over.
            std::net::TcpListener::bind(SocketAddr::new(address, 0))
                .map_err(|source| DialerError::SourceAddress { address, source })?;
        }
        let tls = match &config.tls {
            Some(tls) => {
                let host = config
                    .address
                    .rsplit_once(':')
                    .map_or(config.address.as_str(), |(host, _)| host);
                Some(UpstreamTls::load(tls, host)?)
            }
            None => None,
        };
        Ok(Dialer {
            address: config.address.clone(),
            username: config.username.clone(),
            password: config.password.clone(),
            tls,
            source_addresses: config.source_addresses.as_slice().into(),
            next_source: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Opens a connection to the broker (TCP with Nagle off, as the proxy batches its own writes;
    /// then TLS if configured).
    pub async fn dial_stream(&self) -> Result<UpstreamStream, UpstreamError> {
        let stream = self.dial_tcp().await?;
        let Some(tls) = &self.tls else {
            return Ok(Either::Left(stream));
        };
        let handshake = tls.connector.connect(tls.server_name.clone(), stream);
        let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
            .map_err(|source| UpstreamError::Tls {
                address: self.address.clone(),
                source,
            })?;
        Ok(Either::Right(Box::new(stream)))
    }

    async fn dial_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let io_error = |source| UpstreamError::Io {
            address: self.address.clone(),
            source,
        };
        let connect = async {
            if self.source_addresses.is_empty() {
                TcpStream::connect(&self.address).await
            } else {
                self.connect_from_source().await
            }
        };
        let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
            .map_err(io_error)?;
        stream.set_nodelay(true).map_err(io_error)?;
        Ok(stream)
    }

    /// Connects from the next source address in turn. Each source address has its own range of
    /// ephemeral ports towards the broker; one whose ports are used up (or that this host does
    /// not have) is passed over for the next.
    async fn connect_from_source(&self) -> io::Result<TcpStream> {
        let broker: Vec<SocketAddr> = lookup_host(&self.address).await?.collect();
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
}

impl Dial for Dialer {
    type Stream = UpstreamStream;

    async fn dial(&self) -> Result<UpstreamStream, UpstreamError> {
        self.dial_stream().await
    }

    fn username(&self) -> Option<&str> {
        self.username.as_deref()
    }

    fn password(&self) -> Option<&[u8]> {
        self.password.as_deref().map(str::as_bytes)
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
