//! What an authenticated identity may do: publish to a topic, subscribe to a filter, receive a
//! delivery; and whether a policy edit revoked it.
//!
//! Every check is a pure function of (principal, topic) and answers `Ok(())` or the [`Refusal`]
//! that denies it, so the rules are tested without sockets. Topic *syntax* (wildcard placement,
//! UTF-8, NUL) was already checked by the codec: a topic that reaches this module is valid MQTT,
//! so every denial here is not authorized (180).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::identity::{ClientClass, Identity};
use super::topics::{is_any, parse_iot2, Iot2Topic};
use crate::auth::TokenHash;
use crate::policy::{ApiRole, DeviceClass, GatewayRole, Org, Policy};
use crate::refusal::{Cause, Refusal};

/// An authenticated identity with everything the checks need from the policy.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The parsed client ID.
    pub identity: Identity,
    /// Its org, as the policy had it at CONNECT.
    pub org: Arc<Org>,
    /// For applications, the API key's role.
    pub api_role: ApiRole,
    /// For applications and gateways, the device groups they are limited to (empty: none).
    pub groups: Vec<String>,
    /// For gateways, what they may act for.
    pub gateway_role: GatewayRole,
    /// For group-limited API keys and standard gateways: the devices whose deliveries they may
    /// receive. `None` means the whole org.
    pub scope: Option<Arc<DeviceScope>>,
    /// The API key an application authenticated with.
    pub api_key: Option<String>,
    /// The stored token hash it was verified against (to notice a changed token on reload).
    pub token: Option<TokenHash>,
}

/// The registered devices of some groups, indexed by type then ID so that a delivery is checked
/// with two hash lookups and no allocation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DeviceScope {
    by_type: HashMap<Box<str>, HashSet<Box<str>>>,
}

impl DeviceScope {
    /// The devices of `org` that belong to any of `groups`. Built once per CONNECT.
    pub fn for_groups(org: &Org, groups: &[String]) -> DeviceScope {
        let mut by_type: HashMap<Box<str>, HashSet<Box<str>>> = HashMap::new();
        for (device_type, device_id, device) in org.all_devices() {
            if device.groups.iter().any(|group| groups.contains(group)) {
                by_type
                    .entry(device_type.into())
                    .or_default()
                    .insert(device_id.into());
            }
        }
        DeviceScope { by_type }
    }

    /// Whether the device is in scope.
    pub fn contains(&self, device_type: &str, device_id: &str) -> bool {
        self.by_type
            .get(device_type)
            .is_some_and(|ids| ids.contains(device_id))
    }
}

fn deny(what: &'static str) -> Refusal {
    Refusal::with_detail(Cause::NotAuthorized, what)
}

impl Principal {
    /// Narrows deliveries to the groups when the identity is group-limited (API keys with groups,
    /// standard gateways); builds the device index once.
    pub fn refresh_scope(&mut self) {
        let limited = match self.identity.class {
            ClientClass::Device => false,
            ClientClass::Gateway => self.gateway_role == GatewayRole::Standard,
            ClientClass::Application | ClientClass::ScalableApplication => !self.groups.is_empty(),
        };
        self.scope = limited.then(|| Arc::new(DeviceScope::for_groups(&self.org, &self.groups)));
    }

