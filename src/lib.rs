//! mqtt-warden: a transparent MQTT proxy that gives a standard broker (Mosquitto) the messaging
//! contract of IBM Watson IoT Platform: org-scoped identities, the `iot-2/...` topic namespace and
//! its ACLs, org isolation inside one broker, stripped retained flags, payload limits and
//! connect/disconnect monitoring messages with WIoTP closing codes.
//!
//! # Layout
//!
//! The data path reads top to bottom:
//!
//! - [`config`] — the process config (`warden.yaml`).
//! - [`proxy`] — binds the listeners and runs the accept loop with its connection cap.
//! - [`transport`] — TLS, WebSocket and secure WebSocket, told apart on one port: each a byte stream.
//! - [`session`] — one client's life: the connect phase, the bridge loop (client ⇄ upstream), close.
//! - [`codec`] — MQTT framing and packet views, for MQTT 3.1, 3.1.1 and 5.
//! - [`identity`] — the client-ID grammar (`a:`, `A:`, `d:`, `g:`).
//! - [`auth`] — token hashes, verification pool and cache.
//! - [`policy`] — the policy model and its loader.
//! - [`topics`] — the `iot-2` topic grammar and the org-prefix rewrite.
//! - [`decision`] — what an identity may do: connect, publish, subscribe → allow or a [`close::CloseReason`].
//! - [`upstream`] — dialling the broker, over TCP or TLS.
//! - [`limits`] — rate limits: publishes, bytes, org aggregate, CONNECT rates.
//! - [`registry`] — live sessions by client ID (takeover, org connection counts).
//! - [`close`] — the one table of WIoTP closing codes.
//! - [`ledger`] — which clients this instance connected, kept on the broker for crash recovery.
//! - [`monitor`] — monitoring messages and the control connection that publishes them.
//! - [`reload`] — live policy edits (file watch, SIGHUP) and session re-evaluation.
//! - [`metrics`] and [`admin`] — Prometheus metrics, `/healthz`, `/readyz`.
//! - [`telemetry`] — logging.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod close;
pub mod codec;
pub mod config;
pub mod decision;
pub mod identity;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod policy;
pub mod proxy;
pub mod registry;
pub mod reload;
pub mod session;
pub mod telemetry;
pub mod topics;
pub mod transport;
pub mod upstream;
