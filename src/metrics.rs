//! Process metrics, rendered in the Prometheus text format by the admin endpoint.
//!
//! Counters on the data path are plain atomics added once per read or write batch, not per
//! message. Labelled series (by org, rule, code or limit) live in small maps behind a mutex and
//! are touched only on connect, close, refusal and limit events.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::close::CloseCode;

/// Upper bounds of the authentication latency histogram, in seconds.
const AUTH_BUCKETS_SECS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Every metric of the process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
    /// PUBLISH packets from clients.
    pub messages_in: AtomicU64,
    /// PUBLISH packets to clients.
    pub messages_out: AtomicU64,
    /// TLS handshakes that failed (163).
    pub tls_handshake_failures: AtomicU64,
    /// Policy reloads that were applied.
    pub policy_reloads: AtomicU64,
    /// Policy reloads that were rejected (the last good policy stayed).
    pub policy_reload_failures: AtomicU64,
    connections: Mutex<BTreeMap<(String, &'static str), i64>>,
    closes: Mutex<BTreeMap<(u16, String), u64>>,
    denials: Mutex<BTreeMap<(String, String), u64>>,
    limits: Mutex<BTreeMap<(String, &'static str), u64>>,
    auth_buckets: [AtomicU64; AUTH_BUCKETS_SECS.len()],
    auth_count: AtomicU64,
    auth_sum_micros: AtomicU64,
}

fn locked<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every update is a single insert or increment, so a poisoned map is still consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Metrics {
    /// A session connected (`delta` 1) or closed (`delta` -1).
    pub fn connection(&self, org: &str, protocol: &'static str, delta: i64) {
        *locked(&self.connections)
            .entry((org.to_string(), protocol))
            .or_insert(0) += delta;
    }

    /// A connection closed with a WIoTP code.
    pub fn close(&self, code: u16, org: &str) {
        *locked(&self.closes)
            .entry((code, org.to_string()))
            .or_insert(0) += 1;
    }

    /// An operation was refused by a rule.
    pub fn denial(&self, org: &str, rule: &str) {
        *locked(&self.denials)
            .entry((org.to_string(), rule.to_string()))
            .or_insert(0) += 1;
    }

    /// A limit was hit.
    pub fn limit(&self, org: &str, limit: &'static str) {
        *locked(&self.limits)
            .entry((org.to_string(), limit))
            .or_insert(0) += 1;
    }

    /// How long one authentication took.
    pub fn auth_latency(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        for (bucket, bound) in self.auth_buckets.iter().zip(AUTH_BUCKETS_SECS) {
            if seconds <= bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.auth_count.fetch_add(1, Ordering::Relaxed);
        self.auth_sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of every metric. `upstream_up` and `monitor_*` come from
    /// the monitor's status at the time of the scrape.
    pub fn render(
        &self,
        upstream_up: bool,
        monitor_queued_dropped: u64,
        monitor_published: u64,
    ) -> String {
        let mut out = String::with_capacity(4096);
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
        counter(
            &mut out,
            "warden_bytes_in_total",
            "Bytes read from clients.",
            load(&self.bytes_in),
        );
        counter(
            &mut out,
            "warden_bytes_out_total",
            "Bytes written to clients.",
            load(&self.bytes_out),
        );
        counter(
            &mut out,
            "warden_messages_in_total",
            "PUBLISH packets from clients.",
            load(&self.messages_in),
        );
        counter(
            &mut out,
            "warden_messages_out_total",
            "PUBLISH packets to clients.",
            load(&self.messages_out),
        );
        counter(
            &mut out,
            "warden_tls_handshake_failures_total",
            "TLS handshakes that failed (163).",
            load(&self.tls_handshake_failures),
        );
        counter(
            &mut out,
            "warden_policy_reloads_total",
            "Policy reloads applied.",
            load(&self.policy_reloads),
        );
        counter(
            &mut out,
            "warden_policy_reload_failures_total",
            "Policy reloads rejected; the last good policy stayed.",
            load(&self.policy_reload_failures),
        );
        counter(
            &mut out,
            "warden_monitor_published_total",
            "Monitoring messages confirmed by the broker.",
            monitor_published,
        );
        counter(
            &mut out,
            "warden_monitor_dropped_total",
            "Monitoring messages dropped because the queue was full.",
            monitor_queued_dropped,
        );
        let _ = writeln!(
            out,
            "# HELP warden_upstream_up Whether the broker is reachable.\n# TYPE warden_upstream_up gauge\nwarden_upstream_up {}",
            u8::from(upstream_up)
        );

        let _ = writeln!(
            out,
            "# HELP warden_connections Live client sessions.\n# TYPE warden_connections gauge"
        );
        for ((org, protocol), value) in locked(&self.connections).iter() {
            let _ = writeln!(
                out,
                "warden_connections{{org=\"{}\",protocol=\"{protocol}\"}} {value}",
                escape(org)
            );
        }
        let _ = writeln!(out, "# HELP warden_closes_total Closed connections by WIoTP code.\n# TYPE warden_closes_total counter");
        for ((code, org), value) in locked(&self.closes).iter() {
            let _ = writeln!(
                out,
                "warden_closes_total{{code=\"{code}\",org=\"{}\"}} {value}",
                escape(org)
            );
        }
        let _ = writeln!(out, "# HELP warden_denials_total Refused operations by rule.\n# TYPE warden_denials_total counter");
        for ((org, rule), value) in locked(&self.denials).iter() {
            let _ = writeln!(
                out,
                "warden_denials_total{{org=\"{}\",rule=\"{}\"}} {value}",
                escape(org),
                escape(rule)
            );
        }
        let _ = writeln!(
            out,
            "# HELP warden_limit_hits_total Limits hit.\n# TYPE warden_limit_hits_total counter"
        );
        for ((org, limit), value) in locked(&self.limits).iter() {
            let _ = writeln!(
                out,
                "warden_limit_hits_total{{org=\"{}\",limit=\"{limit}\"}} {value}",
                escape(org)
            );
        }
        let _ = writeln!(
            out,
            "# HELP warden_auth_seconds Time to authenticate a CONNECT.\n# TYPE warden_auth_seconds histogram"
        );
        for (bucket, bound) in self.auth_buckets.iter().zip(AUTH_BUCKETS_SECS) {
            let _ = writeln!(
                out,
                "warden_auth_seconds_bucket{{le=\"{bound}\"}} {}",
                load(bucket)
            );
        }
        let count = load(&self.auth_count);
        let _ = writeln!(out, "warden_auth_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "warden_auth_seconds_sum {}",
            load(&self.auth_sum_micros) as f64 / 1e6
        );
        let _ = writeln!(out, "warden_auth_seconds_count {count}");
        out
    }
}

/// The limit a closing code stands for, for `warden_limit_hits_total`.
pub fn limit_name(code: CloseCode) -> Option<&'static str> {
    Some(match code {
        CloseCode::ServerCapacity => "process_connections",
        CloseCode::OrgConnectionQuota => "org_connections",
        CloseCode::AuthenticationBusy => "auth_queue",
        CloseCode::TooManySubscriptions => "subscriptions",
        CloseCode::MessageTooLarge => "payload",
        CloseCode::InitialPacketTooLarge => "connect_size",
        CloseCode::NoData => "connect_deadline",
        CloseCode::KeepAliveTimeout => "keep_alive",
        _ => return None,
    })
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_labelled_series() {
        let metrics = Metrics::default();
        metrics.connection("org1", "mqtt4", 1);
        metrics.close(180, "org1");
        metrics.denial("org1", "publish not allowed");
        metrics.limit("org1", "payload");
        metrics.auth_latency(Duration::from_micros(700));
        metrics.bytes_in.fetch_add(42, Ordering::Relaxed);
        let text = metrics.render(true, 0, 3);
        for line in [
            "warden_connections{org=\"org1\",protocol=\"mqtt4\"} 1",
            "warden_closes_total{code=\"180\",org=\"org1\"} 1",
            "warden_denials_total{org=\"org1\",rule=\"publish not allowed\"} 1",
            "warden_limit_hits_total{org=\"org1\",limit=\"payload\"} 1",
            "warden_auth_seconds_bucket{le=\"0.001\"} 1",
            "warden_auth_seconds_bucket{le=\"0.0005\"} 0",
            "warden_bytes_in_total 42",
            "warden_upstream_up 1",
            "warden_monitor_published_total 3",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }
}
