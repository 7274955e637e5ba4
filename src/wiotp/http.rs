//! WIoTP's HTTP messaging API (`/api/v0002/...`) in MQTT terms: which client ID, user name and
//! `iot-2` topic each request stands for. Everything after that (authentication, the ACL, limits)
//! is the same hooks an MQTT client meets; this module only reads paths and headers.
//!
//! | request (`POST /api/v0002/` + ...) | Basic user name | client ID | topic |
//! |---|---|---|---|
//! | `device/types/T/devices/I/events/E` | `use-token-auth` (none on quickstart) | `d:ORG:T:I` | `iot-2/evt/E/fmt/F` |
//! | `device/types/T/devices/I/events/E` | `g/ORG/GT/GI` (a gateway) | `g:ORG:GT:GI` | `iot-2/type/T/id/I/evt/E/fmt/F` |
//! | `device/types/T/devices/I/commands/C/request` | `use-token-auth` | `d:ORG:T:I` | filter `iot-2/cmd/C/fmt/+` |
//! | `device/types/T/devices/I/commands/C/request` | `g/ORG/GT/GI` | `g:ORG:GT:GI` | filter `iot-2/type/T/id/I/cmd/C/fmt/+` |
//! | `application/types/T/devices/I/events/E` | the API key `a-ORG-...` | `a:ORG:KEY` | `iot-2/type/T/id/I/evt/E/fmt/F` |
//! | `application/types/T/devices/I/commands/C` | the API key | `a:ORG:KEY` | `iot-2/type/T/id/I/cmd/C/fmt/F` |
//!
//! **The org** comes from the `Host` header (`ORG.messaging.DOMAIN`, as WIoTP's host names
//! were). Where the host cannot carry it (an IP address, `localhost`), the path may start with
//! `org/ORG/` (`/api/v0002/org/ORG/device/...`), and applications and gateways name their org in
//! their credentials (`a-ORG-...`, `g/ORG/...`). Every source present must agree (400
//! otherwise); none at all is 400.
//!
//! **The format** (`fmt`) comes from `Content-Type` (parameters such as `charset` ignored):
//! `application/json` is `json`, `text/plain` is `text`, `application/xml` (and `text/xml`) is
//! `xml`, `application/octet-stream` is `bin`, and no `Content-Type` at all is `bin` (HTTP's own
//! default). Anything else is 415.

use super::identity::TOKEN_AUTH_USERNAME;
use crate::policy::is_valid_id_part;
use crate::profile::{HttpAction, HttpRequest, HttpRoute, HttpRouteError};
use crate::refusal::{Cause, Refusal};

/// The path prefix of the API.
pub const API_PREFIX: &str = "/api/v0002/";
/// The second label of a messaging host name (`ORG.messaging.DOMAIN`).
const MESSAGING_LABEL: &str = "messaging";
/// The command ID that fetches any command.
const ANY_COMMAND: &str = "+";

/// The `fmt` of a content type, or `None` when it maps to none.
pub fn format_of(content_type: Option<&str>) -> Option<&'static str> {
    let Some(content_type) = content_type else {
        return Some("bin");
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Some("json"),
        "text/plain" => Some("text"),
        "application/xml" | "text/xml" => Some("xml"),
        "application/octet-stream" => Some("bin"),
        _ => None,
    }
}

/// The org a `Host` header names (`ORG.messaging.DOMAIN[:port]`).
pub fn org_from_host(host: &str) -> Option<&str> {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let mut labels = name.split('.');
    let org = labels.next()?;
    (labels.next()? == MESSAGING_LABEL && labels.next().is_some() && is_valid_id_part(org))
        .then_some(org)
}

/// Who the credentials say the caller is.
enum Caller<'a> {
    /// `use-token-auth`, or no credentials (quickstart).
    Device,
    /// `g/ORG/TYPE/ID`.
    Gateway {
        org: &'a str,
        device_type: &'a str,
        device_id: &'a str,
    },
    /// An API key `a-ORG-...`.
    Application { key: &'a str, org: &'a str },
}

fn caller<'a>(username: Option<&'a str>) -> Result<Caller<'a>, HttpRouteError> {
    let Some(username) = username else {
        return Ok(Caller::Device);
    };
    if username == TOKEN_AUTH_USERNAME {
        return Ok(Caller::Device);
    }
    if let Some(rest) = username.strip_prefix("g/") {
        let mut parts = rest.split('/');
        return match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(org), Some(device_type), Some(device_id), None)
                if [org, device_type, device_id]
                    .iter()
                    .all(|p| is_valid_id_part(p)) =>
            {
                Ok(Caller::Gateway {
                    org,
                    device_type,
                    device_id,
                })
            }
            _ => Err(bad_credentials("a gateway's user name is g/ORG/TYPE/ID")),
        };
    }
    let org = username
        .strip_prefix("a-")
        .and_then(|rest| rest.split_once('-'))
        .map(|(org, _)| org)
        .filter(|org| is_valid_id_part(org));
    match org {
        Some(org) if is_valid_id_part(username) => Ok(Caller::Application { key: username, org }),
        _ => Err(bad_credentials(
            "the user name is use-token-auth, g/ORG/TYPE/ID or an API key",
        )),
    }
}

