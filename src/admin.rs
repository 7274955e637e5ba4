//! The admin HTTP endpoint: `/metrics` (Prometheus), `/healthz` (the process runs) and `/readyz`
//! (the broker is reachable), and, behind a bearer token (`admin.token_env`), an org's sessions
//! on every instance: `GET /admin/orgs/ORG/sessions`, `POST /admin/orgs/ORG/close` and
//! `POST /admin/orgs/ORG/clients/CLIENT_ID/close` (94, wherever the client is connected). It
//! speaks just enough HTTP/1.1 for probes, scrapers and scripts: one request per connection, no
//! request body, a bounded request head and a deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tracing::{debug, info};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::broker::{BrokerKind, Capabilities};
use crate::coord::{Admission, ClaimError};
use crate::metrics::{Metrics, CONTENT_TYPE};
use crate::monitor::BrokerReport;

/// Whether the proxy is ready for clients (the broker is reachable, no shutdown under way):
/// `Ok` with what it knows of the broker, or `Err` with why not. Either goes in the body.
pub type Readiness = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// The `/readyz` body's account of the broker: its kind, what is declared, what the last probe
/// saw, and every mismatch, one per line.
pub fn broker_details(kind: BrokerKind, declared: &Capabilities, report: &BrokerReport) -> String {
    let escaped: String = declared.escaped.chars().collect();
    let mut out = format!(
        "broker: {kind}\ndeclared: mqtt5={} max_qos={} shared_subscriptions={} retained_to_wildcards={} escape={escaped:?}\n",
        declared.mqtt5, declared.max_qos, declared.shared_subscriptions, declared.retained_to_wildcards,
    );
    match &report.probed {
        Some(probed) => out.push_str(&format!("probed: {probed}\n")),
        None => out.push_str("probed: not yet\n"),
    }
    for mismatch in &report.mismatches {
        out.push_str(&format!("mismatch: {mismatch}\n"));
    }
    out
}

/// What the endpoint reports on.
#[derive(Clone)]
pub struct AdminState {
    /// The metrics to render.
    pub metrics: Arc<Metrics>,
    /// Readiness for `/readyz`.
    pub ready: Readiness,
    /// The session endpoints, when a token is configured.
    pub sessions: Option<AdminSessions>,
}

/// What the session endpoints act on.
#[derive(Clone)]
pub struct AdminSessions {
    /// Every session, on every instance.
    pub admission: Arc<dyn Admission>,
    /// SHA-256 of the bearer token (compared in constant time, never kept in clear here).
    pub token_digest: [u8; 32],
}

impl AdminSessions {
    /// The endpoints for `admission`, behind `token`.
    pub fn new(admission: Arc<dyn Admission>, token: &str) -> AdminSessions {
        AdminSessions {
            admission,
            token_digest: Sha256::digest(token.as_bytes()).into(),
        }
    }

    fn authorized(&self, head: &[u8]) -> bool {
        let token = head
            .split(|b| *b == b'\n')
            .skip(1)
            .filter_map(|line| {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                let colon = line.iter().position(|b| *b == b':')?;
                let (name, value) = line.split_at(colon);
                name.eq_ignore_ascii_case(b"authorization")
                    .then(|| value[1..].trim_ascii())
            })
            .next()
            .and_then(|value| value.strip_prefix(b"Bearer "));
        let Some(token) = token else {
            return false;
        };
        let digest: [u8; 32] = Sha256::digest(token.trim_ascii()).into();
        digest.ct_eq(&self.token_digest).into()
    }
}

/// A path segment with its percent-escapes decoded (a client ID may hold `/`), if it is UTF-8.
fn decode_segment(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

type Answer = (&'static str, &'static str, String);

fn json(code: &'static str, value: serde_json::Value) -> Answer {
    (code, "application/json", format!("{value}\n"))
}

/// A request under `/admin/`.
async fn sessions_request(method: &[u8], path: &[u8], head: &[u8], state: &AdminState) -> Answer {
    let Some(sessions) = &state.sessions else {
        return json(
            "404 Not Found",
            serde_json::json!({ "error": "the session endpoints need admin.token_env" }),
        );
    };
    if !sessions.authorized(head) {
        return json(
            "401 Unauthorized",
            serde_json::json!({ "error": "a valid bearer token is needed" }),
        );
    }
    let path = std::str::from_utf8(path).unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    let segments: Option<Vec<String>> = path.split('/').skip(1).map(decode_segment).collect();
    let Some(segments) = segments else {
        return json(
            "400 Bad Request",
            serde_json::json!({ "error": "a path segment is not valid percent-encoded UTF-8" }),
        );
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let admission = &sessions.admission;
    let result = match (method, segments.as_slice()) {
        (b"GET", ["admin", "orgs", org, "sessions"]) => {
            admission.list(org).await.map(|listed| {
                let listed: Vec<_> = listed
                    .into_iter()
                    .map(|info| {
                        serde_json::json!({
                            "client_id": info.client_id,
                            "instance": info.instance,
                            "session": info.session,
                        })
                    })
                    .collect();
                serde_json::json!({ "org": org, "sessions": listed })
            })
        }
        (b"POST", ["admin", "orgs", org, "close"]) => admission
            .close_sessions(org, None)
            .await
            .map(|closed| serde_json::json!({ "org": org, "closed": closed })),
        (b"POST", ["admin", "orgs", org, "clients", client_id, "close"]) => admission
            .close_sessions(org, Some(client_id))
            .await
            .map(|closed| {
                serde_json::json!({ "org": org, "client_id": client_id, "closed": closed })
            }),
        (_, ["admin", "orgs", _, "sessions"])
        | (_, ["admin", "orgs", _, "close"])
        | (_, ["admin", "orgs", _, "clients", _, "close"]) => {
            return json(
                "405 Method Not Allowed",
                serde_json::json!({ "error": "GET for sessions, POST for close" }),
            )
        }
        _ => {
            return json(
                "404 Not Found",
                serde_json::json!({ "error": "no such admin endpoint" }),
            )
        }
    };
    match result {
        Ok(value) => json("200 OK", value),
        Err(ClaimError::TenantFull | ClaimError::Unavailable) => json(
            "503 Service Unavailable",
            serde_json::json!({ "error": "the coordination store is unavailable" }),
        ),
    }
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
        (_, path) if path.starts_with(b"/admin/") => {
            sessions_request(method, path, &head, state).await
        }
        (b"GET", b"/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        (b"GET", b"/readyz") => match (state.ready)() {
            Ok(details) => ("200 OK", "text/plain", format!("ready\n{details}")),
            Err(reason) => (
                "503 Service Unavailable",
                "text/plain",
                format!("not ready: {reason}\n"),
            ),
        },
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
