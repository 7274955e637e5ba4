//! The seam between the session machinery and a tenant model: the [`Profile`] trait.
//!
//! The session ([`crate::session`]) knows MQTT: framing, packet ids, in-flight windows, topic
//! aliases, SUBACK merging, timers, rate buckets and the close. A profile knows who clients are,
//! what they may do and what status messages say about them. The session calls the profile at
//! each phase of a connection, in the manner of pingora's `ProxyHttp`, with a per-connection
//! context the profile defines ([`Profile::Principal`]):
//!
//! 1. [`Profile::identify`]: a CONNECT arrived; who does it claim to be, in which tenant?
//! 2. [`Profile::authenticate`]: credentials, certificate, will; admit or refuse.
//! 3. [`Profile::terms`] and [`Profile::limits`]: what the session enforces for the principal.
//! 4. [`Profile::check_publish`], [`Profile::check_subscribe`], [`Profile::may_deliver`] and
//!    [`Profile::refused`] on the data path; [`Profile::reevaluate`] after a policy edit.
//! 5. [`Profile::failed_connect`], [`Profile::connected`] and [`Profile::disconnected`]: the
//!    status messages of each event, and [`Profile::settlement`] / [`Profile::settle`] for the
//!    ones a crash left unsent.
//!
//! Every refusal is a generic [`Refusal`]; [`Profile::code`] turns its cause into the profile's
//! closing code.
//!
//! The HTTP messaging front end ([`crate::http`]) goes through the same hooks: a profile says
//! what an HTTP request stands for in MQTT terms ([`Profile::http_route`]: a client ID, a user
//! name and a topic), and from there the request is identified, authenticated, limited and
//! checked exactly as a CONNECT and a PUBLISH would be. ARCHITECTURE.md ("Writing a profile") lists what the session guarantees.

use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;

use crate::codec::Connect;
use crate::limits::Rate;
use crate::refusal::{Cause, Code, Refusal};
use crate::rewrite::TopicMap;
use crate::transport::ConnectionInfo;

/// How a session is closed when a later start of its own process settles it, after the process
/// died without closing it (the ledger's recovery, or coordination's settlement of an earlier
/// process of the same instance): [`Profile::settle`]'s close.
pub fn settled_after_restart() -> Refusal {
    Refusal::with_detail(Cause::ServerClosed, "settled after a proxy restart")
}

/// One PUBLISH the proxy sends itself (a status message, a notification, a ledger entry), at
/// QoS 0 over the control connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// Broker topic (with any tenant prefix).
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Retain flag.
    pub retain: bool,
}

impl Publication {
    /// Bytes this publication holds while it waits to be sent.
    pub fn size(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// Byte and message counts of one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes read from the client.
    pub read_bytes: u64,
    /// PUBLISH packets read from the client.
    pub read_msg: u64,
    /// Bytes written to the client.
    pub write_bytes: u64,
    /// PUBLISH packets written to the client.
    pub write_msg: u64,
}

/// The kind of client request a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A PUBLISH (or a will).
    Publish,
    /// A SUBSCRIBE filter.
    Subscribe,
}

impl Request {
    /// `Publish` or `Subscribe`.
    pub fn name(self) -> &'static str {
        match self {
            Request::Publish => "Publish",
            Request::Subscribe => "Subscribe",
        }
    }
}

/// What the session does for an admitted principal, fixed for the connection's life.
#[derive(Debug, Clone)]
pub struct ConnectTerms {
    /// The tenant the connection counts against (and labels metrics with).
    pub tenant: Arc<str>,
    /// The tenant's connection quota.
    pub max_tenant_connections: u32,
    /// Whether a newer connection with the same client ID takes this one over. Connections that
    /// share a client ID on purpose (load-balanced applications) do not.
    pub takeover: bool,
    /// Connections with the same presence key share one status: the last of them to close
    /// clears it, and crash recovery skips keys that are live again.
    pub presence: Box<str>,
    /// The topic rewrite.
    pub topics: TopicMap,
    /// Each connection gets a broker client ID of its own (the client's ID, `:`, a session ID
    /// unique across processes), and a clean broker session.
    pub unique_upstream_session: bool,
    /// The broker session starts clean whatever the client asked.
    pub force_clean_start: bool,
    /// The keep-alive the client may have, in seconds: a value outside is replaced by the end
    /// of the range (`None`: any).
    pub keep_alive: Option<RangeInclusive<u16>>,
    /// The client ID at the broker and in admission, when it is not the client's own (a tenant
    /// namespaces its clients' IDs so that tenants never take each other's over).
    pub broker_client_id: Option<Box<str>>,
    /// The client ID the proxy assigned to a client that sent a zero-length one (MQTT 5 clients
    /// are told in the CONNACK).
    pub assigned_client_id: Option<Box<str>>,
}

