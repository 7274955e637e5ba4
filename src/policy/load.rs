//! Loading policy files: YAML → serde structs → validated [`Policy`], with errors that name the
//! file, the line and the field.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

mod tenants;

use super::yaml::{self, LineMap};
use super::{
    is_valid_id_part, ApiKey, ApiRole, Device, DeviceClass, DeviceType, GatewayRole,
    OnRateExceeded, OnViolation, Org, OrgLimits, Policy, Rate, SecurityMode, Tenant,
};
use crate::auth::TokenHash;
pub use tenants::check_isolation;
use tenants::TenantConfig;

/// The largest payload an MQTT packet can carry, in bytes (the remaining-length maximum).
pub const MAX_MQTT_PAYLOAD_BYTES: u64 = 268_435_455;

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{}: {field}: {message}", file.display(), line.map(|l| l.to_string()).unwrap_or_else(|| "?".into()))]
pub struct PolicyError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field path, for example `orgs.myorg1.devices.sensor/dev001.token`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a load.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// What an ID may look like, for error messages.
const ID_RULE: &str = "1 to 36 characters of A-Z a-z 0-9 . _ -";

/// Loads one YAML file, or every `*.yaml`/`*.yml` file of a folder (merged; an org defined twice
/// is an error).
///
/// Files in a folder load in name order; names starting with `.` (editor swap files) are skipped.
/// Every file is checked, and every problem found is returned, sorted by file and line.
pub fn load_policies(path: &Path) -> Result<Policy, PolicyErrors> {
    let files = policy_files(path).map_err(|e| PolicyErrors(vec![e]))?;
    let mut merger = Merger::default();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => merger.add(&file, &text),
            Err(e) => merger.errors.push(PolicyError::whole_file(
                &file,
                format!("cannot read the file: {e}"),
            )),
        }
    }
    merger.finish()
}

/// Loads policy text that did not come from disk (tests, tools); `file` names it in errors.
pub fn parse_policy(text: &str, file: &Path) -> Result<Policy, PolicyErrors> {
    let mut merger = Merger::default();
    merger.add(file, text);
    merger.finish()
}

impl PolicyError {
    fn whole_file(file: &Path, message: String) -> PolicyError {
        PolicyError {
            file: file.to_owned(),
            line: None,
            field: ".".to_owned(),
            message,
        }
    }
}

