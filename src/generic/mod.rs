//! The generic profile: plain MQTT clients of a tenant (`tenants:` in the policy), governed by
//! the tenant's ordered topic rules, isolated under the tenant's mount on the broker.
//!
//! - Which tenant: the listener's, else the user name's `@tenant` ([`route`]).
//! - Who: a user of the tenant with a hashed token (or a Mosquitto password hash), or an
//!   anonymous client when the tenant admits them.
//! - What: [`crate::policy::rules`] decides every PUBLISH, SUBSCRIBE filter and delivery; the
//!   deciding rule's `file:line` is the refusal's detail, so the log line and the MQTT 5 reason
//!   string name it.
//! - Isolation: every topic goes under the mount (`$share/GROUP/` stays in front of it), and the
//!   client ID is `TENANT/ID` at the broker and in admission, so tenants never take each other's
//!   client IDs over. A zero-length client ID gets an assigned one.
//!
//! Closing codes are WIoTP's table ([`crate::wiotp::codes`]): one vocabulary for the process.

pub mod explain;
pub mod glob;
pub mod import;

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::{AuthError, Verifier};
use crate::codec::{Connect, ProtocolVersion};
use crate::policy::rules::{self, Action, Applicable, Decision, Subject};
use crate::policy::{OnRateExceeded, OnViolation, PolicyStore, Retained, Tenant, TenantUser};
use crate::profile::{
    settled_after_restart, ConnectTerms, Counters, Profile, Publication, RateAction, SessionLimits,
    Settlement,
};
use crate::refusal::{Cause, Code, Refusal};
use crate::rewrite::TopicMap;
use crate::transport::ConnectionInfo;
use crate::wiotp::status::{iso_time, protocol_name};

/// The prefix of an assigned client ID (followed by 16 random hex digits).
pub const ASSIGNED_PREFIX: &str = "auto-";

/// Which tenant a CONNECT is for, and under which user name: the listener's tenant, else the
/// user name `user@tenant` (split at the last `@`). `None`: neither applies.
pub fn route<'a>(
    connect: &Connect<'a>,
    connection: &'a ConnectionInfo,
) -> Option<(&'a str, Option<&'a str>)> {
    if let Some(tenant) = connection.tenant.as_deref() {
        // `user@tenant` of the listener's own tenant is the same user.
        let user = connect.username.map(|user| {
            user.strip_suffix(tenant)
                .and_then(|rest| rest.strip_suffix('@'))
                .unwrap_or(user)
        });
        return Some((tenant, user));
    }
    let (user, tenant) = connect.username?.rsplit_once('@')?;
    Some((tenant, Some(user)))
}

/// The generic profile: the policy's tenants and the token verifier.
#[derive(Debug)]
pub struct Generic {
    policy: Arc<PolicyStore>,
    verifier: Arc<Verifier>,
}

/// A CONNECT that names a known tenant.
#[derive(Debug)]
pub struct Claim {
    tenant: Arc<Tenant>,
    /// `None`: no user name (anonymous).
    user: Option<String>,
    client_id: String,
    assigned: bool,
    facts: Facts,
}

/// What events say about the connection.
#[derive(Debug, Clone)]
struct Facts {
    peer: std::net::SocketAddr,
    secure: bool,
    protocol: &'static str,
    common_name: Option<String>,
    connected_at: std::time::SystemTime,
}

/// An admitted client of a generic tenant.
#[derive(Debug)]
pub struct Client {
    tenant: Arc<Tenant>,
    user: String,
    /// The user's entry when admitted (`None`: anonymous), to notice edits.
    entry: Option<TenantUser>,
    client_id: String,
    assigned: bool,
    applicable: Applicable,
    facts: Facts,
    generation: u64,
}

