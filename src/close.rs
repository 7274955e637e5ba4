//! Why a connection ended, and what the client is told.
//!
//! Every WIoTP closing code the proxy can produce lives in [`TABLE`], and nowhere else. One row
//! drives the client's answer (an MQTT 3 CONNACK return code or a plain close; an MQTT 5 CONNACK
//! or DISCONNECT reason code with the reason string), the log line and the `CloseCode`/`Reason`
//! fields of the monitoring message.

use std::borrow::Cow;
use std::fmt;

/// A WIoTP closing code (the `CloseCode` field of a monitoring message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 0: the client sent DISCONNECT.
    Normal,
    /// 91: the client closed the socket without DISCONNECT.
    ClosedByClient,
    /// 92: the broker closed the upstream session, or a proxy fault.
    ClosedByServer,
    /// 93: the proxy is shutting down.
    ServerShutdown,
    /// 94: an administrator (a policy edit) closed the connection.
    ClosedByAdministrator,
    /// 104: the process connection cap was reached.
    ServerCapacity,
    /// 105: invalid MQTT data.
    InvalidData,
    /// 154: too many subscriptions on one connection.
    TooManySubscriptions,
    /// 160: keep-alive timeout.
    KeepAliveTimeout,
    /// 163: the TLS handshake failed.
    TlsHandshake,
    /// 164: no data within the deadline.
    NoData,
    /// 165: the initial packet was too large.
    InitialPacketTooLarge,
    /// 166: invalid client ID.
    InvalidClientId,
    /// 167: the broker is unreachable.
    ServerUnavailable,
    /// 169: a required client certificate is missing.
    CertificateMissing,
    /// 170: the client certificate is not valid.
    CertificateInvalid,
    /// 173: the org's connection quota is full.
    OrgConnectionQuota,
    /// 176: the authentication queue is full.
    AuthenticationBusy,
    /// 180: not authorized.
    NotAuthorized,
    /// 271: a length field disagrees with the packet.
    InvalidLength,
    /// 276: invalid topic name or filter.
    InvalidTopic,
    /// 287: message too large.
    MessageTooLarge,
    /// 288: a newer connection used the same client ID.
    ClientIdReused,
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

/// One row of the closing-code table.
#[derive(Debug)]
pub struct CloseRow {
    /// The WIoTP code.
    pub code: CloseCode,
    /// Its number.
    pub number: u16,
    /// The reason string of the source document.
    pub reason: &'static str,
    /// The MQTT 3 answer.
    pub v3: V3Answer,
    /// The MQTT 5 CONNACK reason code, when the close happens before CONNACK.
    pub v5_connack: Option<u8>,
    /// The MQTT 5 DISCONNECT reason code, when the close happens after CONNACK.
    pub v5_disconnect: Option<u8>,
}

use CloseCode as C;
use V3Answer::{Close, Connack, Nothing};

/// The one table of closing codes (PRODUCT.md §5).
#[rustfmt::skip]
pub const TABLE: &[CloseRow] = &[
    row(C::Normal, 0, "The connection has completed normally", Nothing, None, None),
    row(C::ClosedByClient, 91, "The connection was closed by the client", Nothing, None, None),
    row(C::ClosedByServer, 92, "The connection was closed by the server", Close, Some(0x80), Some(0x80)),
    row(C::ServerShutdown, 93, "The connection was closed because the server was shutdown", Close, Some(0x8B), Some(0x8B)),
    row(C::ClosedByAdministrator, 94, "The connection was closed by an administrator", Close, Some(0x98), Some(0x98)),
    row(C::ServerCapacity, 104, "The sever capacity is reached", Connack(3), Some(0x89), Some(0x89)),
    row(C::InvalidData, 105, "The data from the client is not valid", Close, Some(0x81), Some(0x81)),
    row(C::TooManySubscriptions, 154, "Too many producers or consumers in a single connection", Close, Some(0x97), Some(0x97)),
    row(C::KeepAliveTimeout, 160, "The connection timed out", Close, None, Some(0x8D)),
    row(C::TlsHandshake, 163, "Closed during TLS handshake", Close, None, None),
    row(C::NoData, 164, "No data was received on a connection", Close, None, None),
    row(C::InitialPacketTooLarge, 165, "The initial packet is too large", Close, None, None),
    row(C::InvalidClientId, 166, "The ClientID is not valid", Connack(2), Some(0x85), Some(0x85)),
    row(C::ServerUnavailable, 167, "Server not available", Connack(3), Some(0x88), Some(0x88)),
    row(C::CertificateMissing, 169, "Certificate missing", Connack(5), Some(0x87), Some(0x87)),
    row(C::CertificateInvalid, 170, "Certificate not valid", Connack(5), Some(0x87), Some(0x87)),
    row(C::OrgConnectionQuota, 173, "Too many connections for an organizaton", Connack(3), Some(0x97), Some(0x97)),
    row(C::AuthenticationBusy, 176, "Authorization request is in delay or too many authentication requests", Connack(3), Some(0x89), Some(0x89)),
    row(C::NotAuthorized, 180, "The operation is not authorized", Connack(5), Some(0x87), Some(0x87)),
    row(C::InvalidLength, 271, "The length of the message is not correct", Close, Some(0x81), Some(0x81)),
    row(C::InvalidTopic, 276, "The topic is not valid", Close, Some(0x8F), Some(0x90)),
    row(C::MessageTooLarge, 287, "The message size is too large for this endpoint", Close, Some(0x95), Some(0x95)),
    row(C::ClientIdReused, 288, "The clientID was reused", Close, None, Some(0x8E)),
];