/// The files to load for `path`: itself, or the YAML files of a folder in name order.
fn policy_files(path: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let unreadable = |e: std::io::Error| PolicyError::whole_file(path, format!("cannot read: {e}"));
    if !std::fs::metadata(path).map_err(unreadable)?.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(unreadable)? {
        let entry_path = entry.map_err(unreadable)?.path();
        let is_yaml = matches!(
            entry_path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        let hidden = entry_path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if is_yaml && !hidden && entry_path.is_file() {
            files.push(entry_path);
        }
    }
    if files.is_empty() {
        return Err(PolicyError::whole_file(
            path,
            "no *.yaml or *.yml policy file in this folder".to_owned(),
        ));
    }
    files.sort();
    Ok(files)
}

/// Collects orgs and tenants from files, refusing one defined twice, and every error on the way.
#[derive(Default)]
struct Merger {
    orgs: HashMap<String, Arc<Org>>,
    /// Where each org was first defined.
    defined_at: HashMap<String, (PathBuf, Option<usize>)>,
    tenants: HashMap<String, Arc<Tenant>>,
    /// Where each tenant was first defined, and its mount's line.
    tenant_defined_at: HashMap<String, (PathBuf, Option<usize>, Option<usize>)>,
    errors: Vec<PolicyError>,
}

impl Merger {
    fn add(&mut self, file: &Path, text: &str) {
        let (lines, problems, parsed) = yaml::deserialize_all::<Option<PolicyFile>>(text);
        let mut checker = Checker {
            file,
            lines: &lines,
            errors: &mut self.errors,
        };
        for problem in problems {
            checker.errors.push(PolicyError {
                file: file.to_owned(),
                line: problem.line,
                field: problem.field,
                message: problem.message,
            });
        }
        // What is left once the bad parts are out is still checked, so every error shows at once.
        let Some(Some(parsed)) = parsed else {
            // An empty file (or only comments) defines nothing.
            return;
        };
        for (path, line) in lines.duplicates() {
            checker.errors.push(PolicyError {
                file: file.to_owned(),
                line: Some(*line),
                field: path.clone(),
                message: "this key is written twice in the same mapping".to_owned(),
            });
        }
        for (id, config) in parsed.orgs {
            let field = format!("orgs.{id}");
            let line = checker.lines.line(&field);
            let org = checker.org(&id, config);
            if let Some((first_file, first_line)) = self.defined_at.get(&id) {
                checker.error(field, already_defined("org", &id, first_file, *first_line));
                continue;
            }
            self.defined_at.insert(id.clone(), (file.to_owned(), line));
            if let Some(org) = org {
                self.orgs.insert(id, Arc::new(org));
            }
        }
        for (name, config) in parsed.tenants {
            let field = format!("tenants.{name}");
            let line = checker.lines.line(&field);
            let mount_line = checker.lines.line(&format!("{field}.mount"));
            let tenant = checker.tenant(&name, config);
            if let Some((first_file, first_line, _)) = self.tenant_defined_at.get(&name) {
                checker.error(
                    field,
                    already_defined("tenant", &name, first_file, *first_line),
                );
                continue;
            }
            self.tenant_defined_at
                .insert(name.clone(), (file.to_owned(), line, mount_line));
            if let Some(tenant) = tenant {
                self.tenants.insert(name, Arc::new(tenant));
            }
        }
    }

    fn finish(mut self) -> Result<Policy, PolicyErrors> {
        self.check_tenant_names();
        if self.errors.is_empty() {
            return Ok(Policy {
                orgs: self.orgs,
                tenants: self.tenants,
            });
        }
        // Files load in order, so a stable sort keeps file order and puts each file's lines in order.
        self.errors
            .sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        Err(PolicyErrors(self.errors))
    }
}

/// The error for an org or tenant defined a second time.
fn already_defined(kind: &str, name: &str, first_file: &Path, first_line: Option<usize>) -> String {
    let first_line = first_line.map_or_else(|| "?".to_owned(), |l| l.to_string());
    format!(
        "{kind} `{name}` is already defined in {}:{first_line}",
        first_file.display()
    )
}

/// Checks one file's deserialised config and compiles it, recording errors with their lines.
struct Checker<'a> {
    file: &'a Path,
    lines: &'a LineMap,
    errors: &'a mut Vec<PolicyError>,
}

