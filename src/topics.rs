//! The `iot-2/...` topic grammar and the org-prefix rewrite in both directions.
//!
//! Client topics are parsed into a [`Iot2Topic`] without allocating (levels are slices of the
//! topic). A session precomputes its [`TopicRewrite`] once at CONNECT, so that rewriting a topic on
//! the data path is two slice copies into the output buffer, never a `format!`.

use crate::identity::{ClientClass, Identity};

/// The first level of every WIoTP topic.
pub const IOT2: &str = "iot-2";
/// The single-level wildcard.
pub const ANY: &str = "+";

/// A topic or filter of the `iot-2` namespace, as the client writes it. Levels may be `+` in a
/// filter; the grammar itself says nothing about who may use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iot2Topic<'a> {
    /// `iot-2/type/T/id/I/evt/E/fmt/F`
    DeviceEvent {
        /// Device type.
        device_type: &'a str,
        /// Device ID.
        device_id: &'a str,
        /// Event ID.
        event: &'a str,
        /// Format.
        format: &'a str,
    },
    /// `iot-2/type/T/id/I/cmd/C/fmt/F`
    DeviceCommand {
        /// Device type.
        device_type: &'a str,
        /// Device ID.
        device_id: &'a str,
        /// Command ID.
        command: &'a str,
        /// Format.
        format: &'a str,
    },
    /// `iot-2/type/T/id/I/mon`
    DeviceMon {
        /// Device type.
        device_type: &'a str,
        /// Device ID.
        device_id: &'a str,
    },
    /// `iot-2/type/T/id/I/notify`
    DeviceNotify {
        /// Device type.
        device_type: &'a str,
        /// Device ID.
        device_id: &'a str,
    },
    /// `iot-2/app/A/mon`
    AppMon {
        /// App ID.
        app_id: &'a str,
    },
    /// `iot-2/evt/E/fmt/F`: a device's own event (short form).
    OwnEvent {
        /// Event ID.
        event: &'a str,
        /// Format.
        format: &'a str,
    },
    /// `iot-2/cmd/C/fmt/F`: a device's own command (short form).
    OwnCommand {
        /// Command ID.
        command: &'a str,
        /// Format.
        format: &'a str,
    },
}

impl<'a> Iot2Topic<'a> {
    /// The device (type, ID) a topic of the `iot-2/type/T/id/I/...` form names.
    pub fn device(&self) -> Option<(&'a str, &'a str)> {
        match *self {
            Iot2Topic::DeviceEvent {
                device_type,
                device_id,
                ..
            }
            | Iot2Topic::DeviceCommand {
                device_type,
                device_id,
                ..
            }
            | Iot2Topic::DeviceMon {
                device_type,
                device_id,
            }
            | Iot2Topic::DeviceNotify {
                device_type,
                device_id,
            } => Some((device_type, device_id)),
            _ => None,
        }
    }
}

/// The most levels any `iot-2` topic has.
const MAX_IOT2_LEVELS: usize = 9;

/// Parses an `iot-2` topic or filter. `None` when it is not one of the WIoTP forms (including any
/// empty level, any `#`, anything after the last level, and `$` topics).
pub fn parse_iot2(topic: &str) -> Option<Iot2Topic<'_>> {
    let mut levels = [""; MAX_IOT2_LEVELS];
    let mut count = 0;
    for level in topic.split('/') {
        if count == MAX_IOT2_LEVELS || level.is_empty() || level.contains('#') {
            return None;
        }
        levels[count] = level;
        count += 1;
    }
    let levels = &levels[..count];
    match levels {
        [IOT2, "type", t, "id", i, "evt", e, "fmt", f] => Some(Iot2Topic::DeviceEvent {
            device_type: t,
            device_id: i,
            event: e,
            format: f,
        }),
        [IOT2, "type", t, "id", i, "cmd", c, "fmt", f] => Some(Iot2Topic::DeviceCommand {
            device_type: t,
            device_id: i,
            command: c,
            format: f,
        }),
        [IOT2, "type", t, "id", i, "mon"] => Some(Iot2Topic::DeviceMon {
            device_type: t,
            device_id: i,
        }),
        [IOT2, "type", t, "id", i, "notify"] => Some(Iot2Topic::DeviceNotify {
            device_type: t,
            device_id: i,
        }),
        [IOT2, "app", a, "mon"] => Some(Iot2Topic::AppMon { app_id: a }),
        [IOT2, "evt", e, "fmt", f] => Some(Iot2Topic::OwnEvent {
            event: e,
            format: f,
        }),
        [IOT2, "cmd", c, "fmt", f] => Some(Iot2Topic::OwnCommand {
            command: c,
            format: f,
        }),
        _ => None,
    }
}

/// Whether a level is the `+` wildcard.
pub fn is_any(level: &str) -> bool {
    level == ANY
}

/// A session's topic rewrite between the client's form and the broker's form.
///
/// Upstream: a topic that starts with `client_strip` has it replaced by `broker_add`.
/// Downstream: a broker topic that starts with `broker_add` has it replaced by `client_strip`.
/// Applications and gateways use the full `iot-2/type/...` form, so the rewrite is only the org
/// prefix. Devices use short forms (`iot-2/evt/...`, `iot-2/cmd/...`) that expand to their own
/// `iot-2/type/T/id/I/...` on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRewrite {
    /// The org prefix on the broker, for example `myorg1/`.
    pub org_prefix: String,
    /// What the client writes in front of the part that stays (`` or `iot-2/`).
    pub client_strip: String,
    /// What the broker has instead (`myorg1/` or `myorg1/iot-2/type/T/id/I/`).
    pub broker_add: String,
}

