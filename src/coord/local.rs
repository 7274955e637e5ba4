//! The in-process implementations of the coordination traits: one proxy instance holds every
//! client ID, tenant count and bucket in memory, and reports through its own control connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::{
    closed_by_administrator, Admission, ClaimError, ClaimRequest, Ownership, Release, Released,
    Reporter, SessionHandle, SessionId, SessionInfo, TenantBucket, TenantBuckets,
};
use crate::ledger::Ledger;
use crate::limits::{Rate, SharedBucket};
use crate::monitor::Monitor;
use crate::profile::Publication;
use crate::refusal::{Cause, Refusal};

/// How long a new session waits for the session it takes over to finish closing.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Default)]
struct Registry {
    /// Every claimed session, with its tenant and client ID.
    all: HashMap<SessionId, (SessionHandle, Box<str>, Box<str>)>,
    /// The owner of each client ID, keyed by tenant and client ID.
    owners: HashMap<String, SessionHandle>,
    /// Live connections per tenant.
    tenants: HashMap<Box<str>, u32>,
    /// Live connections per presence key.
    presence: HashMap<Box<str>, u32>,
}

/// The ownership key of a client ID: client IDs are unique within a tenant. U+0000 cannot
/// appear in an MQTT string, so it separates the two unambiguously.
fn owner_key(tenant: &str, client_id: &str) -> String {
    let mut key = String::with_capacity(tenant.len() + 1 + client_id.len());
    key.push_str(tenant);
    key.push('\0');
    key.push_str(client_id);
    key
}

pub(super) fn count_down(counts: &mut HashMap<Box<str>, u32>, key: &str) -> u32 {
    let Some(count) = counts.get_mut(key) else {
        return 0;
    };
    *count = count.saturating_sub(1);
    let left = *count;
    if left == 0 {
        counts.remove(key);
    }
    left
}

/// Admission within one process.
#[derive(Debug, Default)]
pub struct LocalAdmission {
    registry: Arc<Mutex<Registry>>,
}

fn locked(registry: &Mutex<Registry>) -> MutexGuard<'_, Registry> {
    // Every update is a handful of inserts and removes that cannot panic half-way, so a
    // poisoned lock still guards consistent maps.
    registry
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct LocalRelease {
    registry: Arc<Mutex<Registry>>,
    session: SessionId,
    owner: Option<String>,
    tenant: Box<str>,
    presence: Box<str>,
}

impl Release for LocalRelease {
    fn release(&self) -> Released {
        let mut registry = locked(&self.registry);
        registry.all.remove(&self.session);
        if let Some(owner) = &self.owner {
            if registry
                .owners
                .get(owner)
                .is_some_and(|held| held.id() == self.session)
            {
                registry.owners.remove(owner);
            }
        }
        count_down(&mut registry.tenants, &self.tenant);
        Released {
            last_of_presence: count_down(&mut registry.presence, &self.presence) == 0,
        }
    }
}

impl LocalAdmission {
    /// An empty registry.
    pub fn new() -> Arc<LocalAdmission> {
        Arc::new(LocalAdmission::default())
    }

    fn try_claim(
        &self,
        request: &ClaimRequest<'_>,
    ) -> Result<(Ownership, Option<SessionHandle>), ClaimError> {
        let owner = request
            .takeover
            .then(|| owner_key(request.tenant, request.client_id));
        let mut registry = locked(&self.registry);
        let displaced = owner
            .as_ref()
            .and_then(|owner| registry.owners.get(owner))
            .cloned();
        let count = registry.tenants.get(request.tenant).copied().unwrap_or(0);
        // The displaced session leaves the tenant, so it does not count against the new one.
        let effective = count.saturating_sub(u32::from(displaced.is_some()));
        if effective >= request.tenant_limit {
            return Err(ClaimError::TenantFull);
        }
        let session = request.session;
        if let Some(owner) = &owner {
            registry.owners.insert(owner.clone(), session.clone());
        }
        registry.all.insert(
            session.id(),
            (
                session.clone(),
                request.tenant.into(),
                request.client_id.into(),
            ),
        );
        *registry.tenants.entry(request.tenant.into()).or_insert(0) += 1;
        *registry
            .presence
            .entry(request.presence.into())
            .or_insert(0) += 1;
        let release = LocalRelease {
            registry: self.registry.clone(),
            session: session.id(),
            owner,
            tenant: request.tenant.into(),
            presence: request.presence.into(),
        };
        Ok((Ownership::new(Box::new(release)), displaced))
    }
}