impl Checker<'_> {
    fn error(&mut self, field: String, message: impl Into<String>) {
        let line = self.lines.line(&field);
        self.errors.push(PolicyError {
            file: self.file.to_owned(),
            line,
            field,
            message: message.into(),
        });
    }

    /// Compiles one org; `None` if anything in it is wrong (the errors are recorded).
    fn org(&mut self, id: &str, config: OrgConfig) -> Option<Org> {
        let errors_before = self.errors.len();
        let field = format!("orgs.{id}");
        if !is_valid_id_part(id) {
            self.error(field.clone(), format!("an org ID must be {ID_RULE}"));
        }
        if config.quickstart {
            // Decision: quickstart clients present no credentials, so credentials or a security
            // mode that needs them are mistakes, not settings.
            if !config.devices.is_empty() {
                self.error(
                    format!("{field}.devices"),
                    "a quickstart org has no credentials: it cannot declare devices",
                );
            }
            if !config.api_keys.is_empty() {
                self.error(
                    format!("{field}.api_keys"),
                    "a quickstart org has no credentials: it cannot declare API keys",
                );
            }
            if config.security != SecurityMode::TlsOptional {
                self.error(
                    format!("{field}.security"),
                    "a quickstart org accepts no credentials: its security must be tls-optional",
                );
            }
        }
        let limits = self.limits(&format!("{field}.limits"), config.limits);

        let mut device_types = HashMap::new();
        for (name, device_type) in config.device_types {
            if !is_valid_id_part(&name) {
                self.error(
                    format!("{field}.device_types.{name}"),
                    format!("a device type must be {ID_RULE}"),
                );
            }
            let class = device_type.map(|t| t.class).unwrap_or_default();
            device_types.insert(name, DeviceType { class });
        }

        let mut devices: HashMap<String, HashMap<String, Device>> = HashMap::new();
        for (key, device) in config.devices {
            let device_field = format!("{field}.devices.{key}");
            if let Some(device) = self.device(&device_field, &key, device, &device_types) {
                if let Some((device_type, device_id)) = key.split_once('/') {
                    devices
                        .entry(device_type.to_owned())
                        .or_default()
                        .insert(device_id.to_owned(), device);
                }
            }
        }

        let mut api_keys = HashMap::new();
        for (key, api_key) in config.api_keys {
            let key_field = format!("{field}.api_keys.{key}");
            if let Some(api_key) = self.api_key(&key_field, id, &key, api_key) {
                api_keys.insert(key, api_key);
            }
        }

        (self.errors.len() == errors_before).then(|| Org {
            id: id.to_owned(),
            enabled: config.enabled,
            quickstart: config.quickstart,
            security: config.security,
            on_violation: config.on_violation,
            on_rate_exceeded: config.on_rate_exceeded,
            require_registered_devices: config.require_registered_devices,
            strip_retained: config.strip_retained,
            limits,
            device_types,
            devices,
            api_keys,
        })
    }

    fn device(
        &mut self,
        field: &str,
        key: &str,
        config: DeviceConfig,
        device_types: &HashMap<String, DeviceType>,
    ) -> Option<Device> {
        let errors_before = self.errors.len();
        let mut class = None;
        match key.split_once('/') {
            Some((device_type, device_id)) if is_valid_id_part(device_type) && is_valid_id_part(device_id) => {
                match device_types.get(device_type) {
                    Some(t) => class = Some(t.class),
                    None => self.error(
                        field.to_owned(),
                        format!("device type `{device_type}` is not declared in this org's device_types"),
                    ),
                }
            }
            _ => self.error(
                field.to_owned(),
                format!("a device is keyed TYPE/ID, where TYPE and ID are each {ID_RULE}"),
            ),
        }
        let token = self.token(field, &config.token);
        self.groups(field, &config.groups);
        if config.role.is_some() && class == Some(DeviceClass::Device) {
            self.error(
                format!("{field}.role"),
                "role applies only to devices of a gateway type",
            );
        }
        let token = token?;
        (self.errors.len() == errors_before).then(|| Device {
            token,
            groups: config.groups,
            role: config.role.unwrap_or_default(),
            enabled: config.enabled,
        })
    }

    fn api_key(
        &mut self,
        field: &str,
        org: &str,
        key: &str,
        config: ApiKeyConfig,
    ) -> Option<ApiKey> {
        let errors_before = self.errors.len();
        let suffix = key
            .strip_prefix("a-")
            .and_then(|k| k.strip_prefix(org))
            .and_then(|k| k.strip_prefix('-'));
        if !suffix.is_some_and(is_valid_id_part) {
            self.error(
                field.to_owned(),
                format!("an API key must be `a-{org}-` followed by {ID_RULE}"),
            );
        }
        let token = self.token(field, &config.token);
        self.groups(field, &config.groups);
        let token = token?;
        (self.errors.len() == errors_before).then_some(ApiKey {
            token,
            role: config.role,
            groups: config.groups,
            enabled: config.enabled,
        })
    }

    fn token(&mut self, parent: &str, stored: &str) -> Option<TokenHash> {
        TokenHash::parse(stored)
            .map_err(|e| self.error(format!("{parent}.token"), e.to_string()))
            .ok()
    }

    fn groups(&mut self, parent: &str, groups: &[String]) {
        for (index, group) in groups.iter().enumerate() {
            let index = self.lines.item_index(&format!("{parent}.groups"), index);
            if !is_valid_id_part(group) {
                self.error(
                    format!("{parent}.groups[{index}]"),
                    format!("a group name must be {ID_RULE}"),
                );
            }
        }
    }

    fn limits(&mut self, field: &str, config: LimitsConfig) -> OrgLimits {
        let mut limits = OrgLimits::default();
        if let Some(bytes) = config.max_payload_bytes {
            if (1..=MAX_MQTT_PAYLOAD_BYTES).contains(&bytes) {
                limits.max_payload_bytes = bytes as usize;
            } else {
                self.error(
                    format!("{field}.max_payload_bytes"),
                    format!(
                        "must be between 1 and {MAX_MQTT_PAYLOAD_BYTES} (the largest MQTT packet)"
                    ),
                );
            }
        }
        if let Some(connections) = config.max_connections {
            if connections == 0 {
                self.error(format!("{field}.max_connections"), "must be at least 1");
            } else {
                limits.max_connections = connections;
            }
        }
        if let Some(subscriptions) = config.max_subscriptions {
            let field = format!("{field}.max_subscriptions");
            let mut check = |class: &str, value: Option<u32>, slot: &mut u32| match value {
                Some(0) => self.error(format!("{field}.{class}"), "must be at least 1"),
                Some(n) => *slot = n,
                None => {}
            };
            let slots = &mut limits.max_subscriptions;
            check("device", subscriptions.device, &mut slots.device);
            check("gateway", subscriptions.gateway, &mut slots.gateway);
            check(
                "application",
                subscriptions.application,
                &mut slots.application,
            );
        }
        if let Some(rates) = config.publish_rate {
            let field = format!("{field}.publish_rate");
            let mut check = |class: &str, value: Option<String>, slot: &mut Rate| {
                if let Some(text) = value {
                    match parse_rate(&text) {
                        Ok(rate) => *slot = rate,
                        Err(message) => self.error(format!("{field}.{class}"), message),
                    }
                }
            };
            let slots = &mut limits.publish_rate;
            check("device", rates.device, &mut slots.device);
            check("gateway", rates.gateway, &mut slots.gateway);
            check("application", rates.application, &mut slots.application);
        }
        if let Some(rates) = config.byte_rate {
            let field = format!("{field}.byte_rate");
            let mut check = |class: &str, value: Option<String>, slot: &mut Option<Rate>| {
                if let Some(text) = value {
                    match parse_rate(&text) {
                        Ok(rate) => *slot = Some(rate),
                        Err(message) => self.error(format!("{field}.{class}"), message),
                    }
                }
            };
            let slots = &mut limits.byte_rate;
            check("device", rates.device, &mut slots.device);
            check("gateway", rates.gateway, &mut slots.gateway);
            check("application", rates.application, &mut slots.application);
        }
        if let Some(text) = config.org_publish_rate {
            match parse_rate(&text) {
                Ok(rate) => limits.org_publish_rate = Some(rate),
                Err(message) => self.error(format!("{field}.org_publish_rate"), message),
            }
        }
        if let Some(text) = config.subscribe_rate {
            match parse_rate(&text) {
                Ok(rate) => limits.subscribe_rate = rate,
                Err(message) => self.error(format!("{field}.subscribe_rate"), message),
            }
        }
        limits
    }
}

