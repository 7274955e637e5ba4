//! Loading generic tenants (`tenants:` in policy files): users, ordered rules, retained, limits
//! and events, checked with `file:line: field` errors, and the isolation checks between
//! tenants' mounts and orgs' prefixes.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;

use super::{Checker, LimitsConfig, Merger, PolicyError, ID_RULE};
use crate::policy::rules::{self, Action, Effect, Pattern, Rule, RuleSet};
use crate::policy::{
    is_valid_id_part, OnRateExceeded, OnViolation, Policy, Retained, Tenant, TenantUser,
};

/// The mount a tenant gets when it names none; `{tenant}` is its name.
pub const DEFAULT_MOUNT: &str = "{tenant}/";

/// One tenant as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TenantConfig {
    #[serde(default)]
    mount: Option<String>,
    #[serde(default)]
    anonymous: bool,
    #[serde(default)]
    users: BTreeMap<String, UserConfig>,
    #[serde(default)]
    rules: Vec<RuleConfig>,
    #[serde(default)]
    retained: Retained,
    #[serde(default)]
    limits: LimitsConfig,
    #[serde(default = "reject")]
    on_violation: OnViolation,
    #[serde(default)]
    on_rate_exceeded: OnRateExceeded,
    #[serde(default)]
    events: Option<EventsConfig>,
}

fn reject() -> OnViolation {
    OnViolation::Reject
}

/// A user as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UserConfig {
    token: String,
    #[serde(default)]
    client_ids: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default = "super::yes")]
    enabled: bool,
}

/// A rule as written: `{ allow: [publish], topic: "a/#" }`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleConfig {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Option<Vec<String>>,
    topic: String,
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    users: Vec<String>,
}

/// `events:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsConfig {
    topic: String,
}

