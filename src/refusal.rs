//! Why a connection or one of its requests ends, in MQTT terms only: the [`Cause`] and what an
//! MQTT 3 and an MQTT 5 client are told for it.
//!
//! This is the vocabulary the session machinery speaks. It names no tenant model: a profile maps
//! each cause to its own closing-code number and reason text (WIoTP's table lives in
//! `wiotp::codes`), which is what logs, metrics and status messages show.

use std::borrow::Cow;
use std::fmt;

use crate::codec::CodecError;

/// Why a connection ends or a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// The client sent DISCONNECT.
    Normal,
    /// The client closed the socket without DISCONNECT, or stopped answering.
    ClientClosed,
    /// The broker closed the upstream session, or the proxy itself failed.
    ServerClosed,
    /// The proxy is shutting down.
    Shutdown,
    /// An administrator (a policy edit) revoked the connection.
    Revoked,
    /// The process connection cap was reached, or the client connects too often.
    ServerCapacity,
    /// Invalid MQTT data.
    InvalidData,
    /// Too many subscriptions on one connection.
    TooManySubscriptions,
    /// Keep-alive timeout, or a packet that never completed.
    KeepAliveTimeout,
    /// The TLS handshake failed.
    TlsHandshake,
    /// Nothing arrived within the connect deadline.
    NoData,
    /// The first packet was too large.
    InitialPacketTooLarge,
    /// The client ID is not acceptable.
    InvalidClientId,
    /// The broker cannot be reached, or the proxy is not accepting sessions.
    ServerUnavailable,
    /// A required client certificate is missing.
    CertificateMissing,
    /// The client certificate is not valid.
    CertificateInvalid,
    /// The tenant's connection quota is full.
    TenantQuota,
    /// The authentication queue is full.
    AuthenticationBusy,
    /// Not authorized: the CONNECT, or a request.
    NotAuthorized,
    /// A length field disagrees with the packet.
    InvalidLength,
    /// A topic name or filter that is not valid.
    InvalidTopic,
    /// A message larger than allowed.
    MessageTooLarge,
    /// A newer connection took the client ID over.
    TakenOver,
    /// An HTTP messaging request changed the Authorization of its kept-alive connection.
    AuthorizationChanged,
}

/// What an MQTT 3.1 / 3.1.1 client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V3Answer {
    /// Nothing: the connection was already closed, or closed normally.
    Nothing,
    /// The socket is closed without a packet (MQTT 3 has no DISCONNECT from the server).
    Close,
    /// CONNACK with this return code, then close. Only before the session is established.
    Connack(u8),
}

/// The MQTT answers to one cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answers {
    /// The MQTT 3 answer.
    pub v3: V3Answer,
    /// The MQTT 5 CONNACK reason code, when the close happens before CONNACK.
    pub v5_connack: Option<u8>,
    /// The MQTT 5 DISCONNECT reason code, when the close happens after CONNACK.
    pub v5_disconnect: Option<u8>,
}

impl Cause {
    /// Every cause, for tables and tests.
    pub const ALL: [Cause; 24] = [
        Cause::Normal,
        Cause::ClientClosed,
        Cause::ServerClosed,
        Cause::Shutdown,
        Cause::Revoked,
        Cause::ServerCapacity,
        Cause::InvalidData,
        Cause::TooManySubscriptions,
        Cause::KeepAliveTimeout,
        Cause::TlsHandshake,
        Cause::NoData,
        Cause::InitialPacketTooLarge,
        Cause::InvalidClientId,
        Cause::ServerUnavailable,
        Cause::CertificateMissing,
        Cause::CertificateInvalid,
        Cause::TenantQuota,
        Cause::AuthenticationBusy,
        Cause::NotAuthorized,
        Cause::InvalidLength,
        Cause::InvalidTopic,
        Cause::MessageTooLarge,
        Cause::TakenOver,
        Cause::AuthorizationChanged,
    ];

