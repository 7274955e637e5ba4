//! Shared subscriptions done by the proxy, for brokers that have none
//! (`Capabilities::shared_subscriptions` false: RabbitMQ 3.x, NATS): the connections of one
//! WIoTP scalable application (`A:ORG:APP:...`) share its deliveries as `$share` would.
//!
//! Each group (its `$share/NAME/` prefix) has one *distributor* per process: a task with a
//! broker connection of its own that subscribes to the union of its members' filters (plain,
//! without `$share`). The members' own broker connections subscribe to nothing. Every PUBLISH
//! the distributor receives goes to exactly one member whose filters match it, taken in turn
//! (round robin), through the member's bounded mailbox ([`MEMBER_MAILBOX`]); the member's session
//! writes it to its client. Rules, as for `$share`:
//!
//! - One member per message. A QoS 1 message is acknowledged to the broker only once the
//!   member's client acknowledged it; a member holds at most [`MEMBER_INFLIGHT`] such messages,
//!   and a member whose mailbox is full (a stalled client) is passed over.
//! - A member that leaves stops getting messages at once; the QoS 1 messages it had not
//!   acknowledged go to another member (with DUP set). When no member is left the
//!   distributor closes its connection.
//! - QoS is the smaller of the message's and the member's subscription's, at most 1. Retained
//!   messages sent by the broker on a new subscription are not delivered (a shared
//!   subscription gets none) and are acknowledged.
//! - A broker connection that breaks or stalls ends the group: its members' sessions close with
//!   92 and reconnect into a new group. Messages the broker sent the distributor and nobody
//!   acknowledged yet are the broker's to redeliver (they are not acknowledged).
//!
//! Several proxy processes cannot share one distributor. The first distributor of a group
//! *claims* it with a retained message at `warden:share/GROUP` (cleared by its connection's
//! will and when it ends); a process that finds the group claimed by another refuses the
//! SUBSCRIBE with a reason that says so, rather than deliver each message once per process, and
//! reads the claim again at the next SUBSCRIBE.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::codec::{
    decode_frame_header, encode_publish, encode_subscribe, encode_unsubscribe, filter_matches,
    parse_publish, parse_suback, ProtocolVersion, Will,
};
use crate::upstream::{connect_own, Dial};

/// Deliveries and answers waiting for one member's session, at most.
pub const MEMBER_MAILBOX: usize = 64;
/// Mailbox places kept free of deliveries for SUBSCRIBE answers.
const ANSWER_RESERVE: usize = 8;
/// QoS 1 messages one member holds unacknowledged, at most.
pub const MEMBER_INFLIGHT: usize = 32;
/// Messages received from the broker and not yet handed to a member, at most: beyond it the
/// distributor stops reading the broker (back-pressure).
const MAX_BACKLOG: usize = 1024;
/// Largest PUBLISH the distributor reads, in bytes.
const MAX_PACKET_BYTES: usize = 16 * 1024 * 1024;
/// Deadline of every write to the broker.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive of the distributor's connection, in seconds.
const KEEP_ALIVE_SECS: u16 = 30;
/// How long a group's claim is waited for.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);
/// First level of the claim topics.
pub const CLAIM_ROOT: &str = "warden:share";

/// What a member's session gets from its distributor.
#[derive(Debug)]
pub enum ShareEvent {
    /// The answer to the member's SUBSCRIBE `packet_id`: a code per filter.
    Suback {
        /// The client's packet id.
        packet_id: u16,
        /// Granted QoS, or 0x80.
        codes: Vec<u8>,
        /// Why filters were refused, if they were.
        reason: Option<String>,
    },
    /// A message for the member's client.
    Deliver {
        /// Broker topic.
        topic: String,
        /// Payload.
        payload: Bytes,
        /// The packet id to use towards the client: `Some` for QoS 1.
        packet_id: Option<u16>,
        /// Sent before to a member that left.
        dup: bool,
    },
}

