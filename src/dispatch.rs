//! The profile the proxy runs: WIoTP orgs and generic tenants side by side, chosen per
//! connection at CONNECT and fixed for its life.
//!
//! A connection is generic when its listener names a tenant, or when its user name is
//! `user@tenant` and the tenant exists (or the client ID is no WIoTP client ID, so that the
//! refusal says "unknown tenant" rather than "invalid client ID"). Every other connection is
//! WIoTP's, exactly as without tenants. Each hook is one `match` over two concrete types, so the
//! data path stays monomorphic and allocation-free.

use std::sync::Arc;

use crate::auth::Verifier;
use crate::codec::Connect;
use crate::generic::{self, Generic};
use crate::policy::PolicyStore;
use crate::profile::{
    ConnectTerms, Counters, HttpRequest, HttpRoute, HttpRouteError, Profile, Publication, Request,
    SessionLimits, Settlement,
};
use crate::refusal::{Cause, Code, Refusal};
use crate::transport::ConnectionInfo;
use crate::wiotp::identity::parse_client_id;
use crate::wiotp::{self, Wiotp};

/// WIoTP and generic tenants, over one policy.
#[derive(Debug)]
pub struct Dispatch {
    wiotp: Wiotp,
    generic: Generic,
}

/// A claim of either profile.
#[derive(Debug)]
pub enum Claim {
    /// A WIoTP client ID of a known org.
    Wiotp(wiotp::Claim),
    /// A client of a generic tenant.
    Generic(generic::Claim),
}

/// A principal of either profile.
#[derive(Debug)]
pub enum Principal {
    /// A WIoTP client.
    Wiotp(wiotp::Client),
    /// A client of a generic tenant.
    Generic(generic::Client),
}

impl Dispatch {
    /// Both profiles over `policy` and `verifier`; orgs under `topic_prefix` (`{org}`).
    pub fn new(policy: Arc<PolicyStore>, verifier: Arc<Verifier>, topic_prefix: &str) -> Dispatch {
        Dispatch {
            wiotp: Wiotp::new(policy.clone(), verifier.clone(), topic_prefix),
            generic: Generic::new(policy, verifier),
        }
    }

    /// The generic profile alone (`explain`, tests).
    pub fn generic(&self) -> &Generic {
        &self.generic
    }
}

impl Profile for Dispatch {
    type Claim = Claim;
    type Principal = Principal;

    fn code(&self, cause: Cause) -> Code {
        self.wiotp.code(cause)
    }

    fn http_route(&self, request: &HttpRequest<'_>) -> Result<HttpRoute, HttpRouteError> {
        // The HTTP messaging API is WIoTP's.
        self.wiotp.http_route(request)
    }

