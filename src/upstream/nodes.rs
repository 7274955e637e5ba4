//! The broker's nodes (`upstream.addresses`; one node for `upstream.address`): which node a new
//! connection goes to, which nodes are down, and how many connections each one holds.
//!
//! - **Selection: least connections.** A new connection goes to the node that is up and holds
//!   the fewest connections of this process (dials under way included, so a burst of CONNECTs
//!   spreads too); ties go round-robin. Nodes that are down come last, in case every node is
//!   down, and then the dial tries them anyway rather than refuse without trying.
//! - **Down.** A node is marked down when a dial to it fails (TCP or TLS, no answer to the
//!   CONNECT, or a CONNACK that says the node cannot serve), or when a probe fails. A probe is a
//!   TCP (and TLS) connect, made when one of the node's connections ends (at most one per
//!   [`LOSS_PROBE_INTERVAL`]: a burst of ends costs one probe, a later one), and while the node
//!   is down, after a backoff that doubles from [`DOWN_BACKOFF_MIN`] to [`DOWN_BACKOFF_MAX`]
//!   and starts over only when a connection to the node was answered. A probe that connects, or
//!   a connection that is answered, marks the node up again.
//! - **Live connections are left alone.** Marking a node down steers new connections away
//!   from it and does not close the ones it holds: a node that is really gone ends them itself
//!   (the bridge closes those sessions with 92), and a dial that failed once on a busy node is no
//!   reason to drop its healthy sessions.
//!
//! The state changes are pure functions of this module ([`Nodes`]); the dialer runs the probes.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::metrics::{NodeMetrics, NodeSeries};

/// The first wait before a down node is probed again; it doubles after each failure.
pub const DOWN_BACKOFF_MIN: Duration = Duration::from_secs(1);
/// The longest wait between probes of a down node.
pub const DOWN_BACKOFF_MAX: Duration = Duration::from_secs(15);
/// A node is probed after one of its connections ended at most this often.
pub const LOSS_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// One node's health.
#[derive(Debug)]
struct Health {
    /// Taken for new connections.
    up: bool,
    /// A probe task watches the node.
    probing: bool,
    /// A connection ended since the last probe started: the node needs another look.
    loss_pending: bool,
    /// When the last probe started.
    last_probe: Option<Instant>,
    /// Since when the node is down.
    down_since: Option<Instant>,
    /// The wait before the next probe of a down node. It doubles with each failure and starts
    /// over only when a connection to the node was answered, not when a probe connects: a node
    /// that takes TCP connections and fails every CONNECT is given ever longer rests.
    backoff: Duration,
}

/// One broker node.
#[derive(Debug)]
pub struct Node {
    /// Its place in `upstream.addresses`, from 0.
    pub index: usize,
    /// `HOST:PORT`.
    pub address: String,
    /// Connections open or being opened.
    connections: AtomicUsize,
    health: Mutex<Health>,
    series: NodeSeries,
}

impl Node {
    fn health(&self) -> MutexGuard<'_, Health> {
        // Every update leaves the fields consistent; a poisoned lock is still usable.
        self.health
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the node is taken for new connections.
    pub fn is_up(&self) -> bool {
        self.health().up
    }

    /// Connections open or being opened.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Dials to the node that failed so far.
    pub fn series_dial_failures(&self) -> u64 {
        self.series.dial_failures.get()
    }

    /// Marks the node down (a no-op when it is down already), with a log line and metrics.
    fn mark_down(&self, health: &mut Health, reason: &str) {
        if health.up {
            health.up = false;
            health.down_since = Some(Instant::now());
            self.series.up.set(0);
            self.series.downs.inc();
            warn!(
                node = self.index,
                address = %self.address,
                %reason,
                "broker node down: new connections go to the other nodes"
            );
        }
    }

    /// Marks the node up (a no-op when it is up), with a log line and metrics.
    fn mark_up(&self, health: &mut Health, how: &str) {
        if !health.up {
            health.up = true;
            let down_for = health
                .down_since
                .take()
                .map_or(0.0, |since| since.elapsed().as_secs_f64());
            self.series.up.set(1);
            info!(
                node = self.index,
                address = %self.address,
                down_for_secs = down_for,
                how,
                "broker node up"
            );
        }
    }
}

