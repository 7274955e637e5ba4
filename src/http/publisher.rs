//! The HTTP front end's way to the broker: a small pool of MQTT connections per tenant, shared
//! by every HTTP request of that tenant, each publishing at QoS 1 and answering a request only
//! once the broker's PUBACK came back (so an HTTP 200 means the broker has the message).
//!
//! Each pooled connection is one task with a bounded job queue and a bounded in-flight window.
//! It dials lazily on its first job, redials after a failure, and disconnects after
//! [`POOL_IDLE_TIMEOUT`] without work. A broker that stops acknowledging for
//! [`PUBACK_TIMEOUT`] fails every waiting request (503) and the connection is dropped. A
//! request that finds every queue of its tenant full is refused at once ([`PublishError::Busy`]),
//! so memory stays bounded whatever the clients do.
//!
//! Tenants get separate pools so that one tenant's flood cannot queue another's requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::codec::{decode_frame_header, put_varint, FrameHeader, ProtocolVersion};
use crate::upstream::{connect_own, Dial, UpstreamError};

/// Broker connections per tenant.
pub const CONNECTIONS_PER_TENANT: usize = 2;
/// Jobs one pooled connection queues before requests are refused.
const JOB_QUEUE: usize = 256;
/// QoS 1 publishes one pooled connection has unacknowledged at once.
const MAX_IN_FLIGHT: usize = 64;
/// How long the broker may take to acknowledge a publish.
pub const PUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pooled connection stays up without work.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The keep-alive of pooled connections, in seconds: longer than the idle timeout, so a live
/// connection always has traffic within it.
const POOL_KEEP_ALIVE_SECS: u16 = 120;
/// The largest packet read from the broker on a pooled connection (only acks are expected).
const MAX_INBOUND_BYTES: usize = 64 * 1024;
/// How long writing to the broker may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a publish did not reach the broker.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Every queue of the tenant is full.
    #[error("the tenant's broker connections are busy")]
    Busy,
    /// The broker could not be reached, refused the connection, or dropped it.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    /// The broker did not acknowledge in time.
    #[error("the broker did not acknowledge within {0:?}")]
    Timeout(Duration),
}

/// One message for the broker.
struct Job {
    topic: String,
    payload: Bytes,
    qos: u8,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// The pools of every tenant that has used the HTTP API.
pub struct Publisher<D: Dial> {
    dialer: Arc<D>,
    client_id_prefix: String,
    pools: Mutex<HashMap<Box<str>, Arc<TenantPool>>>,
}

struct TenantPool {
    queues: Vec<mpsc::Sender<Job>>,
    next: AtomicUsize,
}

impl<D: Dial> Publisher<D> {
    /// Pools dialling with `dialer`; connection client IDs start with `client_id_prefix` (unique
    /// to the process), then `-TENANT-N`.
    pub fn new(dialer: Arc<D>, client_id_prefix: String) -> Publisher<D> {
        Publisher {
            dialer,
            client_id_prefix,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes `payload` to the broker topic at `qos` (0 or 1) through the tenant's pool, and
    /// waits for the broker's PUBACK (QoS 1) or the write (QoS 0).
    pub async fn publish(
        &self,
        tenant: &str,
        topic: String,
        payload: Bytes,
        qos: u8,
    ) -> Result<(), PublishError> {
        let pool = self.pool(tenant);
        let (done, answer) = oneshot::channel();
        let mut job = Job {
            topic,
            payload,
            qos: qos.min(1),
            done,
        };
        let first = pool.next.fetch_add(1, Ordering::Relaxed);
        let count = pool.queues.len();
        for turn in 0..count {
            match pool.queues[(first + turn) % count].try_send(job) {
                Ok(()) => {
                    return match tokio::time::timeout(PUBACK_TIMEOUT, answer).await {
                        Ok(Ok(result)) => result,
                        Ok(Err(_)) => Err(PublishError::Unavailable("connection ended".into())),
                        Err(_) => Err(PublishError::Timeout(PUBACK_TIMEOUT)),
                    };
                }
                Err(mpsc::error::TrySendError::Full(back))
                | Err(mpsc::error::TrySendError::Closed(back)) => job = back,
            }
        }
        Err(PublishError::Busy)
    }

    fn pool(&self, tenant: &str) -> Arc<TenantPool> {
        let mut pools = self
            .pools
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(pool) = pools.get(tenant) {
            return pool.clone();
        }
        let queues = (0..CONNECTIONS_PER_TENANT)
            .map(|n| {
                let (sender, jobs) = mpsc::channel(JOB_QUEUE);
                let client_id = format!("{}-{tenant}-{n}", self.client_id_prefix);
                tokio::spawn(run_connection(self.dialer.clone(), client_id, jobs));
                sender
            })
            .collect();
        let pool = Arc::new(TenantPool {
            queues,
            next: AtomicUsize::new(0),
        });
        pools.insert(tenant.into(), pool.clone());
        pool
    }
}

/// A publish written to the broker and waiting for its PUBACK.
struct InFlight {
    packet_id: u16,
    sent: Instant,
    done: oneshot::Sender<Result<(), PublishError>>,
}

/// One pooled connection's life: wait for work, dial, publish until idle or broken, repeat.
/// Ends when the publisher is dropped.
async fn run_connection<D: Dial>(dialer: Arc<D>, client_id: String, mut jobs: mpsc::Receiver<Job>) {
    while let Some(first) = jobs.recv().await {
        let stream = match connect(&*dialer, &client_id, POOL_KEEP_ALIVE_SECS).await {
            Ok(stream) => stream,
            Err(error) => {
                warn!(%client_id, %error, "HTTP publisher cannot reach the broker");
                let reason = error.to_string();
                let _ = first
                    .done
                    .send(Err(PublishError::Unavailable(reason.clone())));
                // Everything queued behind it would meet the same broker: answer it now.
                while let Ok(job) = jobs.try_recv() {
                    let _ = job
                        .done
                        .send(Err(PublishError::Unavailable(reason.clone())));
                }
                continue;
            }
        };
        let reason = serve(stream, first, &mut jobs).await;
        debug!(%client_id, reason, "HTTP publisher connection closed");
    }
}

/// Dials the broker and connects as `client_id` with the proxy's credentials and a clean
/// session (also used by the command subscriber).
pub(super) async fn connect<D: Dial>(
    dialer: &D,
    client_id: &str,
    keep_alive: u16,
) -> Result<D::Stream, UpstreamError> {
    let (stream, code, _) =
        connect_own(dialer, client_id, ProtocolVersion::V311, keep_alive, None).await?;
    if code != 0 {
        return Err(UpstreamError::NotConnack);
    }
    Ok(stream)
}

/// Writes and flushes `bytes` within [`WRITE_TIMEOUT`].
pub(super) async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
) -> Result<(), &'static str> {
    let written = tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(bytes).await?;
        stream.flush().await
    })
    .await;
    match written {
        Ok(Ok(())) => Ok(()),
        _ => Err("write failed"),
    }
}