impl Client {
    fn subject(&self) -> Subject<'_> {
        Subject {
            client_id: &self.client_id,
            user: &self.user,
            tenant: &self.tenant.name,
            common_name: self.facts.common_name.as_deref(),
        }
    }

    /// The decision on one request, and the rule that made it.
    pub fn decide(&self, action: Action, topic: &str) -> Decision<'_> {
        self.tenant
            .rules
            .decide(action, topic, &self.subject(), &self.applicable)
    }

    /// The client ID at the broker and in admission: `TENANT/ID`.
    pub fn broker_client_id(&self) -> String {
        format!("{}/{}", self.tenant.name, self.client_id)
    }
}

impl Generic {
    /// The profile over `policy`, verifying tokens with `verifier`.
    pub fn new(policy: Arc<PolicyStore>, verifier: Arc<Verifier>) -> Generic {
        Generic { policy, verifier }
    }

    /// Whether the policy in force has this tenant.
    pub fn knows(&self, tenant: &str) -> bool {
        self.policy.load().0.tenant(tenant).is_some()
    }

    /// The claim of a CONNECT routed to `tenant` (see [`route`]).
    pub fn claim(
        &self,
        tenant: &str,
        user: Option<&str>,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Claim, Refusal> {
        let (policy, _) = self.policy.load();
        let tenant = policy
            .tenant(tenant)
            .cloned()
            .ok_or_else(|| Refusal::with_detail(Cause::NotAuthorized, "unknown tenant"))?;
        let (client_id, assigned) = if connect.client_id.is_empty() {
            // MQTT 3.1 has no zero-length client ID; 3.1.1 only with a clean session.
            match connect.version {
                ProtocolVersion::V31 => {
                    return Err(Refusal::with_detail(
                        Cause::InvalidClientId,
                        "MQTT 3.1 needs a client ID",
                    ))
                }
                ProtocolVersion::V311 if !connect.clean_start => {
                    return Err(Refusal::with_detail(
                        Cause::InvalidClientId,
                        "a zero-length client ID needs a clean session",
                    ))
                }
                _ => {}
            }
            (assigned_client_id(), true)
        } else {
            (connect.client_id.to_owned(), false)
        };
        Ok(Claim {
            tenant,
            user: user.map(str::to_owned),
            client_id,
            assigned,
            facts: Facts {
                peer: connection.peer,
                secure: connection.secure,
                protocol: protocol_name(connect.version, connection.websocket),
                common_name: connection.certname.clone(),
                connected_at: connection.connected_at,
            },
        })
    }

    /// A refused request, marked with what the tenant does about it.
    fn request_refusal(&self, client: &Client, action: Action, decision: Decision<'_>) -> Refusal {
        let refusal = Refusal::with_detail(Cause::NotAuthorized, decision.describe(action))
            .with_reason_on_ack();
        match client.tenant.on_violation {
            OnViolation::Reject => refusal.keeping_connection(None),
            OnViolation::Disconnect => refusal,
        }
    }

    fn event(
        &self,
        client: &Client,
        action: &str,
        refusal: Option<&Refusal>,
        counters: Counters,
    ) -> Option<Publication> {
        let topic = rules::expand(client.tenant.events.as_deref()?, &client.subject())?;
        let (close_code, reason) = match refusal {
            Some(refusal) => {
                let code = crate::wiotp::codes::code(refusal.cause);
                (code.number, code.reason_string(refusal))
            }
            None => (0, String::new()),
        };
        let event = Event {
            action: action.to_owned(),
            time: iso_time(std::time::SystemTime::now()),
            tenant: client.tenant.name.clone(),
            client_id: client.client_id.clone(),
            user: client.user.clone(),
            client_addr: client.facts.peer.ip().to_string(),
            secure: client.facts.secure,
            protocol: client.facts.protocol.to_owned(),
            connect_time: iso_time(client.facts.connected_at),
            close_code,
            reason,
            read_bytes: counters.read_bytes,
            read_msg: counters.read_msg,
            write_bytes: counters.write_bytes,
            write_msg: counters.write_msg,
        };
        Some(Publication {
            topic: format!("{}{topic}", client.tenant.mount),
            payload: Bytes::from(serde_json::to_vec(&event).ok()?),
            retain: false,
        })
    }
}

/// The filter a subscription is decided on: a shared subscription's own filter (its group
/// lives inside the mount), else the filter itself.
pub fn shared_filter(filter: &str) -> Result<&str, Refusal> {
    match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, filter)) if !group.is_empty() && !filter.is_empty() => Ok(filter),
            _ => Err(Refusal::with_detail(
                Cause::InvalidTopic,
                "a shared subscription is $share/GROUP/FILTER",
            )
            .v5(0x8F)),
        },
        None => Ok(filter),
    }
}

