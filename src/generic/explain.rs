//! `mqtt-warden explain`: dry-runs a generic tenant's decision on one request and says which
//! rule (`file:line`) made it, in the same words a refusal's log line and MQTT 5 reason string
//! use.

use thiserror::Error;

use super::{client_id_allowed, shared_filter};
use crate::policy::rules::{Action, Subject};
use crate::policy::Policy;

/// One request to explain.
#[derive(Debug, Clone)]
pub struct Question<'a> {
    /// The tenant.
    pub tenant: &'a str,
    /// The user (`None`: an anonymous client).
    pub user: Option<&'a str>,
    /// The client ID.
    pub client_id: &'a str,
    /// The certificate's common name, if the client presents one.
    pub common_name: Option<&'a str>,
    /// What it does.
    pub action: Action,
    /// The client topic (publish, receive) or filter (subscribe).
    pub topic: &'a str,
}

/// The answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Whether the request is allowed.
    pub allowed: bool,
    /// What decided it: `rule FILE:LINE (...)` or `no rule allows ... (default deny)`.
    pub reason: String,
    /// Things that would stop the client before any rule is asked (unknown user, client ID).
    pub notes: Vec<String>,
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        writeln!(f, "{verdict}: {}", self.reason)?;
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Why a question cannot be answered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExplainError {
    /// No such tenant.
    #[error("no tenant `{0}` in the policy")]
    UnknownTenant(String),
    /// A malformed shared subscription.
    #[error("{0}")]
    BadFilter(String),
}

/// Answers `question` under `policy`.
pub fn explain(policy: &Policy, question: &Question<'_>) -> Result<Answer, ExplainError> {
    let tenant = policy
        .tenant(question.tenant)
        .ok_or_else(|| ExplainError::UnknownTenant(question.tenant.to_owned()))?;
    let mut notes = Vec::new();
    let user = question.user.unwrap_or_default();
    let entry = question.user.and_then(|user| tenant.users.get(user));
    match (question.user, entry) {
        (None, _) if !tenant.anonymous => {
            notes.push("this tenant admits no anonymous clients".to_owned())
        }
        (Some(user), None) => notes.push(format!(
            "`{user}` is not a user of tenant `{}`: it cannot connect",
            tenant.name
        )),
        (Some(_), Some(entry)) if !entry.enabled => {
            notes.push("the user is disabled: it cannot connect".to_owned())
        }
        (Some(_), Some(entry)) if !client_id_allowed(entry, question.client_id, false) => notes
            .push(format!(
                "client ID `{}` is not allowed for the user: it cannot connect",
                question.client_id
            )),
        _ => {}
    }
    let groups = entry.map(|e| e.groups.as_slice()).unwrap_or_default();
    let applicable = tenant.rules.applicable(user, groups);
    let subject = Subject {
        client_id: question.client_id,
        user,
        tenant: &tenant.name,
        common_name: question.common_name,
    };
    let topic = match question.action {
        Action::Subscribe => shared_filter(question.topic)
            .map_err(|refusal| ExplainError::BadFilter(refusal.to_string()))?,
        _ => question.topic,
    };
    let decision = tenant
        .rules
        .decide(question.action, topic, &subject, &applicable);
    Ok(Answer {
        allowed: decision.allowed(),
        reason: decision.describe(question.action),
        notes,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::policy::load::parse_policy;

    #[test]
    fn names_the_deciding_rule() {
        let text = format!(
            "tenants:\n  lab:\n    users:\n      alice: {{ token: \"{}\", client_ids: [\"alice-*\"] }}\n    rules:\n      - {{ allow: [publish, subscribe], topic: \"devices/%c/#\" }}\n      - {{ deny: [subscribe], topic: \"test/nosubscribe\" }}\n",
            crate::auth::hash_token_sha256(b"x")
        );
        let policy = parse_policy(&text, Path::new("policies/lab.yaml")).unwrap();
        let question = Question {
            tenant: "lab",
            user: Some("alice"),
            client_id: "alice-1",
            common_name: None,
            action: Action::Publish,
            topic: "devices/alice-1/x",
        };
        let answer = explain(&policy, &question).unwrap();
        assert_eq!(
            answer.to_string(),
            "allow: rule policies/lab.yaml:6 (allow [publish, subscribe] devices/%c/#)\n"
        );
        let answer = explain(
            &policy,
            &Question {
                action: Action::Subscribe,
                topic: "$share/g/test/nosubscribe",
                ..question.clone()
            },
        )
        .unwrap();
        assert!(!answer.allowed);
        assert_eq!(
            answer.reason,
            "rule policies/lab.yaml:7 (deny [subscribe] test/nosubscribe)"
        );
        let answer = explain(
            &policy,
            &Question {
                client_id: "bob",
                topic: "devices/bob/x",
                ..question.clone()
            },
        )
        .unwrap();
        assert!(answer.allowed);
        assert_eq!(answer.notes.len(), 1, "{answer}");
        let answer = explain(
            &policy,
            &Question {
                user: None,
                topic: "elsewhere",
                ..question.clone()
            },
        )
        .unwrap();
        assert_eq!(
            answer.to_string(),
            "deny: no rule allows publish (default deny)\nnote: this tenant admits no anonymous clients\n"
        );
        assert_eq!(
            explain(
                &policy,
                &Question {
                    tenant: "x",
                    ..question
                }
            ),
            Err(ExplainError::UnknownTenant("x".into()))
        );
    }
}