/// What exceeding a publish rate does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RateAction {
    /// Stop reading the client until tokens refill: nothing is lost.
    #[default]
    Backpressure,
    /// Close the connection.
    Disconnect,
}

/// The limits of a session, read again after every policy edit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionLimits {
    /// Largest PUBLISH payload, in bytes.
    pub max_payload_bytes: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// PUBLISH packets per connection.
    pub publish_rate: Rate,
    /// PUBLISH payload bytes per connection, when limited.
    pub byte_rate: Option<Rate>,
    /// PUBLISH packets of the whole tenant together, when limited.
    pub tenant_publish_rate: Option<Rate>,
    /// SUBSCRIBE and UNSUBSCRIBE filters per connection.
    pub subscribe_rate: Rate,
    /// What exceeding a publish rate does.
    pub on_rate_exceeded: RateAction,
    /// Clear the retain flag of every PUBLISH and will (and do not announce Retain Available).
    pub strip_retained: bool,
    /// Refuse every PUBLISH with the retain flag (MQTT 5: 0x9A Retain not supported, and Retain
    /// Available 0 in the CONNACK).
    pub refuse_retained: bool,
    /// The highest QoS accepted: a higher one is downgraded and completed by the proxy, and the
    /// MQTT 5 CONNACK announces it.
    pub max_qos: u8,
}

/// What a ledger entry left by a crashed process comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settlement {
    /// The presence key of the entry's connection.
    pub presence: String,
    /// The status messages to publish, unless a connection with the same presence is live.
    pub publications: Vec<Publication>,
}

/// An HTTP messaging request as the HTTP front end read it, before its body.
#[derive(Debug, Clone, Copy)]
pub struct HttpRequest<'a> {
    /// The request path (without the query).
    pub path: &'a str,
    /// The `Host` header, when there is one.
    pub host: Option<&'a str>,
    /// The user name of Basic authorization, when there is one.
    pub username: Option<&'a str>,
    /// The `Content-Type` header, when there is one.
    pub content_type: Option<&'a str>,
}

/// What an HTTP request stands for in MQTT terms: who (the client ID and user name of the
/// CONNECT it is treated as; the password is the Basic authorization's) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoute {
    /// The client ID the request is identified and authenticated as.
    pub client_id: String,
    /// The CONNECT user name.
    pub username: Option<String>,
    /// What the request does.
    pub action: HttpAction,
}

/// What an HTTP request does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpAction {
    /// Publish the body to this client topic.
    Publish {
        /// The client topic (checked with [`Profile::check_publish`]).
        topic: String,
    },
    /// Take a waiting command whose client topic matches this filter.
    FetchCommand {
        /// The client filter (checked with [`Profile::check_subscribe`]).
        filter: String,
    },
}

/// Why an HTTP request has no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpRouteError {
    /// No such path (404).
    NotFound,
    /// The path or its headers are not valid (400).
    BadRequest(&'static str),
    /// The content type maps to no format (415).
    UnsupportedMediaType,
    /// Refused by the profile (its cause decides the status).
    Refused(Refusal),
}

