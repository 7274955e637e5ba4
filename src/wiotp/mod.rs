//! The WIoTP profile: IBM Watson IoT Platform's messaging contract as a [`Profile`].
//!
//! - [`identity`]: the client-ID grammar (`a:`, `A:`, `d:`, `g:`).
//! - [`admit`]: security modes, certificates and credentials at CONNECT.
//! - [`topics`]: the `iot-2` grammar and each identity's topic rewrite, with the `$share` group
//!   of scalable applications.
//! - [`principal`]: roles, groups, gateways and quickstart: what an identity may do.
//! - [`status`]: monitoring messages, their retain rules, `notify`, and ledger entries.
//! - [`codes`]: the closing-code table.
//! - [`http`]: the HTTP messaging API's paths, in MQTT terms.
//!
//! The session knows none of this; it calls the hooks below.

pub mod admit;
pub mod codes;
pub mod http;
pub mod identity;
pub mod principal;
pub mod status;
pub mod topics;

use std::sync::Arc;

use tracing::Instrument;

use self::identity::{parse_client_id, ClientClass, Identity};
use self::principal::Principal;
use self::status::{Action, ConnectionFacts, MonitorMessage};
use self::topics::{org_prefix, parse_iot2, topic_map};
use crate::auth::Verifier;
use crate::codec::Connect;
use crate::policy::{OnRateExceeded, OnViolation, Org, PerClass, PolicyStore};
use crate::profile::{
    ConnectTerms, Counters, HttpRequest, HttpRoute, HttpRouteError, Profile, Publication,
    RateAction, Request, SessionLimits, Settlement,
};
use crate::refusal::{Cause, Code, Refusal};
use crate::transport::ConnectionInfo;

/// The longest keep-alive a scalable application may use, in seconds (0 becomes this too).
pub const MAX_SCALABLE_KEEP_ALIVE_SECS: u16 = 3600;

/// The value of a per-class limit for a client class.
pub fn for_class<T: Copy>(values: &PerClass<T>, class: ClientClass) -> T {
    match class {
        ClientClass::Device => values.device,
        ClientClass::Gateway => values.gateway,
        ClientClass::Application | ClientClass::ScalableApplication => values.application,
    }
}

/// The WIoTP profile: the policy's orgs, the token verifier and the org prefix template.
#[derive(Debug)]
pub struct Wiotp {
    policy: Arc<PolicyStore>,
    verifier: Arc<Verifier>,
    topic_prefix: String,
}

impl Wiotp {
    /// The profile over `policy`, verifying tokens with `verifier`, with every org under
    /// `topic_prefix` (`{org}` is replaced by the org ID) on the broker.
    pub fn new(policy: Arc<PolicyStore>, verifier: Arc<Verifier>, topic_prefix: &str) -> Wiotp {
        Wiotp {
            policy,
            verifier,
            topic_prefix: topic_prefix.to_owned(),
        }
    }

    /// Marks a refusal of a request with what the org does about it. Gateways keep their
    /// connection (and are told on `notify`); quickstart refuses without closing, because the
    /// WIoTP SDKs' devices subscribe to commands on every connect and quickstart has none.
    fn request_refusal(
        &self,
        client: &Client,
        topic: &str,
        request: Request,
        refusal: Refusal,
    ) -> Refusal {
        let principal = &client.principal;
        let keeps = principal.identity.class == ClientClass::Gateway
            || principal.org.quickstart
            || principal.org.on_violation == OnViolation::Reject;
        if !keeps {
            return refusal;
        }
        // A topic outside the namespace is invalid for the client (0x90 / 0x8F), not forbidden.
        let ack = match (parse_iot2(topic).is_none(), request) {
            (true, Request::Publish) => Some(0x90),
            (true, Request::Subscribe) => Some(0x8F),
            (false, _) => None,
        };
        refusal.keeping_connection(ack)
    }
}

/// A CONNECT that names a known org.
#[derive(Debug)]
pub struct Claim {
    identity: Identity,
    org: Arc<Org>,
    facts: ConnectionFacts,
    org_prefix: String,
}