/// Parses a rate such as `10/s`, `600/min`, `3600/h` or `5/100ms` (any humantime period).
pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let bad = || {
        format!("`{text}` is not a rate: write COUNT/PERIOD, for example 10/s, 600/min, 3600/h or 5/100ms")
    };
    let (count, period) = text.split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let period = period.trim();
    let per = match period {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ if period.starts_with(|c: char| c.is_ascii_digit()) => {
            humantime::parse_duration(period).map_err(|_| bad())?
        }
        _ => return Err(bad()),
    };
    if count == 0 || per.is_zero() {
        return Err(format!(
            "`{text}`: a rate needs a count and a period above zero"
        ));
    }
    Ok(Rate { count, per })
}

// The file format. Unknown keys are errors, so a typo never silently means a default.

/// A policy file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    orgs: BTreeMap<String, OrgConfig>,
    #[serde(default)]
    tenants: BTreeMap<String, TenantConfig>,
}

/// One org as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgConfig {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    quickstart: bool,
    #[serde(default)]
    security: SecurityMode,
    #[serde(default)]
    on_violation: OnViolation,
    #[serde(default)]
    on_rate_exceeded: OnRateExceeded,
    #[serde(default)]
    require_registered_devices: bool,
    #[serde(default = "yes")]
    strip_retained: bool,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default)]
    device_types: BTreeMap<String, Option<DeviceTypeConfig>>,
    #[serde(default)]
    devices: BTreeMap<String, DeviceConfig>,
    #[serde(default)]
    api_keys: BTreeMap<String, ApiKeyConfig>,
}

