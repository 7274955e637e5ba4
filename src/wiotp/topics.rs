//! The `iot-2/...` topic grammar, and the topic rewrite of each identity.
//!
//! Client topics are parsed into a [`Iot2Topic`] without allocating (levels are slices of the
//! topic). A session gets its [`TopicMap`] once at CONNECT, so that rewriting a topic on the data
//! path is two slice copies into the output buffer, never a `format!`.

use super::identity::{ClientClass, Identity};
use crate::rewrite::TopicMap;

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
    // Byte searches: `str::split('/')` and a `contains('#')` per level cost about four times as
    // much on every PUBLISH (callgrind). `/` is ASCII, so every cut is on a character boundary.
    if topic.as_bytes().contains(&b'#') {
        return None;
    }
    let mut rest = topic;
    loop {
        let (level, next) = match rest.bytes().position(|byte| byte == b'/') {
            Some(at) => (rest.get(..at)?, rest.get(at + 1..)),
            None => (rest, None),
        };
        if count == MAX_IOT2_LEVELS || level.is_empty() {
            return None;
        }
        levels[count] = level;
        count += 1;
        match next {
            Some(next) => rest = next,
            None => break,
        }
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

/// The org prefix on the broker under the configured template (`{org}` is replaced).
pub fn org_prefix(org: &str, prefix_template: &str) -> String {
    prefix_template.replace("{org}", org)
}

/// The shared-subscription group of a scalable application: `A:ORG:APP` connections share one
/// group, `A:ORG:APP:INSTANCE` connections another. Empty for every other class.
pub fn share_prefix(identity: &Identity) -> String {
    if identity.class != ClientClass::ScalableApplication {
        return String::new();
    }
    let kind = if identity.instance().is_some() {
        "instances"
    } else {
        "app"
    };
    format!("$share/wiotp.{}.{}.{kind}/", identity.org, identity.first)
}

/// An identity's topic rewrite between the client's form and the broker's form.
///
/// Applications and gateways use the full `iot-2/type/...` form, so the rewrite is only the org
/// prefix. Devices use short forms (`iot-2/evt/...`, `iot-2/cmd/...`) that expand to their own
/// `iot-2/type/T/id/I/...` on the broker. Scalable applications subscribe through their shared
/// group.
pub fn topic_map(identity: &Identity, org_prefix: &str) -> TopicMap {
    match identity.class {
        ClientClass::Device => TopicMap::new(
            &format!("{IOT2}/"),
            &format!(
                "{org_prefix}{IOT2}/type/{}/id/{}/",
                identity.first,
                identity.second.as_deref().unwrap_or_default()
            ),
            "",
        ),
        _ => TopicMap::new("", org_prefix, &share_prefix(identity)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wiotp::identity::parse_client_id;

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
            "iot-2/evt/e#x/fmt/f",
            "iot-2/evt/e/fmt/",
            "iot-2/type/t/id/i/evt/e/fmt/f/x/y/z/w",
            "iot-2/évt/e/fmt/f",
            "iot-2/evt/e/fmt/f/",
            "iot-2/evt/e#/fmt/f",
            "iot-2//e/fmt/f",
            "iot-2/type/t/id/i/evt/e/fmt/f/x/y",
        ] {
            assert_eq!(parse_iot2(topic), None, "{topic:?}");
        }
    }

    #[test]
    fn levels_are_cut_at_every_slash_and_keep_other_characters() {
        assert_eq!(
            parse_iot2("iot-2/evt/é+ü/fmt/$x y"),
            Some(Iot2Topic::OwnEvent {
                event: "é+ü",
                format: "$x y"
            })
        );
        assert_eq!(
            parse_iot2("iot-2/app/\u{1F600}/mon"),
            Some(Iot2Topic::AppMon {
                app_id: "\u{1F600}"
            })
        );
    }

    #[test]
    fn device_rewrite_expands_and_contracts() {
        let device = parse_client_id("d:org1:sensor:d1").unwrap();
        let rewrite = topic_map(&device, &org_prefix(&device.org, "{org}/"));
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
        let rewrite = topic_map(&app, &org_prefix(&app.org, "tenants/{org}/"));
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

    #[test]
    fn scalable_applications_subscribe_through_their_group() {
        let app = parse_client_id("A:org1:app").unwrap();
        let rewrite = topic_map(&app, "org1/");
        assert!(rewrite.is_shared());
        let parts = rewrite
            .filter_to_broker("iot-2/type/+/id/+/evt/+/fmt/+")
            .unwrap();
        assert_eq!(
            parts.concat(),
            b"$share/wiotp.org1.app.app/org1/iot-2/type/+/id/+/evt/+/fmt/+"
        );
        let instance = parse_client_id("A:org1:app:i1").unwrap();
        assert_eq!(share_prefix(&instance), "$share/wiotp.org1.app.instances/");
    }
}