/// Broker filters (without `$share`) and their QoS.
type Filters = Vec<(String, u8)>;

enum Command {
    Join(u64, mpsc::Sender<ShareEvent>),
    Subscribe(u64, u16, Vec<(String, u8)>),
    Unsubscribe(u64, Vec<String>),
    Ack(u64, u16),
    Leave(u64),
}

/// The groups of this process.
#[derive(Debug)]
pub struct Groups<D: Dial> {
    dialer: Arc<D>,
    client_prefix: String,
    owner: String,
    registry: Arc<Registry>,
    next_id: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    groups: Mutex<HashMap<String, Entry>>,
}

#[derive(Debug)]
struct Entry {
    // Unbounded, yet bounded in use: a member sends at most MEMBER_INFLIGHT acks, and its
    // SUBSCRIBEs and UNSUBSCRIBEs pass the session's subscribe rate first.
    commands: mpsc::UnboundedSender<Command>,
    members: usize,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Each update is one insert, removal or count change; a poisoned map is consistent.
        self.groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One session's membership of a group. Dropping it leaves the group.
#[derive(Debug)]
pub struct Member {
    /// What the distributor sends this member.
    pub events: mpsc::Receiver<ShareEvent>,
    id: u64,
    group: String,
    commands: mpsc::UnboundedSender<Command>,
    registry: Arc<Registry>,
}

impl Member {
    /// Subscribes the member to broker `filters` (without `$share`) with their QoS; the answer
    /// comes as [`ShareEvent::Suback`] with `packet_id`.
    pub fn subscribe(&self, packet_id: u16, filters: Vec<(String, u8)>) {
        let _ = self
            .commands
            .send(Command::Subscribe(self.id, packet_id, filters));
    }

    /// Unsubscribes the member from broker `filters`.
    pub fn unsubscribe(&self, filters: Vec<String>) {
        let _ = self.commands.send(Command::Unsubscribe(self.id, filters));
    }

    /// The member's client acknowledged the QoS 1 delivery `packet_id`.
    pub fn ack(&self, packet_id: u16) {
        let _ = self.commands.send(Command::Ack(self.id, packet_id));
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Leave(self.id));
        let mut groups = self.registry.lock();
        if let Some(entry) = groups.get_mut(&self.group) {
            // The entry may be a newer distributor's if this one ended; count only our own.
            if entry.commands.same_channel(&self.commands) {
                entry.members -= 1;
                if entry.members == 0 {
                    groups.remove(&self.group);
                }
            }
        }
    }
}

