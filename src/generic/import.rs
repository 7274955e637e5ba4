//! `mqtt-warden import mosquitto`: a Mosquitto `acl_file` (and `password_file`) as a generic
//! tenant's YAML.
//!
//! Mosquitto checks a client's own `topic` lines, then the `pattern` lines, and within each list
//! its `deny` lines first. The import keeps that order as first-match rules: per user its denials
//! then its grants (limited to the user with `users: [...]`; lines before the first `user` line are
//! the anonymous client's, user `""`), then the patterns' denials and grants for everyone.
//! `read` becomes `[subscribe, receive]`, `write` `[publish]`, `readwrite` all three. Password
//! hashes (`$6$`, `$7$`, argon2id) are kept as they are: users keep their passwords.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::auth::TokenHash;
use crate::policy::is_valid_id_part;
use crate::policy::rules::Pattern;

/// A line that cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct ImportError {
    /// The file.
    pub file: PathBuf,
    /// The 1-based line (0: the whole file).
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Every problem of an import.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n"))]
pub struct ImportErrors(pub Vec<ImportError>);

/// What the rules of one ACL line grant or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn parse(word: &str) -> Option<Access> {
        match word {
            "read" => Some(Access::Read),
            "write" => Some(Access::Write),
            "readwrite" => Some(Access::ReadWrite),
            "deny" => Some(Access::Deny),
            _ => None,
        }
    }

    fn rule(self) -> &'static str {
        match self {
            Access::Read => "allow: [subscribe, receive]",
            Access::Write => "allow: [publish]",
            Access::ReadWrite => "allow: [publish, subscribe, receive]",
            Access::Deny => "deny: [publish, subscribe, receive]",
        }
    }
}

/// One `topic` or `pattern` line.
#[derive(Debug)]
struct Line {
    access: Access,
    topic: String,
    line: usize,
}

/// A list of lines: one user's, the anonymous client's, or the patterns.
#[derive(Debug, Default)]
struct List {
    lines: Vec<Line>,
}

impl List {
    /// Denials first, as Mosquitto checks them.
    fn ordered(&self) -> impl Iterator<Item = &Line> {
        let denials = self.lines.iter().filter(|l| l.access == Access::Deny);
        denials.chain(self.lines.iter().filter(|l| l.access != Access::Deny))
    }
}

fn quoted(text: &str) -> String {
    // A JSON string is a valid YAML double-quoted scalar.
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_owned())
}

/// Reads `acl_file` (and `password_file`) and returns the YAML of tenant `tenant`.
pub fn import_mosquitto(
    tenant: &str,
    acl_file: &Path,
    password_file: Option<&Path>,
) -> Result<String, ImportErrors> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| {
            ImportErrors(vec![ImportError {
                file: path.to_owned(),
                line: 0,
                message: format!("cannot read the file: {e}"),
            }])
        })
    };
    let acl = read(acl_file)?;
    let passwords = password_file.map(read).transpose()?;
    convert(
        tenant,
        acl_file,
        &acl,
        password_file.zip(passwords.as_deref()),
    )
}