impl Checker<'_> {
    /// Compiles one tenant; `None` if anything in it is wrong (the errors are recorded).
    pub(super) fn tenant(&mut self, name: &str, config: TenantConfig) -> Option<Tenant> {
        let errors_before = self.errors.len();
        let field = format!("tenants.{name}");
        if !is_valid_id_part(name) {
            self.error(field.clone(), format!("a tenant name must be {ID_RULE}"));
        }
        let mount = config
            .mount
            .clone()
            .unwrap_or_else(|| DEFAULT_MOUNT.to_owned())
            .replace("{tenant}", name);
        if let Err(message) = check_mount(&mount) {
            self.error(format!("{field}.mount"), message);
        }
        let limits = self.limits(&format!("{field}.limits"), config.limits);

        let mut users = HashMap::new();
        for (user, user_config) in config.users {
            let user_field = format!("{field}.users.{user}");
            if user.is_empty() {
                self.error(
                    user_field.clone(),
                    "a user name cannot be empty (anonymous clients are `anonymous: true`)",
                );
            }
            let token = self.token(&user_field, &user_config.token);
            self.groups(&user_field, &user_config.groups);
            for (index, pattern) in user_config.client_ids.iter().enumerate() {
                if pattern.is_empty() || pattern.contains('\0') {
                    let index = self
                        .lines
                        .item_index(&format!("{user_field}.client_ids"), index);
                    self.error(
                        format!("{user_field}.client_ids[{index}]"),
                        "a client-ID pattern cannot be empty",
                    );
                }
            }
            if let Some(token) = token {
                users.insert(
                    user,
                    TenantUser {
                        token,
                        client_ids: user_config.client_ids,
                        groups: user_config.groups,
                        enabled: user_config.enabled,
                    },
                );
            }
        }

        let file: Arc<Path> = Arc::from(self.file);
        let mut compiled = Vec::with_capacity(config.rules.len());
        let mut patterns = Vec::with_capacity(config.rules.len());
        for (index, rule) in config.rules.into_iter().enumerate() {
            let index = self.lines.item_index(&format!("{field}.rules"), index);
            let rule_field = format!("{field}.rules[{index}]");
            if let Some((rule, pattern)) = self.rule(&rule_field, rule, &file) {
                compiled.push(rule);
                patterns.push(pattern);
            }
        }

        let events = match config.events {
            Some(events) => {
                let topic_field = format!("{field}.events.topic");
                match Pattern::parse(&events.topic) {
                    Ok(pattern) if rules::has_wildcard(&pattern) => {
                        self.error(topic_field, "an event topic cannot have wildcards");
                        None
                    }
                    Ok(_) => Some(events.topic),
                    Err(error) => {
                        self.error(topic_field, error.to_string());
                        None
                    }
                }
            }
            None => None,
        };

        (self.errors.len() == errors_before).then(|| Tenant {
            name: name.to_owned(),
            mount,
            anonymous: config.anonymous,
            users,
            rules: RuleSet::compile(compiled, patterns),
            retained: config.retained,
            limits,
            on_violation: config.on_violation,
            on_rate_exceeded: config.on_rate_exceeded,
            events,
            line: self.lines.line(&field),
            file,
        })
    }

    fn rule(
        &mut self,
        field: &str,
        config: RuleConfig,
        file: &Arc<Path>,
    ) -> Option<(Rule, Pattern)> {
        let errors_before = self.errors.len();
        let (effect, names, key) = match (config.allow, config.deny) {
            (Some(_), Some(_)) => {
                self.error(
                    field.to_owned(),
                    "a rule has `allow` or `deny`, not both: write two rules",
                );
                return None;
            }
            (Some(names), None) => (Effect::Allow, names, "allow"),
            (None, Some(names)) => (Effect::Deny, names, "deny"),
            (None, None) => (Effect::Allow, Vec::new(), "allow"),
        };
        if names.is_empty() {
            self.error(
                field.to_owned(),
                "a rule with no action: write `allow: [...]` or `deny: [...]` with publish, subscribe or receive",
            );
        }
        let mut actions = Vec::with_capacity(names.len());
        for (index, name) in names.iter().enumerate() {
            match Action::parse(name) {
                Some(action) => actions.push(action),
                None => {
                    let index = self.lines.item_index(&format!("{field}.{key}"), index);
                    self.error(
                        format!("{field}.{key}[{index}]"),
                        format!("unknown action `{name}`: the actions are publish, subscribe and receive"),
                    );
                }
            }
        }
        let pattern = Pattern::parse(&config.topic)
            .map_err(|error| self.error(format!("{field}.topic"), error.to_string()))
            .ok();
        self.groups(field, &config.groups);
        let line = self.lines.line(field);
        let pattern = pattern?;
        (self.errors.len() == errors_before).then(|| {
            (
                Rule {
                    effect,
                    actions,
                    topic: config.topic,
                    groups: config.groups,
                    users: config.users,
                    file: file.clone(),
                    line,
                },
                pattern,
            )
        })
    }
}

/// Whether a mount is one or more levels of `[A-Za-z0-9._-]`, each followed by `/`.
fn check_mount(mount: &str) -> Result<(), String> {
    let rule = "a mount is one or more levels of A-Z a-z 0-9 . _ -, each followed by `/` (for example \"lab/\")";
    let Some(levels) = mount.strip_suffix('/') else {
        return Err(rule.to_owned());
    };
    let valid = levels.split('/').all(|level| {
        !level.is_empty()
            && level
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    });
    if valid {
        Ok(())
    } else {
        Err(rule.to_owned())
    }
}

/// Whether two broker prefixes share topics: one starts with the other.
fn overlap(a: &str, b: &str) -> bool {
    a.starts_with(b) || b.starts_with(a)
}