/// What the dialer does next for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// Nothing: a probe task watches the node already, or none is needed.
    Nothing,
    /// Start a probe task that first waits this long.
    Start(Duration),
}

/// What the probe task does after a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The node is up: the task ends.
    Stop,
    /// Probe again after this long.
    ProbeAfter(Duration),
}

/// Every node, in config order.
#[derive(Debug)]
pub struct Nodes {
    nodes: Box<[Node]>,
    /// Where the next round-robin tie-break starts.
    next: AtomicUsize,
}

impl Nodes {
    /// The nodes at `addresses`, all up to begin with.
    pub fn new(addresses: &[String], metrics: &NodeMetrics) -> Nodes {
        let nodes = addresses
            .iter()
            .enumerate()
            .map(|(index, address)| {
                let series = metrics.series(index, address);
                series.up.set(1);
                Node {
                    index,
                    address: address.clone(),
                    connections: AtomicUsize::new(0),
                    health: Mutex::new(Health {
                        up: true,
                        probing: false,
                        loss_pending: false,
                        last_probe: None,
                        down_since: None,
                        backoff: DOWN_BACKOFF_MIN,
                    }),
                    series,
                }
            })
            .collect();
        Nodes {
            nodes,
            next: AtomicUsize::new(0),
        }
    }

    /// Node `index`.
    pub fn get(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    /// Every node, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter()
    }

    /// Whether any node is up.
    pub fn any_up(&self) -> bool {
        self.nodes.iter().any(Node::is_up)
    }

    /// The nodes a new connection tries, best first: the nodes that are up by fewest
    /// connections (ties round-robin), then the nodes that are down (longest down last, as
    /// the backoff of a node that keeps failing grows).
    pub fn order(&self) -> Vec<usize> {
        let count = self.nodes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % count.max(1);
        let mut order: Vec<(bool, usize, usize, usize)> = self
            .nodes
            .iter()
            .map(|node| {
                let health = node.health();
                let turn = (node.index + count - start) % count;
                let down_for = health
                    .down_since
                    .map_or(0, |since| since.elapsed().as_millis() as usize);
                let load = if health.up {
                    node.connections()
                } else {
                    down_for
                };
                (!health.up, load, turn, node.index)
            })
            .collect();
        order.sort_unstable();
        order.into_iter().map(|(_, _, _, index)| index).collect()
    }

    /// Counts a connection to node `index` (from the start of its dial) until the lease drops.
    pub fn lease(self: &Arc<Self>, index: usize) -> NodeLease {
        let node = &self.nodes[index];
        node.connections.fetch_add(1, Ordering::Relaxed);
        node.series.connections.inc();
        NodeLease {
            nodes: self.clone(),
            index,
            lost: false,
        }
    }

    /// A dial to node `index` failed with `reason`: TCP or TLS, no answer to the CONNECT, or a
    /// CONNACK that says the node cannot serve.
    pub fn dial_failed(&self, index: usize, reason: &str) -> Watch {
        let node = &self.nodes[index];
        node.series.dial_failures.inc();
        let mut health = node.health();
        node.mark_down(&mut health, reason);
        if health.probing {
            return Watch::Nothing;
        }
        health.probing = true;
        Watch::Start(Self::next_backoff(&mut health))
    }

    /// The backoff to wait now; the next one doubles.
    fn next_backoff(health: &mut Health) -> Duration {
        let wait = health.backoff;
        health.backoff = (wait * 2).min(DOWN_BACKOFF_MAX);
        wait
    }

    /// A connection to node `index` was answered: the node serves.
    pub fn dialled(&self, index: usize) {
        let node = &self.nodes[index];
        let mut health = node.health();
        health.backoff = DOWN_BACKOFF_MIN;
        node.mark_up(&mut health, "a connection to it was answered");
    }