impl TopicRewrite {
    /// The rewrite for an identity under the configured prefix template (`{org}` is replaced).
    pub fn for_identity(identity: &Identity, prefix_template: &str) -> TopicRewrite {
        let org_prefix = prefix_template.replace("{org}", &identity.org);
        match identity.class {
            ClientClass::Device => TopicRewrite {
                broker_add: format!(
                    "{org_prefix}{IOT2}/type/{}/id/{}/",
                    identity.first,
                    identity.second.as_deref().unwrap_or_default()
                ),
                client_strip: format!("{IOT2}/"),
                org_prefix,
            },
            _ => TopicRewrite {
                broker_add: org_prefix.clone(),
                client_strip: String::new(),
                org_prefix,
            },
        }
    }

    /// The broker form of a client topic as two parts to write one after the other, or `None`
    /// when the topic does not start with what this client must write.
    pub fn to_broker<'a>(&'a self, client_topic: &'a str) -> Option<[&'a [u8]; 2]> {
        let rest = client_topic.strip_prefix(self.client_strip.as_str())?;
        Some([self.broker_add.as_bytes(), rest.as_bytes()])
    }

    /// The broker form of a client topic as one string (CONNECT-time use, such as will topics).
    pub fn to_broker_string(&self, client_topic: &str) -> Option<String> {
        let [head, rest] = self.to_broker(client_topic)?;
        let mut topic = String::with_capacity(head.len() + rest.len());
        topic.push_str(&self.broker_add);
        topic.push_str(std::str::from_utf8(rest).ok()?);
        Some(topic)
    }

    /// The client form of a broker topic as two parts, or `None` when the topic is not in this
    /// client's space (it is then never delivered).
    pub fn to_client<'a>(&'a self, broker_topic: &'a str) -> Option<[&'a [u8]; 2]> {
        let rest = broker_topic.strip_prefix(self.broker_add.as_str())?;
        Some([self.client_strip.as_bytes(), rest.as_bytes()])
    }

    /// How many bytes longer a topic is on the broker than at the client.
    pub fn expansion(&self) -> usize {
        self.broker_add
            .len()
            .saturating_sub(self.client_strip.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::parse_client_id;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            parse_iot2("iot-2/type/sensor/id/d1/evt/temp/fmt/json"),
            Some(Iot2Topic::DeviceEvent {
                device_type: "sensor",
                device_id: "d1",
                event: "temp",
                format: "json"
            })
        );
        assert!(matches!(
            parse_iot2("iot-2/type/+/id/+/cmd/+/fmt/+"),
            Some(Iot2Topic::DeviceCommand { .. })
        ));
        assert!(matches!(
            parse_iot2("iot-2/type/t/id/i/mon"),
            Some(Iot2Topic::DeviceMon { .. })
        ));
        assert!(matches!(
            parse_iot2("iot-2/type/t/id/i/notify"),
            Some(Iot2Topic::DeviceNotify { .. })
        ));
        assert_eq!(
            parse_iot2("iot-2/app/+/mon"),
            Some(Iot2Topic::AppMon { app_id: "+" })
        );
        assert!(matches!(
            parse_iot2("iot-2/evt/e/fmt/f"),
            Some(Iot2Topic::OwnEvent { .. })
        ));
        assert!(matches!(
            parse_iot2("iot-2/cmd/+/fmt/+"),
            Some(Iot2Topic::OwnCommand { .. })
        ));
    }

    #[test]
    fn refuses_everything_else() {
        for topic in [
            "",
            "#",
            "iot-2/#",
            "iot-2/type/t/id/i/evt/e/fmt/#",
            "iot-2/type/t/id/i/evt/e/fmt/f/extra",
            "iot-2/type/t/id/i/evt//fmt/f",
            "iot-2/type/t/id/i",
            "$SYS/broker",
            "other/topic",
            "iot-2/app/a/mon/",
            "/iot-2/evt/e/fmt/f",
            "IOT-2/evt/e/fmt/f",
        ] {
            assert_eq!(parse_iot2(topic), None, "{topic:?}");
        }
    }

    #[test]
    fn device_rewrite_expands_and_contracts() {
        let device = parse_client_id("d:org1:sensor:d1").unwrap();
        let rewrite = TopicRewrite::for_identity(&device, "{org}/");
        assert_eq!(
            rewrite.to_broker_string("iot-2/evt/t/fmt/json").unwrap(),
            "org1/iot-2/type/sensor/id/d1/evt/t/fmt/json"
        );
        let [a, b] = rewrite
            .to_client("org1/iot-2/type/sensor/id/d1/cmd/c/fmt/f")
            .unwrap();
        assert_eq!([a, b].concat(), b"iot-2/cmd/c/fmt/f");
        assert!(rewrite
            .to_client("org1/iot-2/type/sensor/id/d2/cmd/c/fmt/f")
            .is_none());
        assert!(rewrite
            .to_client("org2/iot-2/type/sensor/id/d1/cmd/c/fmt/f")
            .is_none());
        assert_eq!(
            rewrite.expansion(),
            "org1/iot-2/type/sensor/id/d1/".len() - "iot-2/".len()
        );
    }

    #[test]
    fn app_rewrite_is_the_org_prefix() {
        let app = parse_client_id("a:org1:app").unwrap();
        let rewrite = TopicRewrite::for_identity(&app, "tenants/{org}/");
        assert_eq!(
            rewrite
                .to_broker_string("iot-2/type/t/id/i/evt/e/fmt/f")
                .unwrap(),
            "tenants/org1/iot-2/type/t/id/i/evt/e/fmt/f"
        );
        let [a, b] = rewrite.to_client("tenants/org1/iot-2/app/x/mon").unwrap();
        assert_eq!([a, b].concat(), b"iot-2/app/x/mon");
        assert!(rewrite.to_client("tenants/org10/iot-2/app/x/mon").is_none());
    }
}