impl Merger {
    /// A tenant may not share a name with an org, nor its mount with another tenant.
    pub(super) fn check_tenant_names(&mut self) {
        let mut names: Vec<&String> = self.tenant_defined_at.keys().collect();
        names.sort();
        for name in names {
            let Some((file, line, mount_line)) = self.tenant_defined_at.get(name) else {
                continue;
            };
            if let Some((org_file, org_line)) = self.defined_at.get(name) {
                let org_line = org_line.map_or_else(|| "?".to_owned(), |l| l.to_string());
                self.errors.push(PolicyError {
                    file: file.clone(),
                    line: *line,
                    field: format!("tenants.{name}"),
                    message: format!(
                        "`{name}` is already an org (defined in {}:{org_line}): tenants and orgs share one namespace",
                        org_file.display()
                    ),
                });
            }
            let Some(tenant) = self.tenants.get(name) else {
                continue;
            };
            let mut others: Vec<&Arc<Tenant>> = self
                .tenants
                .values()
                .filter(|other| other.name < *name && overlap(&other.mount, &tenant.mount))
                .collect();
            others.sort_by(|a, b| a.name.cmp(&b.name));
            for other in others {
                self.errors.push(PolicyError {
                    file: file.clone(),
                    line: mount_line.or(*line),
                    field: format!("tenants.{name}.mount"),
                    message: format!(
                        "mount `{}` overlaps tenant `{}`'s mount `{}`: tenants must not share topics",
                        tenant.mount, other.name, other.mount
                    ),
                });
            }
        }
    }
}