/// Encodes an MQTT 3.1.1 PUBLISH.
fn encode(out: &mut BytesMut, job: &Job, packet_id: Option<u16>) {
    let len = 2 + job.topic.len() + packet_id.map_or(0, |_| 2) + job.payload.len();
    out.reserve(5 + len);
    out.extend_from_slice(&[0x30 | (job.qos << 1)]);
    put_varint(out, len);
    out.extend_from_slice(&(job.topic.len() as u16).to_be_bytes());
    out.extend_from_slice(job.topic.as_bytes());
    if let Some(id) = packet_id {
        out.extend_from_slice(&id.to_be_bytes());
    }
    out.extend_from_slice(&job.payload);
}

/// Publishes jobs over one established connection until it breaks or stays idle. Returns why it
/// ended.
async fn serve<S>(mut stream: S, first: Job, jobs: &mut mpsc::Receiver<Job>) -> &'static str
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut in_flight: Vec<InFlight> = Vec::with_capacity(MAX_IN_FLIGHT);
    let mut next_id: u16 = 0;
    let mut inbound = BytesMut::with_capacity(256);
    let mut out = BytesMut::new();
    let mut waiting = Some(first);
    let mut last_work = Instant::now();
    let reason = loop {
        if let Some(job) = waiting.take() {
            last_work = Instant::now();
            out.clear();
            let packet_id = (job.qos > 0).then(|| loop {
                next_id = next_id.wrapping_add(1).max(1);
                if !in_flight.iter().any(|f| f.packet_id == next_id) {
                    break next_id;
                }
            });
            encode(&mut out, &job, packet_id);
            if write(&mut stream, &out).await.is_err() {
                let _ = job
                    .done
                    .send(Err(PublishError::Unavailable("write failed".into())));
                break "write failed";
            }
            match packet_id {
                Some(packet_id) => in_flight.push(InFlight {
                    packet_id,
                    sent: Instant::now(),
                    done: job.done,
                }),
                None => {
                    let _ = job.done.send(Ok(()));
                }
            }
        }
        let ack_deadline = in_flight.first().map(|f| f.sent + PUBACK_TIMEOUT);
        let idle_deadline = last_work + POOL_IDLE_TIMEOUT;
        tokio::select! {
            job = jobs.recv(), if in_flight.len() < MAX_IN_FLIGHT => match job {
                Some(job) => waiting = Some(job),
                None => break "publisher dropped",
            },
            read = stream.read_buf(&mut inbound) => {
                if !matches!(read, Ok(n) if n > 0) {
                    break "broker closed the connection";
                }
                if let Err(reason) = acknowledge(&mut inbound, &mut in_flight) {
                    break reason;
                }
            }
            _ = tokio::time::sleep_until(ack_deadline.unwrap_or(idle_deadline)) => {
                if ack_deadline.is_some() {
                    break "the broker did not acknowledge in time";
                }
                if in_flight.is_empty() {
                    // DISCONNECT: the broker ends the session cleanly.
                    let _ = write(&mut stream, &[0xE0, 0]).await;
                    break "idle";
                }
            }
        }
    };
    for flight in in_flight {
        let _ = flight
            .done
            .send(Err(PublishError::Unavailable(reason.to_owned())));
    }
    reason
}