    /// What the client is told for this cause (before any override).
    pub const fn answers(self) -> Answers {
        use V3Answer::{Close, Connack, Nothing};
        let (v3, v5_connack, v5_disconnect) = match self {
            Cause::Normal | Cause::ClientClosed => (Nothing, None, None),
            Cause::ServerClosed => (Close, Some(0x80), Some(0x80)),
            Cause::Shutdown => (Close, Some(0x8B), Some(0x8B)),
            Cause::Revoked => (Close, Some(0x98), Some(0x98)),
            Cause::ServerCapacity => (Connack(3), Some(0x89), Some(0x89)),
            Cause::InvalidData => (Close, Some(0x81), Some(0x81)),
            Cause::TooManySubscriptions => (Close, Some(0x97), Some(0x97)),
            Cause::KeepAliveTimeout => (Close, None, Some(0x8D)),
            Cause::TlsHandshake | Cause::NoData | Cause::InitialPacketTooLarge => {
                (Close, None, None)
            }
            Cause::InvalidClientId => (Connack(2), Some(0x85), Some(0x85)),
            Cause::ServerUnavailable => (Connack(3), Some(0x88), Some(0x88)),
            Cause::CertificateMissing | Cause::CertificateInvalid => {
                (Connack(5), Some(0x87), Some(0x87))
            }
            Cause::TenantQuota => (Connack(3), Some(0x97), Some(0x97)),
            Cause::AuthenticationBusy => (Connack(3), Some(0x89), Some(0x89)),
            Cause::NotAuthorized => (Connack(5), Some(0x87), Some(0x87)),
            Cause::InvalidLength => (Close, Some(0x81), Some(0x81)),
            Cause::InvalidTopic => (Close, Some(0x8F), Some(0x90)),
            Cause::MessageTooLarge => (Close, Some(0x95), Some(0x95)),
            Cause::TakenOver => (Close, None, Some(0x8E)),
            // HTTP only: the HTTP front end answers it; an MQTT client never meets it.
            Cause::AuthorizationChanged => (Close, None, None),
        };
        Answers {
            v3,
            v5_connack,
            v5_disconnect,
        }
    }

    /// Whether the client ended the connection itself (nothing is sent back, nothing abnormal).
    pub fn is_ordinary(self) -> bool {
        matches!(self, Cause::Normal | Cause::ClientClosed)
    }
}

/// A refusal: the cause, the words of this particular case, and how the client is answered.
///
/// `detail` is appended to the profile's reason text after a colon. It must never hold a secret.
/// A static detail (`Cow::Borrowed`) names a rule and may label a metric; a formatted one is for
/// the reason string and the log only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The cause.
    pub cause: Cause,
    /// An MQTT 5 reason code more precise than the cause's (for example 0x82 Protocol Error
    /// against 0x81 Malformed Packet, both invalid data).
    pub v5_reason: Option<u8>,
    /// Extra words for the reason string.
    pub detail: Option<Cow<'static, str>>,
    /// For a refused CONNECT: the credentials were wrong (CONNACK 4 / 0x86), not just not allowed.
    pub bad_credentials: bool,
    /// For a refused request: the connection stays, and the request alone is answered.
    pub keeps_connection: bool,
    /// For a refused request on a connection that stays: the MQTT 5 PUBACK / SUBACK reason code
    /// (0x87 Not authorized unless set).
    pub v5_ack: Option<u8>,
    /// For a refused request on a connection that stays: the MQTT 5 acknowledgement carries the
    /// reason string too (a profile whose details name the deciding rule asks for it).
    pub reason_on_ack: bool,
    /// For a refused CONNECT: the MQTT 3 CONNACK return code, when the cause's is not precise
    /// enough (1, unacceptable protocol version).
    pub v3_connack_code: Option<u8>,
}

