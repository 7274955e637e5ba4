//! mqtt-warden: a transparent MQTT proxy that gives a standard broker (Mosquitto) the messaging
//! contract of IBM Watson IoT Platform: org-scoped identities, the `iot-2/...` topic namespace and
//! its ACLs, org isolation inside one broker, stripped retained flags, payload limits and
//! connect/disconnect monitoring messages with WIoTP closing codes.
//!
//! # Layout
//!
//! Three kinds of module: the **machinery**, which knows MQTT and no tenant model; the
//! **profiles**, which know identities, topics and status messages; and the **coordination**
//! state that sessions share. The data path reads top to bottom:
//!
//! - [`config`]: the process config (`warden.yaml`).
//! - [`proxy`]: assembly only: builds everything, binds, accepts, shuts down. Nothing imports it.
//! - [`transport`]: TCP, TLS, WebSocket and secure WebSocket, told apart on one port.
//! - [`http`]: the HTTP messaging API on the same listeners, through the same profile hooks.
//! - [`session`]: one client's life: connect phase, bridge loop (generic over both streams),
//!   close.
//! - [`codec`]: MQTT framing and packet views, for MQTT 3.1, 3.1.1 and 5.
//! - [`refusal`]: why a connection or request ends, and what MQTT 3 and 5 clients are told.
//! - [`rewrite`]: the topic rewrite between a client's form and the broker's.
//! - [`profile`]: the seam: the trait a tenant model implements.
//! - [`wiotp`]: the WIoTP profile: identities, `iot-2` topics, roles, groups, gateways,
//!   quickstart, scalable apps, status messages and the closing-code table.
//! - [`generic`]: the generic profile: tenants of plain MQTT clients, users, ordered topic
//!   rules, isolation under a mount.
//! - [`dispatch`]: the profile the proxy runs: WIoTP or generic, chosen per connection.
//! - [`policy`]: the policy files' model, its loader and the store that reloads swap.
//! - [`auth`]: token hashes, the verification pool and its cache.
//! - [`coord`]: admission (slots, tenant counts, client-ID ownership), tenant buckets, the
//!   status reporter and session mailboxes: traits with in-process implementations.
//! - [`limits`]: token buckets, CONNECT rates and the refusal log budget.
//! - [`upstream`]: dialling the broker, over TCP or TLS, to a live node of a cluster.
//! - [`broker`]: what the broker behind the proxy supports (`upstream.broker`, overrides).
//! - [`names`]: the reversible escape of characters a broker rejects in topics and client IDs.
//! - [`monitor`]: the control connection that publishes the proxy's own messages.
//! - [`probe`]: what the broker does, checked against what its kind declares.
//! - [`ledger`]: which sessions a process holds, kept on the broker for crash recovery.
//! - [`retained`]: the retained statuses the proxy published, replayed to wildcard
//!   subscribers on brokers that do not deliver retained messages to them.
//! - [`share`]: shared subscriptions done by the proxy for brokers without them.
//! - [`reload`]: live reloads of policy and TLS files.
//! - [`metrics`] and [`admin`]: OpenMetrics, `/healthz`, `/readyz`.
//! - [`telemetry`]: logging and traces.
//! - [`runtime`]: the async runtime's workers and the CPU scheduling policy of its threads.

// One function calls the C library (`runtime`: the CPU scheduling policy); nothing else may.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod broker;
pub mod codec;
pub mod config;
pub mod coord;
pub mod dispatch;
pub mod generic;
pub mod http;
pub mod ledger;
pub mod limits;
pub mod metrics;
pub mod monitor;
pub mod names;
pub mod policy;
pub mod probe;
pub mod profile;
pub mod proxy;
pub mod refusal;
pub mod reload;
pub mod retained;
pub mod rewrite;
pub mod runtime;
pub mod session;
pub mod share;
pub mod telemetry;
pub mod transport;
pub mod upstream;
pub mod wiotp;
