//! Live sessions by client ID: takeover (288) and per-org connection counts (173).
//!
//! A new session claims its client ID *after* authentication. If another session holds it, the
//! old one is told to close with 288 and the new one waits until the old one has finished closing
//! (and so has queued its Disconnect monitoring message) before it queues its own Connect. That
//! keeps monitoring messages in event order for one client ID.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::close::CloseReason;
use crate::identity::Identity;

/// How long a new session waits for the session it takes over to finish closing.
pub const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// What the rest of the process asks of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionCommand {
    /// Close with this reason (takeover, shutdown).
    Close(CloseReason),
    /// The policy changed: check whether the session may go on, and what it may do.
    Reevaluate,
}

/// The registry's handle on one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    id: u64,
    commands: mpsc::UnboundedSender<SessionCommand>,
    done: watch::Receiver<bool>,
}

impl SessionHandle {
    /// Asks the session to close with `reason`. A session that is already closing ignores it.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.commands.send(SessionCommand::Close(reason));
    }

    /// Tells the session that the policy changed, so it re-evaluates itself.
    pub fn reevaluate(&self) {
        let _ = self.commands.send(SessionCommand::Reevaluate);
    }

    /// Waits until the session has finished closing, at most `limit`.
    pub async fn closed(&self, limit: Duration) {
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(limit, done.wait_for(|finished| *finished)).await;
    }
}

/// The session's own side of its handle: where close requests arrive, and how it says it is done.
#[derive(Debug)]
pub struct SessionControl {
    /// Close requests from the registry (takeover, shutdown, policy edits).
    pub commands: mpsc::UnboundedReceiver<SessionCommand>,
    done: watch::Sender<bool>,
    handle: SessionHandle,
}

impl SessionControl {
    /// A new control pair with a process-unique session ID.
    pub fn new() -> SessionControl {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        // Per session and unbounded: a handful of commands in a session's life, never lost.
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (done, done_rx) = watch::channel(false);
        let handle = SessionHandle {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            commands: commands_tx,
            done: done_rx,
        };
        SessionControl {
            commands,
            done,
            handle,
        }
    }

    /// The handle others use.
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// This session's ID.
    pub fn id(&self) -> u64 {
        self.handle.id
    }

    /// Marks the session as fully closed.
    pub fn finish(&self) {
        let _ = self.done.send(true);
    }
}

impl Default for SessionControl {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Default)]
struct Inner {
    /// Every claimed session by session ID, scalable applications included.
    all: HashMap<u64, SessionHandle>,
    by_client_id: HashMap<String, SessionHandle>,
    per_org: HashMap<String, u32>,
    /// Live connections per `ORG/APP`, across `a:` and `A:` client IDs: they share one status topic.
    per_app: HashMap<String, u32>,
}

fn app_key(identity: &Identity) -> Option<String> {
    identity
        .app_id()
        .map(|app| format!("{}/{app}", identity.org))
}

/// Every live session of this process.
#[derive(Debug, Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

/// Why a claim failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The org already has its maximum number of connections.
    OrgFull,
}

impl Registry {
    /// A shared empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the maps inconsistent (each update is one
        // insert or remove), so a poisoned lock is still safe to use.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Registers `session` under `client_id` in `org`, counting it against `org_limit`.
    ///
    /// Returns the session it displaces, which the caller must close with 288 and wait for.
    /// `takeover` false (scalable applications share a client ID) never displaces anyone.
    pub fn claim(
        &self,
        identity: &Identity,
        org_limit: u32,
        session: &SessionHandle,
        takeover: bool,
    ) -> Result<Option<SessionHandle>, ClaimError> {
        let (client_id, org) = (identity.client_id.as_str(), identity.org.as_str());
        let mut inner = self.lock();
        let displaced = if takeover {
            inner.by_client_id.get(client_id).cloned()
        } else {
            None
        };
        let count = inner.per_org.get(org).copied().unwrap_or(0);
        // The displaced session leaves the org, so it does not count against the new one.
        let effective = count - u32::from(displaced.is_some() && count > 0);
        if effective >= org_limit {
            return Err(ClaimError::OrgFull);
        }
        if takeover {
            inner
                .by_client_id
                .insert(client_id.to_string(), session.clone());
        }
        *inner.per_org.entry(org.to_string()).or_insert(0) += 1;
        inner.all.insert(session.id, session.clone());
        if let Some(app) = app_key(identity) {
            *inner.per_app.entry(app).or_insert(0) += 1;
        }
        Ok(displaced)
    }