impl<D: Dial> Groups<D> {
    /// The groups of a process whose distributors connect through `dialer` with client IDs
    /// starting with `client_prefix` (unique to the process and free of `.`), and claim their
    /// groups in the name of `owner`.
    pub fn new(dialer: Arc<D>, client_prefix: &str, owner: &str) -> Groups<D> {
        Groups {
            dialer,
            client_prefix: crate::ledger::level(client_prefix),
            owner: owner.to_owned(),
            registry: Arc::default(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Makes a session a member of `group` (a `$share/NAME/` prefix), starting its distributor
    /// when it is the first.
    pub fn join(&self, group: &str) -> Member {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (events_tx, events) = mpsc::channel(MEMBER_MAILBOX);
        let mut groups = self.registry.lock();
        // A distributor that ended (its broker connection broke) is replaced by a new one.
        if groups
            .get(group)
            .is_some_and(|entry| entry.commands.is_closed())
        {
            groups.remove(group);
        }
        let entry = groups.entry(group.to_owned()).or_insert_with(|| {
            let (commands, commands_rx) = mpsc::unbounded_channel();
            let distributor = Distributor {
                dialer: self.dialer.clone(),
                client_id: format!("{}-{id}", self.client_prefix),
                claim_topic: format!("{CLAIM_ROOT}/{}", crate::ledger::level(group)),
                owner: self.owner.clone(),
                group: group.to_owned(),
                commands: commands_rx,
                members: Vec::new(),
                next: 0,
                filters: HashMap::new(),
                pending_subacks: HashMap::new(),
                next_packet_id: 0,
                backlog: VecDeque::new(),
                out: BytesMut::new(),
                refusal: None,
                deferred: Vec::new(),
            };
            tokio::spawn(distributor.run());
            Entry {
                commands,
                members: 0,
            }
        });
        entry.members += 1;
        let commands = entry.commands.clone();
        let _ = commands.send(Command::Join(id, events_tx));
        Member {
            events,
            id,
            group: group.to_owned(),
            commands,
            registry: self.registry.clone(),
        }
    }
}

/// A message from the broker on its way to a member.
#[derive(Debug)]
struct Message {
    topic: String,
    payload: Bytes,
    qos: u8,
    /// The broker's packet id, to acknowledge once a member's client did.
    packet_id: Option<u16>,
    dup: bool,
}

struct MemberState {
    id: u64,
    events: mpsc::Sender<ShareEvent>,
    filters: Vec<(String, u8)>,
    inflight: HashMap<u16, Message>,
    next_packet_id: u16,
}

impl MemberState {
    /// The QoS this member gets `topic` at, if one of its filters matches it.
    fn qos_for(&self, topic: &str) -> Option<u8> {
        self.filters
            .iter()
            .filter(|(filter, _)| filter_matches(filter, topic))
            .map(|(_, qos)| *qos)
            .max()
    }

    fn packet_id(&mut self) -> u16 {
        loop {
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&self.next_packet_id) {
                return self.next_packet_id;
            }
        }
    }
}

struct Distributor<D: Dial> {
    dialer: Arc<D>,
    client_id: String,
    claim_topic: String,
    owner: String,
    group: String,
    commands: mpsc::UnboundedReceiver<Command>,
    members: Vec<MemberState>,
    /// Where the next round-robin search starts.
    next: usize,
    /// Broker subscriptions and how many members hold each.
    filters: HashMap<String, usize>,
    /// The distributor's SUBSCRIBEs waiting for their SUBACK: the member and its packet id.
    pending_subacks: HashMap<u16, (u64, u16, Vec<u8>)>,
    next_packet_id: u16,
    backlog: VecDeque<Message>,
    out: BytesMut,
    /// Set when the group cannot be served here: every SUBSCRIBE is refused with it.
    refusal: Option<String>,
    /// SUBSCRIBEs that wait for the claim to be read again (the group was claimed elsewhere).
    deferred: Vec<(u64, u16, Filters)>,
}

/// Why a distributor's connection ended.
#[derive(Debug)]
struct Broken(String);

impl<D: Dial> Distributor<D> {
    async fn run(mut self) {
        let result = self.serve().await;
        if let Err(Broken(why)) = result {
            warn!(group = %self.group, members = self.members.len(), reason = %why, "shared-subscription group ended: its members are closed and reconnect");
        }
    }

    async fn serve(&mut self) -> Result<(), Broken> {
        let mut stream = self.connect().await?;
        let mut inbound = BytesMut::with_capacity(4096);
        self.claim(&mut stream, &mut inbound).await?;
        let mut idle = tokio::time::interval(Duration::from_secs(u64::from(KEEP_ALIVE_SECS) / 2));
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.reset();
        let mut pings = 0u32;
        loop {
            self.dispatch();
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                write_all(&mut stream, &out).await?;
            }
            if !self.deferred.is_empty() {
                // The other process may have let the group go since: look again.
                self.claim(&mut stream, &mut inbound).await?;
                for (id, packet_id, filters) in std::mem::take(&mut self.deferred) {
                    self.subscribe_now(id, packet_id, filters);
                }
                continue;
            }
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                read = stream.read_buf(&mut inbound), if self.backlog.len() < MAX_BACKLOG => {
                    match read {
                        Ok(0) => return Err(Broken("the broker closed the connection".into())),
                        Err(error) => return Err(Broken(error.to_string())),
                        Ok(_) => {}
                    }
                    pings = 0;
                    self.frames(&mut inbound)?;
                }
                _ = idle.tick() => {
                    pings += 1;
                    if pings > 2 {
                        return Err(Broken("two keep-alive periods without an answer".into()));
                    }
                    self.out.extend_from_slice(&[0xC0, 0x00]);
                }
            }
        }
        // The last member left: the claim goes, then the connection.
        self.out.clear();
        encode_publish(&mut self.out, 0x31, &[self.claim_topic.as_bytes()], b"");
        self.out.extend_from_slice(&[0xE0, 0x00]);
        let out = std::mem::take(&mut self.out);
        let _ = write_all(&mut stream, &out).await;
        debug!(group = %self.group, "shared-subscription group closed: no member left");
        Ok(())
    }

