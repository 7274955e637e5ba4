//! Process metrics, with the `prometheus-client` crate, rendered in the OpenMetrics text format
//! by the admin endpoint.
//!
//! Counters on the data path are atomics added once per batch of reads or writes, not per
//! message. Labelled series are touched only on connect, close, refusal and limit events, and
//! every label value comes from the policy or the code (tenants the policy knows, closing codes,
//! rule and limit names), never from what a client sends, so the number of series is bounded.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the authentication latency histogram, in seconds.
const AUTH_BUCKETS_SECS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    org: String,
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CloseLabels {
    code: u16,
    org: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DenialLabels {
    org: String,
    rule: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    org: String,
    status: u16,
}

/// Labels of `warden_upstream_refusals_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `control` (the control connection and its probes) or `session` (a client's).
    pub connection: &'static str,
    /// The CONNACK code in hex, or `closed`, `io`, `timeout`, `tls`, `invalid`.
    pub code: String,
}

/// Labels of the broker capability series: one of the five capability names.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapabilityLabels {
    /// `mqtt5`, `max_qos`, `shared_subscriptions`, `retained_to_wildcards` or `escape`.
    pub capability: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    org: String,
    limit: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
    address: String,
}

/// The series of each broker node (`upstream.address` or `upstream.addresses`), labelled with
/// the node's index in the config and its address: as many series as configured nodes.
#[derive(Debug, Clone, Default)]
pub struct NodeMetrics {
    up: Family<NodeLabels, Gauge>,
    connections: Family<NodeLabels, Gauge>,
    downs: Family<NodeLabels, Counter>,
    dial_failures: Family<NodeLabels, Counter>,
}

/// One node's series, created once per node so that updates skip the label lookup.
#[derive(Debug, Clone, Default)]
pub struct NodeSeries {
    /// 1 while the node is taken for new connections, 0 while it is marked down.
    pub up: Gauge,
    /// Live connections to the node (sessions, the control connection, HTTP publishers), and
    /// dials under way.
    pub connections: Gauge,
    /// Times the node was marked down.
    pub downs: Counter,
    /// Connections to the node that failed before they were open (TCP or TLS).
    pub dial_failures: Counter,
}

impl NodeMetrics {
    /// The series of node `index` at `address`.
    pub fn series(&self, index: usize, address: &str) -> NodeSeries {
        let labels = NodeLabels {
            node: index.to_string(),
            address: address.to_owned(),
        };
        NodeSeries {
            up: self.up.get_or_create(&labels).clone(),
            connections: self.connections.get_or_create(&labels).clone(),
            downs: self.downs.get_or_create(&labels).clone(),
            dial_failures: self.dial_failures.get_or_create(&labels).clone(),
        }
    }
}

/// The monitor's own series, updated by the control connection.
#[derive(Debug, Clone, Default)]
pub struct MonitorMetrics {
    /// Whether the control connection (so the broker) is up.
    pub upstream_up: Gauge,
    /// Status messages the broker confirmed.
    pub published: Counter,
    /// Status messages dropped because the queue was full.
    pub dropped: Counter,
    /// Connections to the broker that it refused or that failed before CONNACK.
    pub refusals: Family<RefusalLabels, Counter>,
    /// 1 where the last probe of the broker contradicted the declared capability.
    pub capability_mismatch: Family<CapabilityLabels, Gauge>,
    /// What the last probe saw: 1 / 0, the highest QoS, or for `escape` 1 when the broker
    /// rejects or rewrites `.`; -1 when the probe could not tell.
    pub capability_probed: Family<CapabilityLabels, Gauge>,
}

impl MonitorMetrics {
    /// Counts a refused or failed connection to the broker.
    pub fn refusal(&self, connection: &'static str, code: String) {
        self.refusals
            .get_or_create(&RefusalLabels { connection, code })
            .inc();
    }
}

/// The coordination's series (`coordination:`; zero without it).
#[derive(Debug, Clone, Default)]
pub struct CoordinationMetrics {
    /// Whether this instance holds its lease in Redis.
    pub up: Gauge,
    /// Sessions on another instance that this instance's takeovers closed, answered by the
    /// holder.
    pub remote_takeovers: Counter,
    /// Sessions of another instance whose Disconnect this instance published: a takeover whose
    /// holder did not answer, or an instance that stopped.
    pub settled: Counter,
}