    fn identify(
        &self,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Claim, Refusal> {
        if let Some((tenant, user)) = generic::route(connect, connection) {
            let generic = connection.tenant.is_some()
                || parse_client_id(connect.client_id).is_err()
                || self.generic.knows(tenant);
            if generic {
                return self
                    .generic
                    .claim(tenant, user, connect, connection)
                    .map(Claim::Generic);
            }
        }
        self.wiotp.identify(connect, connection).map(Claim::Wiotp)
    }

    fn tenant<'a>(&self, claim: &'a Claim) -> &'a str {
        match claim {
            Claim::Wiotp(claim) => self.wiotp.tenant(claim),
            Claim::Generic(claim) => self.generic.tenant(claim),
        }
    }

    async fn authenticate(
        &self,
        claim: &Claim,
        connect: &Connect<'_>,
        connection: &ConnectionInfo,
    ) -> Result<Principal, Refusal> {
        match claim {
            Claim::Wiotp(claim) => self
                .wiotp
                .authenticate(claim, connect, connection)
                .await
                .map(Principal::Wiotp),
            Claim::Generic(claim) => self
                .generic
                .authenticate(claim, connect, connection)
                .await
                .map(Principal::Generic),
        }
    }

    fn terms(&self, principal: &Principal) -> ConnectTerms {
        match principal {
            Principal::Wiotp(p) => self.wiotp.terms(p),
            Principal::Generic(p) => self.generic.terms(p),
        }
    }

    fn limits(&self, principal: &Principal) -> SessionLimits {
        match principal {
            Principal::Wiotp(p) => self.wiotp.limits(p),
            Principal::Generic(p) => self.generic.limits(p),
        }
    }

    #[inline]
    fn check_publish(&self, principal: &Principal, topic: &str) -> Result<(), Refusal> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.check_publish(p, topic),
            Principal::Generic(p) => self.generic.check_publish(p, topic),
        }
    }

    #[inline]
    fn check_subscribe(&self, principal: &Principal, filter: &str) -> Result<(), Refusal> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.check_subscribe(p, filter),
            Principal::Generic(p) => self.generic.check_subscribe(p, filter),
        }
    }

    #[inline]
    fn may_deliver(&self, principal: &Principal, topic: &str, payload: &[u8]) -> bool {
        match principal {
            Principal::Wiotp(p) => self.wiotp.may_deliver(p, topic, payload),
            Principal::Generic(p) => self.generic.may_deliver(p, topic, payload),
        }
    }

    fn refused(
        &self,
        principal: &Principal,
        request: Request,
        topic: &str,
        refusal: &Refusal,
    ) -> Vec<Publication> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.refused(p, request, topic, refusal),
            Principal::Generic(p) => self.generic.refused(p, request, topic, refusal),
        }
    }

    fn stale(&self, principal: &Principal) -> bool {
        match principal {
            Principal::Wiotp(p) => self.wiotp.stale(p),
            Principal::Generic(p) => self.generic.stale(p),
        }
    }

    fn reevaluate(&self, principal: &Principal) -> Result<Principal, Refusal> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.reevaluate(p).map(Principal::Wiotp),
            Principal::Generic(p) => self.generic.reevaluate(p).map(Principal::Generic),
        }
    }

    fn failed_connect(
        &self,
        claim: &Claim,
        refusal: &Refusal,
        counters: Counters,
    ) -> Vec<Publication> {
        match claim {
            Claim::Wiotp(c) => self.wiotp.failed_connect(c, refusal, counters),
            Claim::Generic(c) => self.generic.failed_connect(c, refusal, counters),
        }
    }

    fn connected(&self, principal: &Principal, counters: Counters) -> Vec<Publication> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.connected(p, counters),
            Principal::Generic(p) => self.generic.connected(p, counters),
        }
    }

    fn disconnected(
        &self,
        principal: &Principal,
        refusal: &Refusal,
        counters: Counters,
        last_of_presence: bool,
    ) -> Vec<Publication> {
        match principal {
            Principal::Wiotp(p) => self
                .wiotp
                .disconnected(p, refusal, counters, last_of_presence),
            Principal::Generic(p) => {
                self.generic
                    .disconnected(p, refusal, counters, last_of_presence)
            }
        }
    }

    fn settlement(&self, principal: &Principal, counters: Counters) -> Vec<u8> {
        match principal {
            Principal::Wiotp(p) => self.wiotp.settlement(p, counters),
            Principal::Generic(p) => self.generic.settlement(p, counters),
        }
    }

    fn settle(&self, entry: &[u8]) -> Option<Settlement> {
        self.wiotp
            .settle(entry)
            .or_else(|| self.generic.settle(entry))
    }

    fn settle_as(&self, entry: &[u8], refusal: &Refusal) -> Option<Settlement> {
        self.wiotp
            .settle_as(entry, refusal)
            .or_else(|| self.generic.settle_as(entry, refusal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::hash_token_sha256;
    use crate::codec::ProtocolVersion;
    use crate::policy::load::parse_policy;
    use std::path::Path;

    fn dispatch() -> Dispatch {
        let text = format!(
            "orgs:\n  org1:\n    device_types: {{ t: {{}} }}\n    devices:\n      t/d: {{ token: \"{h}\" }}\ntenants:\n  lab:\n    anonymous: true\n    users:\n      u: {{ token: \"{h}\" }}\n",
            h = hash_token_sha256(b"pw")
        );
        let store = Arc::new(PolicyStore::new(
            parse_policy(&text, Path::new("p.yaml")).unwrap(),
        ));
        Dispatch::new(store, Verifier::new(1, 2), "{org}/")
    }

    fn info(tenant: Option<&str>) -> ConnectionInfo {
        ConnectionInfo::loopback_for_tests(tenant)
    }

    fn connect<'a>(client_id: &'a str, user: Option<&'a str>) -> Connect<'a> {
        Connect {
            version: ProtocolVersion::V311,
            clean_start: true,
            keep_alive: 30,
            properties: Vec::new(),
            client_id,
            will: None,
            username: user,
            password: Some(b"pw"),
        }
    }

    #[test]
    fn chooses_the_profile_per_connection() {
        let d = dispatch();
        let which = |c: &Connect<'_>, i: &ConnectionInfo| match d.identify(c, i) {
            Ok(Claim::Wiotp(_)) => "wiotp".to_owned(),
            Ok(Claim::Generic(_)) => "generic".to_owned(),
            Err(refusal) => format!("{refusal}"),
        };
        assert_eq!(
            which(&connect("d:org1:t:d", Some("use-token-auth")), &info(None)),
            "wiotp"
        );
        assert_eq!(
            which(&connect("dev1", Some("u@lab")), &info(None)),
            "generic"
        );
        assert_eq!(
            which(&connect("d:org1:t:d", None), &info(Some("lab"))),
            "generic"
        );
        // A WIoTP client ID whose user name has an `@` of no tenant stays WIoTP's.
        assert_eq!(
            which(&connect("a:org1:app", Some("me@example.com")), &info(None)),
            "wiotp"
        );
        // Neither: the refusal names what is missing.
        assert_eq!(
            which(&connect("dev1", Some("u@nowhere")), &info(None)),
            "NotAuthorized: unknown tenant"
        );
        assert!(which(&connect("dev1", None), &info(None)).starts_with("InvalidClientId"));
    }
}
