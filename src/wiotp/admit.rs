//! Admitting a WIoTP client at CONNECT: the org's state and security mode, the client
//! certificate, the credentials of each class (API key and token, `use-token-auth` and the device
//! token, quickstart without any), the device type's class, and what else the CONNECT asks for
//! (the will, clean session for `A:ORG:APP`).

use std::sync::Arc;

use super::identity::{ClientClass, Identity, TOKEN_AUTH_USERNAME};
use super::principal::Principal;
use crate::auth::{AuthError, Verifier};
use crate::codec::Connect;
use crate::policy::{ApiRole, DeviceClass, GatewayRole, Org, SecurityMode};
use crate::refusal::{Cause, Refusal};
use crate::transport::{ConnectionInfo, PeerCertificate};

/// Checks the identity against the policy and verifies its token.
pub async fn authenticate(
    verifier: &Verifier,
    identity: &Identity,
    org: &Arc<Org>,
    connect: &Connect<'_>,
    info: &ConnectionInfo,
) -> Result<Principal, Refusal> {
    let not_authorized = |what: &'static str| Refusal::with_detail(Cause::NotAuthorized, what);
    if !org.enabled {
        return Err(not_authorized("the org is disabled"));
    }
    let mut principal = Principal {
        identity: identity.clone(),
        org: org.clone(),
        api_role: ApiRole::Standard,
        groups: Vec::new(),
        gateway_role: GatewayRole::Privileged,
        scope: None,
        api_key: None,
        token: None,
    };
    if org.quickstart {
        if identity.class == ClientClass::ScalableApplication {
            return Err(not_authorized("quickstart has no scalable applications"));
        }
        if info.secure {
            return Err(not_authorized("quickstart does not accept TLS"));
        }
        return Ok(principal);
    }
    if org.security != SecurityMode::TlsOptional && !info.secure {
        return Err(not_authorized("the org requires TLS"));
    }
    let by_certificate = check_certificate(org.security, identity, connect.username, info)?;
    let token_needed = match org.security {
        SecurityMode::TlsCert => false,
        SecurityMode::TlsCertOrToken => !by_certificate,
        SecurityMode::TlsOptional | SecurityMode::TlsToken | SecurityMode::TlsTokenAndCert => true,
    };
    let password = if token_needed {
        Some(
            connect
                .password
                .ok_or_else(|| Refusal::bad_credentials("no token"))?,
        )
    } else {
        None
    };
    let (cache_key, token) = match identity.class {
        ClientClass::Application | ClientClass::ScalableApplication => {
            let key_name = connect
                .username
                .ok_or_else(|| Refusal::bad_credentials("no API key"))?;
            let key_org = key_name
                .strip_prefix("a-")
                .and_then(|rest| rest.split_once('-'))
                .map(|(org, _)| org);
            if key_org != Some(identity.org.as_str()) {
                return Err(not_authorized(
                    "the API key does not belong to the client ID's org",
                ));
            }
            let key = org
                .api_keys
                .get(key_name)
                .ok_or_else(|| not_authorized("unknown API key"))?;
            if !key.enabled {
                return Err(not_authorized("the API key is disabled"));
            }
            principal.api_role = key.role;
            principal.groups = key.groups.clone();
            (key_name.to_string(), &key.token)
        }
        ClientClass::Device | ClientClass::Gateway => {
            // Certificate-only devices may leave the user name out.
            if connect.username != Some(TOKEN_AUTH_USERNAME)
                && (token_needed || connect.username.is_some())
            {
                return Err(Refusal::bad_credentials(
                    "devices and gateways use use-token-auth",
                ));
            }
            let device_type = identity.device_type().unwrap_or_default();
            let device_id = identity.device_id().unwrap_or_default();
            let wanted = if identity.class == ClientClass::Gateway {
                DeviceClass::Gateway
            } else {
                DeviceClass::Device
            };
            match org.device_types.get(device_type) {
                Some(declared) if declared.class == wanted => {}
                Some(_) => return Err(not_authorized("the device type is of another class")),
                None => return Err(not_authorized("unknown device type")),
            }
            let device = org
                .device(device_type, device_id)
                .ok_or_else(|| not_authorized("unknown device"))?;
            if !device.enabled {
                return Err(not_authorized("the device is disabled"));
            }
            if identity.class == ClientClass::Gateway {
                principal.gateway_role = device.role;
                principal.groups = device.groups.clone();
            }
            (format!("{device_type}/{device_id}"), &device.token)
        }
    };
    if let Some(password) = password {
        match verifier.verify(&cache_key, token, password).await {
            Ok(true) => {}
            Ok(false) => return Err(Refusal::bad_credentials("the token does not match")),
            Err(AuthError::Busy) => return Err(Refusal::new(Cause::AuthenticationBusy)),
            Err(AuthError::Hashing) => return Err(not_authorized("token verification failed")),
        }
    }
    if identity.class.is_application() {
        principal.api_key = Some(cache_key);
    }
    principal.token = Some(token.clone());
    principal.refresh_scope();
    Ok(principal)
}

/// Judges the client certificate for the org's security mode: `Ok(true)` when a certificate
/// authenticates the client, `Ok(false)` when the mode does not use one or it may be left out,
/// 169 when a required one is missing and 170 when one is invalid or names someone else.
/// Modes without certificates (`tls-optional`, `tls-token`) ignore any that was presented.
fn check_certificate(
    mode: SecurityMode,
    identity: &Identity,
    username: Option<&str>,
    info: &ConnectionInfo,
) -> Result<bool, Refusal> {
    let required = match mode {
        SecurityMode::TlsOptional | SecurityMode::TlsToken => return Ok(false),
        SecurityMode::TlsCert | SecurityMode::TlsTokenAndCert => true,
        SecurityMode::TlsCertOrToken => false,
    };
    match &info.certificate {
        PeerCertificate::Absent if required => Err(Refusal::with_detail(
            Cause::CertificateMissing,
            "the org requires a client certificate",
        )),
        PeerCertificate::Absent => Ok(false),
        PeerCertificate::Invalid { reason } => Err(Refusal::with_detail(
            Cause::CertificateInvalid,
            format!("the client certificate did not verify: {reason}"),
        )),
        PeerCertificate::Verified { common_name } => {
            if identity.matches_certificate(common_name.as_deref(), username) {
                Ok(true)
            } else {
                Err(Refusal::with_detail(
                    Cause::CertificateInvalid,
                    "the client certificate's common name does not match the client ID",
                ))
            }
        }
    }
}

/// Checks what the CONNECT asks for besides identity: clean session for `A:ORG:APP`, and the
/// will, which must be a publish the identity may make, with a payload within the org's limit.
pub fn check_connect_options(connect: &Connect<'_>, principal: &Principal) -> Result<(), Refusal> {
    let identity = &principal.identity;
    if identity.class == ClientClass::ScalableApplication
        && identity.instance().is_none()
        && connect.clean_start
    {
        return Err(Refusal::with_detail(
            Cause::NotAuthorized,
            "A:ORG:APP needs clean session false",
        ));
    }
    if let Some(will) = &connect.will {
        principal.check_publish(will.topic).map_err(|refusal| {
            let detail = refusal.detail.as_deref().unwrap_or("not authorized");
            Refusal::with_detail(Cause::NotAuthorized, format!("will topic: {detail}"))
        })?;
        if will.payload.len() > principal.org.limits.max_payload_bytes {
            return Err(Refusal::with_detail(Cause::MessageTooLarge, "will payload"));
        }
    }
    Ok(())
}
