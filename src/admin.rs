//! The admin HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process runs) and `/readyz`
//! (the broker is reachable). It speaks just enough HTTP/1.1 for probes and scrapers: one
//! request per connection, `GET` only, a bounded request head and a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use crate::metrics::{Metrics, CONTENT_TYPE};

/// Whether the proxy is ready for clients (the broker is reachable, no shutdown under way).
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// Readiness for `/readyz`.
    pub ready: Readiness,
}

/// The largest request head accepted, in bytes.
const MAX_REQUEST_HEAD_BYTES: usize = 8192;
/// How long a request may take to arrive and be answered.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves the admin endpoint on a bound listener until `shutdown` turns true.
pub fn serve(
    listener: TcpListener,
    state: AdminState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let local = listener.local_addr()?;
    info!(address = %local, "admin endpoint listening");
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.wait_for(|stop| *stop) => return,
            };
            if let Ok((stream, _)) = accepted {
                let state = state.clone();
                tokio::spawn(async move {
                    if tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &state))
                        .await
                        .is_err()
                    {
                        debug!("admin request timed out");
                    }
                });
            }
        }
    });
    Ok(local)
}

async fn answer(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut chunk).await?;
        if read == 0 || head.len() + read > MAX_REQUEST_HEAD_BYTES {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    let request_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|b| *b == b' ');
    let (method, path) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let (code, content_type, body) = match (method, path) {
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", b"/readyz") if (state.ready)() => ("200 OK", "text/plain", "ready\n".to_string()),
        (b"GET", b"/readyz") => (
            "503 Service Unavailable",
            "text/plain",
            "not ready\n".to_string(),
        ),
        (b"GET", b"/metrics") => ("200 OK", CONTENT_TYPE, state.metrics.render()),
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {code}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
