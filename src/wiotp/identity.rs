//! Who a client claims to be: the WIoTP client-ID grammar (`a:`, `A:`, `d:`, `g:`).
//!
//! Parsing is pure and allocation-light; it runs once per CONNECT. Whether the claim is true is
//! `admit`'s business, and what the identity may do is `principal`'s.

use thiserror::Error;

use crate::policy::is_valid_id_part;

/// The longest client ID accepted, in bytes.
pub const MAX_CLIENT_ID_BYTES: usize = 256;
/// The username devices and gateways present.
pub const TOKEN_AUTH_USERNAME: &str = "use-token-auth";

/// The class of client, from the first letter of its client ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientClass {
    /// `a:ORG:APP`
    Application,
    /// `A:ORG:APP` or `A:ORG:APP:INSTANCE`
    ScalableApplication,
    /// `d:ORG:TYPE:ID`
    Device,
    /// `g:ORG:TYPE:ID`
    Gateway,
}

impl ClientClass {
    /// Applications of both kinds.
    pub fn is_application(self) -> bool {
        matches!(
            self,
            ClientClass::Application | ClientClass::ScalableApplication
        )
    }

    /// The lowercase name used in logs, metrics and limits.
    pub fn name(self) -> &'static str {
        match self {
            ClientClass::Application | ClientClass::ScalableApplication => "application",
            ClientClass::Device => "device",
            ClientClass::Gateway => "gateway",
        }
    }
}

/// A parsed client ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The class.
    pub class: ClientClass,
    /// The org ID.
    pub org: String,
    /// For applications, the app ID; for devices and gateways, the device type.
    pub first: String,
    /// For devices and gateways, the device ID; for `A:ORG:APP:INSTANCE`, the instance.
    pub second: Option<String>,
    /// The client ID exactly as presented.
    pub client_id: String,
}

impl Identity {
    /// The app ID of an application.
    pub fn app_id(&self) -> Option<&str> {
        self.class.is_application().then_some(self.first.as_str())
    }

    /// The device type of a device or gateway.
    pub fn device_type(&self) -> Option<&str> {
        (!self.class.is_application()).then_some(self.first.as_str())
    }

    /// The device ID of a device or gateway.
    pub fn device_id(&self) -> Option<&str> {
        if self.class.is_application() {
            None
        } else {
            self.second.as_deref()
        }
    }

    /// The instance of an `A:ORG:APP:INSTANCE` application.
    pub fn instance(&self) -> Option<&str> {
        if self.class == ClientClass::ScalableApplication {
            self.second.as_deref()
        } else {
            None
        }
    }

    /// Whether a client certificate with this subject common name belongs to this client: the
    /// common name is the client ID itself, or the device ID of a device or gateway, or the API
    /// key (`api_key`, the CONNECT user name) of an application.
    pub fn matches_certificate(&self, common_name: Option<&str>, api_key: Option<&str>) -> bool {
        let Some(name) = common_name.filter(|name| !name.is_empty()) else {
            return false;
        };
        name == self.client_id
            || match self.class {
                ClientClass::Device | ClientClass::Gateway => self.device_id() == Some(name),
                ClientClass::Application | ClientClass::ScalableApplication => {
                    api_key == Some(name)
                }
            }
    }

    /// The topic (without org prefix) of this client's monitoring messages.
    pub fn mon_topic(&self) -> String {
        match self.class {
            ClientClass::Application | ClientClass::ScalableApplication => {
                format!("iot-2/app/{}/mon", self.first)
            }
            ClientClass::Device | ClientClass::Gateway => {
                format!(
                    "iot-2/type/{}/id/{}/mon",
                    self.first,
                    self.second.as_deref().unwrap_or("")
                )
            }
        }
    }
}

/// Why a client ID is not acceptable (closing code 166).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    /// Empty client ID.
    #[error("empty client ID")]
    Empty,
    /// Longer than [`MAX_CLIENT_ID_BYTES`].
    #[error("client ID longer than {MAX_CLIENT_ID_BYTES} bytes")]
    TooLong,
    /// Not `a:`, `A:`, `d:` or `g:`.
    #[error("client ID must start with a:, A:, d: or g:")]
    UnknownClass,
    /// Wrong number of `:`-separated parts for the class.
    #[error("client ID has the wrong number of parts")]
    WrongParts,
    /// A part is empty, too long or has a character outside `[A-Za-z0-9._-]`.
    #[error("client ID part {0} is not 1 to 36 characters of [A-Za-z0-9._-]")]
    BadPart(&'static str),
}

