//! MQTT over WebSocket (tokio-tungstenite): the server handshake with the `mqtt` / `mqttv3.1`
//! subprotocols on any path, and [`WsByteStream`], which turns binary frames into the plain
//! byte stream the session reads and writes.
//!
//! MQTT packets may span frames and frames may hold several packets, so frames are just byte
//! chunks here: reads copy binary payloads out, and each write is one binary frame. Pings are
//! answered and the closing handshake is done by tungstenite; a text frame is a protocol
//! error [MQTT-6.0.0-1] and ends the connection.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols served, in the order they are preferred: MQTT 3.1.1 and 5 register `mqtt`,
/// MQTT 3.1 clients offer `mqttv3.1`.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];
/// The smallest WebSocket message limit, in bytes, whatever the packet limits.
pub const MIN_MESSAGE_BYTES: usize = 1024 * 1024;

/// The WebSocket limits for a listener: a message may carry several packets of the largest
/// size the proxy accepts.
pub fn config(max_packet_bytes: usize) -> WebSocketConfig {
    let max_message = max_packet_bytes.saturating_mul(4).max(MIN_MESSAGE_BYTES);
    WebSocketConfig::default()
        .max_message_size(Some(max_message))
        .max_frame_size(Some(max_message))
}

/// Picks the subprotocol for the response: the first one the client offers that is served.
/// A request that offers subprotocols but none of ours is refused; one that offers none is
/// served without (some clients leave the header out).
fn choose_subprotocol(request: &Request) -> Result<Option<&'static str>, ()> {
    let mut offered = request
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .peekable();
    if offered.peek().is_none() {
        return Ok(None);
    }
    offered
        .find_map(|name| {
            SUBPROTOCOLS
                .iter()
                .find(|served| served.eq_ignore_ascii_case(name))
                .copied()
        })
        .map(Some)
        .ok_or(())
}

/// Runs the server handshake on `stream` (any path is accepted).
// The refusal type is tungstenite's callback contract.
#[allow(clippy::result_large_err)]
pub async fn accept<S>(stream: S, config: WebSocketConfig) -> Result<WsByteStream<S>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let callback = |request: &Request, mut response: Response| match choose_subprotocol(request) {
        Ok(Some(protocol)) => {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
            Ok(response)
        }
        Ok(None) => Ok(response),
        Err(()) => {
            let mut refusal = ErrorResponse::new(Some(
                "unsupported subprotocol: use mqtt or mqttv3.1".to_owned(),
            ));
            *refusal.status_mut() = StatusCode::BAD_REQUEST;
            Err(refusal)
        }
    };
    let inner =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(config)).await?;
    Ok(WsByteStream {
        inner,
        pending: Bytes::new(),
        closing: false,
    })
}

/// A WebSocket connection as a byte stream: binary frames in, binary frames out.
pub struct WsByteStream<S> {
    inner: WebSocketStream<S>,
    /// The unread rest of the last binary frame.
    pending: Bytes,
    /// A text frame arrived: the close is under way and reads end in an error.
    closing: bool,
}

impl<S> std::fmt::Debug for WsByteStream<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsByteStream")
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

fn to_io(error: WsError) -> io::Error {
    match error {
        WsError::Io(error) => error,
        other => io::Error::other(other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsByteStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.closing {
                // Send the Close frame for the text frame, then report the protocol error.
                let _ = ready!(Pin::new(&mut this.inner).poll_close(cx));
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "text frame on an MQTT WebSocket",
                )));
            }
            match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
                Some(Ok(Message::Binary(data))) => this.pending = data,
                // tungstenite queues the pong itself and sends it with the next read or write.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    this.closing = true;
                    let frame = CloseFrame {
                        code: WsCloseCode::Unsupported,
                        reason: "MQTT needs binary frames".into(),
                    };
                    let _ = Pin::new(&mut this.inner).start_send(Message::Close(Some(frame)));
                }
                // The peer's Close was answered by tungstenite; the stream ends next.
                Some(Ok(Message::Close(_))) => {}
                Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) | None => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(error)) => return Poll::Ready(Err(to_io(error))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsByteStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut sink = Pin::new(&mut self.inner);
        ready!(sink.as_mut().poll_ready(cx)).map_err(to_io)?;
        sink.as_mut()
            .start_send(Message::Binary(Bytes::copy_from_slice(buf)))
            .map_err(to_io)?;
        // Start sending now; `poll_flush` finishes it.
        if let Poll::Ready(Err(error)) = sink.poll_flush(cx) {
            return Poll::Ready(Err(to_io(error)));
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx).map_err(to_io)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.inner).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(error) => Poll::Ready(Err(to_io(error))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(protocols: &[&str]) -> Request {
        let mut builder = Request::builder().uri("/mqtt");
        for value in protocols {
            builder = builder.header(header::SEC_WEBSOCKET_PROTOCOL, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn chooses_an_mqtt_subprotocol() {
        assert_eq!(choose_subprotocol(&request(&[])), Ok(None));
        assert_eq!(choose_subprotocol(&request(&["mqtt"])), Ok(Some("mqtt")));
        assert_eq!(
            choose_subprotocol(&request(&["mqttv3.1"])),
            Ok(Some("mqttv3.1"))
        );
        assert_eq!(
            choose_subprotocol(&request(&["chat, mqttv3.1", "mqtt"])),
            Ok(Some("mqttv3.1"))
        );
        assert_eq!(choose_subprotocol(&request(&["MQTT"])), Ok(Some("mqtt")));
        assert_eq!(choose_subprotocol(&request(&["chat"])), Err(()));
    }

    #[tokio::test]
    async fn carries_bytes_over_binary_frames_and_refuses_text() {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(accept(server_io, config(1024)));
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                "ws://localhost/any/path",
            )
            .unwrap();
        let mut request = request;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("mqtt"),
        );
        let (mut client, response) = tokio_tungstenite::client_async(request, client_io)
            .await
            .unwrap();
        assert_eq!(
            response
                .headers()
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .unwrap(),
            "mqtt"
        );
        let mut server = server.await.unwrap().unwrap();

        // Two frames read as one byte stream; a ping in between is answered.
        client
            .send(Message::Binary(Bytes::from_static(b"\x10\x02")))
            .await
            .unwrap();
        client
            .send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .unwrap();
        client
            .send(Message::Binary(Bytes::from_static(b"ab")))
            .await
            .unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x10\x02ab");

        server.write_all(b"\x20\x02\x00\x00").await.unwrap();
        server.flush().await.unwrap();
        let mut saw_pong = false;
        loop {
            match client.next().await.unwrap().unwrap() {
                Message::Pong(data) => {
                    assert_eq!(&data[..], b"hi");
                    saw_pong = true;
                }
                Message::Binary(data) => {
                    assert_eq!(&data[..], b"\x20\x02\x00\x00");
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(saw_pong);

        client.send(Message::Text("hello".into())).await.unwrap();
        let error = server.read(&mut got).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        match client.next().await {
            Some(Ok(Message::Close(Some(frame)))) => {
                assert_eq!(frame.code, WsCloseCode::Unsupported)
            }
            other => panic!("expected a Close frame, got {other:?}"),
        }
    }
}