impl Refusal {
    /// A refusal with this cause and no detail.
    pub const fn new(cause: Cause) -> Self {
        Refusal {
            cause,
            v5_reason: None,
            detail: None,
            bad_credentials: false,
            keeps_connection: false,
            v5_ack: None,
            reason_on_ack: false,
            v3_connack_code: None,
        }
    }

    /// A protocol version that cannot be served (the client's, or the broker refused the one
    /// the proxy speaks for this client): CONNACK 1 (MQTT 3) or 0x84 (MQTT 5), never "server
    /// unavailable", which tells clients to retry forever.
    pub fn unsupported_protocol(detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            v3_connack_code: Some(1),
            ..Self::with_detail(Cause::InvalidData, detail).v5(0x84)
        }
    }

    /// A refusal with this cause and a detail for the reason string.
    pub fn with_detail(cause: Cause, detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            detail: Some(detail.into()),
            ..Self::new(cause)
        }
    }

    /// Overrides the MQTT 5 reason code.
    pub fn v5(mut self, reason_code: u8) -> Self {
        self.v5_reason = Some(reason_code);
        self
    }

    /// Marks a request refusal that leaves the connection open, acknowledged with `v5_ack`.
    pub fn keeping_connection(mut self, v5_ack: Option<u8>) -> Self {
        self.keeps_connection = true;
        self.v5_ack = v5_ack;
        self
    }

    /// Asks for the reason string on the MQTT 5 acknowledgement of a refused request.
    pub fn with_reason_on_ack(mut self) -> Self {
        self.reason_on_ack = true;
        self
    }

    /// Not authorized because of wrong credentials: CONNACK 4 (MQTT 3) or 0x86 (MQTT 5).
    pub fn bad_credentials(detail: impl Into<Cow<'static, str>>) -> Self {
        Refusal {
            bad_credentials: true,
            ..Self::with_detail(Cause::NotAuthorized, detail)
        }
    }

    /// Invalid data, MQTT 5 Malformed Packet.
    pub fn malformed(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::with_detail(Cause::InvalidData, detail).v5(0x81)
    }

    /// Invalid data, MQTT 5 Protocol Error.
    pub fn protocol_error(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::with_detail(Cause::InvalidData, detail).v5(0x82)
    }

    /// The refusal for bytes that are not valid MQTT. `in_connect` is true for the first packet.
    pub fn from_codec(error: &CodecError, in_connect: bool) -> Self {
        match error {
            CodecError::Malformed(what) => Self::malformed(*what),
            CodecError::ProtocolError(what) => Self::protocol_error(*what),
            CodecError::BadLength(what) => Self::with_detail(Cause::InvalidLength, *what),
            CodecError::InvalidTopic(what) => Self::with_detail(Cause::InvalidTopic, *what),
            CodecError::TooLarge { declared, max } => {
                let cause = if in_connect {
                    Cause::InitialPacketTooLarge
                } else {
                    Cause::MessageTooLarge
                };
                Self::with_detail(cause, format!("{declared} bytes, limit {max}"))
            }
            CodecError::BadProtocolName => Self::malformed("unknown protocol name"),
            CodecError::UnsupportedProtocolLevel(level) => {
                Self::with_detail(Cause::InvalidData, format!("protocol level {level}")).v5(0x84)
            }
        }
    }

    /// A topic-filter syntax error: as [`Refusal::from_codec`], with MQTT 5's "Topic Filter
    /// invalid" for an invalid topic.
    pub fn from_filter_error(error: &CodecError) -> Self {
        let refusal = Self::from_codec(error, false);
        if refusal.cause == Cause::InvalidTopic {
            refusal.v5(0x8F)
        } else {
            refusal
        }
    }

    /// The rule a refusal names, for a metric label: its detail when that is a fixed text.
    pub fn rule(&self) -> &'static str {
        match &self.detail {
            Some(Cow::Borrowed(rule)) => rule,
            _ => "other",
        }
    }

    /// What an MQTT 3 client is told before CONNACK was sent.
    pub fn v3_connack(&self) -> Option<u8> {
        if self.cause == Cause::NotAuthorized && self.bad_credentials {
            return Some(4);
        }
        if let Some(code) = self.v3_connack_code {
            return Some(code);
        }
        match self.cause.answers().v3 {
            V3Answer::Connack(code) => Some(code),
            _ => None,
        }
    }

    /// The MQTT 5 CONNACK reason code, when the close happens before CONNACK.
    pub fn v5_connack(&self) -> Option<u8> {
        if self.cause == Cause::NotAuthorized && self.bad_credentials {
            return Some(0x86);
        }
        match self.cause.answers().v5_connack {
            Some(table) => Some(self.v5_reason.unwrap_or(table)),
            None => self.v5_reason,
        }
    }

    /// The MQTT 5 DISCONNECT reason code, when the close happens after CONNACK.
    pub fn v5_disconnect(&self) -> Option<u8> {
        self.cause
            .answers()
            .v5_disconnect
            .map(|table| self.v5_reason.unwrap_or(table))
    }

    /// The MQTT 5 reason code of the PUBACK or SUBACK that answers a refused request when the
    /// connection stays.
    pub fn v5_ack(&self) -> u8 {
        self.v5_ack.unwrap_or(0x87)
    }
}