    /// The principal under a new policy, or the close (94) when the policy revoked it: its org,
    /// API key, device or gateway was removed or disabled, or its token changed.
    pub fn revalidate(&self, policy: &Policy) -> Result<Principal, Refusal> {
        let revoked = |what: &'static str| Refusal::with_detail(Cause::Revoked, what);
        let org = policy
            .org(&self.identity.org)
            .ok_or_else(|| revoked("the org was removed"))?;
        if !org.enabled {
            return Err(revoked("the org was disabled"));
        }
        if org.quickstart != self.org.quickstart {
            return Err(revoked("the org changed kind"));
        }
        let mut next = self.clone();
        next.org = org.clone();
        if org.quickstart {
            return Ok(next);
        }
        match self.identity.class {
            ClientClass::Application | ClientClass::ScalableApplication => {
                let name = self.api_key.as_deref().unwrap_or_default();
                let key = org
                    .api_keys
                    .get(name)
                    .ok_or_else(|| revoked("the API key was removed"))?;
                if !key.enabled {
                    return Err(revoked("the API key was disabled"));
                }
                if self.token.as_ref() != Some(&key.token) {
                    return Err(revoked("the API key's token changed"));
                }
                next.api_role = key.role;
                next.groups = key.groups.clone();
            }
            ClientClass::Device | ClientClass::Gateway => {
                let device_type = self.identity.device_type().unwrap_or_default();
                let wanted = if self.identity.class == ClientClass::Gateway {
                    DeviceClass::Gateway
                } else {
                    DeviceClass::Device
                };
                if org.device_types.get(device_type).map(|t| t.class) != Some(wanted) {
                    return Err(revoked("the device type was removed or changed class"));
                }
                let device = org
                    .device(device_type, self.identity.device_id().unwrap_or_default())
                    .ok_or_else(|| revoked("the device was removed"))?;
                if !device.enabled {
                    return Err(revoked("the device was disabled"));
                }
                if self.token.as_ref() != Some(&device.token) {
                    return Err(revoked("the device's token changed"));
                }
                if self.identity.class == ClientClass::Gateway {
                    next.gateway_role = device.role;
                    next.groups = device.groups.clone();
                }
            }
        }
        next.refresh_scope();
        Ok(next)
    }

    /// May this principal publish to `topic` (client form)?
    pub fn check_publish(&self, topic: &str) -> Result<(), Refusal> {
        let parsed = parse_iot2(topic).ok_or_else(|| deny("topic outside the iot-2 namespace"))?;
        match (self.identity.class, parsed) {
            (ClientClass::Device, Iot2Topic::OwnEvent { .. }) => Ok(()),
            (
                ClientClass::Gateway,
                Iot2Topic::DeviceEvent {
                    device_type,
                    device_id,
                    ..
                },
            ) => self.check_acts_for(device_type, device_id),
            (
                class,
                Iot2Topic::DeviceEvent {
                    device_type,
                    device_id,
                    ..
                },
            ) if class.is_application() => {
                if !matches!(
                    self.api_role,
                    ApiRole::Standard | ApiRole::BackendTrusted | ApiRole::DeviceApp
                ) {
                    return Err(deny("the API key role may not publish events"));
                }
                self.check_app_device(device_type, device_id)
            }
            (
                class,
                Iot2Topic::DeviceCommand {
                    device_type,
                    device_id,
                    ..
                },
            ) if class.is_application() => {
                if self.org.quickstart {
                    return Err(deny("quickstart has no commands"));
                }
                if !matches!(
                    self.api_role,
                    ApiRole::Standard
                        | ApiRole::BackendTrusted
                        | ApiRole::Operations
                        | ApiRole::DataProcessor
                ) {
                    return Err(deny("the API key role may not publish commands"));
                }
                self.check_app_device(device_type, device_id)
            }
            (
                _,
                Iot2Topic::DeviceMon { .. }
                | Iot2Topic::AppMon { .. }
                | Iot2Topic::DeviceNotify { .. },
            ) => Err(deny(
                "mon and notify topics are published only by the proxy",
            )),
            _ => Err(deny("publish not allowed for this client class")),
        }
    }

    /// May a delivery on `topic` (client form) reach this principal? Wildcard subscriptions of
    /// group-limited identities are narrowed here, per delivered message, in O(1).
    pub fn may_receive(&self, topic: &str) -> bool {
        let Some(scope) = &self.scope else {
            return true;
        };
        match parse_iot2(topic) {
            // A gateway's own notify topic names the gateway itself.
            Some(Iot2Topic::DeviceNotify { .. } | Iot2Topic::AppMon { .. }) => true,
            Some(parsed) => parsed.device().is_some_and(|(device_type, device_id)| {
                self.is_self(device_type, device_id) || scope.contains(device_type, device_id)
            }),
            None => false,
        }
    }