fn bad_credentials(detail: &'static str) -> HttpRouteError {
    HttpRouteError::Refused(Refusal::bad_credentials(detail))
}

fn forbidden(detail: &'static str) -> HttpRouteError {
    HttpRouteError::Refused(Refusal::with_detail(Cause::NotAuthorized, detail))
}

/// The route of a request (see the module documentation).
pub fn route(request: &HttpRequest<'_>) -> Result<HttpRoute, HttpRouteError> {
    let rest = request
        .path
        .strip_prefix(API_PREFIX)
        .ok_or(HttpRouteError::NotFound)?;
    let levels: Vec<&str> = rest.split('/').collect();
    let (path_org, levels) = match levels.as_slice() {
        ["org", org, rest @ ..] => (Some(*org), rest),
        all => (None, all),
    };
    if path_org.is_some_and(|org| !is_valid_id_part(org)) {
        return Err(HttpRouteError::BadRequest("invalid org in the path"));
    }
    let caller = caller(request.username)?;
    let credential_org = match caller {
        Caller::Device => None,
        Caller::Gateway { org, .. } | Caller::Application { org, .. } => Some(org),
    };
    let mut orgs = [
        path_org,
        request.host.and_then(org_from_host),
        credential_org,
    ]
    .into_iter()
    .flatten();
    let org = orgs.next().ok_or(HttpRouteError::BadRequest(
        "no org: use the host ORG.messaging.DOMAIN or the path /api/v0002/org/ORG/...",
    ))?;
    if orgs.any(|other| other != org) {
        return Err(HttpRouteError::BadRequest(
            "the host, path and credentials name different orgs",
        ));
    }

    let (kind, device_type, device_id, what, id, tail) = match levels {
        [kind @ ("device" | "application"), "types", device_type, "devices", device_id, what @ ("events" | "commands"), id, tail @ ..] => {
            (*kind, *device_type, *device_id, *what, *id, tail)
        }
        _ => return Err(HttpRouteError::NotFound),
    };
    let fetch = match (kind, what, tail) {
        ("device", "events", []) | ("application", _, []) => false,
        ("device", "commands", ["request"]) => true,
        _ => return Err(HttpRouteError::NotFound),
    };
    let id_ok = is_valid_id_part(id) || (fetch && id == ANY_COMMAND);
    if !(is_valid_id_part(device_type) && is_valid_id_part(device_id) && id_ok) {
        return Err(HttpRouteError::BadRequest(
            "type, device, event and command IDs are letters, digits, '.', '_' and '-'",
        ));
    }
    let format = if fetch {
        ""
    } else {
        format_of(request.content_type).ok_or(HttpRouteError::UnsupportedMediaType)?
    };

    let long_form = |what: &str, format: &str| {
        format!("iot-2/type/{device_type}/id/{device_id}/{what}/{id}/fmt/{format}")
    };
    let (client_id, username, action) = match (kind, caller) {
        ("device", Caller::Device) => {
            let action = if fetch {
                HttpAction::FetchCommand {
                    filter: format!("iot-2/cmd/{id}/fmt/+"),
                }
            } else {
                HttpAction::Publish {
                    topic: format!("iot-2/evt/{id}/fmt/{format}"),
                }
            };
            (
                format!("d:{org}:{device_type}:{device_id}"),
                request.username.map(str::to_owned),
                action,
            )
        }
        (
            "device",
            Caller::Gateway {
                device_type: gateway_type,
                device_id: gateway_id,
                ..
            },
        ) => {
            let action = if fetch {
                HttpAction::FetchCommand {
                    filter: long_form("cmd", "+"),
                }
            } else {
                HttpAction::Publish {
                    topic: long_form("evt", format),
                }
            };
            (
                format!("g:{org}:{gateway_type}:{gateway_id}"),
                Some(TOKEN_AUTH_USERNAME.to_owned()),
                action,
            )
        }
        ("device", Caller::Application { .. }) => {
            return Err(forbidden(
                "applications use /api/v0002/application/..., not /device/...",
            ))
        }
        ("application", Caller::Application { key, .. }) => {
            let what = if what == "events" { "evt" } else { "cmd" };
            (
                format!("a:{org}:{key}"),
                Some(key.to_owned()),
                HttpAction::Publish {
                    topic: long_form(what, format),
                },
            )
        }
        _ => {
            return Err(bad_credentials(
                "/api/v0002/application/... needs an API key",
            ))
        }
    };
    Ok(HttpRoute {
        client_id,
        username,
        action,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(path: &'a str, host: &'a str, username: Option<&'a str>) -> HttpRequest<'a> {
        HttpRequest {
            path,
            host: Some(host),
            username,
            content_type: Some("application/json; charset=utf-8"),
        }
    }

    fn publish(route: Result<HttpRoute, HttpRouteError>) -> (String, String) {
        match route {
            Ok(HttpRoute {
                client_id,
                action: HttpAction::Publish { topic },
                ..
            }) => (client_id, topic),
            other => panic!("not a publish: {other:?}"),
        }
    }

    #[test]
    fn a_device_event_is_its_own_short_form_publish() {
        let route = route(&request(
            "/api/v0002/device/types/sensor/devices/dev1/events/temp",
            "org1.messaging.example.com:1883",
            Some("use-token-auth"),
        ));
        assert_eq!(
            publish(route),
            (
                "d:org1:sensor:dev1".into(),
                "iot-2/evt/temp/fmt/json".into()
            )
        );
    }

    #[test]
    fn applications_and_gateways_name_the_device_in_the_topic() {
        let app = route(&request(
            "/api/v0002/application/types/sensor/devices/dev1/commands/reboot",
            "127.0.0.1:1883",
            Some("a-org1-key0000001"),
        ));
        assert_eq!(
            publish(app),
            (
                "a:org1:a-org1-key0000001".into(),
                "iot-2/type/sensor/id/dev1/cmd/reboot/fmt/json".into()
            )
        );
        let gateway = route(&request(
            "/api/v0002/device/types/sensor/devices/dev1/events/temp",
            "localhost",
            Some("g/org1/edge-gw/gw1"),
        ));
        assert_eq!(
            publish(gateway),
            (
                "g:org1:edge-gw:gw1".into(),
                "iot-2/type/sensor/id/dev1/evt/temp/fmt/json".into()
            )
        );
    }

    #[test]
    fn the_org_comes_from_host_path_or_credentials_and_they_must_agree() {
        let path = route(&request(
            "/api/v0002/org/org1/device/types/sensor/devices/dev1/events/temp",
            "127.0.0.1",
            Some("use-token-auth"),
        ));
        assert_eq!(publish(path).0, "d:org1:sensor:dev1");
        let none = route(&request(
            "/api/v0002/device/types/sensor/devices/dev1/events/temp",
            "127.0.0.1",
            Some("use-token-auth"),
        ));
        assert!(matches!(none, Err(HttpRouteError::BadRequest(_))));
        let disagree = route(&request(
            "/api/v0002/application/types/sensor/devices/dev1/events/temp",
            "org2.messaging.example.com",
            Some("a-org1-key0000001"),
        ));
        assert!(matches!(disagree, Err(HttpRouteError::BadRequest(_))));
    }

    #[test]
    fn content_types_map_to_formats() {
        assert_eq!(format_of(Some("Application/JSON")), Some("json"));
        assert_eq!(format_of(Some("text/plain;charset=utf-8")), Some("text"));
        assert_eq!(format_of(Some("application/xml")), Some("xml"));
        assert_eq!(format_of(Some("application/octet-stream")), Some("bin"));
        assert_eq!(format_of(None), Some("bin"));
        assert_eq!(format_of(Some("application/x-www-form-urlencoded")), None);
    }

    #[test]
    fn hosts_name_an_org_only_in_the_messaging_form() {
        assert_eq!(org_from_host("org1.messaging.example.com"), Some("org1"));
        assert_eq!(
            org_from_host("org1.messaging.example.com:443"),
            Some("org1")
        );
        assert_eq!(org_from_host("127.0.0.1:1883"), None);
        assert_eq!(org_from_host("localhost"), None);
        assert_eq!(org_from_host("org1.messaging"), None);
        assert_eq!(org_from_host("[::1]:80"), None);
    }

    #[test]
    fn paths_outside_the_api_and_bad_ids_are_refused() {
        let host = "org1.messaging.example.com";
        for (path, not_found) in [
            ("/", true),
            ("/api/v0002/device/types/sensor/devices/dev1/events", true),
            (
                "/api/v0002/device/types/sensor/devices/dev1/events/a/b",
                true,
            ),
            (
                "/api/v0002/device/types/sensor/devices/d%2B/events/e",
                false,
            ),
            (
                "/api/v0002/device/types/sensor/devices/dev1/events/+",
                false,
            ),
            ("/api/v0002/device/types/sensor/devices/dev1/events/", false),
        ] {
            let result = route(&request(path, host, Some("use-token-auth")));
            match result {
                Err(HttpRouteError::NotFound) => assert!(not_found, "{path}"),
                Err(HttpRouteError::BadRequest(_)) => assert!(!not_found, "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_device_fetches_its_own_commands() {
        let fetch = route(&request(
            "/api/v0002/device/types/sensor/devices/dev1/commands/+/request",
            "org1.messaging.example.com",
            Some("use-token-auth"),
        ))
        .expect("route");
        assert_eq!(
            fetch.action,
            HttpAction::FetchCommand {
                filter: "iot-2/cmd/+/fmt/+".into()
            }
        );
    }
}