impl From<Cause> for Refusal {
    fn from(cause: Cause) -> Self {
        Refusal::new(cause)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.detail {
            Some(detail) => write!(f, "{:?}: {detail}", self.cause),
            None => write!(f, "{:?}", self.cause),
        }
    }
}

/// A profile's closing code for a cause: the number and the reason text that logs, metrics,
/// status messages and MQTT 5 reason strings show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Code {
    /// The number (WIoTP's closing codes: 0, 91, 180, 288, ...).
    pub number: u16,
    /// The reason text, without the detail.
    pub text: &'static str,
}

impl Code {
    /// The reason string of a refusal under this code: the text, then `: detail`.
    pub fn reason_string(&self, refusal: &Refusal) -> String {
        match &refusal.detail {
            Some(detail) => format!("{}: {detail}", self.text),
            None => self.text.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_refusals_follow_the_mqtt_answers() {
        assert_eq!(Refusal::new(Cause::InvalidClientId).v3_connack(), Some(2));
        assert_eq!(
            Refusal::new(Cause::InvalidClientId).v5_connack(),
            Some(0x85)
        );
        assert_eq!(Refusal::bad_credentials("x").v3_connack(), Some(4));
        assert_eq!(Refusal::bad_credentials("x").v5_connack(), Some(0x86));
        assert_eq!(Refusal::new(Cause::NotAuthorized).v3_connack(), Some(5));
        assert_eq!(Refusal::new(Cause::NotAuthorized).v5_connack(), Some(0x87));
        assert_eq!(Refusal::new(Cause::KeepAliveTimeout).v5_connack(), None);
    }

    #[test]
    fn disconnects_follow_the_mqtt_answers() {
        assert_eq!(
            Refusal::new(Cause::InvalidTopic).v5_disconnect(),
            Some(0x90)
        );
        assert_eq!(
            Refusal::new(Cause::InvalidTopic).v5(0x8F).v5_disconnect(),
            Some(0x8F)
        );
        assert_eq!(Refusal::protocol_error("x").v5_disconnect(), Some(0x82));
        assert_eq!(Refusal::new(Cause::ClientClosed).v5_disconnect(), None);
        assert_eq!(Refusal::new(Cause::TakenOver).v5_disconnect(), Some(0x8E));
    }

    #[test]
    fn only_fixed_details_name_a_rule() {
        assert_eq!(
            Refusal::with_detail(Cause::NotAuthorized, "unknown org").rule(),
            "unknown org"
        );
        assert_eq!(
            Refusal::with_detail(Cause::NotAuthorized, format!("topic {}", "x")).rule(),
            "other"
        );
    }
}
