//! The HTTP messaging front end: `POST` requests on the MQTT listeners (plain, and inside TLS),
//! served with hyper's HTTP/1.1 server, each turned into the MQTT decision it stands for and
//! published to the broker through [`publisher::Publisher`].
//!
//! Nothing here knows a tenant model. A request goes through the profile's hooks in the order a
//! CONNECT and a PUBLISH would: [`Profile::http_route`] (what the path means: a client ID, a user
//! name and a topic), [`Profile::identify`] and [`Profile::authenticate`] (with the Basic
//! password as the CONNECT password, and the connection's TLS facts), [`Profile::limits`] (the
//! payload limit, the rates, the highest QoS), [`Profile::check_publish`] or
//! [`Profile::check_subscribe`], and the topic rewrite of [`Profile::terms`]. Each refusal's cause
//! becomes an HTTP status ([`status_of`]) and the body says the profile's closing code and reason.
//!
//! Per connection:
//!
//! - The request head must arrive within `limits.connect_timeout` of the accept or of the
//!   previous answer (an idle kept-alive connection closes then), and the body within the same
//!   time after the head (408).
//! - Heads are limited to `limits.http_max_header_bytes` (431), bodies to the org's payload limit
//!   and `limits.max_packet_bytes` (413, closing code 287), requests to
//!   `limits.http_max_requests_per_connection` (the last answer says `Connection: close`).
//! - The connection takes a process slot (`limits.max_connections`) like an MQTT session.
//! - Every request must carry the `Authorization` of the first (or none, like the first): a
//!   change closes the connection with closing code **175**, answered 400.
//! - Rates: each identity (client ID) has publish and byte buckets of its class's rates, shared
//!   by all its HTTP connections, and the tenant's bucket is the one MQTT sessions charge. HTTP
//!   cannot be slowed by not reading, so a request over a rate is answered 429 with
//!   `Retry-After`.
//!
//! HTTP clients produce no Connect or Disconnect status messages: a request is not a session,
//! and WIoTP's `Protocol` values name only MQTT variants (see PRODUCT-NOTES.md).

pub mod commands;
pub mod publisher;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Mutex};
use tokio::time::Instant;
use tracing::{debug, info};

use self::commands::{FetchError, Mailboxes};
use self::publisher::{PublishError, Publisher};
use crate::codec::{Connect, ProtocolVersion};
use crate::limits::{refusal_log_budget, SharedBucket};
use crate::metrics::limit_name;
use crate::profile::{HttpAction, HttpRequest, HttpRouteError, Profile, SessionLimits};
use crate::refusal::{Cause, Refusal};
use crate::session::{ClientStream, Context};
use crate::transport::ConnectionInfo;
use crate::upstream::Dial;

