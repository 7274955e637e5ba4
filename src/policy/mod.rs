//! The policy model: orgs, device types, devices, gateways and API keys, as operators write them in
//! `policies/*.yaml` (PRODUCT.md §8), in the compiled form the data path reads.
//!
//! A [`Policy`] is immutable. A reload builds a new one and swaps it in whole (`arc_swap`), so a
//! session sees either the old policy or the new one, never a mix. Loading and its precise errors
//! (file, line, field) live in [`load`]. The enums below deserialise from the kebab-case names the
//! files use (`tls-cert-or-token`, `backend-trusted`, ...).

pub mod load;
/// YAML with field paths and lines, shared with [`crate::config`].
pub(crate) mod yaml;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::auth::TokenHash;

pub use load::{load_policies, PolicyError, PolicyErrors};

/// Default payload limit in bytes (PRODUCT.md §4).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 131_072;
/// Default concurrent connections per org.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;

/// Every org the proxy knows. An org not in here is denied.
#[derive(Debug, Default)]
pub struct Policy {
    /// Orgs by org ID.
    pub orgs: HashMap<String, Arc<Org>>,
}

impl Policy {
    /// The org with this ID.
    pub fn org(&self, id: &str) -> Option<&Arc<Org>> {
        self.orgs.get(id)
    }
}

/// How an org secures its connections (PRODUCT.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecurityMode {
    /// Plain or TLS, token required.
    #[default]
    TlsOptional,
    /// TLS and token.
    TlsToken,
    /// TLS and client certificate.
    TlsCert,
    /// TLS, token and certificate.
    TlsTokenAndCert,
    /// TLS with a certificate or a token.
    TlsCertOrToken,
}

/// What happens when a client publishes faster than its rate (PRODUCT.md §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRateExceeded {
    /// Stop reading the client until tokens refill: nothing is lost.
    #[default]
    Backpressure,
    /// Close with 92 ("rate limit exceeded"; MQTT 5: DISCONNECT 0x96).
    Disconnect,
}

/// What happens when a client does something its identity may not do (PRODUCT.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnViolation {
    /// Close the connection (180 / 276), as WIoTP does.
    #[default]
    Disconnect,
    /// Refuse the one operation and keep the connection.
    Reject,
}

/// A value per client class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerClass<T> {
    /// For devices.
    pub device: T,
    /// For gateways.
    pub gateway: T,
    /// For applications.
    pub application: T,
}

impl<T: Copy> PerClass<T> {
    /// The value for a class.
    pub fn get(&self, class: crate::identity::ClientClass) -> T {
        use crate::identity::ClientClass;
        match class {
            ClientClass::Device => self.device,
            ClientClass::Gateway => self.gateway,
            ClientClass::Application | ClientClass::ScalableApplication => self.application,
        }
    }
}

/// A token-bucket rate: `count` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Messages per period.
    pub count: u32,
    /// The period.
    pub per: Duration,
}

/// Per-org limits (PRODUCT.md §4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgLimits {
    /// Largest PUBLISH payload in bytes (287 above).
    pub max_payload_bytes: usize,
    /// Concurrent connections of the org (173 above).
    pub max_connections: u32,
    /// Subscriptions per connection (154 above).
    pub max_subscriptions: PerClass<u32>,
    /// Publishes per connection.
    pub publish_rate: PerClass<Rate>,
    /// Bytes of PUBLISH payload per connection, when limited.
    pub byte_rate: PerClass<Option<Rate>>,
    /// Publishes of the whole org together, when limited.
    pub org_publish_rate: Option<Rate>,
}

impl Default for OrgLimits {
    fn default() -> Self {
        let per_second = |count| Rate {
            count,
            per: Duration::from_secs(1),
        };
        OrgLimits {
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_subscriptions: PerClass {
                device: 50,
                gateway: 500,
                application: 500,
            },
            publish_rate: PerClass {
                device: per_second(10),
                gateway: per_second(100),
                application: per_second(20),
            },
            byte_rate: PerClass {
                device: None,
                gateway: None,
                application: None,
            },
            org_publish_rate: None,
        }
    }
}

/// The class of a device type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceClass {
    /// Plain devices.
    #[default]
    Device,
    /// Gateways.
    Gateway,
}

/// A device type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceType {
    /// Device or gateway.
    pub class: DeviceClass,
}

/// What a gateway may act for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GatewayRole {
    /// Any device of its org (the default).
    #[default]
    Privileged,
    /// Only devices in its groups.
    Standard,
}

/// A registered device or gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Its token, hashed.
    pub token: TokenHash,
    /// Groups it belongs to (for gateways: groups it may act for).
    pub groups: Vec<String>,
    /// For gateways.
    pub role: GatewayRole,
    /// Disabled devices cannot connect.
    pub enabled: bool,
}

/// An API key role (PRODUCT.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(missing_docs)]
pub enum ApiRole {
    #[default]
    Standard,
    BackendTrusted,
    Operations,
    DataProcessor,
    Visualization,
    DeviceApp,
}

/// An API key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Its token, hashed.
    pub token: TokenHash,
    /// Its role.
    pub role: ApiRole,
    /// Device groups it is limited to; empty means the whole org.
    pub groups: Vec<String>,
    /// Disabled keys cannot connect.
    pub enabled: bool,
}

/// One org.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Org {
    /// The org ID.
    pub id: String,
    /// Disabled orgs accept no connection.
    pub enabled: bool,
    /// The open quickstart org: no credentials.
    pub quickstart: bool,
    /// Security mode.
    pub security: SecurityMode,
    /// What a violation does.
    pub on_violation: OnViolation,
    /// What publishing too fast does.
    pub on_rate_exceeded: OnRateExceeded,
    /// Apps may publish only for registered devices.
    pub require_registered_devices: bool,
    /// Clear the retain flag of every PUBLISH and will (default true, as WIoTP does).
    pub strip_retained: bool,
    /// Limits.
    pub limits: OrgLimits,
    /// Device types by name.
    pub device_types: HashMap<String, DeviceType>,
    /// Devices and gateways by `TYPE/ID`.
    pub devices: HashMap<String, Device>,
    /// API keys by key.
    pub api_keys: HashMap<String, ApiKey>,
}

impl Org {
    /// A registered device or gateway.
    pub fn device(&self, device_type: &str, device_id: &str) -> Option<&Device> {
        // Keyed as the file writes it; the lookup builds the key once per CONNECT, not per message.
        self.devices.get(&format!("{device_type}/{device_id}"))
    }
}