impl Admission for LocalAdmission {
    fn claim<'a>(
        &'a self,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Ownership, ClaimError>> {
        Box::pin(async move {
            let (ownership, displaced) = self.try_claim(&request)?;
            if let Some(displaced) = displaced {
                displaced.close(Refusal::new(Cause::TakenOver));
                displaced.closed(TAKEOVER_WAIT).await;
            }
            Ok(ownership)
        })
    }

    fn is_present(&self, presence: &str) -> bool {
        locked(&self.registry).presence.contains_key(presence)
    }

    fn tenant_connections(&self, tenant: &str) -> u32 {
        locked(&self.registry)
            .tenants
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }

    fn sessions(&self) -> Vec<SessionHandle> {
        locked(&self.registry)
            .all
            .values()
            .map(|(handle, _, _)| handle.clone())
            .collect()
    }

    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Vec<SessionInfo>, ClaimError>> {
        let listed = locked(&self.registry)
            .all
            .iter()
            .filter(|(_, (_, held_by, _))| **held_by == *tenant)
            .map(|(id, (_, _, client_id))| SessionInfo {
                client_id: client_id.to_string(),
                instance: String::new(),
                session: id.to_string(),
            })
            .collect();
        Box::pin(std::future::ready(Ok(listed)))
    }

    fn close_sessions<'a>(
        &'a self,
        tenant: &'a str,
        client_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, ClaimError>> {
        let handles: Vec<SessionHandle> = locked(&self.registry)
            .all
            .values()
            .filter(|(_, held_by, held_id)| {
                **held_by == *tenant && client_id.is_none_or(|id| **held_id == *id)
            })
            .map(|(handle, _, _)| handle.clone())
            .collect();
        for handle in &handles {
            handle.close(closed_by_administrator());
        }
        Box::pin(std::future::ready(Ok(handles.len())))
    }
}

impl TenantBucket for SharedBucket {
    fn try_take(&self, n: u32, now: Instant) -> Result<(), Duration> {
        SharedBucket::try_take(self, n, now)
    }
}

/// Tenant buckets within one process.
#[derive(Debug, Default)]
pub struct LocalTenantBuckets {
    buckets: Mutex<HashMap<Box<str>, Arc<SharedBucket>>>,
}

impl TenantBuckets for LocalTenantBuckets {
    fn bucket(&self, tenant: &str, rate: Rate) -> Arc<dyn TenantBucket> {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match buckets.get(tenant) {
            Some(bucket) if bucket.rate() == rate => bucket.clone(),
            _ => {
                let bucket = Arc::new(SharedBucket::new(rate));
                buckets.insert(tenant.into(), bucket.clone());
                bucket
            }
        }
    }
}

/// Status messages through this process's control connection, with the ledger for crash
/// recovery.
#[derive(Debug, Clone)]
pub struct LocalReporter {
    monitor: Monitor,
    ledger: Ledger,
}

impl LocalReporter {
    /// A reporter that writes `ledger` entries through `monitor`.
    pub fn new(monitor: Monitor, ledger: Ledger) -> LocalReporter {
        LocalReporter { monitor, ledger }
    }
}

impl Reporter for LocalReporter {
    fn connected(
        &self,
        session: SessionId,
        client_id: &str,
        entry: Vec<u8>,
        statuses: Vec<Publication>,
    ) {
        // The entry goes first and the broker handles one connection's packets in order, so a
        // crash at any point leaves an entry for every client anyone saw connected.
        let mut batch = self.ledger.entry(client_id, session, entry);
        batch.extend(statuses);
        self.monitor.send(batch);
    }