/// A random client ID for a client that sent none.
fn assigned_client_id() -> String {
    format!("{ASSIGNED_PREFIX}{:016x}", rand::random::<u64>())
}

/// A lifecycle event.
#[derive(Debug, Serialize, Deserialize)]
struct Event {
    #[serde(rename = "Action")]
    action: String,
    #[serde(rename = "Time")]
    time: String,
    #[serde(rename = "Tenant")]
    tenant: String,
    #[serde(rename = "ClientID")]
    client_id: String,
    #[serde(rename = "User")]
    user: String,
    #[serde(rename = "ClientAddr")]
    client_addr: String,
    #[serde(rename = "Secure")]
    secure: bool,
    #[serde(rename = "Protocol")]
    protocol: String,
    #[serde(rename = "ConnectTime")]
    connect_time: String,
    #[serde(rename = "CloseCode")]
    close_code: u16,
    #[serde(rename = "Reason")]
    reason: String,
    #[serde(rename = "ReadBytes")]
    read_bytes: u64,
    #[serde(rename = "ReadMsg")]
    read_msg: u64,
    #[serde(rename = "WriteBytes")]
    write_bytes: u64,
    #[serde(rename = "WriteMsg")]
    write_msg: u64,
}

/// What the ledger keeps for a generic session: its presence and the Disconnect event owed.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    generic: String,
    topic: Option<String>,
    event: Option<Event>,
}

/// Whether `user` may use `client_id`.
fn client_id_allowed(entry: &TenantUser, client_id: &str, assigned: bool) -> bool {
    entry.client_ids.is_empty()
        || (!assigned && entry.client_ids.iter().any(|p| glob::matches(p, client_id)))
}

/// The user of a claim under the tenant as it is now: the entry, or why not.
fn admit_user<'t>(
    tenant: &'t Tenant,
    user: Option<&str>,
    client_id: &str,
    assigned: bool,
) -> Result<Option<&'t TenantUser>, Refusal> {
    let Some(user) = user else {
        return if tenant.anonymous {
            Ok(None)
        } else {
            Err(Refusal::with_detail(
                Cause::NotAuthorized,
                "this tenant admits no anonymous clients",
            ))
        };
    };
    let entry = tenant
        .users
        .get(user)
        .ok_or_else(|| Refusal::bad_credentials("unknown user or wrong password"))?;
    if !entry.enabled {
        return Err(Refusal::with_detail(
            Cause::NotAuthorized,
            "the user is disabled",
        ));
    }
    if !client_id_allowed(entry, client_id, assigned) {
        return Err(Refusal::with_detail(
            Cause::InvalidClientId,
            "this client ID is not allowed for the user",
        ));
    }
    Ok(Some(entry))
}

impl Profile for Generic {
    type Claim = Claim;
    type Principal = Client;

    fn code(&self, cause: Cause) -> Code {
        crate::wiotp::codes::code(cause)
    }