    /// May this principal subscribe to `filter` (client form)?
    pub fn check_subscribe(&self, filter: &str) -> Result<(), Refusal> {
        let parsed =
            parse_iot2(filter).ok_or_else(|| deny("filter outside the iot-2 namespace"))?;
        let quickstart = self.org.quickstart;
        match (self.identity.class, parsed) {
            (ClientClass::Device, Iot2Topic::OwnCommand { .. }) if !quickstart => Ok(()),
            (
                ClientClass::Gateway,
                Iot2Topic::DeviceCommand {
                    device_type,
                    device_id,
                    ..
                },
            ) if !quickstart => self.check_acts_for_filter(device_type, device_id),
            (
                ClientClass::Gateway,
                Iot2Topic::DeviceNotify {
                    device_type,
                    device_id,
                },
            ) => {
                if self.is_self(device_type, device_id) {
                    Ok(())
                } else {
                    Err(deny("a gateway subscribes only to its own notify topic"))
                }
            }
            (
                ClientClass::Gateway,
                Iot2Topic::DeviceMon {
                    device_type,
                    device_id,
                },
            ) => self.check_acts_for_filter(device_type, device_id),
            (class, topic) if class.is_application() => self.check_app_subscribe(topic),
            _ => Err(deny("subscription not allowed for this client class")),
        }
    }

    fn check_app_subscribe(&self, topic: Iot2Topic<'_>) -> Result<(), Refusal> {
        let role = self.api_role;
        let full_rights = matches!(role, ApiRole::Standard | ApiRole::BackendTrusted);
        let (device_type, device_id) = match topic {
            Iot2Topic::DeviceEvent {
                device_type,
                device_id,
                ..
            } => (device_type, device_id),
            Iot2Topic::DeviceCommand {
                device_type,
                device_id,
                ..
            } => {
                if self.org.quickstart {
                    return Err(deny("quickstart has no commands"));
                }
                if !(full_rights || role == ApiRole::DeviceApp) {
                    return Err(deny("the API key role may not subscribe to commands"));
                }
                (device_type, device_id)
            }
            Iot2Topic::DeviceMon {
                device_type,
                device_id,
            } if full_rights => (device_type, device_id),
            Iot2Topic::AppMon { app_id } if full_rights => {
                if self.org.quickstart && is_any(app_id) {
                    return Err(deny("quickstart forbids + in the app ID"));
                }
                return Ok(());
            }
            _ => return Err(deny("subscription not allowed for this API key")),
        };
        if self.org.quickstart && is_any(device_id) {
            return Err(deny("quickstart forbids + in the device ID"));
        }
        if self.groups.is_empty() || is_any(device_type) || is_any(device_id) {
            // Wildcards over a group-limited key are narrowed per delivery, not refused.
            return Ok(());
        }
        self.check_in_groups(device_type, device_id)
    }

    fn check_app_device(&self, device_type: &str, device_id: &str) -> Result<(), Refusal> {
        if !self.groups.is_empty() {
            return self.check_in_groups(device_type, device_id);
        }
        if self.org.require_registered_devices && self.org.device(device_type, device_id).is_none()
        {
            return Err(deny("the device is not registered"));
        }
        Ok(())
    }

    fn is_self(&self, device_type: &str, device_id: &str) -> bool {
        self.identity.device_type() == Some(device_type)
            && self.identity.device_id() == Some(device_id)
    }

    /// A gateway publishing for a device: itself, any device when privileged, else its groups.
    fn check_acts_for(&self, device_type: &str, device_id: &str) -> Result<(), Refusal> {
        if self.is_self(device_type, device_id) || self.gateway_role == GatewayRole::Privileged {
            return Ok(());
        }
        self.check_in_groups(device_type, device_id)
    }

    fn check_acts_for_filter(&self, device_type: &str, device_id: &str) -> Result<(), Refusal> {
        if is_any(device_type) || is_any(device_id) {
            // A standard gateway's wildcard is narrowed per delivery to its groups.
            return Ok(());
        }
        self.check_acts_for(device_type, device_id)
    }

