//! Client transports: raw MQTT, TLS, MQTT over WebSocket and over secure WebSocket, told apart on
//! the same port from the first bytes, each handed to the session as a plain byte stream
//! ([`ClientConnection`]).
//!
//! Detection, per accepted connection and off the accept loop:
//!
//! - The first byte is peeked (not read) within the connect deadline; nothing: no data (**164**
//!   in WIoTP's closing codes).
//! - `0x16` (a TLS handshake record) on a TLS listener: the TLS handshake, within
//!   [`HANDSHAKE_TIMEOUT`] (capped by the connect deadline). Then the first decrypted bytes are
//!   read and looked at again: `GET` is secure WebSocket, anything else MQTT. A handshake that
//!   fails or stalls, and anything but TLS on a TLS listener, is a TLS failure (**163**): logged
//!   and counted, with no status message (no identity is known yet).
//! - `G` (an HTTP `GET`) on a plain listener: the WebSocket handshake. `P` (an HTTP `POST`): the
//!   HTTP messaging API ([`crate::http`]), handed over with no handshake of its own. Anything else
//!   is raw MQTT, left to the session to parse (a TLS client on a plain listener fails there as
//!   invalid MQTT). After TLS, the first decrypted byte is told apart the same way.

pub mod tls;
pub mod websocket;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::{Buf, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

use crate::refusal::Cause;
pub use tls::{PeerCertificate, ServerTls, TlsError, UpstreamTls};
pub use websocket::WsByteStream;

/// The longest a TLS or WebSocket handshake may take (the connect deadline caps it further).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS connection: a handshake record.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// The first byte of an HTTP upgrade request (`GET`). As an MQTT fixed header it would be an
/// invalid PUBACK, so it never starts an MQTT connection.
const HTTP_GET_FIRST_BYTE: u8 = b'G';
/// The first byte of an HTTP messaging request (`POST`). As an MQTT fixed header it would be a
/// PUBREC, which never starts an MQTT connection either.
const HTTP_POST_FIRST_BYTE: u8 = b'P';
/// How many decrypted bytes are read at once to tell MQTT from WebSocket after TLS.
const FIRST_READ_BYTES: usize = 4096;

/// A TLS stream over TCP.
pub type TlsTcp = tokio_rustls::server::TlsStream<TcpStream>;

/// A client connection as the session sees it: a byte stream over one of four transports
/// (TCP, TLS, WebSocket, WebSocket over TLS).
pub type ClientConnection = Either<
    Either<TcpStream, Box<Rewind<TlsTcp>>>,
    Either<Box<WsByteStream<TcpStream>>, Box<WsByteStream<Rewind<TlsTcp>>>>,
>;

/// Facts about a client connection known before its first MQTT byte.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The listener address the client connected to.
    pub local: SocketAddr,
    /// TLS.
    pub secure: bool,
    /// MQTT over WebSocket.
    pub websocket: bool,
    /// The client certificate's common name (of a certificate that verified against `client_ca`).
    pub certname: Option<String>,
    /// The client certificate, judged against the listener's `client_ca`.
    pub certificate: PeerCertificate,
    /// When the connection was accepted.
    pub connected_at: SystemTime,
    /// The generic tenant the listener belongs to, if any.
    pub tenant: Option<Arc<str>>,
}