/// Identities whose rate buckets are kept at once (the least recently used go first).
const MAX_RATED_IDENTITIES: u64 = 100_000;
/// How long an identity's buckets are kept without a request.
const RATED_IDENTITY_IDLE: Duration = Duration::from_secs(600);
/// The response header that names a fetched command's topic (client form).
const TOPIC_HEADER: &str = "x-topic";
/// The realm of `WWW-Authenticate`.
const REALM: &str = "Basic realm=\"mqtt-warden\"";
/// The answer of a connection refused for want of a process slot.
const NO_SLOT_RESPONSE: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// The HTTP status of a refusal.
pub fn status_of(refusal: &Refusal) -> StatusCode {
    match refusal.cause {
        Cause::NotAuthorized if refusal.bad_credentials => StatusCode::UNAUTHORIZED,
        Cause::NotAuthorized
        | Cause::CertificateMissing
        | Cause::CertificateInvalid
        | Cause::Revoked => StatusCode::FORBIDDEN,
        Cause::MessageTooLarge | Cause::InitialPacketTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Cause::InvalidClientId
        | Cause::InvalidTopic
        | Cause::InvalidData
        | Cause::InvalidLength
        | Cause::AuthorizationChanged => StatusCode::BAD_REQUEST,
        Cause::NoData | Cause::KeepAliveTimeout => StatusCode::REQUEST_TIMEOUT,
        Cause::ServerUnavailable
        | Cause::ServerCapacity
        | Cause::AuthenticationBusy
        | Cause::TenantQuota
        | Cause::Shutdown
        | Cause::ServerClosed
        | Cause::TooManySubscriptions
        | Cause::TlsHandshake
        | Cause::TakenOver
        | Cause::Normal
        | Cause::ClientClosed => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The publish and byte buckets of one identity.
#[derive(Debug)]
struct IdentityBuckets {
    publish: SharedBucket,
    bytes: Option<SharedBucket>,
}

impl IdentityBuckets {
    fn new(limits: &SessionLimits) -> IdentityBuckets {
        IdentityBuckets {
            publish: SharedBucket::new(limits.publish_rate),
            bytes: limits.byte_rate.map(SharedBucket::new),
        }
    }

    fn fits(&self, limits: &SessionLimits) -> bool {
        self.publish.rate() == limits.publish_rate
            && self.bytes.as_ref().map(SharedBucket::rate) == limits.byte_rate
    }
}

/// What every HTTP connection of a proxy shares.
pub struct HttpFront<P: Profile, D: Dial> {
    context: Arc<Context<P, D>>,
    publisher: Publisher<D>,
    mailboxes: Mailboxes<D>,
    identities: moka::sync::Cache<String, Arc<IdentityBuckets>>,
}

impl<P: Profile, D: Dial> HttpFront<P, D> {
    /// The front end over a proxy's context; its broker connections' client IDs start with
    /// `client_id_prefix`.
    pub fn new(context: Arc<Context<P, D>>, client_id_prefix: String) -> HttpFront<P, D> {
        // The instance's name may hold characters the broker cannot take (the default one has
        // the listener's dotted address).
        let client_id_prefix =
            crate::names::escape(context.capabilities.escaped, &client_id_prefix).into_owned();
        HttpFront {
            publisher: Publisher::new(context.dialer.clone(), client_id_prefix.clone()),
            mailboxes: Mailboxes::new(context.dialer.clone(), format!("{client_id_prefix}-cmd")),
            context,
            identities: moka::sync::Cache::builder()
                .max_capacity(MAX_RATED_IDENTITIES)
                .time_to_idle(RATED_IDENTITY_IDLE)
                .build(),
        }
    }
}

/// What one connection remembers between its requests.
struct ConnectionState<Principal> {
    /// The first request's `Authorization` (`Some(None)`: it had none).
    authorization: Option<Option<HeaderValue>>,
    /// Requests so far.
    requests: u32,
    /// The last principal admitted on this connection, by client ID, with its tenant.
    admitted: Option<Admitted<Principal>>,
}

struct Admitted<Principal> {
    client_id: String,
    tenant: Arc<str>,
    principal: Principal,
}

/// One answer: the status, the text body, and what goes with it.
struct Answer {
    status: StatusCode,
    body: Bytes,
    /// For a fetched command: its client topic.
    topic: Option<String>,
    retry_after: Option<Duration>,
    close: bool,
    /// The tenant, for the metrics label (empty: unknown).
    tenant: Arc<str>,
}

impl Answer {
    fn new(status: StatusCode, body: impl Into<String>) -> Answer {
        Answer {
            status,
            body: Bytes::from(body.into()),
            topic: None,
            retry_after: None,
            close: false,
            tenant: Arc::from(""),
        }
    }

    fn closing(mut self) -> Answer {
        self.close = true;
        self
    }

    fn retry_after(mut self, wait: Duration) -> Answer {
        self.retry_after = Some(wait);
        self
    }

    fn tenant(mut self, tenant: &Arc<str>) -> Answer {
        self.tenant = tenant.clone();
        self
    }
}

/// Serves one HTTP connection until it closes, `shutdown` turns true (the request under way is
/// answered first), or a limit ends it.
pub async fn serve<P: Profile, D: Dial, S: ClientStream>(
    mut stream: S,
    info: ConnectionInfo,
    front: Arc<HttpFront<P, D>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(_slot) = front.context.slots.try_take() else {
        front.context.metrics.limit("", "process_connections");
        let write = tokio::time::timeout(
            front.context.limits.write_timeout,
            stream.write_all(NO_SLOT_RESPONSE),
        );
        let _ = write.await;
        return;
    };
    let limits = &front.context.limits;
    let state = Arc::new(Mutex::new(ConnectionState {
        authorization: None,
        requests: 0,
        admitted: None,
    }));
    let peer = info.peer;
    let info = Arc::new(info);
    let service = {
        let front = front.clone();
        service_fn(move |request: Request<Incoming>| {
            let (front, state, info) = (front.clone(), state.clone(), info.clone());
            async move {
                let mut state = state.lock().await;
                Ok::<_, Infallible>(front.handle(&info, &mut state, request).await)
            }
        })
    };
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.connect_timeout)
        .max_buf_size(limits.http_max_header_bytes)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let mut draining = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    debug!(%peer, %error, "HTTP connection ended");
                }
                return;
            }
            _ = shutdown.wait_for(|stop| *stop), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

