//! State that sessions share, split by concern, each behind a narrow type: identifiers, the
//! command mailbox of a session, admission (process slots, tenant connection counts, client-ID
//! ownership and takeover), tenant rate buckets, and the status reporter.
//!
//! Admission, tenant buckets and the reporter are traits, so that a second implementation (state
//! in Redis, shared by several proxy instances) can replace the in-process one in [`local`]
//! without touching the session. Admission hands back guards that release on `Drop`: a session
//! that ends by any path, a panic included, gives back its slot, its tenant count and its client
//! ID.

pub mod ids;
pub mod local;
pub mod redis;
pub mod redis_link;
pub mod redis_rate;
pub mod redis_retained;

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::task::AtomicWaker;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

pub use ids::SessionId;

use crate::limits::Rate;
use crate::profile::Publication;
use crate::refusal::Refusal;

/// What the rest of the process asks of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Close with this refusal (takeover, shutdown).
    Close(Refusal),
    /// The policy changed: check whether the session may go on, and what it may do.
    Reevaluate,
}

/// A close is waiting in the mailbox.
const CLOSE: u8 = 1;
/// A re-evaluation is waiting in the mailbox.
const REEVALUATE: u8 = 2;

/// A session's mailbox. It holds at most one close (the first wins) and one re-evaluation
/// flag, so it is bounded however often it is written to. The session polls it on every turn of
/// its loop, which costs one atomic load and a waker registration.
#[derive(Debug)]
struct Mailbox {
    close: Mutex<Option<Refusal>>,
    pending: AtomicU8,
    waker: AtomicWaker,
    /// The session has finished closing.
    done: AtomicBool,
    /// Wakes whoever waits for `done`.
    done_wake: Notify,
}

/// The handle others hold on one session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    id: SessionId,
    mailbox: Arc<Mailbox>,
}

impl SessionHandle {
    /// This session's ID.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// Asks the session to close with `refusal`. The first close asked for wins.
    pub fn close(&self, refusal: Refusal) {
        let mut close = self
            .mailbox
            .close
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if close.is_none() {
            *close = Some(refusal);
        }
        drop(close);
        self.mailbox.pending.fetch_or(CLOSE, Ordering::AcqRel);
        self.mailbox.waker.wake();
    }

    /// Tells the session that the policy changed, so it re-evaluates itself.
    pub fn reevaluate(&self) {
        self.mailbox.pending.fetch_or(REEVALUATE, Ordering::AcqRel);
        self.mailbox.waker.wake();
    }

    /// Waits until the session has finished closing, at most `limit`. True if it did.
    pub async fn closed(&self, limit: Duration) -> bool {
        let mailbox = &self.mailbox;
        let finished = async {
            loop {
                // Registered before the flag is read, so a finish in between is not missed.
                let notified = mailbox.done_wake.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if mailbox.done.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(limit, finished).await.is_ok()
    }
}

/// The session's own side of its mailbox. Dropping it marks the session as finished, so a
/// takeover never waits for a session whose task is gone.
#[derive(Debug)]
pub struct SessionControl {
    handle: SessionHandle,
}

impl SessionControl {
    /// A new mailbox with a fresh session ID.
    pub fn new() -> SessionControl {
        SessionControl {
            handle: SessionHandle {
                id: SessionId::next(),
                mailbox: Arc::new(Mailbox {
                    close: Mutex::new(None),
                    pending: AtomicU8::new(0),
                    waker: AtomicWaker::new(),
                    done: AtomicBool::new(false),
                    done_wake: Notify::new(),
                }),
            },
        }
    }

    /// The handle others use.
    pub fn handle(&self) -> &SessionHandle {
        &self.handle
    }

    /// This session's ID.
    pub fn id(&self) -> SessionId {
        self.handle.id
    }

    /// The next command. Cancel-safe: a command is taken only when it is returned.
    pub async fn next(&self) -> Command {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// Polls for the next command; registers `cx`'s waker when there is none.
    pub fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Command> {
        let mailbox = &self.handle.mailbox;
        mailbox.waker.register(cx.waker());
        let pending = mailbox.pending.load(Ordering::Acquire);
        if pending & CLOSE != 0 {
            mailbox.pending.fetch_and(!CLOSE, Ordering::AcqRel);
            let close = mailbox
                .close
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(refusal) = close {
                return Poll::Ready(Command::Close(refusal));
            }
        }
        if pending & REEVALUATE != 0 {
            mailbox.pending.fetch_and(!REEVALUATE, Ordering::AcqRel);
            return Poll::Ready(Command::Reevaluate);
        }
        Poll::Pending
    }

    /// Marks the session as fully closed (its Disconnect status is queued).
    pub fn finish(&self) {
        self.handle.mailbox.done.store(true, Ordering::Release);
        self.handle.mailbox.done_wake.notify_waiters();
    }
}

impl Default for SessionControl {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for SessionControl {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The process-wide connection cap. A slot is taken once a CONNECT has arrived and held until
/// the session ends.
#[derive(Debug, Clone)]
pub struct ProcessSlots {
    slots: Arc<Semaphore>,
}

/// One connection's place under the process cap, given back on `Drop`.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
}

impl ProcessSlots {
    /// A cap of `max` connections.
    pub fn new(max: usize) -> ProcessSlots {
        ProcessSlots {
            slots: Arc::new(Semaphore::new(max)),
        }
    }

    /// A slot, or `None` when the cap is reached.
    pub fn try_take(&self) -> Option<Slot> {
        self.slots
            .clone()
            .try_acquire_owned()
            .ok()
            .map(|permit| Slot { _permit: permit })
    }
}

/// What a session asks admission for once its client is authenticated.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRequest<'a> {
    /// The client ID.
    pub client_id: &'a str,
    /// Whether the claim takes the client ID over from a session that holds it (288 for that
    /// one). Without takeover, sessions share the client ID.
    pub takeover: bool,
    /// The tenant the connection counts against.
    pub tenant: &'a str,
    /// The tenant's connection quota.
    pub tenant_limit: u32,
    /// The presence key (see [`crate::profile::ConnectTerms::presence`]).
    pub presence: &'a str,
    /// The claiming session.
    pub session: &'a SessionHandle,
}

/// Why a claim was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The tenant already has its maximum number of connections.
    TenantFull,
    /// The shared state is out of reach, so neither the client ID nor the quota can be checked.
    Unavailable,
}

/// What releasing an ownership tells the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    /// No other connection with the same presence key is live.
    pub last_of_presence: bool,
}

/// The release half of an admission implementation.
pub trait Release: Send + Sync {
    /// Gives back what the claim took.
    fn release(&self) -> Released;
}

/// A claimed client ID and tenant place, given back on `Drop` (or by [`Ownership::release`],
/// which also says whether the presence is over).
pub struct Ownership {
    release: Option<Box<dyn Release>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("held", &self.release.is_some())
            .finish()
    }
}

