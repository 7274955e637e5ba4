//! Commands for clients that fetch them over HTTP: a bounded mailbox per broker filter, filled
//! by one subscribing broker connection per tenant.
//!
//! A fetch names a filter (the profile's client filter, rewritten to the broker's form). The
//! first fetch of a filter creates its mailbox, subscribes to the filter at QoS 1 and waits for
//! the SUBACK, then answers "nothing waiting": a command sent before the first fetch is not kept
//! (the proxy was not listening for it yet). From then on every command matching the filter is
//! queued, up to [`MAILBOX_COMMANDS`] (the oldest is dropped when a new one arrives to a full
//! mailbox), and each fetch takes the oldest. A mailbox not fetched from for [`MAILBOX_IDLE`] is
//! dropped and unsubscribed; a tenant has at most [`MAX_MAILBOXES_PER_TENANT`], holding at most
//! [`MAILBOX_BYTES_PER_TENANT`] of payload together.
//!
//! The subscribing connection starts clean: commands sent while it is down (a broker restart)
//! are not kept. It reconnects and subscribes every live mailbox again when the next fetch finds
//! it down.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::publisher::{complete_frame, connect, write};
use crate::codec::{
    encode_subscribe, encode_unsubscribe, filter_matches, parse_publish, ProtocolVersion,
};
use crate::limits::refusal_log_budget;
use crate::upstream::Dial;

/// Commands one mailbox holds.
pub const MAILBOX_COMMANDS: usize = 16;
/// Payload bytes all the mailboxes of one tenant hold together; a command that does not fit is
/// dropped (and logged).
pub const MAILBOX_BYTES_PER_TENANT: usize = 64 * 1024 * 1024;
/// Mailboxes one tenant may have.
pub const MAX_MAILBOXES_PER_TENANT: usize = 10_000;
/// How long a mailbox lives without a fetch.
pub const MAILBOX_IDLE: Duration = Duration::from_secs(15 * 60);
/// How long the broker may take to answer a SUBSCRIBE.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriptions waiting to be sent on a tenant's connection.
const REQUEST_QUEUE: usize = 64;
/// The keep-alive of the subscribing connections, in seconds; a PINGREQ goes at half of it.
const KEEP_ALIVE_SECS: u16 = 60;
/// The largest packet read from the broker (a command).
const MAX_INBOUND_BYTES: usize = 1024 * 1024;
/// How often idle mailboxes are looked for.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// One command taken from a mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// The broker topic it was published to.
    pub topic: String,
    /// The payload.
    pub payload: Bytes,
}

/// Why a fetch could not be served.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The tenant has as many mailboxes as it may.
    #[error("too many command mailboxes for the org")]
    Full,
    /// The broker did not take the subscription.
    #[error("the broker did not take the subscription: {0}")]
    Unavailable(String),
}

#[derive(Debug)]
struct Mailbox {
    queue: VecDeque<Command>,
    last_fetch: Instant,
    subscribed: bool,
}

/// A subscription the connection task is asked for.
struct Subscription {
    filter: String,
    done: oneshot::Sender<Result<(), String>>,
}

struct TenantMail {
    boxes: Mutex<HashMap<String, Mailbox>>,
    /// Payload bytes queued in all the tenant's mailboxes (changed under the `boxes` lock).
    bytes: AtomicUsize,
    requests: mpsc::Sender<Subscription>,
}

impl TenantMail {
    /// Takes the oldest command of a mailbox.
    fn take(&self, mailbox: &mut Mailbox) -> Option<Command> {
        let command = mailbox.queue.pop_front()?;
        self.bytes
            .fetch_sub(command.payload.len(), Ordering::Relaxed);
        Some(command)
    }

    /// Forgets what a dropped mailbox held.
    fn dropped(&self, mailbox: &Mailbox) {
        let held: usize = mailbox.queue.iter().map(|c| c.payload.len()).sum();
        self.bytes.fetch_sub(held, Ordering::Relaxed);
    }