/// A tenant model (see the module documentation). Hooks that answer quickly are plain
/// functions; they run on the data path and must not block.
pub trait Profile: Send + Sync + 'static {
    /// Who a CONNECT claims to be, once it names a known tenant (credentials not yet checked).
    type Claim: Send + Sync + 'static;
    /// An admitted client: the context every later hook of the connection gets.
    type Principal: Send + Sync + 'static;

    /// The profile's closing code for a cause.
    fn code(&self, cause: Cause) -> Code;

    /// What an HTTP messaging request stands for. The default: no HTTP API (404).
    fn http_route(&self, request: &HttpRequest<'_>) -> Result<HttpRoute, HttpRouteError> {
        let _ = request;
        Err(HttpRouteError::NotFound)
    }

    /// The first look at a CONNECT: parse the identity and find its tenant. A refusal here
    /// publishes no status message (there is no tenant to publish it in).
    fn identify(
        &self,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Self::Claim, Refusal>;

    /// The tenant a claim belongs to (a metrics label: bounded by the policy).
    fn tenant<'a>(&self, claim: &'a Self::Claim) -> &'a str;

    /// Checks credentials, certificate and the rest of the CONNECT (the will, clean session
    /// rules), and admits the claim.
    fn authenticate(
        &self,
        claim: &Self::Claim,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> impl Future<Output = Result<Self::Principal, Refusal>> + Send;

    /// What the session does for this principal for the connection's life.
    fn terms(&self, principal: &Self::Principal) -> ConnectTerms;

    /// The principal's limits, read at CONNECT and after every policy edit.
    fn limits(&self, principal: &Self::Principal) -> SessionLimits;

    /// May the principal publish to this client topic (also asked for the will)?
    fn check_publish(&self, principal: &Self::Principal, topic: &str) -> Result<(), Refusal>;

    /// May the principal subscribe to this client filter?
    fn check_subscribe(&self, principal: &Self::Principal, filter: &str) -> Result<(), Refusal>;

    /// May this delivery reach the principal? `topic` is the delivery's client topic without
    /// the part the rewrite puts in front. Dropped deliveries are completed with the broker.
    fn may_deliver(&self, principal: &Self::Principal, topic: &str, payload: &[u8]) -> bool {
        let _ = (principal, topic, payload);
        true
    }

    /// A request was refused and the connection stays: what to publish about it (for example a
    /// notification to the client).
    fn refused(
        &self,
        principal: &Self::Principal,
        request: Request,
        topic: &str,
        refusal: &Refusal,
    ) -> Vec<Publication> {
        let _ = (principal, request, topic, refusal);
        Vec::new()
    }

    /// Whether the policy changed since the principal was admitted or last re-evaluated.
    fn stale(&self, principal: &Self::Principal) -> bool {
        let _ = principal;
        false
    }

    /// The principal under the current policy, or the refusal that closes the connection. The
    /// session re-checks every subscription with [`Profile::check_subscribe`] afterwards.
    fn reevaluate(&self, principal: &Self::Principal) -> Result<Self::Principal, Refusal>;

    /// Status messages for a CONNECT refused after [`Profile::identify`].
    fn failed_connect(
        &self,
        claim: &Self::Claim,
        refusal: &Refusal,
        counters: Counters,
    ) -> Vec<Publication>;

    /// Status messages for an established session.
    fn connected(&self, principal: &Self::Principal, counters: Counters) -> Vec<Publication>;

    /// Status messages for a closed session. `last_of_presence` is false while another
    /// connection with the same presence key is live.
    fn disconnected(
        &self,
        principal: &Self::Principal,
        refusal: &Refusal,
        counters: Counters,
        last_of_presence: bool,
    ) -> Vec<Publication>;

    /// What the ledger keeps for an established session, so that a later process can settle it
    /// with [`Profile::settle`] if this one dies without closing it.
    fn settlement(&self, principal: &Self::Principal, counters: Counters) -> Vec<u8>;

    /// The status messages owed for a ledger entry of a process that died. `None` for an entry
    /// that is not this profile's or cannot be read (it is then only cleared).
    fn settle(&self, entry: &[u8]) -> Option<Settlement>;

    /// As [`Profile::settle`], closed with `refusal` instead of [`settled_after_restart`]: another
    /// proxy instance publishes the Disconnect of a session whose own instance did not answer
    /// (a takeover's 288, an instance that stopped).
    fn settle_as(&self, entry: &[u8], refusal: &Refusal) -> Option<Settlement> {
        let _ = refusal;
        self.settle(entry)
    }
}
