//! What the broker behind the proxy can do: its kind (`upstream.broker`), the capabilities that
//! kind declares, and the operator's overrides of each one (`upstream.capabilities`).
//!
//! The rest of the proxy asks [`Capabilities`] instead of assuming Mosquitto: whether to speak
//! MQTT 5 upstream, the highest QoS to forward, whether `$share` subscriptions and retained
//! delivery to wildcard filters can be relied on, and which characters must be escaped in topic
//! levels and client IDs on their way to the broker.

use std::fmt;

/// The capability names, in the order of the docs, as metric labels.
pub const CAPABILITIES: [&str; 5] = [
    "mqtt5",
    "max_qos",
    "shared_subscriptions",
    "retained_to_wildcards",
    "escape",
];

/// The broker products the proxy knows, as named in `upstream.broker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrokerKind {
    /// Mosquitto 2: MQTT 5, QoS 2, shared subscriptions, retained delivery to wildcards.
    #[default]
    Mosquitto,
    /// RabbitMQ 3.x with its MQTT plugin: MQTT 3.1.1, QoS 1, no shared subscriptions, retained
    /// messages only for filters without wildcards, and `.` turned into `/` (it maps `/` to the
    /// AMQP routing key's `.` and back).
    Rabbitmq,
    /// NATS 2.9+ with MQTT: MQTT 3.1.1, QoS 1 (QoS 2 arrived in 2.10, so it is not assumed), no
    /// shared subscriptions, and `.` refused in topics (it separates subject tokens).
    Nats,
    /// Any other broker: only what MQTT 3.1.1 guarantees, nothing more.
    Generic,
}

impl BrokerKind {
    /// The names `upstream.broker` accepts, in the order the docs list them.
    pub const NAMES: [&'static str; 4] = ["mosquitto", "rabbitmq", "nats", "generic"];

    /// Parses an `upstream.broker` value.
    pub fn from_name(name: &str) -> Option<BrokerKind> {
        match name {
            "mosquitto" => Some(BrokerKind::Mosquitto),
            "rabbitmq" => Some(BrokerKind::Rabbitmq),
            "nats" => Some(BrokerKind::Nats),
            "generic" => Some(BrokerKind::Generic),
            _ => None,
        }
    }

    /// The `upstream.broker` name.
    pub fn name(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Rabbitmq => "rabbitmq",
            BrokerKind::Nats => "nats",
            BrokerKind::Generic => "generic",
        }
    }

    /// What a broker of this kind supports, before any override.
    pub fn declared(self) -> Capabilities {
        match self {
            BrokerKind::Mosquitto => Capabilities {
                mqtt5: true,
                max_qos: 2,
                shared_subscriptions: true,
                retained_to_wildcards: true,
                escaped: EscapeSet::NONE,
            },
            BrokerKind::Rabbitmq | BrokerKind::Nats => Capabilities {
                mqtt5: false,
                max_qos: 1,
                shared_subscriptions: false,
                retained_to_wildcards: self == BrokerKind::Nats,
                escaped: EscapeSet::DOT,
            },
            BrokerKind::Generic => Capabilities {
                mqtt5: false,
                max_qos: 1,
                shared_subscriptions: false,
                retained_to_wildcards: false,
                escaped: EscapeSet::NONE,
            },
        }
    }
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the broker supports, as the proxy relies on it: the kind's declaration with the
/// operator's overrides applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The broker accepts MQTT 5 connections.
    pub mqtt5: bool,
    /// The highest QoS the broker delivers as such (0, 1 or 2).
    pub max_qos: u8,
    /// The broker distributes `$share/GROUP/...` subscriptions among the group.
    pub shared_subscriptions: bool,
    /// A new subscription with a wildcard filter receives the matching retained messages.
    pub retained_to_wildcards: bool,
    /// Characters the broker rejects or rewrites in topic levels and client IDs.
    pub escaped: EscapeSet,
}

impl Default for Capabilities {
    fn default() -> Self {
        BrokerKind::default().declared()
    }
}