    fn boxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mailbox>> {
        self.boxes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The mailboxes of every tenant.
pub struct Mailboxes<D: Dial> {
    dialer: Arc<D>,
    client_id_prefix: String,
    tenants: Mutex<HashMap<Box<str>, Arc<TenantMail>>>,
}

impl<D: Dial> Mailboxes<D> {
    /// Mailboxes whose connections dial with `dialer`, with client IDs `PREFIX-TENANT`.
    pub fn new(dialer: Arc<D>, client_id_prefix: String) -> Mailboxes<D> {
        Mailboxes {
            dialer,
            client_id_prefix,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Takes the oldest command waiting for `filter` (a broker filter) in `tenant`; the first
    /// fetch of a filter subscribes to it and answers `None`.
    pub async fn fetch(&self, tenant: &str, filter: &str) -> Result<Option<Command>, FetchError> {
        let mail = self.tenant(tenant);
        {
            let mut boxes = mail.boxes();
            let count = boxes.len();
            match boxes.get_mut(filter) {
                Some(mailbox) if mailbox.subscribed => {
                    mailbox.last_fetch = Instant::now();
                    return Ok(mail.take(mailbox));
                }
                // Another fetch is subscribing it: this one waits for the same SUBACK below.
                Some(_) => {}
                None if count >= MAX_MAILBOXES_PER_TENANT => return Err(FetchError::Full),
                None => {
                    boxes.insert(
                        filter.to_owned(),
                        Mailbox {
                            queue: VecDeque::new(),
                            last_fetch: Instant::now(),
                            subscribed: false,
                        },
                    );
                }
            }
        }
        let (done, answer) = oneshot::channel();
        let request = Subscription {
            filter: filter.to_owned(),
            done,
        };
        let subscribed = match mail.requests.try_send(request) {
            Err(_) => Err("the subscription queue is full".to_owned()),
            Ok(()) => match tokio::time::timeout(SUBACK_TIMEOUT, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err("the connection ended".to_owned()),
                Err(_) => Err(format!("no SUBACK within {SUBACK_TIMEOUT:?}")),
            },
        };
        let mut boxes = mail.boxes();
        match subscribed {
            Ok(()) => {
                if let Some(mailbox) = boxes.get_mut(filter) {
                    mailbox.subscribed = true;
                    mailbox.last_fetch = Instant::now();
                    return Ok(mail.take(mailbox));
                }
                Ok(None)
            }
            Err(reason) => {
                if boxes.get(filter).is_some_and(|mailbox| !mailbox.subscribed) {
                    if let Some(mailbox) = boxes.remove(filter) {
                        mail.dropped(&mailbox);
                    }
                }
                Err(FetchError::Unavailable(reason))
            }
        }
    }

    fn tenant(&self, tenant: &str) -> Arc<TenantMail> {
        let mut tenants = self
            .tenants
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(mail) = tenants.get(tenant) {
            if !mail.requests.is_closed() {
                return mail.clone();
            }
        }
        let (requests, receiver) = mpsc::channel(REQUEST_QUEUE);
        let mail = Arc::new(TenantMail {
            boxes: Mutex::new(HashMap::new()),
            bytes: AtomicUsize::new(0),
            requests,
        });
        let client_id = format!("{}-{tenant}", self.client_id_prefix);
        tokio::spawn(run(self.dialer.clone(), client_id, mail.clone(), receiver));
        tenants.insert(tenant.into(), mail.clone());
        mail
    }
}

/// A tenant's subscribing connection: connects when a subscription is asked for, subscribes
/// every live mailbox, queues matching commands, and ends with its last mailbox.
async fn run<D: Dial>(
    dialer: Arc<D>,
    client_id: String,
    mail: Arc<TenantMail>,
    mut requests: mpsc::Receiver<Subscription>,
) {
    while let Some(first) = requests.recv().await {
        let stream = match connect(&*dialer, &client_id, KEEP_ALIVE_SECS).await {
            Ok(stream) => stream,
            Err(error) => {
                let reason = error.to_string();
                warn!(%client_id, %reason, "HTTP command subscriber cannot reach the broker");
                let _ = first.done.send(Err(reason));
                continue;
            }
        };
        let reason = serve(stream, first, &mut requests, &mail).await;
        debug!(%client_id, reason, "HTTP command subscriber closed");
    }
}

/// Runs one connection until it breaks or has no mailbox left.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    first: Subscription,
    requests: &mut mpsc::Receiver<Subscription>,
    mail: &TenantMail,
) -> &'static str {
    let mut next_id: u16 = 0;
    let mut waiting: Vec<(u16, Subscription)> = Vec::new();
    let mut out = BytesMut::new();
    let mut inbound = BytesMut::with_capacity(512);
    let mut ping = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2));
    ping.tick().await;
    let mut sweep = tokio::time::interval(SWEEP_INTERVAL);
    sweep.tick().await;
    let mut last_read = Instant::now();
    // A reconnect subscribes again every mailbox there is.
    let live: Vec<String> = mail
        .boxes()
        .keys()
        .filter(|filter| **filter != first.filter)
        .cloned()
        .collect();
    let mut pending_requests = vec![first];
    for filter in live {
        let (done, _) = oneshot::channel();
        pending_requests.push(Subscription { filter, done });
    }
    let reason = 'connection: loop {
        for request in pending_requests.drain(..) {
            next_id = next_id.wrapping_add(1).max(1);
            out.clear();
            let parts: &[&[u8]] = &[request.filter.as_bytes()];
            encode_subscribe(&mut out, ProtocolVersion::V311, next_id, &[], &[(parts, 1)]);
            if let Err(reason) = write(&mut stream, &out).await {
                let _ = request.done.send(Err(reason.into()));
                break 'connection reason;
            }
            waiting.push((next_id, request));
        }
        tokio::select! {
            request = requests.recv() => match request {
                Some(request) => pending_requests.push(request),
                None => break "mailboxes dropped",
            },
            read = stream.read_buf(&mut inbound) => {
                if !matches!(read, Ok(n) if n > 0) {
                    break "broker closed the connection";
                }
                last_read = Instant::now();
                out.clear();
                if let Err(reason) = handle_inbound(&mut inbound, &mut waiting, mail, &mut out) {
                    break reason;
                }
                if !out.is_empty() {
                    if let Err(reason) = write(&mut stream, &out).await {
                        break reason;
                    }
                }
            }
            _ = ping.tick() => {
                if last_read.elapsed() > Duration::from_secs(u64::from(KEEP_ALIVE_SECS)) {
                    break "the broker stopped answering";
                }
                if let Err(reason) = write(&mut stream, &[0xC0, 0]).await {
                    break reason;
                }
            }
            _ = sweep.tick() => {
                let expired = expire(mail);
                for filter in &expired {
                    next_id = next_id.wrapping_add(1).max(1);
                    out.clear();
                    let parts: &[&[u8]] = &[filter.as_bytes()];
                    encode_unsubscribe(&mut out, ProtocolVersion::V311, next_id, &[], &[parts]);
                    if let Err(reason) = write(&mut stream, &out).await {
                        break 'connection reason;
                    }
                }
                if mail.boxes().is_empty() && waiting.is_empty() {
                    let _ = write(&mut stream, &[0xE0, 0]).await;
                    break "no mailboxes left";
                }
            }
        }
    };
    for (_, request) in waiting {
        let _ = request.done.send(Err(reason.into()));
    }
    // The subscriptions are gone with the connection: the next fetch subscribes again.
    for mailbox in mail.boxes().values_mut() {
        mailbox.subscribed = false;
    }
    reason
}