impl<P: Profile, D: Dial> HttpFront<P, D> {
    async fn handle(
        &self,
        info: &ConnectionInfo,
        state: &mut ConnectionState<P::Principal>,
        request: Request<Incoming>,
    ) -> Response<Full<Bytes>> {
        state.requests = state.requests.saturating_add(1);
        let last = state.requests >= self.context.limits.http_max_requests_per_connection;
        let mut answer = self.answer(info, state, request).await;
        answer.close |= last;
        self.context
            .metrics
            .http_request(&answer.tenant, answer.status.as_u16());
        let mut response = Response::new(Full::new(answer.body));
        *response.status_mut() = answer.status;
        let headers = response.headers_mut();
        match answer
            .topic
            .and_then(|topic| HeaderValue::from_str(&topic).ok())
        {
            Some(topic) => {
                headers.insert(TOPIC_HEADER, topic);
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
            }
            None => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
            }
        }
        if let Some(wait) = answer.retry_after {
            // Whole seconds, rounded up: a client that waits that long finds the tokens.
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if answer.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(REALM));
        }
        if answer.status == StatusCode::METHOD_NOT_ALLOWED {
            headers.insert(header::ALLOW, HeaderValue::from_static("POST"));
        }
        if answer.close {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }

    /// The answer to a refusal: the status of its cause and the profile's closing code, counted
    /// and logged like the same refusal of an MQTT client.
    fn refused(&self, refusal: &Refusal, tenant: &Arc<str>, client_id: &str) -> Answer {
        let profile = &*self.context.profile;
        let metrics = &self.context.metrics;
        let code = profile.code(refusal.cause);
        match limit_name(refusal.cause) {
            Some(limit) => metrics.limit(tenant, limit),
            None if refusal.cause == Cause::NotAuthorized => metrics.denial(tenant, refusal.rule()),
            None => {}
        }
        let reason = code.reason_string(refusal);
        if let Some(suppressed) = refusal_log_budget() {
            info!(code = code.number, reason = %reason, client_id, suppressed, "HTTP request refused");
        }
        let mut answer =
            Answer::new(status_of(refusal), format!("{} {reason}\n", code.number)).tenant(tenant);
        if answer.status == StatusCode::SERVICE_UNAVAILABLE {
            answer = answer.retry_after(Duration::from_secs(1));
        }
        answer
    }

    async fn answer(
        &self,
        info: &ConnectionInfo,
        state: &mut ConnectionState<P::Principal>,
        request: Request<Incoming>,
    ) -> Answer {
        let no_tenant: Arc<str> = Arc::from("");
        let known_tenant = state
            .admitted
            .as_ref()
            .map_or_else(|| no_tenant.clone(), |a| a.tenant.clone());
        // 175 first: a connection is authorized once.
        let authorization = request.headers().get(header::AUTHORIZATION).cloned();
        match &state.authorization {
            None => state.authorization = Some(authorization.clone()),
            Some(first) if *first != authorization => {
                let refusal = Refusal::new(Cause::AuthorizationChanged);
                let code = self.context.profile.code(refusal.cause);
                self.context.metrics.close(code.number, &known_tenant);
                return self.refused(&refusal, &known_tenant, "").closing();
            }
            Some(_) => {}
        }
        if request.method() != Method::POST {
            return Answer::new(StatusCode::METHOD_NOT_ALLOWED, "only POST is served\n");
        }
        let (username, password) = match basic_credentials(request.headers()) {
            Ok(credentials) => credentials,
            Err(what) => return Answer::new(StatusCode::BAD_REQUEST, format!("{what}\n")),
        };
        let headers = request.headers();
        let host = header_str(headers, header::HOST).or(request.uri().host());
        let route = self.context.profile.http_route(&HttpRequest {
            path: request.uri().path(),
            host,
            username: username.as_deref(),
            content_type: header_str(headers, header::CONTENT_TYPE),
        });
        let route = match route {
            Ok(route) => route,
            Err(HttpRouteError::NotFound) => {
                return Answer::new(StatusCode::NOT_FOUND, "no such API path\n")
            }
            Err(HttpRouteError::BadRequest(what)) => {
                return Answer::new(StatusCode::BAD_REQUEST, format!("{what}\n"))
            }
            Err(HttpRouteError::UnsupportedMediaType) => {
                return Answer::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Content-Type is application/json, text/plain, application/xml or application/octet-stream\n",
                )
            }
            Err(HttpRouteError::Refused(refusal)) => {
                return self.refused(&refusal, &no_tenant, "")
            }
        };

        let fresh = state.admitted.as_ref().is_some_and(|admitted| {
            admitted.client_id == route.client_id
                && !self.context.profile.stale(&admitted.principal)
        });
        if !fresh {
            state.admitted = None;
            // Each authentication counts as a CONNECT from the address (limits.connect_rate_per_
            // address), so that HTTP is no cheaper a way to guess tokens. Not per client ID: many
            // callers (serverless functions) may share one API key.
            if let Err(exceeded) = self.context.connect_rates.check_address(info.peer.ip()) {
                self.context.metrics.limit("", "connect_rate");
                return Answer::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("authentication rate exceeded: {exceeded:?}\n"),
                )
                .retry_after(Duration::from_secs(1));
            }
            let connect = Connect {
                version: ProtocolVersion::V311,
                clean_start: true,
                keep_alive: 0,
                properties: Vec::new(),
                client_id: &route.client_id,
                will: None,
                username: route.username.as_deref(),
                password: password.as_deref(),
            };
            match self.admit(&connect, info).await {
                Ok(admitted) => state.admitted = Some(admitted),
                Err((refusal, tenant)) => return self.refused(&refusal, &tenant, &route.client_id),
            }
        }
        let Some(admitted) = &state.admitted else {
            return Answer::new(StatusCode::SERVICE_UNAVAILABLE, "no principal\n");
        };
        let tenant = &admitted.tenant;
        let principal = &admitted.principal;
        let profile = &*self.context.profile;
        match route.action {
            HttpAction::Publish { topic } => {
                if let Err(refusal) = profile.check_publish(principal, &topic) {
                    return self.refused(&refusal, tenant, &route.client_id);
                }
                let limits = profile.limits(principal);
                self.publish(
                    request,
                    &route.client_id,
                    tenant,
                    principal,
                    &limits,
                    &topic,
                )
                .await
            }
            HttpAction::FetchCommand { filter } => {
                if let Err(refusal) = profile.check_subscribe(principal, &filter) {
                    return self.refused(&refusal, tenant, &route.client_id);
                }
                self.fetch(&route.client_id, tenant, principal, &filter)
                    .await
            }
        }
    }

    /// Identifies and authenticates a request as the CONNECT it stands for.
    async fn admit(
        &self,
        connect: &Connect<'_>,
        info: &ConnectionInfo,
    ) -> Result<Admitted<P::Principal>, (Refusal, Arc<str>)> {
        let profile = &*self.context.profile;
        let claim = profile
            .identify(connect, info)
            .map_err(|refusal| (refusal, Arc::from("")))?;
        let tenant: Arc<str> = Arc::from(profile.tenant(&claim));
        let started = std::time::Instant::now();
        let authenticated = profile.authenticate(&claim, connect, info).await;
        self.context.metrics.auth_latency(started.elapsed());
        let principal = authenticated.map_err(|refusal| (refusal, tenant.clone()))?;
        Ok(Admitted {
            client_id: connect.client_id.to_owned(),
            tenant,
            principal,
        })
    }

    async fn publish(
        &self,
        request: Request<Incoming>,
        client_id: &str,
        tenant: &Arc<str>,
        principal: &P::Principal,
        limits: &SessionLimits,
        topic: &str,
    ) -> Answer {
        let max_body = limits
            .max_payload_bytes
            .min(self.context.limits.max_packet_bytes);
        let too_large = || Refusal::with_detail(Cause::MessageTooLarge, "HTTP body");
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max_body as u64) {
            return self.refused(&too_large(), tenant, client_id).closing();
        }
        let body_deadline = self.context.limits.connect_timeout;
        let collected = tokio::time::timeout(
            body_deadline,
            Limited::new(request.into_body(), max_body).collect(),
        )
        .await;
        let payload = match collected {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(error)) if error.is::<LengthLimitError>() => {
                return self.refused(&too_large(), tenant, client_id).closing();
            }
            Ok(Err(_)) => {
                return Answer::new(StatusCode::BAD_REQUEST, "the body did not arrive whole\n")
                    .tenant(tenant)
                    .closing()
            }
            Err(_) => {
                self.context.metrics.limit(tenant, "http_body_deadline");
                return Answer::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {body_deadline:?}\n"),
                )
                .tenant(tenant)
                .closing();
            }
        };
        if let Some(wait) = self.rate_wait(client_id, tenant, limits, payload.len()) {
            self.context.metrics.limit(tenant, "publish_rate");
            return Answer::new(StatusCode::TOO_MANY_REQUESTS, "publish rate exceeded\n")
                .tenant(tenant)
                .retry_after(wait);
        }
        let mut terms = self.context.profile.terms(principal);
        terms.topics =
            std::mem::take(&mut terms.topics).escaping(self.context.capabilities.escaped);
        let broker_topic = match terms.topics.to_broker_string(topic) {
            Ok(broker_topic) => broker_topic,
            Err(error) => {
                let refusal = Refusal::with_detail(Cause::InvalidTopic, error.to_string());
                return self.refused(&refusal, tenant, client_id);
            }
        };
        let qos = limits.max_qos.min(1);
        let size = payload.len() as u64;
        match self
            .publisher
            .publish(tenant, broker_topic, payload, qos)
            .await
        {
            Ok(()) => {
                let metrics = &self.context.metrics;
                metrics.messages_in.inc();
                metrics.bytes_in.inc_by(size);
                Answer::new(StatusCode::OK, "").tenant(tenant)
            }
            Err(error) => {
                let refusal = Refusal::with_detail(Cause::ServerUnavailable, error.to_string());
                let answer = self.refused(&refusal, tenant, client_id);
                if error == PublishError::Busy {
                    self.context.metrics.limit(tenant, "http_publisher_queue");
                }
                answer
            }
        }
    }

    /// Takes a waiting command for the client filter (204 when none).
    async fn fetch(
        &self,
        client_id: &str,
        tenant: &Arc<str>,
        principal: &P::Principal,
        filter: &str,
    ) -> Answer {
        let mut terms = self.context.profile.terms(principal);
        terms.topics =
            std::mem::take(&mut terms.topics).escaping(self.context.capabilities.escaped);
        let broker_filter = match terms.topics.filter_to_broker(filter) {
            Ok(parts) => String::from_utf8_lossy(&parts.concat()).into_owned(),
            Err(error) => {
                let refusal = Refusal::with_detail(Cause::InvalidTopic, error.to_string());
                return self.refused(&refusal, tenant, client_id);
            }
        };
        // Commands the profile would not deliver to this client are passed over, as they
        // would be over MQTT.
        for _ in 0..=commands::MAILBOX_COMMANDS {
            let command = match self.mailboxes.fetch(tenant, &broker_filter).await {
                Ok(Some(command)) => command,
                Ok(None) => return Answer::new(StatusCode::NO_CONTENT, "").tenant(tenant),
                Err(error) => {
                    if error == FetchError::Full {
                        self.context.metrics.limit(tenant, "http_command_mailboxes");
                    }
                    let refusal = Refusal::with_detail(Cause::ServerUnavailable, error.to_string());
                    return self.refused(&refusal, tenant, client_id);
                }
            };
            let Some(rest) = terms.topics.client_rest(&command.topic) else {
                continue;
            };
            if !self
                .context
                .profile
                .may_deliver(principal, &rest, &command.payload)
            {
                continue;
            }
            let Some(client_topic) = terms.topics.to_client(&command.topic) else {
                continue;
            };
            let metrics = &self.context.metrics;
            metrics.messages_out.inc();
            metrics.bytes_out.inc_by(command.payload.len() as u64);
            let mut answer = Answer::new(StatusCode::OK, "").tenant(tenant);
            answer.topic = Some(String::from_utf8_lossy(&client_topic.concat()).into_owned());
            answer.body = command.payload;
            return answer;
        }
        Answer::new(StatusCode::NO_CONTENT, "").tenant(tenant)
    }

    /// How long the identity or its tenant must wait before this publish fits its rates
    /// (`None`: it fits, and the tokens are taken).
    fn rate_wait(
        &self,
        client_id: &str,
        tenant: &str,
        limits: &SessionLimits,
        bytes: usize,
    ) -> Option<Duration> {
        let now = Instant::now();
        let mut buckets = self
            .identities
            .get_with_by_ref(client_id, || Arc::new(IdentityBuckets::new(limits)));
        if !buckets.fits(limits) {
            // A policy edit changed the rates: start over with the new ones.
            buckets = Arc::new(IdentityBuckets::new(limits));
            self.identities
                .insert(client_id.to_owned(), buckets.clone());
        }
        buckets.publish.try_take(1, now).err().or_else(|| {
            let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
            buckets
                .bytes
                .as_ref()
                .and_then(|bucket| bucket.try_take(bytes, now).err())
                .or_else(|| {
                    let rate = limits.tenant_publish_rate?;
                    self.context
                        .buckets
                        .bucket(tenant, rate)
                        .try_take(1, now)
                        .err()
                })
        })
    }
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// The user name and password of a Basic `Authorization` (both `None` without one).
fn basic_credentials(
    headers: &HeaderMap,
) -> Result<(Option<String>, Option<Vec<u8>>), &'static str> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok((None, None));
    };
    let value = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII")?;
    let (scheme, encoded) = value
        .trim()
        .split_once(' ')
        .ok_or("the Authorization header is not Basic credentials")?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err("only Basic authorization is accepted");
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|_| "the Basic credentials are not valid base64")?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or("the Basic credentials have no ':'")?;
    let username = std::str::from_utf8(&decoded[..colon])
        .map_err(|_| "the Basic user name is not UTF-8")?
        .to_owned();
    Ok((Some(username), Some(decoded[colon + 1..].to_vec())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(authorization: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(authorization).expect("header"),
        );
        headers
    }

    #[test]
    fn basic_credentials_are_decoded_and_bad_ones_refused() {
        // use-token-auth:s3cr:et
        let (user, password) =
            basic_credentials(&headers("Basic dXNlLXRva2VuLWF1dGg6czNjcjpldA==")).expect("valid");
        assert_eq!(user.as_deref(), Some("use-token-auth"));
        assert_eq!(password.as_deref(), Some(&b"s3cr:et"[..]));
        assert_eq!(basic_credentials(&HeaderMap::new()), Ok((None, None)));
        for bad in ["Bearer abc", "Basic", "Basic !!!", "Basic dXNlcg=="] {
            assert!(basic_credentials(&headers(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn refusals_map_to_statuses() {
        assert_eq!(
            status_of(&Refusal::bad_credentials("x")),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status_of(&Refusal::new(Cause::NotAuthorized)),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            status_of(&Refusal::new(Cause::MessageTooLarge)),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            status_of(&Refusal::new(Cause::AuthorizationChanged)),
            StatusCode::BAD_REQUEST
        );
    }
}