/// [`import_mosquitto`] on file contents.
pub fn convert(
    tenant: &str,
    acl_file: &Path,
    acl: &str,
    passwords: Option<(&Path, &str)>,
) -> Result<String, ImportErrors> {
    let mut errors = Vec::new();
    let mut error = |file: &Path, line: usize, message: String| {
        errors.push(ImportError {
            file: file.to_owned(),
            line,
            message,
        })
    };
    if !is_valid_id_part(tenant) {
        error(
            acl_file,
            0,
            format!("`{tenant}` is no tenant name: 1 to 36 characters of A-Z a-z 0-9 . _ -"),
        );
    }
    let mut anonymous = List::default();
    let mut users: Vec<(String, List)> = Vec::new();
    let mut patterns = List::default();
    let mut skipped = Vec::new();
    let mut current: Option<usize> = None;
    for (index, raw) in acl.lines().enumerate() {
        let number = index + 1;
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let (keyword, rest) = text.split_once([' ', '\t']).unwrap_or((text, ""));
        let rest = rest.trim();
        match keyword {
            "user" if !rest.is_empty() => {
                current = Some(match users.iter().position(|(name, _)| name == rest) {
                    Some(at) => at,
                    None => {
                        users.push((rest.to_owned(), List::default()));
                        users.len() - 1
                    }
                });
            }
            "topic" | "pattern" if !rest.is_empty() => {
                let (access, topic) = match rest.split_once([' ', '\t']) {
                    Some((word, topic)) => match Access::parse(word) {
                        Some(access) => (access, topic.trim()),
                        None => (Access::ReadWrite, rest),
                    },
                    None => (Access::ReadWrite, rest),
                };
                if keyword == "topic" && topic.contains('%') {
                    // Mosquitto substitutes nothing in `topic` lines; the rules would.
                    skipped.push(format!(
                        "line {number}: `{text}`: a `topic` line with `%` cannot be expressed"
                    ));
                    continue;
                }
                if let Err(problem) = Pattern::parse(topic) {
                    error(acl_file, number, format!("`{topic}`: {problem}"));
                    continue;
                }
                let line = Line {
                    access,
                    topic: topic.to_owned(),
                    line: number,
                };
                match (keyword, current) {
                    ("pattern", _) => patterns.lines.push(line),
                    (_, Some(user)) => users[user].1.lines.push(line),
                    (_, None) => anonymous.lines.push(line),
                }
            }
            _ => error(
                acl_file,
                number,
                format!("`{text}`: expected `user NAME`, `topic [read|write|readwrite|deny] TOPIC` or `pattern [...] TOPIC`"),
            ),
        }
    }

    let mut hashes: Vec<(String, String)> = Vec::new();
    if let Some((file, text)) = passwords {
        for (index, raw) in text.lines().enumerate() {
            let text = raw.trim();
            if text.is_empty() || text.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = text.split_once(':') else {
                error(file, index + 1, "expected USER:HASH".to_owned());
                continue;
            };
            match TokenHash::parse(hash) {
                // The error text names the form only, never the hash.
                Err(problem) => error(file, index + 1, format!("user `{user}`: {problem}")),
                Ok(_) => hashes.push((user.to_owned(), hash.to_owned())),
            }
        }
    }
    if !errors.is_empty() {
        return Err(ImportErrors(errors));
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Imported from Mosquitto's {}{} by `mqtt-warden import mosquitto`.",
        acl_file.display(),
        passwords
            .map(|(file, _)| format!(" and {}", file.display()))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "# Order: each user's denials, then its grants; then the patterns' denials and grants."
    );
    for note in &skipped {
        let _ = writeln!(out, "# skipped: {note}");
    }
    let _ = writeln!(out, "tenants:\n  {tenant}:");
    let _ = writeln!(
        out,
        "    # true: the acl_file has lines for anonymous clients (before any `user` line)."
    );
    let _ = writeln!(out, "    anonymous: {}", !anonymous.lines.is_empty());
    let mut named: Vec<&str> = hashes.iter().map(|(user, _)| user.as_str()).collect();
    if hashes.is_empty() {
        let _ = writeln!(out, "    users: {{}}");
    } else {
        let _ = writeln!(out, "    users:");
        for (user, hash) in &hashes {
            let _ = writeln!(out, "      {}: {{ token: {} }}", quoted(user), quoted(hash));
        }
    }
    for (user, _) in &users {
        if !named.contains(&user.as_str()) {
            let _ = writeln!(
                out,
                "    # user {}: no password in the password file; add it under users: to let it connect",
                quoted(user)
            );
            named.push(user);
        }
    }
    let _ = writeln!(out, "    rules:");
    let mut lists: Vec<(Option<&str>, &List)> = vec![(Some(""), &anonymous)];
    lists.extend(users.iter().map(|(user, list)| (Some(user.as_str()), list)));
    lists.push((None, &patterns));
    let mut count = 0;
    for (user, list) in lists {
        for line in list.ordered() {
            count += 1;
            let users = user
                .map(|user| format!(", users: [{}]", quoted(user)))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "      - {{ {}, topic: {}{users} }}  # acl line {}",
                line.access.rule(),
                quoted(&line.topic),
                line.line
            );
        }
    }
    if count == 0 {
        let _ = writeln!(out, "      []");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load::parse_policy;
    use crate::policy::rules::{Action, Subject};

    #[test]
    fn converts_users_topics_and_patterns_in_mosquitto_order() {
        let acl = "# anonymous\ntopic read public/#\n\nuser alice\ntopic readwrite alice/#\ntopic deny alice/secret\ntopic lab/#\n\npattern write devices/%c/up\npattern read devices/%u/down\n";
        let passwords = "alice:$7$101$s2ObCSj8MaklduYr$4nCpATRz2e+12Rg4hXAkVLOd7Aj12MAIgzOmcPC2TLvfLEBshYPDDAX8+AnuewPTN9Q4oqcb1f+7IQwMK+APPg==\n";
        let yaml = convert(
            "lab",
            Path::new("acl"),
            acl,
            Some((Path::new("pw"), passwords)),
        )
        .unwrap();
        let policy =
            parse_policy(&yaml, Path::new("lab.yaml")).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        let lab = policy.tenant("lab").unwrap();
        assert!(lab.anonymous);
        assert!(lab.users["alice"].token.verify(b"secret1"));
        let topics: Vec<&str> = lab.rules.rules().iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(
            topics,
            [
                "public/#",
                "alice/secret",
                "alice/#",
                "lab/#",
                "devices/%c/up",
                "devices/%u/down"
            ]
        );
        let decide = |user: &str, client_id: &str, action: Action, topic: &str| {
            let subject = Subject {
                client_id,
                user,
                tenant: "lab",
                common_name: None,
            };
            let applicable = lab.rules.applicable(user, &[]);
            lab.rules
                .decide(action, topic, &subject, &applicable)
                .allowed()
        };
        assert!(decide("alice", "c", Action::Publish, "alice/x"));
        assert!(!decide("alice", "c", Action::Publish, "alice/secret"));
        assert!(!decide("alice", "c", Action::Subscribe, "public/#"));
        assert!(decide("", "c", Action::Subscribe, "public/#"));
        assert!(!decide("", "c", Action::Publish, "public/x"));
        assert!(decide("bob", "c1", Action::Publish, "devices/c1/up"));
        assert!(!decide("bob", "c1", Action::Subscribe, "devices/c1/up"));
        assert!(decide("bob", "c1", Action::Receive, "devices/bob/down"));
    }

    #[test]
    fn reports_bad_lines_with_their_numbers() {
        let errors = convert(
            "lab",
            Path::new("acl"),
            "user a\ntopic read a/#b\nfrobnicate\n",
            Some((Path::new("pw"), "a:plain\n")),
        )
        .unwrap_err();
        let shown = errors.to_string();
        assert!(shown.contains("acl:2: `a/#b`"), "{shown}");
        assert!(shown.contains("acl:3: `frobnicate`"), "{shown}");
        assert!(shown.contains("pw:1: user `a`"), "{shown}");
        assert!(!shown.contains("plain"), "{shown}");
    }
}