/// The header of the first packet in `inbound` once the whole packet is there (`None`: not yet).
pub(super) fn complete_frame(
    inbound: &BytesMut,
    max_bytes: usize,
) -> Result<Option<FrameHeader>, &'static str> {
    match decode_frame_header(inbound, max_bytes) {
        Ok(Some(header)) if inbound.len() >= header.frame_len() => Ok(Some(header)),
        Ok(_) => Ok(None),
        Err(_) => Err("invalid packet from the broker"),
    }
}

/// Handles every complete packet in `inbound`: a PUBACK answers its publish; anything else the
/// broker may send on a connection that subscribed to nothing is ignored.
fn acknowledge(inbound: &mut BytesMut, in_flight: &mut Vec<InFlight>) -> Result<(), &'static str> {
    loop {
        let Some(header) = complete_frame(inbound, MAX_INBOUND_BYTES)? else {
            return Ok(());
        };
        let body = &inbound[header.header_len..header.frame_len()];
        if header.first_byte == 0x40 && body.len() >= 2 {
            let packet_id = u16::from_be_bytes([body[0], body[1]]);
            if let Some(at) = in_flight.iter().position(|f| f.packet_id == packet_id) {
                let flight = in_flight.remove(at);
                let _ = flight.done.send(Ok(()));
            }
        }
        inbound.advance(header.frame_len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::memory::DuplexDialer;
    use tokio::io::DuplexStream;

    /// Reads one whole packet from the broker's end.
    async fn read_packet(broker: &mut DuplexStream, buf: &mut BytesMut) -> BytesMut {
        loop {
            if let Ok(Some(header)) = decode_frame_header(buf, 1 << 16) {
                if buf.len() >= header.frame_len() {
                    return buf.split_to(header.frame_len());
                }
            }
            assert!(broker.read_buf(buf).await.expect("read") > 0, "closed");
        }
    }

    fn publisher() -> (
        Publisher<DuplexDialer>,
        mpsc::UnboundedReceiver<DuplexStream>,
    ) {
        let (brokers, dialled) = mpsc::unbounded_channel();
        let dialer = DuplexDialer {
            brokers,
            pipe_bytes: 64 * 1024,
        };
        (Publisher::new(Arc::new(dialer), "test".into()), dialled)
    }

    /// A publish under way, the broker's end after CONNACK, and the PUBLISH it received.
    async fn one_publish() -> (
        tokio::task::JoinHandle<Result<(), PublishError>>,
        DuplexStream,
        BytesMut,
    ) {
        let (publisher, mut dialled) = publisher();
        let publish = tokio::spawn(async move {
            publisher
                .publish("org1", "org1/t".into(), Bytes::from_static(b"hi"), 1)
                .await
        });
        let mut broker = dialled.recv().await.expect("dialled");
        let mut buf = BytesMut::new();
        let connect = read_packet(&mut broker, &mut buf).await;
        assert_eq!(connect[0], 0x10);
        broker.write_all(&[0x20, 2, 0, 0]).await.expect("connack");
        let packet = read_packet(&mut broker, &mut buf).await;
        (publish, broker, packet)
    }

    #[tokio::test]
    async fn answers_after_the_puback_and_not_before() {
        let (publish, mut broker, packet) = one_publish().await;
        assert_eq!(packet[0], 0x32, "QoS 1 PUBLISH");
        // Two bytes of remaining length would not fit this small packet: one.
        let body = &packet[2..];
        let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
        assert_eq!(&body[2..2 + topic_len], b"org1/t");
        let id = [body[2 + topic_len], body[3 + topic_len]];
        assert_eq!(&body[4 + topic_len..], b"hi");
        tokio::task::yield_now().await;
        assert!(!publish.is_finished(), "answered before the PUBACK");
        broker
            .write_all(&[0x40, 2, id[0], id[1]])
            .await
            .expect("puback");
        assert_eq!(publish.await.expect("task"), Ok(()));
    }

    #[tokio::test]
    async fn a_broker_that_closes_fails_the_request() {
        let (publish, broker, _) = one_publish().await;
        drop(broker);
        assert!(matches!(
            publish.await.expect("task"),
            Err(PublishError::Unavailable(_))
        ));
    }
}