    fn disconnected(&self, session: SessionId, client_id: &str, statuses: Vec<Publication>) {
        let mut batch = statuses;
        batch.extend(self.ledger.clear(client_id, session));
        self.monitor.send(batch);
    }

    fn publish(&self, publications: Vec<Publication>) {
        self.monitor.send(publications);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::{Command, SessionControl};

    fn request<'a>(
        client_id: &'a str,
        presence: &'a str,
        limit: u32,
        takeover: bool,
        session: &'a SessionHandle,
    ) -> ClaimRequest<'a> {
        ClaimRequest {
            client_id,
            takeover,
            tenant: "o",
            tenant_limit: limit,
            presence,
            session,
        }
    }

    #[tokio::test]
    async fn takeover_displaces_and_waits() {
        let admission = LocalAdmission::new();
        let first = SessionControl::new();
        let second = SessionControl::new();
        let held = admission
            .claim(request("d:o:t:i", "d:o:t:i", 10, true, first.handle()))
            .await
            .unwrap();
        let claim = admission.claim(request("d:o:t:i", "d:o:t:i", 10, true, second.handle()));
        let old_session = async {
            assert_eq!(first.next().await, Command::Close(Cause::TakenOver.into()));
            // The old session releasing must not remove the new session's claim.
            drop(held);
            drop(first);
        };
        let (new, ()) = tokio::join!(claim, old_session);
        let _new = new.unwrap();
        assert_eq!(admission.sessions().len(), 1);
        assert_eq!(admission.tenant_connections("o"), 1);
        assert!(admission.is_present("d:o:t:i"));
    }

    #[tokio::test]
    async fn tenant_limit_counts_live_sessions() {
        let admission = LocalAdmission::new();
        let (a, b) = (SessionControl::new(), SessionControl::new());
        let _one = admission
            .claim(request("a:o:1", "o/1", 1, true, a.handle()))
            .await
            .unwrap();
        assert_eq!(
            admission
                .claim(request("a:o:2", "o/2", 1, true, b.handle()))
                .await
                .unwrap_err(),
            ClaimError::TenantFull
        );
        // Reconnecting with the same client ID replaces, so it fits.
        a.handle().close(Cause::Shutdown.into());
        drop(a);
        assert!(admission
            .claim(request("a:o:1", "o/1", 1, true, b.handle()))
            .await
            .is_ok());
    }

    #[tokio::test]
    async fn the_last_of_a_presence_is_known() {
        let admission = LocalAdmission::new();
        let (a, b) = (SessionControl::new(), SessionControl::new());
        let plain = admission
            .claim(request("a:o:app", "o/app", 10, true, a.handle()))
            .await
            .unwrap();
        let scalable = admission
            .claim(request("A:o:app:i1", "o/app", 10, false, b.handle()))
            .await
            .unwrap();
        assert!(
            !plain.release().last_of_presence,
            "another instance is live"
        );
        assert!(scalable.release().last_of_presence);
        assert!(!admission.is_present("o/app"));
    }

    #[tokio::test]
    async fn a_dropped_claim_gives_everything_back() {
        let admission = LocalAdmission::new();
        let a = SessionControl::new();
        let claim = admission
            .claim(request("d:o:t:i", "d:o:t:i", 10, true, a.handle()))
            .await
            .unwrap();
        drop(claim);
        assert_eq!(admission.tenant_connections("o"), 0);
        assert!(admission.sessions().is_empty());
        assert!(!admission.is_present("d:o:t:i"));
    }

    #[tokio::test]
    async fn a_panicking_session_gives_its_tenant_place_back() {
        let admission = LocalAdmission::new();
        let task = {
            let admission = admission.clone();
            tokio::spawn(async move {
                let control = SessionControl::new();
                let _held = admission
                    .claim(request("d:o:t:i", "d:o:t:i", 10, true, control.handle()))
                    .await
                    .unwrap();
                panic!("a bug in a session");
            })
        };
        assert!(task.await.unwrap_err().is_panic());
        assert_eq!(admission.tenant_connections("o"), 0);
    }
}