/// Drops the mailboxes nobody fetched from for [`MAILBOX_IDLE`] and returns their filters.
fn expire(mail: &TenantMail) -> Vec<String> {
    let mut boxes = mail.boxes();
    let expired: Vec<String> = boxes
        .iter()
        .filter(|(_, mailbox)| mailbox.subscribed && mailbox.last_fetch.elapsed() > MAILBOX_IDLE)
        .map(|(filter, _)| filter.clone())
        .collect();
    for filter in &expired {
        if let Some(mailbox) = boxes.remove(filter) {
            mail.dropped(&mailbox);
        }
    }
    expired
}

/// Handles every complete packet: SUBACKs answer their subscriptions, PUBLISHes go to the
/// mailboxes whose filter they match (and are acknowledged into `out`).
fn handle_inbound(
    inbound: &mut BytesMut,
    waiting: &mut Vec<(u16, Subscription)>,
    mail: &TenantMail,
    out: &mut BytesMut,
) -> Result<(), &'static str> {
    loop {
        let Some(header) = complete_frame(inbound, MAX_INBOUND_BYTES)? else {
            return Ok(());
        };
        let body = &inbound[header.header_len..header.frame_len()];
        match header.first_byte >> 4 {
            9 if body.len() >= 3 => {
                let packet_id = u16::from_be_bytes([body[0], body[1]]);
                if let Some(at) = waiting.iter().position(|(id, _)| *id == packet_id) {
                    let (_, request) = waiting.remove(at);
                    let granted = body[2] < 0x80;
                    // Marked here, not by the fetch that waits: a command right after the
                    // SUBACK must find its mailbox open.
                    if let Some(mailbox) = mail.boxes().get_mut(&request.filter) {
                        mailbox.subscribed |= granted;
                    }
                    let _ = request.done.send(if granted {
                        Ok(())
                    } else {
                        Err("the broker refused the subscription".into())
                    });
                }
            }
            3 => {
                let publish = parse_publish(header.first_byte, body, ProtocolVersion::V311, false)
                    .map_err(|_| "invalid PUBLISH from the broker")?;
                let payload = Bytes::copy_from_slice(&body[publish.payload.clone()]);
                deliver(mail, publish.topic, payload);
                if let Some(packet_id) = publish.packet_id {
                    // QoS 1 (the subscriptions ask for no more): PUBACK.
                    out.extend_from_slice(&[0x40, 2]);
                    out.extend_from_slice(&packet_id.to_be_bytes());
                }
            }
            _ => {}
        }
        inbound.advance(header.frame_len());
    }
}