/// Operator overrides of single capabilities (`upstream.capabilities`); `None` keeps the
/// kind's declaration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CapabilityOverrides {
    /// `mqtt5`.
    pub mqtt5: Option<bool>,
    /// `max_qos`.
    pub max_qos: Option<u8>,
    /// `shared_subscriptions`.
    pub shared_subscriptions: Option<bool>,
    /// `retained_to_wildcards`.
    pub retained_to_wildcards: Option<bool>,
    /// `escape`: the characters to escape.
    pub escaped: Option<EscapeSet>,
}

impl Capabilities {
    /// The kind's declaration with `overrides` applied.
    pub fn of(kind: BrokerKind, overrides: &CapabilityOverrides) -> Capabilities {
        let declared = kind.declared();
        Capabilities {
            mqtt5: overrides.mqtt5.unwrap_or(declared.mqtt5),
            max_qos: overrides.max_qos.unwrap_or(declared.max_qos),
            shared_subscriptions: overrides
                .shared_subscriptions
                .unwrap_or(declared.shared_subscriptions),
            retained_to_wildcards: overrides
                .retained_to_wildcards
                .unwrap_or(declared.retained_to_wildcards),
            escaped: overrides.escaped.unwrap_or(declared.escaped),
        }
    }
}

/// A small set of ASCII characters to escape on the way to the broker. A bit set, so that it is
/// `Copy` and checking a byte costs one shift.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct EscapeSet(u128);

impl EscapeSet {
    /// Nothing is escaped.
    pub const NONE: EscapeSet = EscapeSet(0);
    /// `.` only.
    pub const DOT: EscapeSet = EscapeSet(1 << b'.');

    /// The set of the characters of `chars`, or the first character that cannot be escaped:
    /// only printable ASCII other than the escape character `%`, `/`, `+`, `#` and `$`, which
    /// MQTT itself gives a meaning.
    pub fn parse(chars: &str) -> Result<EscapeSet, char> {
        let mut set = 0u128;
        for c in chars.chars() {
            if !c.is_ascii_graphic() && c != ' ' || matches!(c, '%' | '/' | '+' | '#' | '$') {
                return Err(c);
            }
            set |= 1 << (c as u32);
        }
        Ok(EscapeSet(set))
    }

    /// Whether nothing is escaped (the common case, which costs nothing per message).
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether `byte` is escaped.
    pub fn contains(self, byte: u8) -> bool {
        byte < 128 && self.0 & (1 << byte) != 0
    }

    /// The characters, in ASCII order.
    pub fn chars(self) -> impl Iterator<Item = char> {
        (0u8..128)
            .filter(move |b| self.contains(*b))
            .map(char::from)
    }
}

impl fmt::Debug for EscapeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EscapeSet({:?})", self.chars().collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_parses_back_to_its_kind() {
        for name in BrokerKind::NAMES {
            let kind = BrokerKind::from_name(name).expect("a known name");
            assert_eq!(kind.name(), name);
        }
        assert_eq!(BrokerKind::from_name("activemq"), None);
    }

    #[test]
    fn an_override_changes_only_its_own_capability() {
        let declared = BrokerKind::Nats.declared();
        let overridden = Capabilities::of(
            BrokerKind::Nats,
            &CapabilityOverrides {
                max_qos: Some(2),
                ..CapabilityOverrides::default()
            },
        );
        assert_eq!(overridden.max_qos, 2);
        assert_eq!(
            Capabilities {
                max_qos: declared.max_qos,
                ..overridden
            },
            declared
        );
    }

    #[test]
    fn the_escape_set_refuses_characters_mqtt_gives_a_meaning() {
        for c in ['%', '/', '+', '#', '$', '\0', 'é'] {
            assert_eq!(EscapeSet::parse(&c.to_string()), Err(c), "{c:?}");
        }
        let set = EscapeSet::parse(". *").expect("valid");
        assert!(set.contains(b'.') && set.contains(b' ') && set.contains(b'*'));
        assert!(!set.contains(b'a') && !set.contains(200));
        assert_eq!(set.chars().collect::<String>(), " *.");
        assert!(EscapeSet::NONE.is_empty());
    }
}