/// Every metric of the process.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Bytes read from clients.
    pub bytes_in: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// PUBLISH packets from clients.
    pub messages_in: Counter,
    /// PUBLISH packets to clients.
    pub messages_out: Counter,
    /// TLS handshakes that failed.
    pub tls_handshake_failures: Counter,
    /// Policy reloads that were applied.
    pub policy_reloads: Counter,
    /// Policy reloads that were rejected (the last good policy stayed).
    pub policy_reload_failures: Counter,
    /// The control connection's series.
    pub monitor: MonitorMetrics,
    /// The coordination's series.
    pub coordination: CoordinationMetrics,
    /// The broker nodes' series.
    pub nodes: NodeMetrics,
    connections: Family<ConnectionLabels, Gauge>,
    closes: Family<CloseLabels, Counter>,
    denials: Family<DenialLabels, Counter>,
    limits: Family<LimitLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    auth_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let metrics = Metrics {
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            tls_handshake_failures: Counter::default(),
            policy_reloads: Counter::default(),
            policy_reload_failures: Counter::default(),
            monitor: MonitorMetrics::default(),
            coordination: CoordinationMetrics::default(),
            nodes: NodeMetrics::default(),
            connections: Family::default(),
            closes: Family::default(),
            denials: Family::default(),
            limits: Family::default(),
            http_requests: Family::default(),
            auth_seconds: Histogram::new(AUTH_BUCKETS_SECS),
            registry: Registry::default(),
        };
        let counters = [
            (
                "warden_bytes_in",
                "Bytes read from clients",
                &metrics.bytes_in,
            ),
            (
                "warden_bytes_out",
                "Bytes written to clients",
                &metrics.bytes_out,
            ),
            (
                "warden_messages_in",
                "PUBLISH packets from clients",
                &metrics.messages_in,
            ),
            (
                "warden_messages_out",
                "PUBLISH packets to clients",
                &metrics.messages_out,
            ),
            (
                "warden_tls_handshake_failures",
                "TLS handshakes that failed",
                &metrics.tls_handshake_failures,
            ),
            (
                "warden_policy_reloads",
                "Policy reloads applied",
                &metrics.policy_reloads,
            ),
            (
                "warden_policy_reload_failures",
                "Policy reloads rejected; the last good policy stayed",
                &metrics.policy_reload_failures,
            ),
            (
                "warden_monitor_published",
                "Status messages confirmed by the broker",
                &metrics.monitor.published,
            ),
            (
                "warden_monitor_dropped",
                "Status messages dropped because the queue was full",
                &metrics.monitor.dropped,
            ),
            (
                "warden_coordination_remote_takeovers",
                "Sessions on other instances closed by a takeover here, answered by their instance",
                &metrics.coordination.remote_takeovers,
            ),
            (
                "warden_coordination_settled",
                "Disconnects published here for sessions of other instances",
                &metrics.coordination.settled,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "warden_upstream_up",
            "Whether the broker is reachable",
            metrics.monitor.upstream_up.clone(),
        );
        registry.register(
            "warden_upstream_refusals",
            "Connections to the broker refused by it (CONNACK code) or failed before its CONNACK",
            metrics.monitor.refusals.clone(),
        );
        registry.register(
            "warden_broker_capability_mismatch",
            "1 where the last probe of the broker contradicted upstream.broker / upstream.capabilities",
            metrics.monitor.capability_mismatch.clone(),
        );
        registry.register(
            "warden_broker_capability_probed",
            "What the last probe of the broker saw (1/0, the highest QoS; -1 unknown)",
            metrics.monitor.capability_probed.clone(),
        );
        registry.register(
            "warden_coordination_up",
            "Whether this instance holds its coordination lease",
            metrics.coordination.up.clone(),
        );
        registry.register(
            "warden_upstream_node_up",
            "Whether a broker node is taken for new connections (0 while marked down)",
            metrics.nodes.up.clone(),
        );
        registry.register(
            "warden_upstream_node_connections",
            "Connections to a broker node",
            metrics.nodes.connections.clone(),
        );
        registry.register(
            "warden_upstream_node_downs",
            "Times a broker node was marked down",
            metrics.nodes.downs.clone(),
        );
        registry.register(
            "warden_upstream_node_dial_failures",
            "Connections to a broker node that failed to open",
            metrics.nodes.dial_failures.clone(),
        );
        registry.register(
            "warden_connections",
            "Live client sessions",
            metrics.connections.clone(),
        );
        registry.register(
            "warden_closes",
            "Closed connections by closing code",
            metrics.closes.clone(),
        );
        registry.register(
            "warden_denials",
            "Refused operations by rule",
            metrics.denials.clone(),
        );
        registry.register("warden_limit_hits", "Limits hit", metrics.limits.clone());
        registry.register(
            "warden_http_requests",
            "HTTP messaging requests answered, by status",
            metrics.http_requests.clone(),
        );
        registry.register(
            "warden_auth_seconds",
            "Time to authenticate a CONNECT",
            metrics.auth_seconds.clone(),
        );
        // Series that dashboards rate() from zero: every failure that is not a CONNACK code,
        // and every capability (unknown, no mismatch, until the first probe).
        for connection in ["control", "session"] {
            for code in ["io", "timeout", "closed", "tls", "invalid"] {
                let _ = metrics.monitor.refusals.get_or_create(&RefusalLabels {
                    connection,
                    code: code.to_owned(),
                });
            }
        }
        for capability in crate::broker::CAPABILITIES {
            let labels = CapabilityLabels { capability };
            metrics
                .monitor
                .capability_probed
                .get_or_create(&labels)
                .set(-1);
            let _ = metrics.monitor.capability_mismatch.get_or_create(&labels);
        }
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// A session of `org` connected (`delta` 1) or closed (`delta` -1).
    pub fn connection(&self, org: &str, protocol: &'static str, delta: i64) {
        self.connections
            .get_or_create(&ConnectionLabels {
                org: org.to_owned(),
                protocol,
            })
            .inc_by(delta);
    }

    /// A connection of `org` closed with a closing code.
    pub fn close(&self, code: u16, org: &str) {
        self.closes
            .get_or_create(&CloseLabels {
                code,
                org: org.to_owned(),
            })
            .inc();
    }

    /// A request of `org` was refused by a rule.
    pub fn denial(&self, org: &str, rule: &'static str) {
        self.denials
            .get_or_create(&DenialLabels {
                org: org.to_owned(),
                rule,
            })
            .inc();
    }

    /// A limit was hit (`org` empty when the client named no known tenant).
    pub fn limit(&self, org: &str, limit: &'static str) {
        self.limits
            .get_or_create(&LimitLabels {
                org: org.to_owned(),
                limit,
            })
            .inc();
    }

    /// An HTTP messaging request of `org` (empty when unknown) was answered with `status` (one
    /// of the few statuses the HTTP front end answers with).
    pub fn http_request(&self, org: &str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels {
                org: org.to_owned(),
                status,
            })
            .inc();
    }

    /// How long one authentication took.
    pub fn auth_latency(&self, elapsed: Duration) {
        self.auth_seconds.observe(elapsed.as_secs_f64());
    }

    /// The OpenMetrics text exposition of every metric ([`CONTENT_TYPE`]).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The limit a cause stands for, for `warden_limit_hits_total`.
