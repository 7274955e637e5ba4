//! Logging and tracing: a `tracing` subscriber writing text or JSON lines (filtered by `RUST_LOG`,
//! default `info`), and, when `telemetry.otlp_endpoint` is set, OpenTelemetry spans exported over
//! OTLP/HTTP (JSON) in batches.
//!
//! Spans: `session` (one per connection, with the close code), `connect`, `authenticate`,
//! `publish` and `subscribe` (with the policy decision). The per-message spans are at debug level,
//! so they cost nothing unless the OTLP exporter (which enables them) is configured. MQTT 5
//! `traceparent` user properties are continued: the proxy's publish span becomes their child and
//! replaces the property with its own context.
//!
//! Log lines carry terminal colours only when stdout is a terminal (and `NO_COLOR` is not set), so
//! log files and journald get plain text.
//!
//! Secrets never reach a log line or a span: sessions record identities and codes only.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use thiserror::Error;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// The W3C trace-context user property of MQTT 5 messages.
pub const TRACEPARENT: &str = "traceparent";
/// What the OTLP exporter records: the proxy's spans down to the per-message ones.
const TRACE_FILTER: &str = "mqtt_warden=debug";

static TRACING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (and so `traceparent` properties are continued).
pub fn tracing_enabled() -> bool {
    TRACING.load(Ordering::Relaxed)
}

/// Why telemetry could not start.
#[derive(Debug, Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter for {endpoint}: {message}")]
    Exporter {
        /// The configured endpoint.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
}

/// Keeps the exporter alive; flushes the last spans when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.force_flush();
            let _ = provider.shutdown();
        }
    }
}

/// The OTLP/HTTP traces URL for a configured endpoint: a bare `http://host:port` gets the
/// standard `/v1/traces` path.
pub fn traces_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    let has_path = trimmed
        .split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'));
    if has_path {
        trimmed.to_string()
    } else {
        format!("{trimmed}/v1/traces")
    }
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(colour_wanted(
            std::io::stdout().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ));
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let mut provider = None;
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            let url = traces_url(endpoint);
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpJson)
                .with_endpoint(url.clone())
                .build()
                .map_err(|error| TelemetryError::Exporter {
                    endpoint: url,
                    message: error.to_string(),
                })?;
            let tracer_provider = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(Resource::builder().with_service_name("mqtt-warden").build())
                .build();
            let tracer = tracer_provider.tracer("mqtt-warden");
            provider = Some(tracer_provider);
            TRACING.store(true, Ordering::Relaxed);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(EnvFilter::new(TRACE_FILTER)),
            )
        }
        None => None,
    };
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    Ok(TelemetryGuard { provider })
}

/// Whether log lines get terminal colours: only on a terminal, and never when `NO_COLOR` is set
/// to a non-empty value (the `NO_COLOR` convention).
fn colour_wanted(stdout_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stdout_is_terminal && no_color.is_none_or(|value| value.is_empty())
}

/// Makes `span` a child of the W3C `traceparent` a client sent, and returns the `traceparent`
/// that names `span` itself, to forward in its place.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) -> Option<String> {
    let propagator = TraceContextPropagator::new();
    let mut carrier = HashMap::new();
    carrier.insert(TRACEPARENT.to_string(), traceparent.to_string());
    let parent = propagator.extract(&carrier);
    let _ = span.set_parent(parent);
    let mut out: HashMap<String, String> = HashMap::new();
    propagator.inject_context(&span.context(), &mut out);
    out.remove(TRACEPARENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        assert!(colour_wanted(true, None));
        assert!(colour_wanted(true, Some(std::ffi::OsStr::new(""))));
        assert!(!colour_wanted(true, Some(std::ffi::OsStr::new("1"))));
        assert!(!colour_wanted(false, None));
    }

    #[test]
    fn traces_url_adds_the_standard_path_only_when_missing() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://127.0.0.1:4318/"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector/custom/traces"),
            "http://collector/custom/traces"
        );
    }
}
