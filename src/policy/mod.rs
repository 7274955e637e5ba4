//! The policy model: WIoTP orgs (device types, devices, gateways and API keys) and generic tenants
//! (users, rules), as operators write them in `policies/*.yaml`, in the compiled form the data
//! path reads.
//!
//! A [`Policy`] is immutable. A reload builds a new one and swaps it into the [`PolicyStore`]
//! whole, so a session sees either the old policy or the new one, never a mix. Loading and its precise errors
//! (file, line, field) live in [`load`]. The enums below deserialise from the kebab-case names the
//! files use (`tls-cert-or-token`, `backend-trusted`, ...).

pub mod load;
pub mod rules;
/// YAML with field paths and lines, shared with [`crate::config`].
pub(crate) mod yaml;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use crate::auth::TokenHash;
pub use crate::limits::Rate;

pub use load::{check_isolation, load_policies, PolicyError, PolicyErrors};
use rules::RuleSet;
pub use store::PolicyStore;

pub mod store;

/// Default payload limit in bytes.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 131_072;
/// Default concurrent connections per org.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Default SUBSCRIBE and UNSUBSCRIBE filters per second per connection.
pub const DEFAULT_SUBSCRIBE_RATE: Rate = Rate::per_second(100);
/// The longest org, app, type, device or instance ID, in characters.
pub const MAX_ID_PART_CHARS: usize = 36;

/// Whether `part` is a valid org, app, type, device or instance ID: 1 to
/// [`MAX_ID_PART_CHARS`] characters of `[A-Za-z0-9._-]`.
pub fn is_valid_id_part(part: &str) -> bool {
    (1..=MAX_ID_PART_CHARS).contains(&part.len())
        && part
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Every org and tenant the proxy knows. An org or tenant not in here is denied.
#[derive(Debug, Default)]
pub struct Policy {
    /// Orgs by org ID.
    pub orgs: HashMap<String, Arc<Org>>,
    /// Generic tenants by name.
    pub tenants: HashMap<String, Arc<Tenant>>,
}

impl Policy {
    /// The org with this ID.
    pub fn org(&self, id: &str) -> Option<&Arc<Org>> {
        self.orgs.get(id)
    }

    /// The generic tenant with this name.
    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }
}

/// What a generic tenant does with the retain flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Retained {
    /// Passed to the broker as sent.
    #[default]
    Keep,
    /// Cleared, as WIoTP does.
    Strip,
    /// A retained PUBLISH is refused (MQTT 5: 0x9A Retain not supported).
    Deny,
}

/// A user of a generic tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantUser {
    /// Its token or password, hashed.
    pub token: TokenHash,
    /// Client-ID patterns (`*` any characters); empty: any client ID.
    pub client_ids: Vec<String>,
    /// Groups, for rules limited to groups.
    pub groups: Vec<String>,
    /// Disabled users cannot connect.
    pub enabled: bool,
}

/// A generic tenant: MQTT clients under a mount, governed by topic rules.
#[derive(Debug, PartialEq, Eq)]
pub struct Tenant {
    /// The tenant's name.
    pub name: String,
    /// Its prefix on the broker (`lab/`).
    pub mount: String,
    /// Clients without a user name are admitted as user `""`.
    pub anonymous: bool,
    /// Users by name.
    pub users: HashMap<String, TenantUser>,
    /// The rules, compiled.
    pub rules: RuleSet,
    /// Retain handling.
    pub retained: Retained,
    /// Limits (the `application` values of per-class limits apply).
    pub limits: OrgLimits,
    /// What a refused request does (default: refuse it and keep the connection).
    pub on_violation: OnViolation,
    /// What publishing too fast does.
    pub on_rate_exceeded: OnRateExceeded,
    /// The topic (inside the mount, with variables) of lifecycle events.
    pub events: Option<String>,
    /// Where the tenant is defined, for errors found after loading.
    pub file: Arc<Path>,
    /// The line of its name.
    pub line: Option<usize>,
}

/// How an org secures its connections.
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

/// What happens when a client publishes faster than its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRateExceeded {
    /// Stop reading the client until tokens refill: nothing is lost.
    #[default]
    Backpressure,
    /// Close with 92 ("rate limit exceeded"; MQTT 5: DISCONNECT 0x96).
    Disconnect,
}

/// What happens when a client does something its identity may not do.
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

/// Per-org limits.
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
    /// SUBSCRIBE and UNSUBSCRIBE filters per connection.
    pub subscribe_rate: Rate,
}

impl Default for OrgLimits {
    fn default() -> Self {
        let per_second = Rate::per_second;
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
            subscribe_rate: DEFAULT_SUBSCRIBE_RATE,
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

/// An API key role.
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
    /// Devices and gateways by type, then ID (`TYPE/ID` in the file). Two levels, so that a
    /// lookup on the data path builds no key.
    pub devices: HashMap<String, HashMap<String, Device>>,
    /// API keys by key.
    pub api_keys: HashMap<String, ApiKey>,
}

impl Org {
    /// A registered device or gateway.
    pub fn device(&self, device_type: &str, device_id: &str) -> Option<&Device> {
        self.devices.get(device_type)?.get(device_id)
    }

    /// Every registered device and gateway, with its type and ID.
    pub fn all_devices(&self) -> impl Iterator<Item = (&str, &str, &Device)> {
        self.devices.iter().flat_map(|(device_type, ids)| {
            ids.iter()
                .map(move |(id, device)| (device_type.as_str(), id.as_str(), device))
        })
    }

    /// Registers a device or gateway (policy loading and tests).
    pub fn insert_device(&mut self, device_type: &str, device_id: &str, device: Device) {
        self.devices
            .entry(device_type.to_owned())
            .or_default()
            .insert(device_id.to_owned(), device);
    }
}