pub fn limit_name(cause: crate::refusal::Cause) -> Option<&'static str> {
    use crate::refusal::Cause;
    Some(match cause {
        Cause::ServerCapacity => "process_connections",
        Cause::TenantQuota => "org_connections",
        Cause::AuthenticationBusy => "auth_queue",
        Cause::TooManySubscriptions => "subscriptions",
        Cause::MessageTooLarge => "payload",
        Cause::InitialPacketTooLarge => "connect_size",
        Cause::NoData => "connect_deadline",
        Cause::KeepAliveTimeout => "keep_alive",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series_under_the_documented_names() {
        let metrics = Metrics::default();
        metrics.connection("org1", "mqtt4", 1);
        metrics.close(180, "org1");
        metrics.denial("org1", "publish not allowed");
        metrics.limit("org1", "payload");
        metrics.http_request("org1", 200);
        metrics.auth_latency(Duration::from_micros(700));
        metrics.bytes_in.inc_by(42);
        metrics.monitor.upstream_up.set(1);
        metrics.monitor.published.inc_by(3);
        let node = metrics.nodes.series(1, "10.0.0.2:1883");
        node.up.set(1);
        node.connections.set(7);
        node.downs.inc();
        let text = metrics.render();
        for line in [
            "warden_connections{org=\"org1\",protocol=\"mqtt4\"} 1",
            "warden_closes_total{code=\"180\",org=\"org1\"} 1",
            "warden_denials_total{org=\"org1\",rule=\"publish not allowed\"} 1",
            "warden_limit_hits_total{org=\"org1\",limit=\"payload\"} 1",
            "warden_http_requests_total{org=\"org1\",status=\"200\"} 1",
            "warden_auth_seconds_bucket{le=\"0.001\"} 1",
            "warden_auth_seconds_bucket{le=\"0.0005\"} 0",
            "warden_auth_seconds_count 1",
            "warden_bytes_in_total 42",
            "warden_upstream_up 1",
            "warden_monitor_published_total 3",
            "warden_upstream_node_up{node=\"1\",address=\"10.0.0.2:1883\"} 1",
            "warden_upstream_node_connections{node=\"1\",address=\"10.0.0.2:1883\"} 7",
            "warden_upstream_node_downs_total{node=\"1\",address=\"10.0.0.2:1883\"} 1",
            "warden_upstream_node_dial_failures_total{node=\"1\",address=\"10.0.0.2:1883\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
