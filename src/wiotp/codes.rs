//! The WIoTP closing codes: the one table that turns a [`Cause`] into the number and reason
//! string of the source document. Logs, metrics, monitoring messages and MQTT 5 reason strings
//! all read it; what the client is told in MQTT terms comes from the cause itself
//! ([`Cause::answers`]).

use crate::refusal::{Cause, Code};

/// The closing-code table, one row per cause: (cause, number, reason string).
#[rustfmt::skip]
pub const TABLE: [(Cause, u16, &str); 24] = [
    (Cause::Normal, 0, "The connection has completed normally"),
    (Cause::ClientClosed, 91, "The connection was closed by the client"),
    (Cause::ServerClosed, 92, "The connection was closed by the server"),
    (Cause::Shutdown, 93, "The connection was closed because the server was shutdown"),
    (Cause::Revoked, 94, "The connection was closed by an administrator"),
    (Cause::ServerCapacity, 104, "The sever capacity is reached"),
    (Cause::InvalidData, 105, "The data from the client is not valid"),
    (Cause::TooManySubscriptions, 154, "Too many producers or consumers in a single connection"),
    (Cause::KeepAliveTimeout, 160, "The connection timed out"),
    (Cause::TlsHandshake, 163, "Closed during TLS handshake"),
    (Cause::NoData, 164, "No data was received on a connection"),
    (Cause::InitialPacketTooLarge, 165, "The initial packet is too large"),
    (Cause::InvalidClientId, 166, "The ClientID is not valid"),
    (Cause::ServerUnavailable, 167, "Server not available"),
    (Cause::CertificateMissing, 169, "Certificate missing"),
    (Cause::CertificateInvalid, 170, "Certificate not valid"),
    (Cause::TenantQuota, 173, "Too many connections for an organizaton"),
    (Cause::AuthorizationChanged, 175, "The HTTP Authorization header cannot be changed in a connection"),
    (Cause::AuthenticationBusy, 176, "Authorization request is in delay or too many authentication requests"),
    (Cause::NotAuthorized, 180, "The operation is not authorized"),
    (Cause::InvalidLength, 271, "The length of the message is not correct"),
    (Cause::InvalidTopic, 276, "The topic is not valid"),
    (Cause::MessageTooLarge, 287, "The message size is too large for this endpoint"),
    (Cause::TakenOver, 288, "The clientID was reused"),
];

/// The WIoTP closing code of a cause.
pub fn code(cause: Cause) -> Code {
    // Small and fixed: a scan keeps one source of truth.
    let (_, number, text) = TABLE
        .iter()
        .find(|(row, _, _)| *row == cause)
        .copied()
        .unwrap_or(TABLE[2]); // every cause has a row (tested); 92 is the safe fallback
    Code { number, text }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::refusal::Refusal;

    #[test]
    fn every_cause_has_exactly_one_row() {
        for cause in Cause::ALL {
            assert_eq!(
                TABLE.iter().filter(|(row, _, _)| *row == cause).count(),
                1,
                "{cause:?}"
            );
        }
        assert_eq!(TABLE.len(), Cause::ALL.len());
    }

    #[test]
    fn connect_refusals_follow_product_table() {
        assert_eq!(code(Cause::InvalidClientId).number, 166);
        assert_eq!(code(Cause::ServerUnavailable).number, 167);
        assert_eq!(Refusal::new(Cause::ServerUnavailable).v3_connack(), Some(3));
        assert_eq!(
            Refusal::new(Cause::ServerUnavailable).v5_connack(),
            Some(0x88)
        );
        assert_eq!(code(Cause::TakenOver).number, 288);
    }

    #[test]
    fn reason_string_appends_detail() {
        let refusal = Refusal::with_detail(Cause::NotAuthorized, "publish to iot-2/x");
        let code = code(refusal.cause);
        assert_eq!(
            code.reason_string(&refusal),
            "The operation is not authorized: publish to iot-2/x"
        );
        assert_eq!(code.number, 180);
    }
}