/// A device type as written: `{}` or `{ class: gateway }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceTypeConfig {
    #[serde(default)]
    class: DeviceClass,
}

/// A device or gateway as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceConfig {
    token: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    role: Option<GatewayRole>,
    #[serde(default = "yes")]
    enabled: bool,
}

/// An API key as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyConfig {
    token: String,
    #[serde(default)]
    role: ApiRole,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default = "yes")]
    enabled: bool,
}

/// `limits:`; every key optional.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsConfig {
    max_payload_bytes: Option<u64>,
    max_connections: Option<u32>,
    max_subscriptions: Option<PerClassConfig<u32>>,
    publish_rate: Option<PerClassConfig<String>>,
    byte_rate: Option<PerClassConfig<String>>,
    org_publish_rate: Option<String>,
    subscribe_rate: Option<String>,
}

/// A value per client class; every key optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PerClassConfig<T> {
    device: Option<T>,
    gateway: Option<T>,
    application: Option<T>,
}

fn yes() -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PerClass;

    const DEV_HASH: &str =
        "sha256:19314500b1aa853c7b459b9c31bbad66d7c52bc138261277ed63053936abff30";

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Loads `text` as one file and returns its errors as (line, field, message).
    pub(super) fn errors_of(text: &str) -> Vec<(Option<usize>, String, String)> {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "p.yaml", text);
        let errors = load_policies(&file).unwrap_err().0;
        for e in &errors {
            assert_eq!(e.file, file);
        }
        errors
            .into_iter()
            .map(|e| (e.line, e.field, e.message))
            .collect()
    }

    fn example_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/example.yaml")
    }

    #[test]
    fn loads_the_shipped_example() {
        let policy = load_policies(&example_path()).unwrap();
        let mut ids: Vec<_> = policy.orgs.keys().cloned().collect();
        ids.sort();
        assert_eq!(ids, ["myorg1", "otherorg", "quickstart"]);

        let org = policy.org("myorg1").unwrap();
        assert!(org.enabled && !org.quickstart && org.strip_retained);
        assert_eq!(org.limits, OrgLimits::default());
        assert_eq!(org.device_types["edge-gw"].class, DeviceClass::Gateway);
        assert_eq!(org.device_types["sensor"].class, DeviceClass::Device);
        let device = org.device("sensor", "dev001").unwrap();
        assert!(device.token.verify(b"dev001-secret-token"));
        assert_eq!(device.groups, ["line-1"]);
        let gateway = org.device("edge-gw", "gw01").unwrap();
        assert!(gateway.token.verify(b"gw01-secret-token"));
        assert_eq!(gateway.role, GatewayRole::Privileged);
        let key = &org.api_keys["a-myorg1-k7x2p9q4zz"];
        assert!(key.token.verify(b"app-secret-token"));
        assert_eq!(key.role, ApiRole::Standard);

        let other = policy.org("otherorg").unwrap();
        assert!(other
            .device("sensor", "dev001")
            .unwrap()
            .token
            .verify(b"other-dev-token"));
        assert!(other.api_keys["a-otherorg-zz9x8c7v6b"]
            .token
            .verify(b"other-app-token"));
        assert!(policy.org("quickstart").unwrap().quickstart);
    }

    #[test]
    fn applies_defaults_and_settings() {
        let text = format!(
            "orgs:\n  o1:\n    enabled: false\n    security: tls-cert-or-token\n    on_violation: reject\n    \
             require_registered_devices: true\n    strip_retained: false\n    limits:\n      max_payload_bytes: 1024\n      \
             max_subscriptions: {{ device: 5 }}\n      publish_rate: {{ device: 600/min, gateway: 5/100ms, application: 1/h }}\n    \
             device_types:\n      t:\n      g: {{ class: gateway }}\n    devices:\n      g/x: {{ token: \"{DEV_HASH}\", role: standard, enabled: false }}\n    \
             api_keys:\n      a-o1-k.1_x: {{ token: \"{}\", role: data-processor, groups: [g1] }}\n",
            crate::auth::hash_token_argon2id(b"t").unwrap()
        );
        let policy = parse_policy(&text, Path::new("inline.yaml")).unwrap();
        let org = policy.org("o1").unwrap();
        assert!(!org.enabled && !org.strip_retained && org.require_registered_devices);
        assert_eq!(org.security, SecurityMode::TlsCertOrToken);
        assert_eq!(org.on_violation, OnViolation::Reject);
        assert_eq!(org.limits.max_payload_bytes, 1024);
        assert_eq!(
            org.limits.max_connections,
            super::super::DEFAULT_MAX_CONNECTIONS
        );
        assert_eq!(
            org.limits.max_subscriptions,
            PerClass {
                device: 5,
                gateway: 500,
                application: 500
            }
        );
        assert_eq!(
            org.limits.publish_rate.device,
            Rate {
                count: 600,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            org.limits.publish_rate.gateway,
            Rate {
                count: 5,
                per: Duration::from_millis(100)
            }
        );
        assert_eq!(
            org.limits.publish_rate.application,
            Rate {
                count: 1,
                per: Duration::from_secs(3600)
            }
        );
        assert_eq!(org.device_types["t"].class, DeviceClass::Device);
        let gateway = org.device("g", "x").unwrap();
        assert_eq!(
            (gateway.role, gateway.enabled),
            (GatewayRole::Standard, false)
        );
        let key = &org.api_keys["a-o1-k.1_x"];
        assert_eq!(
            (key.role, key.enabled, key.token.is_slow()),
            (ApiRole::DataProcessor, true, true)
        );
        assert_eq!(key.groups, ["g1"]);
    }

    #[test]
    fn merges_a_folder_in_name_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yml", "orgs:\n  org-b: {}\n");
        write(dir.path(), "a.yaml", "orgs:\n  org-a: {}\n");
        write(dir.path(), "empty.yaml", "# nothing yet\n");
        write(dir.path(), "notes.txt", "not: [yaml");
        write(dir.path(), ".a.yaml.swp", "not: [yaml");
        let policy = load_policies(dir.path()).unwrap();
        assert_eq!(policy.orgs.len(), 2);
        assert!(policy.org("org-a").unwrap().enabled);
    }

    #[test]
    fn refuses_an_org_defined_in_two_files() {
        let dir = tempfile::tempdir().unwrap();
        let first = write(dir.path(), "a.yaml", "orgs:\n  shared: {}\n");
        let second = write(
            dir.path(),
            "b.yaml",
            "# b\norgs:\n  other: {}\n  shared: {}\n",
        );
        let errors = load_policies(dir.path()).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (&errors[0].file, errors[0].line, errors[0].field.as_str()),
            (&second, Some(4), "orgs.shared")
        );
        assert!(
            errors[0]
                .message
                .contains(&format!("{}:2", first.display())),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn reports_errors_of_every_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(
            dir.path(),
            "a.yaml",
            "orgs:\n  o1:\n    secruity: tls-token\n",
        );
        let b = write(
            dir.path(),
            "b.yaml",
            "orgs:\n  o2:\n    limits:\n      max_connections: 0\n",
        );
        let errors = load_policies(dir.path()).unwrap_err().0;
        let got: Vec<_> = errors
            .iter()
            .map(|e| (&e.file, e.line, e.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (&a, Some(3), "orgs.o1.secruity"),
                (&b, Some(4), "orgs.o2.limits.max_connections")
            ]
        );
        let shown = PolicyErrors(errors).to_string();
        assert!(
            shown.contains(&format!(
                "{}:3: orgs.o1.secruity: unknown field `secruity`",
                a.display()
            )),
            "{shown}"
        );
    }

    #[test]
    fn reports_every_format_error_of_a_file_and_the_checks_of_the_rest() {
        let errors = errors_of(
            "orgs:\n  o1:\n    secruity: tls-token\n    on_violation: explode\n    limits:\n      max_connections: 0\n  o2:\n    enabled: maybe\n    limits: { max_payload_bytes: 0 }\n",
        );
        let got: Vec<_> = errors
            .iter()
            .map(|(line, field, _)| (line.unwrap_or(0), field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (3, "orgs.o1.secruity"),
                (4, "orgs.o1.on_violation"),
                (6, "orgs.o1.limits.max_connections"),
                (8, "orgs.o2.enabled"),
                (9, "orgs.o2.limits.max_payload_bytes"),
            ],
            "{errors:?}"
        );
        assert!(
            errors[1].2.contains("unknown variant `explode`"),
            "{}",
            errors[1].2
        );
    }

    #[test]
    fn reports_syntax_and_type_errors_with_lines() {
        let errors = errors_of("orgs:\n  o1:\n    devices: [\n");
        assert_eq!(errors.len(), 1);
        assert!(errors[0].0.is_some());

        let errors = errors_of("orgs:\n  o1:\n    security: tls-bogus\n");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(3), "orgs.o1.security")
        );
        assert!(
            errors[0].2.contains("unknown variant `tls-bogus`"),
            "{}",
            errors[0].2
        );

        let errors =
            errors_of("orgs:\n  o1:\n    limits:\n      max_subscriptions: { device: -1 }\n");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(4), "orgs.o1.limits.max_subscriptions.device")
        );

        let errors = errors_of(
            "orgs:\n  o1:\n    device_types: { t: {} }\n    devices:\n      t/d: { groups: [] }\n",
        );
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(5), "orgs.o1.devices.t/d")
        );
        assert!(
            errors[0].2.contains("missing field `token`"),
            "{}",
            errors[0].2
        );

        let errors = errors_of("orgs:\n  o1: {}\nextra: 1\n");
        assert_eq!((errors[0].0, errors[0].1.as_str()), (Some(3), "extra"));
    }

    #[test]
    fn reports_every_semantic_error_with_its_line() {
        let text = format!(
            "orgs:\n\
             \x20 bad org!: {{}}\n\
             \x20 o1:\n\
             \x20   device_types:\n\
             \x20     sensor: {{}}\n\
             \x20     gw: {{ class: gateway }}\n\
             \x20   devices:\n\
             \x20     sensor/ok: {{ token: \"{DEV_HASH}\" }}\n\
             \x20     sensor/plain:\n\
             \x20       token: my-secret\n\
             \x20     pump/d1: {{ token: \"{DEV_HASH}\" }}\n\
             \x20     no-slash: {{ token: \"{DEV_HASH}\" }}\n\
             \x20     sensor/d2: {{ token: \"sha256:ABC\", role: standard }}\n\
             \x20     gw/g1: {{ token: \"{DEV_HASH}\", groups: [ok, \"bad group\"] }}\n\
             \x20   api_keys:\n\
             \x20     a-o2-abcdefghij: {{ token: \"{DEV_HASH}\" }}\n\
             \x20     a-o1-: {{ token: \"$argon2id$v=19$broken\" }}\n\
             \x20   limits:\n\
             \x20     max_payload_bytes: 268435456\n\
             \x20     publish_rate:\n\
             \x20       device: 10/fortnight\n\
             \x20       gateway: 0/s\n\
             \x20 qs:\n\
             \x20   quickstart: true\n\
             \x20   security: tls-token\n\
             \x20   device_types: {{ t: {{}} }}\n\
             \x20   devices:\n\
             \x20     t/d: {{ token: \"{DEV_HASH}\" }}\n"
        );
        let errors = errors_of(&text);
        let got: Vec<_> = errors
            .iter()
            .map(|(line, field, _)| (line.unwrap_or(0), field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (2, "orgs.bad org!"),
                (10, "orgs.o1.devices.sensor/plain.token"),
                (11, "orgs.o1.devices.pump/d1"),
                (12, "orgs.o1.devices.no-slash"),
                (13, "orgs.o1.devices.sensor/d2.token"),
                (13, "orgs.o1.devices.sensor/d2.role"),
                (14, "orgs.o1.devices.gw/g1.groups[1]"),
                (16, "orgs.o1.api_keys.a-o2-abcdefghij"),
                (17, "orgs.o1.api_keys.a-o1-"),
                (17, "orgs.o1.api_keys.a-o1-.token"),
                (19, "orgs.o1.limits.max_payload_bytes"),
                (21, "orgs.o1.limits.publish_rate.device"),
                (22, "orgs.o1.limits.publish_rate.gateway"),
                (25, "orgs.qs.security"),
                (27, "orgs.qs.devices"),
            ]
        );
        let message = |field: &str| {
            errors
                .iter()
                .find(|e| e.1 == field)
                .map(|e| e.2.clone())
                .unwrap()
        };
        assert!(message("orgs.o1.devices.sensor/plain.token").contains("must be stored hashed"));
        assert!(message("orgs.o1.devices.pump/d1").contains("`pump` is not declared"));
        assert!(message("orgs.o1.api_keys.a-o2-abcdefghij").contains("`a-o1-`"));
        assert!(message("orgs.o1.limits.publish_rate.device").contains("10/fortnight"));
        // No error message repeats a token or its hash.
        for (_, _, message) in &errors {
            assert!(
                !message.contains("my-secret") && !message.contains(&DEV_HASH[7..]),
                "{message}"
            );
        }
    }

    #[test]
    fn reports_duplicate_keys() {
        let errors = errors_of("orgs:\n  o1:\n    enabled: true\n    enabled: false\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(4), "orgs.o1.enabled")
        );
        let errors = errors_of(&format!(
            "orgs:\n  o1:\n    device_types: {{ t: }}\n    devices:\n      t/d: {{ token: \"{DEV_HASH}\" }}\n      t/d: {{ token: \"{DEV_HASH}\" }}\n"
        ));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(6), "orgs.o1.devices.t/d")
        );
    }

    #[test]
    fn reports_missing_and_empty_paths() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let errors = load_policies(&missing).unwrap_err().0;
        assert_eq!((&errors[0].file, errors[0].line), (&missing, None));
        let errors = load_policies(dir.path()).unwrap_err().0;
        assert!(
            errors[0].message.contains("no *.yaml"),
            "{}",
            errors[0].message
        );
    }

    #[test]
    fn parses_rates() {
        assert_eq!(
            parse_rate("10/s"),
            Ok(Rate {
                count: 10,
                per: Duration::from_secs(1)
            })
        );
        assert_eq!(
            parse_rate("600/m"),
            Ok(Rate {
                count: 600,
                per: Duration::from_secs(60)
            })
        );
        assert_eq!(
            parse_rate("7/2h"),
            Ok(Rate {
                count: 7,
                per: Duration::from_secs(7200)
            })
        );
        for bad in [
            "10",
            "/s",
            "x/s",
            "-1/s",
            "0/s",
            "1/0s",
            "1/",
            "1/lightyear",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