    fn check_in_groups(&self, device_type: &str, device_id: &str) -> Result<(), Refusal> {
        let device = self
            .org
            .device(device_type, device_id)
            .ok_or_else(|| deny("the device is not registered in the key's groups"))?;
        if device
            .groups
            .iter()
            .any(|group| self.groups.contains(group))
        {
            Ok(())
        } else {
            Err(deny("the device is outside the groups of this identity"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenHash;
    use crate::policy::{Device, OrgLimits};
    use crate::wiotp::codes::code;
    use crate::wiotp::identity::parse_client_id;
    use std::collections::HashMap;

    /// The WIoTP number of a refusal, as the assertions read.
    trait Number {
        fn number(&self) -> u16;
    }

    impl Number for Refusal {
        fn number(&self) -> u16 {
            code(self.cause).number
        }
    }

    fn org(quickstart: bool) -> Arc<Org> {
        let mut org = Org {
            id: "org1".into(),
            enabled: true,
            quickstart,
            security: Default::default(),
            on_violation: Default::default(),
            on_rate_exceeded: Default::default(),
            require_registered_devices: false,
            strip_retained: true,
            limits: OrgLimits::default(),
            device_types: HashMap::new(),
            devices: HashMap::new(),
            api_keys: HashMap::new(),
        };
        org.insert_device(
            "sensor",
            "d1",
            Device {
                token: TokenHash::Sha256([0; 32]),
                groups: vec!["line-1".into()],
                role: GatewayRole::Privileged,
                enabled: true,
            },
        );
        Arc::new(org)
    }

    fn principal(client_id: &str, role: ApiRole, groups: &[&str]) -> Principal {
        Principal {
            identity: parse_client_id(client_id).unwrap(),
            org: org(false),
            api_role: role,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            gateway_role: GatewayRole::Privileged,
            scope: None,
            api_key: Some("a-org1-key".into()),
            token: Some(TokenHash::Sha256([0; 32])),
        }
    }

    const EVT: &str = "iot-2/type/sensor/id/d1/evt/e/fmt/json";
    const CMD: &str = "iot-2/type/sensor/id/d1/cmd/c/fmt/json";

    #[test]
    fn devices_publish_own_events_and_subscribe_own_commands_only() {
        let device = principal("d:org1:sensor:d1", ApiRole::Standard, &[]);
        assert!(device.check_publish("iot-2/evt/temp/fmt/json").is_ok());
        assert!(device.check_publish(EVT).is_err());
        assert!(device.check_publish("iot-2/cmd/c/fmt/json").is_err());
        assert!(device.check_subscribe("iot-2/cmd/+/fmt/+").is_ok());
        assert!(device.check_subscribe("iot-2/evt/+/fmt/+").is_err());
        assert!(device
            .check_subscribe("iot-2/type/+/id/+/cmd/+/fmt/+")
            .is_err());
        assert_eq!(device.check_subscribe("#").unwrap_err().number(), 180);
    }

    #[test]
    fn applications_follow_their_role() {
        let standard = principal("a:org1:app", ApiRole::Standard, &[]);
        for ok in [EVT, CMD] {
            assert!(standard.check_publish(ok).is_ok());
        }
        for ok in [
            "iot-2/type/+/id/+/evt/+/fmt/+",
            "iot-2/type/+/id/+/mon",
            "iot-2/app/+/mon",
            CMD,
        ] {
            assert!(standard.check_subscribe(ok).is_ok(), "{ok}");
        }
        for denied in [
            "iot-2/type/sensor/id/d1/mon",
            "iot-2/app/x/mon",
            "iot-2/type/t/id/i/notify",
            "$SYS/x",
            "org2/iot-2/x",
        ] {
            assert!(standard.check_publish(denied).is_err(), "{denied}");
        }
        assert!(standard.check_subscribe("iot-2/type/+/id/+/evt/#").is_err());
        assert!(standard.check_subscribe("$SYS/#").is_err());

        let visualization = principal("a:org1:viz", ApiRole::Visualization, &[]);
        assert!(visualization
            .check_subscribe("iot-2/type/+/id/+/evt/+/fmt/+")
            .is_ok());
        assert!(visualization.check_publish(EVT).is_err());
        assert!(visualization.check_publish(CMD).is_err());
        assert!(visualization
            .check_subscribe("iot-2/type/+/id/+/mon")
            .is_err());

        let operations = principal("a:org1:ops", ApiRole::Operations, &[]);
        assert!(operations.check_publish(CMD).is_ok());
        assert!(operations.check_publish(EVT).is_err());
        assert!(operations.check_subscribe(CMD).is_err());

        let device_app = principal("a:org1:da", ApiRole::DeviceApp, &[]);
        assert!(device_app.check_publish(EVT).is_ok());
        assert!(device_app.check_publish(CMD).is_err());
        assert!(device_app.check_subscribe(CMD).is_ok());
    }

    #[test]
    fn groups_limit_publishing() {
        let in_group = principal("a:org1:app", ApiRole::Standard, &["line-1"]);
        assert!(in_group.check_publish(EVT).is_ok());
        let other_group = principal("a:org1:app", ApiRole::Standard, &["line-2"]);
        assert!(other_group.check_publish(EVT).is_err());
        assert!(other_group
            .check_publish("iot-2/type/sensor/id/unknown/evt/e/fmt/f")
            .is_err());
    }

    #[test]
    fn group_scope_narrows_deliveries() {
        let mut app = principal("a:org1:app", ApiRole::Standard, &["line-1"]);
        app.scope = Some(Arc::new(DeviceScope::for_groups(&app.org, &app.groups)));
        assert!(app.may_receive(EVT));
        assert!(app.may_receive("iot-2/type/sensor/id/d1/mon"));
        assert!(!app.may_receive("iot-2/type/sensor/id/d2/evt/e/fmt/f"));
        assert!(!app.may_receive("iot-2/type/other/id/d1/cmd/c/fmt/f"));
        assert!(app.may_receive("iot-2/app/x/mon"));
        let unrestricted = principal("a:org1:app", ApiRole::Standard, &[]);
        assert!(unrestricted.may_receive("iot-2/type/sensor/id/d2/evt/e/fmt/f"));
    }

    #[test]
    fn revalidation_follows_the_policy() {
        let device = principal("d:org1:sensor:d1", ApiRole::Standard, &[]);
        let mut policy = Policy::default();
        policy.orgs.insert("org1".into(), device.org.clone());
        // The test org declares no device types, so the device's type is gone.
        assert_eq!(device.revalidate(&policy).unwrap_err().number(), 94);

        let mut org = (*device.org).clone();
        org.device_types.insert("sensor".into(), Default::default());
        policy.orgs.insert("org1".into(), Arc::new(org.clone()));
        assert!(device.revalidate(&policy).is_ok());

        org.devices
            .get_mut("sensor")
            .and_then(|ids| ids.get_mut("d1"))
            .unwrap()
            .token = TokenHash::Sha256([1; 32]);
        policy.orgs.insert("org1".into(), Arc::new(org.clone()));
        assert_eq!(
            device.revalidate(&policy).unwrap_err().number(),
            94,
            "token changed"
        );

        org.enabled = false;
        policy.orgs.insert("org1".into(), Arc::new(org));
        assert_eq!(
            device.revalidate(&policy).unwrap_err().number(),
            94,
            "org disabled"
        );
        assert_eq!(
            device.revalidate(&Policy::default()).unwrap_err().number(),
            94,
            "org removed"
        );
    }

    #[test]
    fn gateways_act_for_devices() {
        let gateway = principal("g:org1:gw:g1", ApiRole::Standard, &[]);
        assert!(gateway
            .check_publish("iot-2/type/gw/id/g1/evt/e/fmt/f")
            .is_ok());
        assert!(gateway
            .check_publish("iot-2/type/any/id/unregistered/evt/e/fmt/f")
            .is_ok());
        assert!(gateway.check_publish(CMD).is_err());
        assert!(gateway
            .check_subscribe("iot-2/type/+/id/+/cmd/+/fmt/+")
            .is_ok());
        assert!(gateway
            .check_subscribe("iot-2/type/gw/id/g1/notify")
            .is_ok());
        assert!(gateway
            .check_subscribe("iot-2/type/gw/id/g2/notify")
            .is_err());
        let mut standard = principal("g:org1:gw:g1", ApiRole::Standard, &["line-1"]);
        standard.gateway_role = GatewayRole::Standard;
        assert!(standard.check_publish(EVT).is_ok());
        assert!(standard
            .check_publish("iot-2/type/any/id/unregistered/evt/e/fmt/f")
            .is_err());
    }

    #[test]
    fn quickstart_has_no_commands_and_no_device_wildcards() {
        let mut app = principal("a:quickstart:app", ApiRole::Standard, &[]);
        app.org = org(true);
        assert!(app.check_publish(CMD).is_err());
        assert!(app
            .check_subscribe("iot-2/type/sensor/id/+/evt/+/fmt/+")
            .is_err());
        assert!(app
            .check_subscribe("iot-2/type/sensor/id/d1/evt/+/fmt/+")
            .is_ok());
        assert!(app.check_subscribe("iot-2/app/+/mon").is_err());
    }
}