#[allow(clippy::too_many_arguments)]
const fn row(
    code: CloseCode,
    number: u16,
    reason: &'static str,
    v3: V3Answer,
    v5_connack: Option<u8>,
    v5_disconnect: Option<u8>,
) -> CloseRow {
    CloseRow {
        code,
        number,
        reason,
        v3,
        v5_connack,
        v5_disconnect,
    }
}

impl CloseCode {
    /// The table row of this code.
    pub fn row(self) -> &'static CloseRow {
        // The table is small and ordered like the enum; a linear scan keeps one source of truth.
        TABLE
            .iter()
            .find(|row| row.code == self)
            .unwrap_or(&TABLE[2]) // unwrap-ok: every variant has a row (tested), 92 is the safe fallback
    }

    /// The WIoTP number.
    pub fn number(self) -> u16 {
        self.row().number
    }
}

/// A closing code with the details of this particular close.
///
/// `detail` is appended to the reason string after a colon, as WIoTP does. It must never hold a
/// secret. `v5_reason` overrides the table's MQTT 5 reason code where MQTT 5 is more precise than
/// WIoTP (for example 0x82 Protocol Error versus 0x81 Malformed Packet, both 105).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    /// The WIoTP code.
    pub code: CloseCode,
    /// More precise MQTT 5 reason code than the table's, if any.
    pub v5_reason: Option<u8>,
    /// Extra words for the reason string.
    pub detail: Option<Cow<'static, str>>,
    /// For 180 at CONNECT: the credentials were wrong (CONNACK 4 / 0x86) rather than not allowed.
    pub bad_credentials: bool,
}

impl CloseReason {
    /// A close with this code and no detail.
    pub const fn new(code: CloseCode) -> Self {
        CloseReason {
            code,
            v5_reason: None,
            detail: None,
            bad_credentials: false,
        }
    }

    /// A close with this code and a detail for the reason string.
    pub fn with_detail(code: CloseCode, detail: impl Into<Cow<'static, str>>) -> Self {
        CloseReason {
            detail: Some(detail.into()),
            ..Self::new(code)
        }
    }

    /// Overrides the MQTT 5 reason code.
    pub fn v5(mut self, reason_code: u8) -> Self {
        self.v5_reason = Some(reason_code);
        self
    }

    /// 180 for wrong credentials: CONNACK 4 (MQTT 3) or 0x86 (MQTT 5).
    pub fn bad_credentials(detail: impl Into<Cow<'static, str>>) -> Self {
        CloseReason {
            bad_credentials: true,
            ..Self::with_detail(CloseCode::NotAuthorized, detail)
        }
    }

    /// 105 Malformed Packet.
    pub fn malformed(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::with_detail(CloseCode::InvalidData, detail).v5(0x81)
    }

    /// 105 Protocol Error.
    pub fn protocol_error(detail: impl Into<Cow<'static, str>>) -> Self {
        Self::with_detail(CloseCode::InvalidData, detail).v5(0x82)
    }

    /// The WIoTP number.
    pub fn number(&self) -> u16 {
        self.code.number()
    }