/// An admitted WIoTP client: the per-connection context of the profile's hooks.
#[derive(Debug)]
pub struct Client {
    principal: Principal,
    facts: ConnectionFacts,
    org_prefix: String,
    /// The policy generation the principal was checked against.
    generation: u64,
}

impl Client {
    /// The rules this client is held to.
    pub fn principal(&self) -> &Principal {
        &self.principal
    }

    fn message(
        &self,
        action: Action,
        close: Option<&Refusal>,
        counters: Counters,
    ) -> MonitorMessage {
        MonitorMessage::new(
            action,
            &self.principal.identity,
            &self.facts,
            close,
            counters,
        )
    }
}

impl Profile for Wiotp {
    type Claim = Claim;
    type Principal = Client;

    fn code(&self, cause: Cause) -> Code {
        codes::code(cause)
    }

    fn http_route(&self, request: &HttpRequest<'_>) -> Result<HttpRoute, HttpRouteError> {
        http::route(request)
    }

    fn identify(
        &self,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Claim, Refusal> {
        let identity = parse_client_id(connect.client_id)
            .map_err(|error| Refusal::with_detail(Cause::InvalidClientId, error.to_string()))?;
        let (policy, _) = self.policy.load();
        // An unknown org gets no monitoring message: its topic space does not exist.
        let org = policy
            .org(&identity.org)
            .cloned()
            .ok_or_else(|| Refusal::with_detail(Cause::NotAuthorized, "unknown org"))?;
        let facts = ConnectionFacts {
            peer: connection.peer,
            local: connection.local,
            secure: connection.secure,
            protocol: status::protocol_name(connect.version, connection.websocket),
            user: connect.username.map(str::to_owned),
            certname: connection.certname.clone(),
            connected_at: connection.connected_at,
        };
        Ok(Claim {
            org_prefix: org_prefix(&identity.org, &self.topic_prefix),
            identity,
            org,
            facts,
        })
    }

    fn tenant<'a>(&self, claim: &'a Claim) -> &'a str {
        &claim.org.id
    }

    async fn authenticate(
        &self,
        claim: &Claim,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Client, Refusal> {
        let generation = self.policy.generation();
        let span = tracing::info_span!(
            "authenticate",
            class = claim.identity.class.name(),
            code = tracing::field::Empty
        );
        let admitted = async {
            let principal = admit::authenticate(
                &self.verifier,
                &claim.identity,
                &claim.org,
                connect,
                connection,
            )
            .await?;
            admit::check_connect_options(connect, &principal)?;
            Ok(principal)
        }
        .instrument(span.clone())
        .await;
        span.record(
            "code",
            admitted
                .as_ref()
                .map_or_else(|refusal: &Refusal| codes::code(refusal.cause).number, |_| 0),
        );
        let principal = admitted?;
        Ok(Client {
            principal,
            facts: claim.facts.clone(),
            org_prefix: claim.org_prefix.clone(),
            generation,
        })
    }

    fn terms(&self, client: &Client) -> ConnectTerms {
        let principal = &client.principal;
        let identity = &principal.identity;
        let scalable = identity.class == ClientClass::ScalableApplication;
        ConnectTerms {
            tenant: principal.org.id.as_str().into(),
            max_tenant_connections: principal.org.limits.max_connections,
            // Connections of one scalable application share its client ID on purpose.
            takeover: !scalable,
            presence: status::presence(identity).into(),
            topics: topic_map(identity, &client.org_prefix),
            // They share the broker's shared subscription, not a session.
            unique_upstream_session: scalable,
            force_clean_start: principal.org.quickstart,
            keep_alive: scalable.then_some(1..=MAX_SCALABLE_KEEP_ALIVE_SECS),
            // WIoTP client IDs name their org already.
            broker_client_id: None,
            assigned_client_id: None,
        }
    }

    fn limits(&self, client: &Client) -> SessionLimits {
        let org = &client.principal.org;
        let limits = &org.limits;
        let class = client.principal.identity.class;
        SessionLimits {
            max_payload_bytes: limits.max_payload_bytes,
            max_subscriptions: for_class(&limits.max_subscriptions, class) as usize,
            publish_rate: for_class(&limits.publish_rate, class),
            byte_rate: for_class(&limits.byte_rate, class),
            tenant_publish_rate: limits.org_publish_rate,
            subscribe_rate: limits.subscribe_rate,
            on_rate_exceeded: match org.on_rate_exceeded {
                OnRateExceeded::Backpressure => RateAction::Backpressure,
                OnRateExceeded::Disconnect => RateAction::Disconnect,
            },
            strip_retained: org.strip_retained,
            refuse_retained: false,
            // Quickstart is QoS 0 only: higher QoS is downgraded.
            max_qos: if org.quickstart { 0 } else { 2 },
        }
    }

    fn check_publish(&self, client: &Client, topic: &str) -> Result<(), Refusal> {
        client
            .principal
            .check_publish(topic)
            .map_err(|refusal| self.request_refusal(client, topic, Request::Publish, refusal))
    }

    fn check_subscribe(&self, client: &Client, filter: &str) -> Result<(), Refusal> {
        client
            .principal
            .check_subscribe(filter)
            .map_err(|refusal| self.request_refusal(client, filter, Request::Subscribe, refusal))
    }

    fn may_deliver(&self, client: &Client, topic: &str, payload: &[u8]) -> bool {
        // Clearing a retained monitoring message is state housekeeping, not a message.
        if payload.is_empty() && topic.ends_with("/mon") {
            return false;
        }
        client.principal.may_receive(topic)
    }

    fn refused(
        &self,
        client: &Client,
        request: Request,
        topic: &str,
        refusal: &Refusal,
    ) -> Vec<Publication> {
        let identity = &client.principal.identity;
        if identity.class != ClientClass::Gateway {
            return Vec::new();
        }
        vec![status::notification(
            identity,
            &client.org_prefix,
            request,
            topic,
            refusal,
        )]
    }

    fn stale(&self, client: &Client) -> bool {
        self.policy.generation() != client.generation
    }

    fn reevaluate(&self, client: &Client) -> Result<Client, Refusal> {
        let (policy, generation) = self.policy.load();
        Ok(Client {
            principal: client.principal.revalidate(&policy)?,
            facts: client.facts.clone(),
            org_prefix: client.org_prefix.clone(),
            generation,
        })
    }

    fn failed_connect(
        &self,
        claim: &Claim,
        refusal: &Refusal,
        counters: Counters,
    ) -> Vec<Publication> {
        let message = MonitorMessage::new(
            Action::FailedConnect,
            &claim.identity,
            &claim.facts,
            Some(refusal),
            counters,
        );
        status::publications(
            &message,
            &claim.identity,
            &claim.org_prefix,
            claim.org.quickstart,
            false,
        )
    }

    fn connected(&self, client: &Client, counters: Counters) -> Vec<Publication> {
        let message = client.message(Action::Connect, None, counters);
        status::publications(
            &message,
            &client.principal.identity,
            &client.org_prefix,
            client.principal.org.quickstart,
            false,
        )
    }

    fn disconnected(
        &self,
        client: &Client,
        refusal: &Refusal,
        counters: Counters,
        last_of_presence: bool,
    ) -> Vec<Publication> {
        let principal = &client.principal;
        let message = client.message(Action::Disconnect, Some(refusal), counters);
        let clear = last_of_presence
            && status::clears_on_disconnect(principal.identity.class, principal.org.quickstart);
        status::publications(
            &message,
            &principal.identity,
            &client.org_prefix,
            principal.org.quickstart,
            clear,
        )
    }

    fn settlement(&self, client: &Client, counters: Counters) -> Vec<u8> {
        let message = client.message(Action::Connect, None, counters);
        status::entry(message, &client.org_prefix, client.principal.org.quickstart)
    }

    fn settle(&self, entry: &[u8]) -> Option<Settlement> {
        status::settle(entry)
    }

    fn settle_as(&self, entry: &[u8], refusal: &Refusal) -> Option<Settlement> {
        status::settle_as(entry, refusal)
    }
}
