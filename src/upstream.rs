//! Dialling the broker: one TCP connection per client session, plus the monitor's control
//! connection, and reading the broker's CONNACK.

use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::codec::{decode_frame_header, CodecError, FrameHeader};
use crate::config::UpstreamConfig;

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
}

/// How to reach the broker, with the proxy's own credentials.
#[derive(Debug, Clone)]
pub struct Dialer {
    /// Broker address.
    pub address: String,
    /// The proxy's user name on the broker.
    pub username: Option<String>,
    /// Its password.
    pub password: Option<String>,
}

impl Dialer {
    /// A dialer for the configured broker.
    pub fn new(config: &UpstreamConfig) -> Dialer {
        Dialer {
            address: config.address.clone(),
            username: config.username.clone(),
            password: config.password.clone(),
        }
    }

    /// Opens a TCP connection to the broker, with Nagle off (the proxy batches its own writes).
    pub async fn dial(&self) -> Result<TcpStream, UpstreamError> {
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
    pub async fn handshake(
        &self,
        stream: &mut TcpStream,
        connect: &[u8],
        buf: &mut BytesMut,
    ) -> Result<FrameHeader, UpstreamError> {
        let exchange = async {
            stream
                .write_all(connect)
                .await
                .map_err(|source| UpstreamError::Io {
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