    async fn connect(&mut self) -> Result<D::Stream, Broken> {
        let will = Will {
            properties: Vec::new(),
            topic: &self.claim_topic,
            payload: b"",
            qos: 0,
            retain: true,
        };
        let (stream, code, _) = connect_own(
            &*self.dialer,
            &self.client_id,
            ProtocolVersion::V311,
            KEEP_ALIVE_SECS,
            Some(will),
        )
        .await
        .map_err(|e| Broken(e.to_string()))?;
        if code != 0 {
            return Err(Broken(format!(
                "the broker refused the connection (CONNACK {code})"
            )));
        }
        Ok(stream)
    }

    /// Reads the group's claim (an exact topic, so every broker delivers its retained
    /// message), and takes it unless another process holds it.
    async fn claim(
        &mut self,
        stream: &mut D::Stream,
        inbound: &mut BytesMut,
    ) -> Result<(), Broken> {
        self.refusal = None;
        let round = self.packet_id();
        // This read's own probe: an earlier read's, or another process's, says nothing.
        let probe = format!("probe {} {round}", self.owner);
        let mut out = BytesMut::new();
        encode_subscribe(
            &mut out,
            ProtocolVersion::V311,
            round,
            &[],
            &[(&[self.claim_topic.as_bytes()], 0)],
        );
        write_all(stream, &out).await?;
        let holder = tokio::time::timeout(CLAIM_TIMEOUT, async {
            let mut subscribed = false;
            loop {
                match stream.read_buf(inbound).await {
                    Ok(0) => return Err(Broken("the broker closed the connection".into())),
                    Err(error) => return Err(Broken(error.to_string())),
                    Ok(_) => {}
                }
                while let Some(header) = decode_frame_header(inbound, MAX_PACKET_BYTES)
                    .map_err(|e| Broken(e.to_string()))?
                {
                    if inbound.len() < header.frame_len() {
                        break;
                    }
                    let frame = inbound.split_to(header.frame_len());
                    match header.first_byte >> 4 {
                        9 if !subscribed => {
                            subscribed = true;
                            // Our own claim, published now, comes back after any retained one.
                            let mut out = BytesMut::new();
                            encode_publish(
                                &mut out,
                                0x30,
                                &[self.claim_topic.as_bytes()],
                                probe.as_bytes(),
                            );
                            write_all(stream, &out).await?;
                        }
                        3 => {
                            let body = &frame[header.header_len..];
                            if let Ok(publish) =
                                parse_publish(header.first_byte, body, ProtocolVersion::V311, false)
                            {
                                let payload =
                                    String::from_utf8_lossy(&body[publish.payload]).into_owned();
                                if payload == probe {
                                    return Ok(None);
                                }
                                if !payload.is_empty()
                                    && !payload.starts_with("probe ")
                                    && payload != self.owner
                                {
                                    return Ok(Some(payload));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        })
        .await
        .map_err(|_| Broken("the group's claim could not be read in time".into()))??;
        out.clear();
        encode_unsubscribe(
            &mut out,
            ProtocolVersion::V311,
            self.packet_id(),
            &[],
            &[&[self.claim_topic.as_bytes()]],
        );
        match holder {
            Some(holder) => {
                warn!(group = %self.group, holder = %holder, "shared-subscription group served by another proxy process: its SUBSCRIBEs here are refused");
                self.refusal = Some(format!(
                    "the scalable application's group is served by another proxy process ({holder}); \
                     the broker has no shared subscriptions, so all its connections must use one process"
                ));
            }
            None => {
                encode_publish(
                    &mut out,
                    0x31,
                    &[self.claim_topic.as_bytes()],
                    self.owner.as_bytes(),
                );
                info!(group = %self.group, "shared-subscription group served by this process");
            }
        }
        write_all(stream, &out).await
    }

    fn packet_id(&mut self) -> u16 {
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        self.next_packet_id
    }

    fn member(&mut self, id: u64) -> Option<&mut MemberState> {
        self.members.iter_mut().find(|member| member.id == id)
    }

    /// Handles a member's command. The distributor ends when the command channel closes (the
    /// registry drops its sender with the last member), not when the last member's Leave
    /// arrives: a new member may have joined in between.
    fn command(&mut self, command: Command) {
        match command {
            Command::Join(id, events) => self.members.push(MemberState {
                id,
                events,
                filters: Vec::new(),
                inflight: HashMap::new(),
                next_packet_id: 0,
            }),
            Command::Subscribe(id, packet_id, filters) => self.subscribe(id, packet_id, filters),
            Command::Unsubscribe(id, filters) => {
                let Some(member) = self.member(id) else {
                    return;
                };
                let mut dropped = Vec::new();
                for filter in filters {
                    let before = member.filters.len();
                    member.filters.retain(|(f, _)| *f != filter);
                    if member.filters.len() < before {
                        dropped.push(filter);
                    }
                }
                self.release(dropped);
            }
            Command::Ack(id, packet_id) => {
                let acked = self
                    .member(id)
                    .and_then(|member| member.inflight.remove(&packet_id));
                if let Some(upstream_id) = acked.and_then(|message| message.packet_id) {
                    self.puback(upstream_id);
                }
            }
            Command::Leave(id) => {
                let Some(at) = self.members.iter().position(|member| member.id == id) else {
                    return;
                };
                let member = self.members.remove(at);
                // Its unacknowledged messages go to another member, marked as sent before.
                for (_, mut message) in member.inflight {
                    message.dup = true;
                    self.backlog.push_front(message);
                }
                self.release(member.filters.into_iter().map(|(f, _)| f).collect());
            }
        }
    }

    /// A member's SUBSCRIBE. While the group is claimed elsewhere, it waits for the claim to be
    /// read again.
    fn subscribe(&mut self, id: u64, packet_id: u16, filters: Vec<(String, u8)>) {
        if self.refusal.is_some() {
            self.deferred.push((id, packet_id, filters));
        } else {
            self.subscribe_now(id, packet_id, filters);
        }
    }

    fn subscribe_now(&mut self, id: u64, packet_id: u16, filters: Vec<(String, u8)>) {
        if let Some(reason) = self.refusal.clone() {
            if let Some(member) = self.member(id) {
                let _ = member.events.try_send(ShareEvent::Suback {
                    packet_id,
                    codes: vec![0x80; filters.len()],
                    reason: Some(reason),
                });
            }
            return;
        }
        let Some(member) = self.member(id) else {
            return;
        };
        let mut requested = Vec::with_capacity(filters.len());
        let mut added = Vec::new();
        for (filter, qos) in &filters {
            let qos = (*qos).min(1);
            requested.push(qos);
            match member.filters.iter_mut().find(|(f, _)| f == filter) {
                Some(existing) => existing.1 = qos,
                None => {
                    member.filters.push((filter.clone(), qos));
                    added.push(filter.clone());
                }
            }
        }
        for filter in added {
            *self.filters.entry(filter).or_default() += 1;
        }
        // Every SUBSCRIBE goes to the broker (the same subscription again is harmless), so its
        // SUBACK is the broker's word on these filters.
        let upstream_id = self.packet_id();
        let parts: Vec<[&[u8]; 1]> = filters.iter().map(|(f, _)| [f.as_bytes()]).collect();
        let request: Vec<(&[&[u8]], u8)> = parts.iter().map(|p| (&p[..], 1u8)).collect();
        encode_subscribe(
            &mut self.out,
            ProtocolVersion::V311,
            upstream_id,
            &[],
            &request,
        );
        self.pending_subacks
            .insert(upstream_id, (id, packet_id, requested));
    }

    /// Members let go of `filters`: those nobody holds any more are unsubscribed.
    fn release(&mut self, filters: Vec<String>) {
        let mut gone = Vec::new();
        for filter in filters {
            if let Some(count) = self.filters.get_mut(&filter) {
                *count -= 1;
                if *count == 0 {
                    self.filters.remove(&filter);
                    gone.push(filter);
                }
            }
        }
        if !gone.is_empty() {
            let upstream_id = self.packet_id();
            let parts: Vec<[&[u8]; 1]> = gone.iter().map(|f| [f.as_bytes()]).collect();
            let request: Vec<&[&[u8]]> = parts.iter().map(|p| &p[..]).collect();
            encode_unsubscribe(
                &mut self.out,
                ProtocolVersion::V311,
                upstream_id,
                &[],
                &request,
            );
        }
    }

    fn puback(&mut self, packet_id: u16) {
        let [high, low] = packet_id.to_be_bytes();
        self.out.extend_from_slice(&[0x40, 0x02, high, low]);
    }

    /// Handles every complete frame from the broker.
    fn frames(&mut self, inbound: &mut BytesMut) -> Result<(), Broken> {
        while let Some(header) =
            decode_frame_header(inbound, MAX_PACKET_BYTES).map_err(|e| Broken(e.to_string()))?
        {
            if inbound.len() < header.frame_len() {
                inbound.reserve(header.frame_len() - inbound.len());
                break;
            }
            let frame = inbound.split_to(header.frame_len()).freeze();
            let body = frame.slice(header.header_len..);
            match header.first_byte >> 4 {
                3 => {
                    let publish =
                        parse_publish(header.first_byte, &body, ProtocolVersion::V311, false)
                            .map_err(|e| Broken(e.to_string()))?;
                    if publish.qos > 1 {
                        return Err(Broken("the broker delivered at QoS 2".into()));
                    }
                    let message = Message {
                        topic: publish.topic.to_owned(),
                        payload: body.slice(publish.payload.clone()),
                        qos: publish.qos,
                        packet_id: publish.packet_id,
                        dup: false,
                    };
                    // A retained message on a new subscription: a shared subscription gets none.
                    if header.first_byte & 0x01 == 0x01 || message.topic == self.claim_topic {
                        if let Some(id) = message.packet_id {
                            self.puback(id);
                        }
                        continue;
                    }
                    self.backlog.push_back(message);
                }
                9 => {
                    let suback = parse_suback(&body, ProtocolVersion::V311)
                        .map_err(|e| Broken(e.to_string()))?;
                    if let Some((id, packet_id, requested)) =
                        self.pending_subacks.remove(&suback.packet_id)
                    {
                        let codes: Vec<u8> = requested
                            .iter()
                            .zip(suback.codes.iter().chain(std::iter::repeat(&0x80)))
                            .map(|(asked, granted)| {
                                if *granted >= 0x80 {
                                    0x80
                                } else {
                                    (*asked).min(*granted)
                                }
                            })
                            .collect();
                        let refused = codes.iter().any(|code| *code >= 0x80);
                        if let Some(member) = self.member(id) {
                            let answer = ShareEvent::Suback {
                                packet_id,
                                codes,
                                reason: refused
                                    .then(|| "the broker refused the subscription".to_owned()),
                            };
                            if member.events.try_send(answer).is_err() {
                                warn!(group = %self.group, "a member's mailbox is full: its SUBSCRIBE answer is lost and the member leaves");
                                self.command(Command::Leave(id));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Hands waiting messages to members, in turn, as long as one has room.
    fn dispatch(&mut self) {
        while let Some(message) = self.backlog.front() {
            let count = self.members.len();
            let mut chosen = None;
            let mut anyone = false;
            for step in 0..count {
                let at = (self.next + step) % count;
                let member = &self.members[at];
                let Some(qos) = member.qos_for(&message.topic) else {
                    continue;
                };
                anyone = true;
                let qos = qos.min(message.qos);
                let room = member.events.capacity() > ANSWER_RESERVE
                    && (qos == 0 || member.inflight.len() < MEMBER_INFLIGHT);
                if room {
                    chosen = Some((at, qos));
                    break;
                }
            }
            let Some(message) = (if anyone && chosen.is_none() {
                None
            } else {
                self.backlog.pop_front()
            }) else {
                // Every member that wants it is full: wait for an acknowledgement or a reader.
                return;
            };
            let Some((at, qos)) = chosen else {
                // Nobody subscribes to it (any more): the broker is done with it.
                if let Some(id) = message.packet_id {
                    self.puback(id);
                }
                continue;
            };
            self.next = at + 1;
            let member = &mut self.members[at];
            let packet_id = (qos == 1).then(|| member.packet_id());
            let event = ShareEvent::Deliver {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                packet_id,
                dup: message.dup,
            };
            if member.events.try_send(event).is_err() {
                // The session ended between the check and now; its Leave is on its way.
                self.backlog.push_front(message);
                return;
            }
            match packet_id {
                Some(packet_id) => {
                    member.inflight.insert(packet_id, message);
                }
                None => {
                    if let Some(id) = message.packet_id {
                        self.puback(id);
                    }
                }
            }
        }
    }
}

async fn write_all<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), Broken> {
    match tokio::time::timeout(
        WRITE_TIMEOUT,
        crate::transport::write_flushed(stream, bytes),
    )
    .await
    {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Broken(error.to_string())),
        Err(_) => Err(Broken("a write to the broker stalled".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::memory::DuplexDialer;
    use tokio::io::{AsyncWriteExt, DuplexStream};

    /// How long the test waits for something that must (or must not) happen, in paused time.
    const PATIENCE: Duration = Duration::from_secs(1);

    async fn read_frame(stream: &mut DuplexStream) -> Option<Vec<u8>> {
        let mut buf = Vec::new();
        tokio::time::timeout(PATIENCE, async {
            loop {
                if let Ok(Some(header)) = decode_frame_header(&buf, usize::MAX) {
                    if buf.len() >= header.frame_len() {
                        return buf;
                    }
                }
                let mut byte = [0u8; 1];
                match stream.read(&mut byte).await {
                    Ok(1) => buf.push(byte[0]),
                    _ => return Vec::new(),
                }
            }
        })
        .await
        .ok()
        .filter(|frame| !frame.is_empty())
    }

    fn publish(topic: &str, packet_id: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        let mut after = packet_id.to_be_bytes().to_vec();
        after.extend_from_slice(payload);
        encode_publish(&mut out, 0x32, &[topic.as_bytes()], &after);
        out.to_vec()
    }

    /// Plays the broker until the distributor has claimed its group.
    async fn accept(broker: &mut DuplexStream) {
        assert_eq!(read_frame(broker).await.expect("CONNECT")[0], 0x10);
        broker.write_all(&[0x20, 0x02, 0x00, 0x00]).await.unwrap();
        let subscribe = read_frame(broker).await.expect("claim SUBSCRIBE");
        assert_eq!(subscribe[0], 0x82);
        broker
            .write_all(&[0x90, 0x03, subscribe[2], subscribe[3], 0x00])
            .await
            .unwrap();
        // The probe comes back, as the broker delivers it to the subscription.
        let probe = read_frame(broker).await.expect("probe");
        broker.write_all(&probe).await.unwrap();
        assert_eq!(read_frame(broker).await.expect("UNSUBSCRIBE")[0], 0xA2);
        let claim = read_frame(broker).await.expect("claim");
        assert_eq!(claim[0], 0x31, "retained claim");
    }

    /// Subscribes `member` and plays the broker's SUBACK.
    async fn subscribe(member: &mut Member, broker: &mut DuplexStream, packet_id: u16) {
        member.subscribe(packet_id, vec![("org1/iot-2/#".into(), 1)]);
        let subscribe = read_frame(broker).await.expect("SUBSCRIBE");
        assert_eq!(subscribe[0], 0x82);
        broker
            .write_all(&[0x90, 0x03, subscribe[2], subscribe[3], 0x01])
            .await
            .unwrap();
        match member.events.recv().await {
            Some(ShareEvent::Suback { codes, .. }) => assert_eq!(codes, [1]),
            other => panic!("{other:?}"),
        }
    }

    async fn delivery(member: &mut Member) -> (Bytes, Option<u16>, bool) {
        match tokio::time::timeout(PATIENCE, member.events.recv()).await {
            Ok(Some(ShareEvent::Deliver {
                payload,
                packet_id,
                dup,
                ..
            })) => (payload, packet_id, dup),
            other => panic!("a delivery: {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_message_goes_to_one_member_and_is_acknowledged_after_its_client_did() {
        let (brokers, mut dialled) = mpsc::unbounded_channel();
        let groups = Groups::new(
            Arc::new(DuplexDialer {
                brokers,
                pipe_bytes: 64 * 1024,
            }),
            "test-share",
            "test-process",
        );
        let mut first = groups.join("$share/g/");
        let mut second = groups.join("$share/g/");
        let mut broker = dialled.recv().await.expect("the distributor dials");
        accept(&mut broker).await;
        subscribe(&mut first, &mut broker, 1).await;
        subscribe(&mut second, &mut broker, 1).await;

        broker
            .write_all(&publish("org1/iot-2/a", 7, b"one"))
            .await
            .unwrap();
        broker
            .write_all(&publish("org1/iot-2/b", 8, b"two"))
            .await
            .unwrap();
        let (payload, to_first, _) = delivery(&mut first).await;
        assert_eq!(&payload[..], b"one");
        let (payload, to_second, _) = delivery(&mut second).await;
        assert_eq!(&payload[..], b"two", "the next member's turn");
        // Neither client acknowledged yet: the broker hears nothing.
        assert!(read_frame(&mut broker).await.is_none());
        second.ack(to_second.expect("QoS 1"));
        assert_eq!(
            read_frame(&mut broker).await,
            Some(vec![0x40, 0x02, 0x00, 0x08])
        );

        // The first member leaves without acknowledging: its message goes to the other one,
        // marked as sent before, and is acknowledged once that client did.
        assert!(to_first.is_some());
        drop(first);
        let (payload, again, dup) = delivery(&mut second).await;
        assert_eq!((&payload[..], dup), (&b"one"[..], true));
        assert!(read_frame(&mut broker).await.is_none());
        second.ack(again.expect("QoS 1"));
        assert_eq!(
            read_frame(&mut broker).await,
            Some(vec![0x40, 0x02, 0x00, 0x07])
        );

        // A retained message on subscription is no shared subscription's: acknowledged, dropped.
        let mut retained = publish("org1/iot-2/c", 9, b"old");
        retained[0] |= 0x01;
        broker.write_all(&retained).await.unwrap();
        assert_eq!(
            read_frame(&mut broker).await,
            Some(vec![0x40, 0x02, 0x00, 0x09])
        );
        assert!(tokio::time::timeout(PATIENCE, second.events.recv())
            .await
            .is_err());
    }
}
