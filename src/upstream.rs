//! Dialling the broker: one connection per client session, plus the monitor's control
//! connection, over TCP or TLS (`upstream.tls`), and reading the broker's CONNACK.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

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
#[derive(Debug)]
pub enum UpstreamStream {
    /// Plain TCP.
    Tcp(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(&mut **stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            UpstreamStream::Tls(stream) => Pin::new(&mut **stream).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            UpstreamStream::Tls(stream) => Pin::new(&mut **stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            UpstreamStream::Tls(stream) => Pin::new(&mut **stream).poll_shutdown(cx),
        }
    }
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
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("address", &self.address)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Dialer {
    /// A dialer for the configured broker; loads the TLS files when `upstream.tls` is set.
    pub fn new(config: &UpstreamConfig) -> Result<Dialer, TlsError> {
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
        })
    }

    /// Opens a connection to the broker (TCP with Nagle off, as the proxy batches its own writes;
    /// then TLS if configured).
    pub async fn dial(&self) -> Result<UpstreamStream, UpstreamError> {
        let stream = self.dial_tcp().await?;
        let Some(tls) = &self.tls else {
            return Ok(UpstreamStream::Tcp(stream));
        };
        let handshake = tls.connector.connect(tls.server_name.clone(), stream);
        let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
            .map_err(|source| UpstreamError::Tls {
                address: self.address.clone(),
                source,
            })?;
        Ok(UpstreamStream::Tls(Box::new(stream)))
    }

    async fn dial_tcp(&self) -> Result<TcpStream, UpstreamError> {
        let connect = TcpStream::connect(&self.address);
        let stream = tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
            .map_err(|source| UpstreamError::Io {
                address: self.address.clone(),
                source,
            })?;
        stream
            .set_nodelay(true)
            .map_err(|source| UpstreamError::Io {
                address: self.address.clone(),
                source,
            })?;
        Ok(stream)
    }

    /// Sends an encoded CONNECT and reads frames into `buf` until the broker's first packet is
    /// complete. Returns its header; the CONNACK is `buf[..header.frame_len()]`, and anything after
    /// it (messages of a persistent session) stays in `buf` for the bridge.
    pub async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut S,
        connect: &[u8],
        buf: &mut BytesMut,
    ) -> Result<FrameHeader, UpstreamError> {
        let exchange = async {
            let sent = async {
                stream.write_all(connect).await?;
                stream.flush().await
            };
            sent.await.map_err(|source| UpstreamError::Io {
                address: self.address.clone(),
                source,
            })?;
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
                    .map_err(|source| UpstreamError::Io {
                        address: self.address.clone(),
                        source,
                    })?;
                if read == 0 {
                    return Err(UpstreamError::Closed);
                }
            }
        };
        tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, exchange)
            .await
            .map_err(|_| UpstreamError::Timeout(UPSTREAM_CONNECT_TIMEOUT))?
    }
}