    /// One of node `index`'s connections ended (closed by the broker, or an I/O error): have
    /// the node probed, at once, or [`LOSS_PROBE_INTERVAL`] after the last probe started, so
    /// that many ends at once (or a stream of clients that come and go) cost one probe. A loss
    /// while a probe is under way has it probe once more after it.
    pub fn connection_lost(&self, index: usize) -> Watch {
        let node = &self.nodes[index];
        let mut health = node.health();
        if !health.up {
            return Watch::Nothing;
        }
        health.loss_pending = true;
        if health.probing {
            return Watch::Nothing;
        }
        health.probing = true;
        let since_last = health.last_probe.map(|at| at.elapsed());
        Watch::Start(since_last.map_or(Duration::ZERO, |since| {
            LOSS_PROBE_INTERVAL.saturating_sub(since)
        }))
    }

    /// The probe task of node `index` is about to probe it.
    pub fn probing(&self, index: usize) {
        let mut health = self.nodes[index].health();
        health.loss_pending = false;
        health.last_probe = Some(Instant::now());
    }

    /// A probe of node `index` connected (`Ok`) or failed.
    pub fn probed(&self, index: usize, outcome: Result<(), String>) -> Next {
        let node = &self.nodes[index];
        let mut health = node.health();
        match outcome {
            // A connection ended while the probe ran: the probe may have come before the end.
            Ok(()) if health.loss_pending => Next::ProbeAfter(LOSS_PROBE_INTERVAL),
            Ok(()) => {
                node.mark_up(&mut health, "a probe connected");
                health.probing = false;
                Next::Stop
            }
            Err(reason) => {
                node.mark_down(&mut health, &format!("probe failed: {reason}"));
                Next::ProbeAfter(Self::next_backoff(&mut health))
            }
        }
    }

    /// One line per node for `/readyz`: index, address, up or down, connections.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for node in self.nodes.iter() {
            let state = if node.is_up() { "up" } else { "down" };
            out.push_str(&format!(
                "node {} {} {} connections={}\n",
                node.index,
                node.address,
                state,
                node.connections()
            ));
        }
        out
    }
}

/// A connection's place in its node's count; given back on `Drop`.
#[derive(Debug)]
pub struct NodeLease {
    nodes: Arc<Nodes>,
    index: usize,
    lost: bool,
}

impl NodeLease {
    /// The node.
    pub fn node(&self) -> &Node {
        self.nodes.get(self.index)
    }

    /// The connection ended by the broker's doing or an I/O error, for the first time: what to
    /// do about the node (see [`Nodes::connection_lost`]).
    pub fn lost(&mut self) -> Watch {
        if std::mem::replace(&mut self.lost, true) {
            return Watch::Nothing;
        }
        self.nodes.connection_lost(self.index)
    }

    /// The nodes.
    pub fn nodes(&self) -> &Arc<Nodes> {
        &self.nodes
    }
}