/// Parses a client ID: `a:ORG:APP`, `A:ORG:APP[:INSTANCE]`, `d:ORG:TYPE:ID`, `g:ORG:TYPE:ID`.
pub fn parse_client_id(client_id: &str) -> Result<Identity, IdentityError> {
    if client_id.is_empty() {
        return Err(IdentityError::Empty);
    }
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(IdentityError::TooLong);
    }
    let mut parts = client_id.split(':');
    let class = match parts.next() {
        Some("a") => ClientClass::Application,
        Some("A") => ClientClass::ScalableApplication,
        Some("d") => ClientClass::Device,
        Some("g") => ClientClass::Gateway,
        _ => return Err(IdentityError::UnknownClass),
    };
    let org = parts.next().ok_or(IdentityError::WrongParts)?;
    let first = parts.next().ok_or(IdentityError::WrongParts)?;
    let second = parts.next();
    if parts.next().is_some() {
        return Err(IdentityError::WrongParts);
    }
    match (class, second) {
        (ClientClass::Application, Some(_)) => return Err(IdentityError::WrongParts),
        (ClientClass::Device | ClientClass::Gateway, None) => {
            return Err(IdentityError::WrongParts)
        }
        _ => {}
    }
    check_part(org, "org")?;
    check_part(
        first,
        if class.is_application() {
            "app"
        } else {
            "type"
        },
    )?;
    if let Some(second) = second {
        check_part(
            second,
            if class.is_application() {
                "instance"
            } else {
                "id"
            },
        )?;
    }
    Ok(Identity {
        class,
        org: org.to_string(),
        first: first.to_string(),
        second: second.map(str::to_string),
        client_id: client_id.to_string(),
    })
}

fn check_part(part: &str, name: &'static str) -> Result<(), IdentityError> {
    if is_valid_id_part(part) {
        Ok(())
    } else {
        Err(IdentityError::BadPart(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_names_match_the_client() {
        let device = parse_client_id("d:org1:sensor:dev1").unwrap();
        assert!(device.matches_certificate(Some("dev1"), None));
        assert!(device.matches_certificate(Some("d:org1:sensor:dev1"), None));
        assert!(!device.matches_certificate(Some("dev2"), None));
        assert!(!device.matches_certificate(Some("sensor"), None));
        assert!(!device.matches_certificate(None, None));
        let gateway = parse_client_id("g:org1:edge:gw1").unwrap();
        assert!(gateway.matches_certificate(Some("gw1"), Some("use-token-auth")));
        let app = parse_client_id("a:org1:app1").unwrap();
        assert!(app.matches_certificate(Some("a-org1-key1"), Some("a-org1-key1")));
        assert!(app.matches_certificate(Some("a:org1:app1"), None));
        assert!(!app.matches_certificate(Some("app1"), Some("a-org1-key1")));
        assert!(!app.matches_certificate(Some(""), Some("")));
    }

    #[test]
    fn parses_each_class() {
        let app = parse_client_id("a:myorg1:app-1").unwrap();
        assert_eq!(
            (app.class, app.org.as_str(), app.app_id()),
            (ClientClass::Application, "myorg1", Some("app-1"))
        );
        let scalable = parse_client_id("A:myorg1:app:inst.2").unwrap();
        assert_eq!(scalable.instance(), Some("inst.2"));
        assert_eq!(parse_client_id("A:myorg1:app").unwrap().instance(), None);
        let device = parse_client_id("d:myorg1:sensor:dev_001").unwrap();
        assert_eq!(
            (device.device_type(), device.device_id()),
            (Some("sensor"), Some("dev_001"))
        );
        assert_eq!(device.mon_topic(), "iot-2/type/sensor/id/dev_001/mon");
        assert_eq!(
            parse_client_id("g:o:gw:1").unwrap().class,
            ClientClass::Gateway
        );
        assert_eq!(app.mon_topic(), "iot-2/app/app-1/mon");
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "x:org:app",
            "a:org",
            "a:org:app:extra",
            "d:org:type",
            "d:org:type:id:more",
            "a::app",
            "a:org:ap p",
            "a:org:app/x",
            "a:org:+",
            "d:org:type:#",
            "a:org:\u{0}",
            "A:org:app:",
            "a:org:1234567890123456789012345678901234567",
        ] {
            assert!(parse_client_id(bad).is_err(), "{bad:?} should be refused");
        }
        assert_eq!(
            parse_client_id(&"a".repeat(300)),
            Err(IdentityError::TooLong)
        );
    }
}