#[cfg(test)]
impl ConnectionInfo {
    /// A plain TCP client on loopback, of `tenant`'s listener if any: the connection the unit
    /// tests of profiles and sessions admit.
    pub fn loopback_for_tests(tenant: Option<&str>) -> ConnectionInfo {
        ConnectionInfo {
            peer: SocketAddr::from(([127, 0, 0, 1], 40000)),
            local: SocketAddr::from(([127, 0, 0, 1], 1883)),
            secure: false,
            websocket: false,
            certname: None,
            certificate: PeerCertificate::Absent,
            connected_at: SystemTime::UNIX_EPOCH,
            tenant: tenant.map(Arc::from),
        }
    }
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    /// `prefix` is read first, then `inner`.
    pub fn new(prefix: BytesMut, inner: S) -> Rewind<S> {
        Rewind { prefix, inner }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Writes `bytes` and flushes them: TLS and WebSocket hold written bytes until flushed (plain TCP
/// flushes as a no-op).
pub async fn write_flushed<W: AsyncWrite + Unpin>(stream: &mut W, bytes: &[u8]) -> io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// What a listener serves besides raw MQTT and WebSocket.
#[derive(Debug, Clone)]
pub struct ListenerTransport {
    /// TLS: then the listener serves only TLS (MQTT and WebSocket inside it).
    pub tls: Option<Arc<ServerTls>>,
    /// WebSocket limits.
    pub websocket: WebSocketConfig,
    /// The connect deadline: the first byte must arrive within it.
    pub connect_timeout: Duration,
    /// The generic tenant of every client of this listener, if any
    /// ([`ConnectionInfo::tenant`]).
    pub tenant: Option<Arc<str>>,
}

/// An accepted connection, ready for the session.
#[derive(Debug)]
pub struct Accepted {
    /// The byte stream.
    pub stream: ClientConnection,
    /// TLS.
    pub secure: bool,
    /// WebSocket.
    pub websocket: bool,
    /// The HTTP messaging API (the stream starts with an HTTP request).
    pub http: bool,
    /// The client certificate's verdict.
    pub certificate: PeerCertificate,
}

/// Why a connection did not get as far as MQTT. None of these carries a secret.
#[derive(Debug, Error)]
pub enum AcceptError {
    /// Nothing arrived within the connect deadline (164).
    #[error("no data within {0:?}")]
    NoData(Duration),
    /// The client closed before sending anything.
    #[error("closed before any data")]
    Closed,
    /// Something other than TLS on a TLS listener (163).
    #[error("not a TLS handshake on a TLS listener")]
    NotTls,
    /// The TLS handshake failed (163).
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
    /// The TLS handshake did not finish in time (163).
    #[error("TLS handshake did not finish within {0:?}")]
    TlsTimeout(Duration),
    /// The WebSocket handshake failed.
    #[error("WebSocket handshake failed: {0}")]
    WebSocket(#[source] tokio_tungstenite::tungstenite::Error),
    /// The WebSocket handshake did not finish in time.
    #[error("WebSocket handshake did not finish within {0:?}")]
    WebSocketTimeout(Duration),
}

impl AcceptError {
    /// The cause this ends with, if it is worth a closing code.
    pub fn cause(&self) -> Option<Cause> {
        match self {
            AcceptError::NoData(_) => Some(Cause::NoData),
            AcceptError::NotTls | AcceptError::TlsHandshake(_) | AcceptError::TlsTimeout(_) => {
                Some(Cause::TlsHandshake)
            }
            AcceptError::Closed | AcceptError::WebSocket(_) | AcceptError::WebSocketTimeout(_) => {
                None
            }
        }
    }

    /// Whether this is a failed TLS handshake (counted).
    pub fn is_tls_failure(&self) -> bool {
        self.cause() == Some(Cause::TlsHandshake)
    }
}

/// Tells the transport from the first bytes and runs its handshakes.
pub async fn accept(tcp: TcpStream, listener: &ListenerTransport) -> Result<Accepted, AcceptError> {
    let started = Instant::now();
    let connect_deadline = started + listener.connect_timeout;
    let handshake_deadline = started + listener.connect_timeout.min(HANDSHAKE_TIMEOUT);

    let mut first = [0u8; 1];
    match tokio::time::timeout_at(connect_deadline, tcp.peek(&mut first)).await {
        Err(_) => return Err(AcceptError::NoData(listener.connect_timeout)),
        Ok(Ok(0)) | Ok(Err(_)) => return Err(AcceptError::Closed),
        Ok(Ok(_)) => {}
    }

    let Some(server_tls) = &listener.tls else {
        if first[0] == HTTP_GET_FIRST_BYTE {
            let ws = websocket_handshake(tcp, listener).await?;
            return Ok(Accepted {
                stream: Either::Right(Either::Left(Box::new(ws))),
                secure: false,
                websocket: true,
                http: false,
                certificate: PeerCertificate::Absent,
            });
        }
        return Ok(Accepted {
            stream: Either::Left(Either::Left(tcp)),
            secure: false,
            websocket: false,
            http: first[0] == HTTP_POST_FIRST_BYTE,
            certificate: PeerCertificate::Absent,
        });
    };

    if first[0] != TLS_HANDSHAKE_RECORD {
        return Err(AcceptError::NotTls);
    }
    let timeout = handshake_deadline - started;
    let (mut tls, certificate) =
        match tokio::time::timeout_at(handshake_deadline, server_tls.accept(tcp)).await {
            Err(_) => return Err(AcceptError::TlsTimeout(timeout)),
            Ok(Err(error)) => return Err(AcceptError::TlsHandshake(error)),
            Ok(Ok(accepted)) => accepted,
        };

    let mut prefix = BytesMut::with_capacity(FIRST_READ_BYTES);
    match tokio::time::timeout_at(connect_deadline, tls.read_buf(&mut prefix)).await {
        Err(_) => return Err(AcceptError::NoData(listener.connect_timeout)),
        Ok(Ok(0)) | Ok(Err(_)) => return Err(AcceptError::Closed),
        Ok(Ok(_)) => {}
    }
    let is_websocket = prefix.first() == Some(&HTTP_GET_FIRST_BYTE);
    let is_http = prefix.first() == Some(&HTTP_POST_FIRST_BYTE);
    let stream = Rewind::new(prefix, tls);
    if is_websocket {
        let ws = websocket_handshake(stream, listener).await?;
        return Ok(Accepted {
            stream: Either::Right(Either::Right(Box::new(ws))),
            secure: true,
            websocket: true,
            http: false,
            certificate,
        });
    }
    Ok(Accepted {
        stream: Either::Left(Either::Right(Box::new(stream))),
        secure: true,
        websocket: false,
        http: is_http,
        certificate,
    })
}

/// The WebSocket handshake, within its own handshake timeout.
async fn websocket_handshake<S>(
    stream: S,
    listener: &ListenerTransport,
) -> Result<WsByteStream<S>, AcceptError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let timeout = listener.connect_timeout.min(HANDSHAKE_TIMEOUT);
    match tokio::time::timeout(timeout, websocket::accept(stream, listener.websocket)).await {
        Err(_) => Err(AcceptError::WebSocketTimeout(timeout)),
        Ok(Err(error)) => Err(AcceptError::WebSocket(error)),
        Ok(Ok(ws)) => Ok(ws),
    }
}