impl Drop for NodeLease {
    fn drop(&mut self) {
        let node = &self.nodes.nodes[self.index];
        node.connections.fetch_sub(1, Ordering::Relaxed);
        node.series.connections.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(count: usize) -> (Arc<Nodes>, NodeMetrics) {
        let metrics = NodeMetrics::default();
        let addresses: Vec<String> = (0..count).map(|i| format!("10.0.0.{i}:1883")).collect();
        (Arc::new(Nodes::new(&addresses, &metrics)), metrics)
    }

    #[test]
    fn new_connections_go_to_the_node_with_fewest_and_ties_take_turns() {
        let (nodes, _) = nodes(3);
        let firsts: Vec<usize> = (0..3).map(|_| nodes.order()[0]).collect();
        assert_eq!(firsts, [0, 1, 2], "ties go round-robin");
        // Leases held from the start of a dial: a burst spreads before any dial finishes.
        let leases: Vec<NodeLease> = (0..6)
            .map(|_| {
                let best = nodes.order()[0];
                nodes.lease(best)
            })
            .collect();
        let counts: Vec<usize> = nodes.iter().map(Node::connections).collect();
        assert_eq!(counts, [2, 2, 2]);
        drop(leases);
        let _two = [nodes.lease(0), nodes.lease(0)];
        let _one = nodes.lease(2);
        for _ in 0..3 {
            assert_eq!(nodes.order(), [1, 2, 0]);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_dial_puts_the_node_last_until_a_probe_connects() {
        let (nodes, metrics) = nodes(3);
        assert_eq!(
            nodes.dial_failed(1, "refused"),
            Watch::Start(DOWN_BACKOFF_MIN)
        );
        assert_eq!(
            nodes.dial_failed(1, "refused"),
            Watch::Nothing,
            "one probe task"
        );
        assert!(!nodes.get(1).is_up());
        for _ in 0..4 {
            assert_eq!(nodes.order().last(), Some(&1));
        }
        assert_eq!(nodes.get(1).series.downs.get(), 1);
        assert_eq!(nodes.get(1).series.dial_failures.get(), 2);
        assert_eq!(metrics.series(1, "10.0.0.1:1883").up.get(), 0);

        // The backoff doubles up to its maximum.
        let mut waits = Vec::new();
        for _ in 0..6 {
            match nodes.probed(1, Err("refused".into())) {
                Next::ProbeAfter(next) => waits.push(next.as_secs()),
                Next::Stop => panic!("a failed probe keeps probing"),
            }
        }
        assert_eq!(waits, [2, 4, 8, 15, 15, 15]);
        assert_eq!(
            nodes.get(1).series.downs.get(),
            1,
            "down once, not per probe"
        );
        assert_eq!(nodes.probed(1, Ok(())), Next::Stop);
        assert!(nodes.get(1).is_up());
        assert!(nodes
            .report()
            .contains("node 1 10.0.0.1:1883 up connections=0"));
        // A probe that connects does not reset the backoff: the next failure rests longer...
        assert_eq!(
            nodes.dial_failed(1, "CONNACK 0x88"),
            Watch::Start(DOWN_BACKOFF_MAX)
        );
        assert_eq!(nodes.get(1).series.downs.get(), 2);
        assert!(nodes.report().contains("node 1 10.0.0.1:1883 down"));
        assert_eq!(nodes.probed(1, Ok(())), Next::Stop);
        // ...until a connection to the node is answered.
        nodes.dialled(1);
        assert_eq!(
            nodes.dial_failed(1, "refused"),
            Watch::Start(DOWN_BACKOFF_MIN)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_node_is_down_the_one_down_longest_comes_last() {
        let (nodes, _) = nodes(2);
        let _ = nodes.dial_failed(0, "refused");
        tokio::time::advance(Duration::from_secs(3)).await;
        let _ = nodes.dial_failed(1, "refused");
        assert!(!nodes.any_up());
        assert_eq!(nodes.order(), [1, 0]);
        nodes.dialled(0);
        assert!(nodes.any_up());
        assert_eq!(nodes.order(), [0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn lost_connections_have_their_node_probed_at_most_once_per_interval() {
        let (nodes, _) = nodes(2);
        let mut leases: Vec<NodeLease> = (0..5).map(|_| nodes.lease(0)).collect();
        assert_eq!(leases[0].lost(), Watch::Start(Duration::ZERO));
        assert_eq!(leases[0].lost(), Watch::Nothing, "once per connection");
        nodes.probing(0);
        assert_eq!(nodes.probed(0, Ok(())), Next::Stop);

        // The next loss comes soon after: its probe waits for the rest of the interval.
        tokio::time::advance(Duration::from_millis(300)).await;
        assert_eq!(leases[1].lost(), Watch::Start(Duration::from_millis(700)));
        assert_eq!(leases[2].lost(), Watch::Nothing, "a probe is on its way");
        tokio::time::advance(Duration::from_millis(700)).await;
        nodes.probing(0);
        // A loss while the probe runs: the probe's success may predate it, so probe again.
        assert_eq!(leases[3].lost(), Watch::Nothing);
        assert_eq!(
            nodes.probed(0, Ok(())),
            Next::ProbeAfter(LOSS_PROBE_INTERVAL)
        );
        nodes.probing(0);
        assert_eq!(
            nodes.probed(0, Err("connection refused".into())),
            Next::ProbeAfter(DOWN_BACKOFF_MIN)
        );
        assert!(!nodes.get(0).is_up());
        assert_eq!(
            leases[4].lost(),
            Watch::Nothing,
            "down: its probe task watches it"
        );
        assert_eq!(nodes.get(0).connections(), 5);
        drop(leases);
        assert_eq!(nodes.get(0).connections(), 0);
    }
}