fn deliver(mail: &TenantMail, topic: &str, payload: Bytes) {
    for (filter, mailbox) in mail.boxes().iter_mut() {
        if !mailbox.subscribed || !filter_matches(filter, topic) {
            continue;
        }
        if mailbox.queue.len() >= MAILBOX_COMMANDS {
            if let Some(oldest) = mailbox.queue.pop_front() {
                mail.bytes
                    .fetch_sub(oldest.payload.len(), Ordering::Relaxed);
            }
        }
        if mail.bytes.load(Ordering::Relaxed) + payload.len() > MAILBOX_BYTES_PER_TENANT {
            if let Some(suppressed) = refusal_log_budget() {
                warn!(
                    topic,
                    suppressed, "HTTP command mailboxes of the org are full: command dropped"
                );
            }
            continue;
        }
        mail.bytes.fetch_add(payload.len(), Ordering::Relaxed);
        mailbox.queue.push_back(Command {
            topic: topic.to_owned(),
            payload: payload.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tenant_mail(filters: &[&str]) -> TenantMail {
        let (requests, _) = mpsc::channel(1);
        let boxes = filters
            .iter()
            .map(|filter| {
                let mailbox = Mailbox {
                    queue: VecDeque::new(),
                    last_fetch: Instant::now(),
                    subscribed: true,
                };
                (filter.to_string(), mailbox)
            })
            .collect();
        TenantMail {
            boxes: Mutex::new(boxes),
            bytes: AtomicUsize::new(0),
            requests,
        }
    }

    #[test]
    fn a_full_mailbox_drops_its_oldest_and_the_byte_count_follows() {
        let mail = tenant_mail(&["o/cmd/+", "o/other/+"]);
        for n in 0..MAILBOX_COMMANDS + 2 {
            deliver(&mail, "o/cmd/c", Bytes::from(vec![b'x'; n + 1]));
        }
        let mut boxes = mail.boxes();
        let mailbox = boxes.get_mut("o/cmd/+").expect("mailbox");
        assert_eq!(mailbox.queue.len(), MAILBOX_COMMANDS);
        // The two oldest (1 and 2 bytes) were dropped.
        let held: usize = (3..=MAILBOX_COMMANDS + 2).sum();
        assert_eq!(mail.bytes.load(Ordering::Relaxed), held);
        let first = mail.take(mailbox).expect("a command");
        assert_eq!(first.payload.len(), 3);
        assert_eq!(mail.bytes.load(Ordering::Relaxed), held - 3);
        assert!(boxes.get("o/other/+").expect("mailbox").queue.is_empty());
    }

    #[test]
    fn the_tenant_byte_budget_bounds_every_mailbox_together() {
        let mail = tenant_mail(&["o/a", "o/b"]);
        let big = Bytes::from(vec![0u8; MAILBOX_BYTES_PER_TENANT / 2 + 1]);
        deliver(&mail, "o/a", big.clone());
        deliver(&mail, "o/b", big);
        let boxes = mail.boxes();
        assert_eq!(boxes["o/a"].queue.len(), 1);
        assert!(boxes["o/b"].queue.is_empty(), "over the budget: dropped");
    }
}