impl Ownership {
    /// An ownership that `release` gives back.
    pub fn new(release: Box<dyn Release>) -> Ownership {
        Ownership {
            release: Some(release),
        }
    }

    /// Gives the ownership back now.
    pub fn release(mut self) -> Released {
        self.take_release()
    }

    fn take_release(&mut self) -> Released {
        match self.release.take() {
            Some(release) => release.release(),
            None => Released {
                last_of_presence: false,
            },
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        self.take_release();
    }
}

/// A live session, as an administrator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The client ID.
    pub client_id: String,
    /// The instance holding it (empty without coordination).
    pub instance: String,
    /// The session's ID.
    pub session: String,
}

/// Client-ID ownership, tenant connection counts and takeover.
pub trait Admission: Send + Sync + 'static {
    /// Claims the request's client ID and a place in its tenant. A session displaced by the
    /// takeover is told to close (288) and the claim resolves once it has finished closing (so
    /// its Disconnect status is queued before the new session's Connect), or after a bounded
    /// wait. Dropping the future before it resolves gives everything back.
    fn claim<'a>(
        &'a self,
        request: ClaimRequest<'a>,
    ) -> BoxFuture<'a, Result<Ownership, ClaimError>>;

    /// Whether a connection with this presence key is live (crash recovery skips those).
    fn is_present(&self, presence: &str) -> bool;

    /// Live connections of a tenant.
    fn tenant_connections(&self, tenant: &str) -> u32;

    /// Handles of every live session (shutdown, policy edits).
    fn sessions(&self) -> Vec<SessionHandle>;

    /// The live sessions of a tenant, on every instance (the admin endpoint).
    fn list<'a>(&'a self, tenant: &'a str) -> BoxFuture<'a, Result<Vec<SessionInfo>, ClaimError>>;

    /// Closes the live sessions of a tenant, all of them or those of one client ID, wherever
    /// they are connected, with 94 (closed by an administrator). Resolves to how many were told
    /// to close.
    fn close_sessions<'a>(
        &'a self,
        tenant: &'a str,
        client_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<usize, ClaimError>>;
}

/// The refusal an administrator's close gives a session (94).
pub fn closed_by_administrator() -> Refusal {
    Refusal::with_detail(crate::refusal::Cause::Revoked, "closed by an administrator")
}

/// A tenant's shared publish bucket.
pub trait TenantBucket: Send + Sync + std::fmt::Debug {
    /// Takes `n` tokens, or says how long until they are there (taking nothing).
    fn try_take(&self, n: u32, now: Instant) -> Result<(), Duration>;
}

/// The publish buckets of tenants.
pub trait TenantBuckets: Send + Sync + 'static {
    /// The tenant's shared bucket for `rate`; a changed rate (a policy edit) starts a new one.
    fn bucket(&self, tenant: &str, rate: Rate) -> Arc<dyn TenantBucket>;
}

/// Where status messages go, in the order of the events of one client ID.
pub trait Reporter: Send + Sync + 'static {
    /// An established session: its ledger `entry` (what a later process settles if this one
    /// dies first) goes out before its status messages.
    fn connected(
        &self,
        session: SessionId,
        client_id: &str,
        entry: Vec<u8>,
        statuses: Vec<Publication>,
    );

    /// A closed session: its status messages go out, then its ledger entry is cleared.
    fn disconnected(&self, session: SessionId, client_id: &str, statuses: Vec<Publication>);

    /// Publications that belong to no established session (refused connects, notifications).
    fn publish(&self, publications: Vec<Publication>);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Cause;

    #[tokio::test]
    async fn the_first_close_wins_and_nothing_queues_up() {
        let control = SessionControl::new();
        let handle = control.handle().clone();
        for _ in 0..1000 {
            handle.reevaluate();
        }
        handle.close(Cause::TakenOver.into());
        handle.close(Cause::Shutdown.into());
        assert_eq!(
            control.next().await,
            Command::Close(Cause::TakenOver.into())
        );
        assert_eq!(control.next().await, Command::Reevaluate);
        let pending = tokio::time::timeout(Duration::from_millis(10), control.next()).await;
        assert!(
            pending.is_err(),
            "one flag for any number of re-evaluations"
        );
    }

    #[tokio::test]
    async fn a_dropped_control_counts_as_closed() {
        let control = SessionControl::new();
        let handle = control.handle().clone();
        drop(control);
        assert!(handle.closed(Duration::from_secs(1)).await);
    }
}