    /// Removes a session's claim. The client-ID entry is removed only if it is still this session's.
    /// Returns whether this was the last live connection of its application (always true for
    /// devices and gateways), which decides whether the retained status is cleared.
    pub fn release(&self, identity: &Identity, session_id: u64) -> bool {
        let (client_id, org) = (identity.client_id.as_str(), identity.org.as_str());
        let mut inner = self.lock();
        inner.all.remove(&session_id);
        if inner
            .by_client_id
            .get(client_id)
            .is_some_and(|held| held.id == session_id)
        {
            inner.by_client_id.remove(client_id);
        }
        if let Some(count) = inner.per_org.get_mut(org) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                inner.per_org.remove(org);
            }
        }
        let Some(app) = app_key(identity) else {
            return true;
        };
        let Some(count) = inner.per_app.get_mut(&app) else {
            return true;
        };
        *count = count.saturating_sub(1);
        let last = *count == 0;
        if last {
            inner.per_app.remove(&app);
        }
        last
    }

    /// Whether the identity has a live session here (for applications: any connection of the app).
    pub fn is_live(&self, identity: &Identity) -> bool {
        let inner = self.lock();
        match app_key(identity) {
            Some(app) => inner.per_app.contains_key(&app),
            None => inner.by_client_id.contains_key(&identity.client_id),
        }
    }

    /// Live sessions of an org.
    pub fn org_connections(&self, org: &str) -> u32 {
        self.lock().per_org.get(org).copied().unwrap_or(0)
    }

    /// Handles of every live session.
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.lock().all.values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::close::CloseCode;
    use crate::identity::parse_client_id;

    #[tokio::test]
    async fn takeover_displaces_and_waits() {
        let registry = Registry::new();
        let device = parse_client_id("d:o:t:i").unwrap();
        let mut first = SessionControl::new();
        let second = SessionControl::new();
        assert!(registry
            .claim(&device, 10, first.handle(), true)
            .unwrap()
            .is_none());
        let displaced = registry
            .claim(&device, 10, second.handle(), true)
            .unwrap()
            .unwrap();
        displaced.close(CloseCode::ClientIdReused.into());
        assert_eq!(
            first.commands.recv().await,
            Some(SessionCommand::Close(CloseCode::ClientIdReused.into()))
        );
        // The old session releasing must not remove the new session's entry.
        registry.release(&device, first.id());
        first.finish();
        displaced.closed(Duration::from_secs(1)).await;
        assert_eq!(registry.sessions().len(), 1);
        assert_eq!(registry.org_connections("o"), 1);
    }

    #[test]
    fn org_limit_counts_live_sessions() {
        let registry = Registry::new();
        let (one, two) = (
            parse_client_id("a:o:1").unwrap(),
            parse_client_id("a:o:2").unwrap(),
        );
        let a = SessionControl::new();
        let b = SessionControl::new();
        registry.claim(&one, 1, a.handle(), true).unwrap();
        assert!(matches!(
            registry.claim(&two, 1, b.handle(), true),
            Err(ClaimError::OrgFull)
        ));
        // Reconnecting with the same client ID replaces, so it fits.
        assert!(registry.claim(&one, 1, b.handle(), true).unwrap().is_some());
    }

    #[test]
    fn the_last_instance_of_an_application_is_known() {
        let registry = Registry::new();
        let plain = parse_client_id("a:o:app").unwrap();
        let scalable = parse_client_id("A:o:app:i1").unwrap();
        let (a, b) = (SessionControl::new(), SessionControl::new());
        registry.claim(&plain, 10, a.handle(), true).unwrap();
        registry.claim(&scalable, 10, b.handle(), false).unwrap();
        assert!(
            !registry.release(&plain, a.id()),
            "another instance of app is live"
        );
        assert!(registry.release(&scalable, b.id()));
        assert!(
            registry.release(&parse_client_id("d:o:t:i").unwrap(), 99),
            "devices always clear"
        );
    }
}