    fn identify(
        &self,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Claim, Refusal> {
        let (tenant, user) = route(connect, connection).ok_or_else(|| {
            Refusal::with_detail(
                Cause::NotAuthorized,
                "no tenant: connect to a tenant's listener or log in as user@tenant",
            )
        })?;
        self.claim(tenant, user, connect, connection)
    }

    fn tenant<'a>(&self, claim: &'a Claim) -> &'a str {
        &claim.tenant.name
    }

    async fn authenticate(
        &self,
        claim: &Claim,
        connect: &Connect<'_>,
        _connection: &ConnectionInfo,
    ) -> Result<Client, Refusal> {
        let generation = self.policy.generation();
        let tenant = &claim.tenant;
        let entry = admit_user(
            tenant,
            claim.user.as_deref(),
            &claim.client_id,
            claim.assigned,
        )?;
        if let Some(entry) = entry {
            let password = connect
                .password
                .ok_or_else(|| Refusal::bad_credentials("a password is required"))?;
            let key = format!(
                "{}/{}",
                tenant.name,
                claim.user.as_deref().unwrap_or_default()
            );
            match self.verifier.verify(&key, &entry.token, password).await {
                Ok(true) => {}
                Ok(false) => {
                    return Err(Refusal::bad_credentials("unknown user or wrong password"))
                }
                Err(AuthError::Busy) => return Err(Refusal::new(Cause::AuthenticationBusy)),
                Err(AuthError::Hashing) => {
                    return Err(Refusal::with_detail(
                        Cause::NotAuthorized,
                        "password verification failed",
                    ))
                }
            }
        }
        let user = claim.user.clone().unwrap_or_default();
        let groups = entry.map(|e| e.groups.as_slice()).unwrap_or_default();
        let client = Client {
            applicable: tenant.rules.applicable(&user, groups),
            tenant: tenant.clone(),
            user,
            entry: entry.cloned(),
            client_id: claim.client_id.clone(),
            assigned: claim.assigned,
            facts: claim.facts.clone(),
            generation,
        };
        if let Some(will) = &connect.will {
            let decision = client.decide(Action::Publish, will.topic);
            if !decision.allowed() {
                return Err(Refusal::with_detail(
                    Cause::NotAuthorized,
                    format!("will: {}", decision.describe(Action::Publish)),
                ));
            }
            if will.retain && tenant.retained == Retained::Deny {
                return Err(Refusal::with_detail(
                    Cause::NotAuthorized,
                    "retained wills are refused",
                )
                .v5(0x9A));
            }
        }
        Ok(client)
    }

    fn terms(&self, client: &Client) -> ConnectTerms {
        let broker_id = client.broker_client_id();
        ConnectTerms {
            tenant: client.tenant.name.as_str().into(),
            max_tenant_connections: client.tenant.limits.max_connections,
            takeover: true,
            presence: broker_id.clone().into(),
            topics: TopicMap::new("", &client.tenant.mount, "").with_client_shares(),
            unique_upstream_session: false,
            force_clean_start: false,
            keep_alive: None,
            broker_client_id: Some(broker_id.into()),
            assigned_client_id: client.assigned.then(|| client.client_id.as_str().into()),
        }
    }

    fn limits(&self, client: &Client) -> SessionLimits {
        let tenant = &client.tenant;
        let limits = &tenant.limits;
        SessionLimits {
            max_payload_bytes: limits.max_payload_bytes,
            max_subscriptions: limits.max_subscriptions.application as usize,
            publish_rate: limits.publish_rate.application,
            byte_rate: limits.byte_rate.application,
            tenant_publish_rate: limits.org_publish_rate,
            subscribe_rate: limits.subscribe_rate,
            on_rate_exceeded: match tenant.on_rate_exceeded {
                OnRateExceeded::Backpressure => RateAction::Backpressure,
                OnRateExceeded::Disconnect => RateAction::Disconnect,
            },
            strip_retained: tenant.retained == Retained::Strip,
            refuse_retained: tenant.retained == Retained::Deny,
            max_qos: 2,
        }
    }

    fn check_publish(&self, client: &Client, topic: &str) -> Result<(), Refusal> {
        let decision = client.decide(Action::Publish, topic);
        if decision.allowed() {
            Ok(())
        } else {
            Err(self.request_refusal(client, Action::Publish, decision))
        }
    }

    fn check_subscribe(&self, client: &Client, filter: &str) -> Result<(), Refusal> {
        let filter = shared_filter(filter)?;
        let decision = client.decide(Action::Subscribe, filter);
        if decision.allowed() {
            Ok(())
        } else {
            Err(self.request_refusal(client, Action::Subscribe, decision))
        }
    }

    fn may_deliver(&self, client: &Client, topic: &str, _payload: &[u8]) -> bool {
        client.decide(Action::Receive, topic).allowed()
    }

    fn stale(&self, client: &Client) -> bool {
        self.policy.generation() != client.generation
    }

    fn reevaluate(&self, client: &Client) -> Result<Client, Refusal> {
        let (policy, generation) = self.policy.load();
        let revoked = |detail: &'static str| Refusal::with_detail(Cause::Revoked, detail);
        let tenant = policy
            .tenant(&client.tenant.name)
            .cloned()
            .ok_or_else(|| revoked("the tenant was removed"))?;
        let user = client.entry.as_ref().map(|_| client.user.as_str());
        let entry = admit_user(&tenant, user, &client.client_id, client.assigned)
            .map_err(|_| revoked("the user is no longer admitted"))?;
        if entry.map(|e| &e.token) != client.entry.as_ref().map(|e| &e.token) {
            return Err(revoked("the user's token changed"));
        }
        let groups = entry.map(|e| e.groups.as_slice()).unwrap_or_default();
        Ok(Client {
            applicable: tenant.rules.applicable(&client.user, groups),
            entry: entry.cloned(),
            tenant,
            user: client.user.clone(),
            client_id: client.client_id.clone(),
            assigned: client.assigned,
            facts: client.facts.clone(),
            generation,
        })
    }

    fn failed_connect(
        &self,
        _claim: &Claim,
        _refusal: &Refusal,
        _counters: Counters,
    ) -> Vec<Publication> {
        Vec::new()
    }

    fn connected(&self, client: &Client, counters: Counters) -> Vec<Publication> {
        self.event(client, "Connect", None, counters)
            .into_iter()
            .collect()
    }

    fn disconnected(
        &self,
        client: &Client,
        refusal: &Refusal,
        counters: Counters,
        _last_of_presence: bool,
    ) -> Vec<Publication> {
        self.event(client, "Disconnect", Some(refusal), counters)
            .into_iter()
            .collect()
    }

    fn settlement(&self, client: &Client, counters: Counters) -> Vec<u8> {
        // Its close, reason and time are filled in when it is settled (`settle_as`).
        let owed = self.event(
            client,
            "Disconnect",
            Some(&settled_after_restart()),
            counters,
        );
        let entry = Entry {
            generic: client.broker_client_id(),
            topic: owed.as_ref().map(|p| p.topic.clone()),
            event: owed.and_then(|p| serde_json::from_slice(&p.payload).ok()),
        };
        serde_json::to_vec(&entry).unwrap_or_default()
    }

    fn settle(&self, entry: &[u8]) -> Option<Settlement> {
        self.settle_as(entry, &settled_after_restart())
    }

    /// The Disconnect event kept at connect time, closed with `refusal` now: a restart's
    /// settlement, another instance's for a stopped one, or a takeover's 288.
    fn settle_as(&self, entry: &[u8], refusal: &Refusal) -> Option<Settlement> {
        let entry: Entry = serde_json::from_slice(entry).ok()?;
        let publications = match (entry.topic, entry.event) {
            (Some(topic), Some(mut event)) => {
                let code = crate::wiotp::codes::code(refusal.cause);
                event.close_code = code.number;
                event.reason = code.reason_string(refusal);
                event.time = iso_time(std::time::SystemTime::now());
                vec![Publication {
                    topic,
                    payload: Bytes::from(serde_json::to_vec(&event).ok()?),
                    retain: false,
                }]
            }
            _ => Vec::new(),
        };
        Some(Settlement {
            presence: entry.generic,
            publications,
        })
    }
}

#[cfg(test)]
mod tests;