/// Errors for tenants whose mount overlaps the broker prefix of an org (`org_prefix` is the
/// `upstream.topic_prefix` template, `{org}` standing for the org ID), or the proxy's own topics.
pub fn check_isolation(policy: &Policy, org_prefix: &str) -> Vec<PolicyError> {
    let mut errors = Vec::new();
    let mut tenants: Vec<&Arc<Tenant>> = policy.tenants.values().collect();
    tenants.sort_by(|a, b| a.name.cmp(&b.name));
    for tenant in tenants {
        let mut orgs: Vec<&String> = policy.orgs.keys().collect();
        orgs.sort();
        for org in orgs {
            let prefix = org_prefix.replace("{org}", org);
            if overlap(&prefix, &tenant.mount) {
                errors.push(PolicyError {
                    file: tenant.file.to_path_buf(),
                    line: tenant.line,
                    field: format!("tenants.{}.mount", tenant.name),
                    message: format!(
                        "mount `{}` overlaps org `{org}`'s prefix `{prefix}`: a tenant must not share topics with an org",
                        tenant.mount
                    ),
                });
            }
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::super::parse_policy;
    use super::super::tests::errors_of;
    use super::*;
    use crate::policy::rules::{Decision, Subject};

    const HASH: &str = "sha256:19314500b1aa853c7b459b9c31bbad66d7c52bc138261277ed63053936abff30";

    #[test]
    fn loads_a_tenant() {
        let text = format!(
            "tenants:\n  lab:\n    anonymous: true\n    users:\n      alice: {{ token: \"{HASH}\", client_ids: [\"alice-*\"] }}\n      \
             sensor-17: {{ token: \"{HASH}\", groups: [sensors] }}\n    rules:\n      \
             - {{ allow: [publish, subscribe], topic: \"devices/%c/#\" }}\n      \
             - {{ allow: [subscribe], topic: \"fleet/+/status\", groups: [ops] }}\n      \
             - {{ deny: [subscribe], topic: \"test/nosubscribe\" }}\n      \
             - {{ allow: [publish, subscribe], topic: \"#\" }}\n    retained: strip\n    \
             limits: {{ max_connections: 5 }}\n    events: {{ topic: \"$events/%c\" }}\n"
        );
        let policy = parse_policy(&text, Path::new("p.yaml")).unwrap();
        let lab = policy.tenant("lab").unwrap();
        assert_eq!(lab.mount, "lab/");
        assert!(lab.anonymous);
        assert_eq!(lab.retained, Retained::Strip);
        assert_eq!(lab.on_violation, OnViolation::Reject);
        assert_eq!(lab.limits.max_connections, 5);
        assert_eq!(lab.events.as_deref(), Some("$events/%c"));
        assert_eq!(lab.users["alice"].client_ids, ["alice-*"]);
        assert_eq!(lab.users["sensor-17"].groups, ["sensors"]);
        assert_eq!(lab.rules.rules().len(), 4);
        let lines: Vec<_> = lab.rules.rules().iter().map(|r| r.line).collect();
        assert_eq!(lines, [Some(8), Some(9), Some(10), Some(11)]);
        let subject = Subject {
            client_id: "c",
            user: "alice",
            tenant: "lab",
            common_name: None,
        };
        let all = lab.rules.applicable("alice", &[]);
        match lab
            .rules
            .decide(Action::Subscribe, "test/nosubscribe", &subject, &all)
        {
            Decision::Rule(rule) => {
                assert_eq!(rule.location(), "p.yaml:10");
                assert_eq!(rule.effect, Effect::Deny);
            }
            Decision::NoMatch => panic!("a rule decides"),
        }
    }

    #[test]
    fn reports_bad_rules_with_lines() {
        let errors = errors_of(
            "tenants:\n  lab:\n    rules:\n      - { allow: [publish], topic: \"a/%x\" }\n      - { allow: [publish], topic: \"a/b#\" }\n      - { topic: \"a\" }\n      - { allow: [], topic: \"a\" }\n      - { allow: [write], topic: \"a\" }\n      - { allow: [publish], deny: [publish], topic: \"a\" }\n    events: { topic: \"$events/+\" }\n    mount: \"$lab\"\n",
        );
        let got: Vec<_> = errors
            .iter()
            .map(|(line, field, _)| (line.unwrap_or(0), field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (4, "tenants.lab.rules[0].topic"),
                (5, "tenants.lab.rules[1].topic"),
                (6, "tenants.lab.rules[2]"),
                (7, "tenants.lab.rules[3]"),
                (8, "tenants.lab.rules[4].allow[0]"),
                (9, "tenants.lab.rules[5]"),
                (10, "tenants.lab.events.topic"),
                (11, "tenants.lab.mount"),
            ],
            "{errors:?}"
        );
        assert!(
            errors[0].2.contains("unknown variable `%x`"),
            "{}",
            errors[0].2
        );
        assert!(errors[1].2.contains("whole topic level"), "{}", errors[1].2);
        assert!(errors[2].2.contains("no action"), "{}", errors[2].2);
    }

    #[test]
    fn refuses_a_tenant_named_twice() {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("a.yaml");
        std::fs::write(&first, "tenants:\n  lab: {}\n").unwrap();
        let second = dir.path().join("b.yaml");
        std::fs::write(
            &second,
            "orgs:\n  shop: {}\ntenants:\n  lab: {}\n  shop: {}\n",
        )
        .unwrap();
        let errors = crate::policy::load_policies(dir.path()).unwrap_err().0;
        let got: Vec<(PathBuf, Option<usize>, String)> = errors
            .iter()
            .map(|e| (e.file.clone(), e.line, e.field.clone()))
            .collect();
        assert_eq!(
            got,
            [
                (second.clone(), Some(4), "tenants.lab".to_owned()),
                (second.clone(), Some(5), "tenants.shop".to_owned()),
            ]
        );
        assert!(errors[0]
            .message
            .contains(&format!("{}:2", first.display())));
        assert!(errors[1].message.contains("already an org"));
        // The same name twice in one file is a repeated key.
        let errors = errors_of("tenants:\n  lab: {}\n  lab: {}\n");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(3), "tenants.lab")
        );
    }

    #[test]
    fn refuses_overlapping_mounts() {
        let errors =
            errors_of("tenants:\n  a: { mount: \"shared/\" }\n  b:\n    mount: \"shared/b/\"\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(
            (errors[0].0, errors[0].1.as_str()),
            (Some(4), "tenants.b.mount")
        );
        let policy = parse_policy(
            "orgs:\n  org1: {}\ntenants:\n  t: { mount: \"org1/x/\" }\n  u: {}\n",
            Path::new("p.yaml"),
        )
        .unwrap();
        let errors = check_isolation(&policy, "{org}/");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "tenants.t.mount");
        assert!(check_isolation(&policy, "wiotp/{org}/").is_empty());
    }
}