    /// The reason string: the table's words, then `: detail` when there is one.
    pub fn reason_string(&self) -> String {
        match &self.detail {
            Some(detail) => format!("{}: {}", self.code.row().reason, detail),
            None => self.code.row().reason.to_string(),
        }
    }

    /// What an MQTT 3 client is told before CONNACK was sent.
    pub fn v3_connack(&self) -> Option<u8> {
        match (self.code, self.bad_credentials) {
            (CloseCode::NotAuthorized, true) => Some(4),
            _ => match self.code.row().v3 {
                Connack(rc) => Some(rc),
                _ => None,
            },
        }
    }

    /// The MQTT 5 CONNACK reason code, when the close happens before CONNACK.
    pub fn v5_connack(&self) -> Option<u8> {
        if self.code == CloseCode::NotAuthorized && self.bad_credentials {
            return Some(0x86);
        }
        match self.code.row().v5_connack {
            Some(table) => Some(self.v5_reason.unwrap_or(table)),
            None => self.v5_reason,
        }
    }

    /// The MQTT 5 DISCONNECT reason code, when the close happens after CONNACK.
    pub fn v5_disconnect(&self) -> Option<u8> {
        self.code
            .row()
            .v5_disconnect
            .map(|table| self.v5_reason.unwrap_or(table))
    }
}

impl From<CloseCode> for CloseReason {
    fn from(code: CloseCode) -> Self {
        CloseReason::new(code)
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.number(), self.reason_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[CloseCode] = &[
        C::Normal,
        C::ClosedByClient,
        C::ClosedByServer,
        C::ServerShutdown,
        C::ClosedByAdministrator,
        C::ServerCapacity,
        C::InvalidData,
        C::TooManySubscriptions,
        C::KeepAliveTimeout,
        C::TlsHandshake,
        C::NoData,
        C::InitialPacketTooLarge,
        C::InvalidClientId,
        C::ServerUnavailable,
        C::CertificateMissing,
        C::CertificateInvalid,
        C::OrgConnectionQuota,
        C::AuthenticationBusy,
        C::NotAuthorized,
        C::InvalidLength,
        C::InvalidTopic,
        C::MessageTooLarge,
        C::ClientIdReused,
    ];

    #[test]
    fn every_code_has_exactly_one_row() {
        for code in ALL {
            assert_eq!(
                TABLE.iter().filter(|row| row.code == *code).count(),
                1,
                "{code:?}"
            );
        }
        assert_eq!(TABLE.len(), ALL.len());
    }

    #[test]
    fn connect_refusals_follow_product_table() {
        assert_eq!(CloseReason::new(C::InvalidClientId).v3_connack(), Some(2));
        assert_eq!(
            CloseReason::new(C::InvalidClientId).v5_connack(),
            Some(0x85)
        );
        assert_eq!(CloseReason::bad_credentials("x").v3_connack(), Some(4));
        assert_eq!(CloseReason::bad_credentials("x").v5_connack(), Some(0x86));
        assert_eq!(CloseReason::new(C::NotAuthorized).v3_connack(), Some(5));
        assert_eq!(CloseReason::new(C::NotAuthorized).v5_connack(), Some(0x87));
        assert_eq!(CloseReason::new(C::ServerUnavailable).v3_connack(), Some(3));
        assert_eq!(
            CloseReason::new(C::ServerUnavailable).v5_connack(),
            Some(0x88)
        );
    }

    #[test]
    fn disconnects_follow_product_table() {
        assert_eq!(
            CloseReason::new(C::InvalidTopic).v5_disconnect(),
            Some(0x90)
        );
        assert_eq!(
            CloseReason::new(C::InvalidTopic).v5(0x8F).v5_disconnect(),
            Some(0x8F)
        );
        assert_eq!(
            CloseReason::new(C::MessageTooLarge).v5_disconnect(),
            Some(0x95)
        );
        assert_eq!(
            CloseReason::new(C::ClientIdReused).v5_disconnect(),
            Some(0x8E)
        );
        assert_eq!(CloseReason::protocol_error("x").v5_disconnect(), Some(0x82));
        assert_eq!(CloseReason::new(C::ClosedByClient).v5_disconnect(), None);
    }

    #[test]
    fn reason_string_appends_detail() {
        let reason = CloseReason::with_detail(C::NotAuthorized, "publish to iot-2/x");
        assert_eq!(
            reason.reason_string(),
            "The operation is not authorized: publish to iot-2/x"
        );
        assert_eq!(reason.number(), 180);
    }
}
