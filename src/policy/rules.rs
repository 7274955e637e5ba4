//! A generic tenant's topic rules, compiled: patterns with variables (`%c`, `%u`, `%t`, `%cn`),
//! ordered, first match wins, no match denies.
//!
//! The rules of a tenant are compiled once per policy load into a trie over topic levels, so a
//! decision walks the levels of one topic (or filter), not every rule. Each trie node keeps the
//! rules that end there; the decision is the matching rule with the lowest index, which is the
//! first one in the file. Nothing is allocated per decision: variables are compared against the
//! principal's values in place.
//!
//! A variable never widens a rule. A value that is empty, absent (no certificate) or holds `+`,
//! `#` or `/` is unusable: an `allow` rule that needs it matches nothing, and a `deny` rule that
//! needs it matches as if the variable's level were `+`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

/// What a rule is about. `receive` is the delivery of a message to a subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// A PUBLISH (and the will).
    Publish,
    /// A SUBSCRIBE filter.
    Subscribe,
    /// A delivery to the client.
    Receive,
}

impl Action {
    /// The name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Receive => "receive",
        }
    }

    /// Parses a policy-file name.
    pub fn parse(name: &str) -> Option<Action> {
        match name {
            "publish" => Some(Action::Publish),
            "subscribe" => Some(Action::Subscribe),
            "receive" => Some(Action::Receive),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Action::Publish => 1,
            Action::Subscribe => 2,
            Action::Receive => 4,
        }
    }
}

/// A variable of a rule pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Var {
    /// `%c`: the client ID (the assigned one for a zero-length client ID).
    ClientId,
    /// `%u`: the user name (without `@tenant`).
    User,
    /// `%t`: the tenant name.
    Tenant,
    /// `%cn`: the common name of the client certificate.
    CommonName,
}

impl Var {
    fn bit(self) -> u8 {
        match self {
            Var::ClientId => 1,
            Var::User => 2,
            Var::Tenant => 4,
            Var::CommonName => 8,
        }
    }
}

/// The values a principal gives the variables.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// `%c`.
    pub client_id: &'a str,
    /// `%u`.
    pub user: &'a str,
    /// `%t`.
    pub tenant: &'a str,
    /// `%cn`, when the client presented a verified certificate.
    pub common_name: Option<&'a str>,
}

impl Subject<'_> {
    fn value(&self, var: Var) -> Option<&str> {
        let value = match var {
            Var::ClientId => self.client_id,
            Var::User => self.user,
            Var::Tenant => self.tenant,
            Var::CommonName => self.common_name?,
        };
        usable(value).then_some(value)
    }

    /// The variables whose values cannot be put in a topic level (see the module docs).
    fn unusable(&self) -> u8 {
        [Var::ClientId, Var::User, Var::Tenant, Var::CommonName]
            .into_iter()
            .filter(|var| self.value(*var).is_none())
            .fold(0, |bits, var| bits | var.bit())
    }
}

/// Whether a value can stand for a variable: it must be one non-empty topic level without
/// wildcards.
fn usable(value: &str) -> bool {
    !value.is_empty() && !value.bytes().any(|b| matches!(b, b'+' | b'#' | b'/' | 0))
}

/// Why a rule pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PatternError {
    /// The pattern is empty.
    #[error("a topic pattern cannot be empty")]
    Empty,
    /// `%` followed by something that is not a variable.
    #[error("unknown variable `{0}`: the variables are %c (client ID), %u (user), %t (tenant) and %cn (certificate common name)")]
    UnknownVariable(String),
    /// `+` or `#` sharing a level with other characters.
    #[error("`{0}` must be a whole topic level")]
    PartialWildcard(char),
    /// `#` before the last level.
    #[error("`#` must be the last level")]
    HashNotLast,
    /// A shared-subscription prefix in a rule.
    #[error("a rule names topics, not `$share/GROUP/...`: a shared subscription is checked on its topic filter")]
    Share,
    /// A NUL character.
    #[error("a topic pattern cannot contain NUL")]
    Nul,
}

/// One part of a level with variables.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(Box<str>),
    Var(Var),
}

/// A level of a pattern that holds a variable.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Template {
    parts: Box<[Part]>,
    vars: u8,
}

impl Template {
    /// Whether `level` is this template with the subject's values in it.
    fn matches(&self, level: &str, subject: &Subject<'_>) -> bool {
        let mut rest = level;
        for part in self.parts.iter() {
            let piece = match part {
                Part::Text(text) => &**text,
                Part::Var(var) => match subject.value(*var) {
                    Some(value) => value,
                    None => return false,
                },
            };
            match rest.strip_prefix(piece) {
                Some(after) => rest = after,
                None => return false,
            }
        }
        rest.is_empty()
    }
}

/// A pattern level.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Text(Box<str>),
    Plus,
    Hash,
    Template(Template),
}

/// A parsed topic pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    levels: Vec<Level>,
}

impl Pattern {
    /// Parses a pattern: MQTT filter syntax, with variables inside levels.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        if text.is_empty() {
            return Err(PatternError::Empty);
        }
        if text.contains('\0') {
            return Err(PatternError::Nul);
        }
        if text.starts_with("$share/") || text == "$share" {
            return Err(PatternError::Share);
        }
        let count = text.split('/').count();
        let mut levels = Vec::with_capacity(count);
        for (index, level) in text.split('/').enumerate() {
            let parsed = match level {
                "+" => Level::Plus,
                "#" if index + 1 == count => Level::Hash,
                "#" => return Err(PatternError::HashNotLast),
                _ if level.contains('+') => return Err(PatternError::PartialWildcard('+')),
                _ if level.contains('#') => return Err(PatternError::PartialWildcard('#')),
                _ if level.contains('%') => Level::Template(parse_template(level)?),
                _ => Level::Text(level.into()),
            };
            levels.push(parsed);
        }
        Ok(Pattern { levels })
    }

    fn vars(&self) -> u8 {
        self.levels
            .iter()
            .map(|level| match level {
                Level::Template(template) => template.vars,
                _ => 0,
            })
            .fold(0, |a, b| a | b)
    }
}

fn parse_template(level: &str) -> Result<Template, PatternError> {
    let mut parts = Vec::new();
    let mut vars = 0;
    let mut text = String::new();
    let mut rest = level;
    while let Some(at) = rest.find('%') {
        text.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (var, len) = if after.starts_with("cn") {
            (Var::CommonName, 2)
        } else if after.starts_with('c') {
            (Var::ClientId, 1)
        } else if after.starts_with('u') {
            (Var::User, 1)
        } else if after.starts_with('t') {
            (Var::Tenant, 1)
        } else {
            let shown: String = after.chars().take(1).collect();
            return Err(PatternError::UnknownVariable(format!("%{shown}")));
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text).into()));
        }
        parts.push(Part::Var(var));
        vars |= var.bit();
        rest = &after[len..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text.into()));
    }
    Ok(Template {
        parts: parts.into(),
        vars,
    })
}

/// A topic with variables (lifecycle event topics): its text with the subject's values put in,
/// or `None` when the text has a wildcard or a variable without a usable value.
pub fn expand(text: &str, subject: &Subject<'_>) -> Option<String> {
    let pattern = Pattern::parse(text).ok()?;
    let mut out = String::with_capacity(text.len() + 32);
    for (index, level) in pattern.levels.iter().enumerate() {
        if index > 0 {
            out.push('/');
        }
        match level {
            Level::Text(text) => out.push_str(text),
            Level::Template(template) => {
                for part in template.parts.iter() {
                    match part {
                        Part::Text(text) => out.push_str(text),
                        Part::Var(var) => out.push_str(subject.value(*var)?),
                    }
                }
            }
            Level::Plus | Level::Hash => return None,
        }
    }
    Some(out)
}

/// Whether a pattern has a wildcard (event topics may not).
pub fn has_wildcard(pattern: &Pattern) -> bool {
    pattern
        .levels
        .iter()
        .any(|level| matches!(level, Level::Plus | Level::Hash))
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The rule allows its actions.
    Allow,
    /// The rule denies its actions.
    Deny,
}

/// One rule as written, with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub effect: Effect,
    /// The actions it names.
    pub actions: Vec<Action>,
    /// The pattern as written.
    pub topic: String,
    /// Groups it is limited to (empty: every user).
    pub groups: Vec<String>,
    /// Users it is limited to (empty: every user).
    pub users: Vec<String>,
    /// The policy file.
    pub file: Arc<Path>,
    /// The line in it.
    pub line: Option<usize>,
}

impl Rule {
    /// `file:line`, the rule's name in explanations and reason strings.
    pub fn location(&self) -> String {
        let line = self.line.map_or_else(|| "?".to_owned(), |l| l.to_string());
        format!("{}:{line}", self.file.display())
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match self.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        let actions: Vec<&str> = self.actions.iter().map(|a| a.name()).collect();
        write!(f, "{effect} [{}] {}", actions.join(", "), self.topic)?;
        if !self.groups.is_empty() {
            write!(f, " groups [{}]", self.groups.join(", "))?;
        }
        if !self.users.is_empty() {
            write!(f, " users [{}]", self.users.join(", "))?;
        }
        Ok(())
    }
}

/// A compiled rule: what the trie needs at a match.
#[derive(Debug)]
struct Compiled {
    effect: Effect,
    /// Action bits; an allowed `subscribe` also allows `receive`.
    actions: u8,
    /// Variables the pattern uses.
    vars: u8,
}

#[derive(Debug, Default)]
struct Node {
    text: HashMap<Box<str>, usize>,
    plus: Option<usize>,
    templates: Vec<(Template, usize)>,
    /// Rules whose pattern ends with `#` below this node.
    hash: Vec<u32>,
    /// Rules whose pattern ends at this node.
    end: Vec<u32>,
    /// The lowest rule index anywhere in this subtree, to stop a walk that cannot win.
    lowest: u32,
}

/// The rules that apply to one principal, as a bit set over rule indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applicable(Box<[u64]>);

impl Applicable {
    fn contains(&self, rule: u32) -> bool {
        self.0
            .get(rule as usize / 64)
            .is_some_and(|word| (*word >> (rule % 64)) & 1 == 1)
    }
}

/// What decided a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision<'r> {
    /// A rule matched.
    Rule(&'r Rule),
    /// No rule matched: denied.
    NoMatch,
}

impl Decision<'_> {
    /// Whether the request is allowed.
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Rule(rule) if rule.effect == Effect::Allow)
    }

    /// What decided it, in words: the same text in logs, reason strings and `explain`.
    pub fn describe(&self, action: Action) -> String {
        match self {
            Decision::Rule(rule) => format!("rule {} ({rule})", rule.location()),
            Decision::NoMatch => format!("no rule allows {} (default deny)", action.name()),
        }
    }
}

/// A tenant's rules, compiled.
#[derive(Debug)]
pub struct RuleSet {
    rules: Vec<Rule>,
    compiled: Vec<Compiled>,
    nodes: Vec<Node>,
}

impl PartialEq for RuleSet {
    fn eq(&self, other: &Self) -> bool {
        self.rules == other.rules
    }
}

impl Eq for RuleSet {}

impl Default for RuleSet {
    fn default() -> Self {
        RuleSet::compile(Vec::new(), Vec::new())
    }
}

impl RuleSet {
    /// Compiles rules (in file order) with their parsed patterns.
    pub fn compile(rules: Vec<Rule>, patterns: Vec<Pattern>) -> RuleSet {
        let mut nodes = vec![Node {
            lowest: u32::MAX,
            ..Node::default()
        }];
        let mut compiled = Vec::with_capacity(rules.len());
        for (index, (rule, pattern)) in rules.iter().zip(&patterns).enumerate() {
            let index = u32::try_from(index).unwrap_or(u32::MAX);
            let mut actions = rule.actions.iter().fold(0, |bits, a| bits | a.bit());
            if rule.effect == Effect::Allow && actions & Action::Subscribe.bit() != 0 {
                actions |= Action::Receive.bit();
            }
            compiled.push(Compiled {
                effect: rule.effect,
                actions,
                vars: pattern.vars(),
            });
            let mut at = 0;
            nodes[at].lowest = nodes[at].lowest.min(index);
            for level in &pattern.levels {
                if let Level::Hash = level {
                    nodes[at].hash.push(index);
                    at = usize::MAX;
                    break;
                }
                let existing = match level {
                    Level::Text(text) => nodes[at].text.get(text).copied(),
                    Level::Plus => nodes[at].plus,
                    Level::Template(template) => nodes[at]
                        .templates
                        .iter()
                        .find(|(t, _)| t == template)
                        .map(|(_, n)| *n),
                    Level::Hash => None,
                };
                let next = match existing {
                    Some(next) => next,
                    None => {
                        nodes.push(Node {
                            lowest: u32::MAX,
                            ..Node::default()
                        });
                        let next = nodes.len() - 1;
                        match level {
                            Level::Text(text) => {
                                nodes[at].text.insert(text.clone(), next);
                            }
                            Level::Plus => nodes[at].plus = Some(next),
                            Level::Template(template) => {
                                nodes[at].templates.push((template.clone(), next))
                            }
                            Level::Hash => {}
                        }
                        next
                    }
                };
                at = next;
                nodes[at].lowest = nodes[at].lowest.min(index);
            }
            if at != usize::MAX {
                nodes[at].end.push(index);
            }
        }
        RuleSet {
            rules,
            compiled,
            nodes,
        }
    }

    /// The rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rules that apply to a user in these groups (computed once per connection).
    pub fn applicable(&self, user: &str, groups: &[String]) -> Applicable {
        let mut bits = vec![0u64; self.rules.len().div_ceil(64)];
        for (index, rule) in self.rules.iter().enumerate() {
            let by_user = rule.users.is_empty() || rule.users.iter().any(|u| u == user);
            let by_group = rule.groups.is_empty() || rule.groups.iter().any(|g| groups.contains(g));
            if by_user && by_group {
                bits[index / 64] |= 1u64 << (index % 64);
            }
        }
        Applicable(bits.into())
    }

    /// Decides `action` on a client topic (publish, receive) or filter (subscribe) for the
    /// subject. No allocation.
    pub fn decide(
        &self,
        action: Action,
        topic: &str,
        subject: &Subject<'_>,
        applicable: &Applicable,
    ) -> Decision<'_> {
        let walk = Walk {
            set: self,
            bit: action.bit(),
            is_filter: action == Action::Subscribe,
            subject,
            unusable: subject.unusable(),
            applicable,
            dollar: topic.starts_with('$'),
        };
        let mut best = u32::MAX;
        walk.node(0, topic, true, &mut best);
        match self.rules.get(best as usize) {
            Some(rule) => Decision::Rule(rule),
            None => Decision::NoMatch,
        }
    }
}

/// One decision's walk through the trie.
struct Walk<'a> {
    set: &'a RuleSet,
    bit: u8,
    is_filter: bool,
    subject: &'a Subject<'a>,
    unusable: u8,
    applicable: &'a Applicable,
    /// The topic starts with `$`: a wildcard first level does not match it (MQTT 4.7.2).
    dollar: bool,
}

impl Walk<'_> {
    /// Whether rule `index` takes part: it names the action, applies to the subject, and, for an
    /// allow rule, has every variable it needs.
    fn counts(&self, index: u32, via_unusable: bool) -> bool {
        let Some(compiled) = self.set.compiled.get(index as usize) else {
            return false;
        };
        if compiled.actions & self.bit == 0 || !self.applicable.contains(index) {
            return false;
        }
        match compiled.effect {
            // An allow rule never stands in for a missing value.
            Effect::Allow => !via_unusable && compiled.vars & self.unusable == 0,
            Effect::Deny => true,
        }
    }

    fn offer(&self, rules: &[u32], via_unusable: bool, best: &mut u32) {
        // Rules are pushed in index order, so the first that counts is the lowest here.
        let limit = *best;
        if let Some(&index) = rules
            .iter()
            .take_while(|&&index| index < limit)
            .find(|&&index| self.counts(index, via_unusable))
        {
            *best = index;
        }
    }

    /// Matches `rest` (the remaining levels; `None` once every level was consumed) at `node`.
    fn node(&self, node: usize, rest: &str, first: bool, best: &mut u32) {
        self.visit(node, Some(rest), first, false, best);
    }

    fn visit(
        &self,
        node: usize,
        rest: Option<&str>,
        first: bool,
        via_unusable: bool,
        best: &mut u32,
    ) {
        let Some(here) = self.set.nodes.get(node) else {
            return;
        };
        if here.lowest >= *best {
            return;
        }
        let wildcard_ok = !(first && self.dollar);
        // `#` here matches this level and everything below, and the parent level itself.
        if wildcard_ok {
            self.offer(&here.hash, via_unusable, best);
        }
        let Some(rest) = rest else {
            self.offer(&here.end, via_unusable, best);
            return;
        };
        let (level, below) = match rest.split_once('/') {
            Some((level, below)) => (level, Some(below)),
            None => (rest, None),
        };
        if self.is_filter && level == "#" {
            // Only a `#` of the pattern covers a `#` of the filter: offered above.
            return;
        }
        if let Some(&next) = here.text.get(level) {
            if !(self.is_filter && level == "+") {
                self.visit(next, below, false, via_unusable, best);
            }
        }
        if wildcard_ok {
            if let Some(next) = here.plus {
                self.visit(next, below, false, via_unusable, best);
            }
        }
        for (template, next) in &here.templates {
            let missing = template.vars & self.unusable != 0;
            if missing {
                // Only a deny rule can use it, as if the level were `+`.
                if wildcard_ok {
                    self.visit(*next, below, false, true, best);
                }
            } else if !(self.is_filter && level == "+") && template.matches(level, self.subject) {
                self.visit(*next, below, false, via_unusable, best);
            }
        }
    }
}

/// Where a rule came from, for tests and tools that build rules by hand.
pub fn rule_at(
    effect: Effect,
    actions: &[Action],
    topic: &str,
    file: &Path,
    line: usize,
) -> (Rule, Pattern) {
    let pattern = Pattern::parse(topic).unwrap_or(Pattern { levels: Vec::new() });
    (
        Rule {
            effect,
            actions: actions.to_vec(),
            topic: topic.to_owned(),
            groups: Vec::new(),
            users: Vec::new(),
            file: Arc::from(PathBuf::from(file)),
            line: Some(line),
        },
        pattern,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(rules: &[(Effect, &[Action], &str)]) -> RuleSet {
        let (rules, patterns) = rules
            .iter()
            .enumerate()
            .map(|(i, (effect, actions, topic))| {
                rule_at(*effect, actions, topic, Path::new("t.yaml"), i + 1)
            })
            .unzip();
        RuleSet::compile(rules, patterns)
    }

    const ALICE: Subject<'static> = Subject {
        client_id: "alice-1",
        user: "alice",
        tenant: "lab",
        common_name: None,
    };

    fn line(set: &RuleSet, action: Action, topic: &str, subject: &Subject<'_>) -> Option<usize> {
        let all = set.applicable(subject.user, &[]);
        match set.decide(action, topic, subject, &all) {
            Decision::Rule(rule) => rule.line,
            Decision::NoMatch => None,
        }
    }

    fn allowed(set: &RuleSet, action: Action, topic: &str, subject: &Subject<'_>) -> bool {
        let all = set.applicable(subject.user, &[]);
        set.decide(action, topic, subject, &all).allowed()
    }

    use Action::{Publish, Receive, Subscribe};
    use Effect::{Allow, Deny};

    #[test]
    fn parses_patterns_and_refuses_bad_ones() {
        assert!(Pattern::parse("devices/%c/#").is_ok());
        assert!(Pattern::parse("a/pre-%u-%cn/+").is_ok());
        assert_eq!(
            Pattern::parse("a/%x"),
            Err(PatternError::UnknownVariable("%x".into()))
        );
        assert_eq!(
            Pattern::parse("a/%"),
            Err(PatternError::UnknownVariable("%".into()))
        );
        assert_eq!(
            Pattern::parse("a/b+"),
            Err(PatternError::PartialWildcard('+'))
        );
        assert_eq!(
            Pattern::parse("a/#b"),
            Err(PatternError::PartialWildcard('#'))
        );
        assert_eq!(Pattern::parse("a/#/b"), Err(PatternError::HashNotLast));
        assert_eq!(Pattern::parse(""), Err(PatternError::Empty));
        assert_eq!(Pattern::parse("$share/g/a"), Err(PatternError::Share));
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let rules = set(&[
            (Allow, &[Publish, Subscribe], "devices/%c/#"),
            (Deny, &[Subscribe], "test/nosubscribe"),
            (Deny, &[Publish], "devices/#"),
            (Allow, &[Publish, Subscribe], "#"),
        ]);
        assert_eq!(line(&rules, Publish, "devices/alice-1/x", &ALICE), Some(1));
        assert_eq!(line(&rules, Publish, "devices/bob/x", &ALICE), Some(3));
        assert!(!allowed(&rules, Publish, "devices/bob/x", &ALICE));
        assert_eq!(line(&rules, Subscribe, "test/nosubscribe", &ALICE), Some(2));
        // A filter is decided by the rules that cover all of it.
        assert_eq!(line(&rules, Subscribe, "test/#", &ALICE), Some(4));
        assert_eq!(line(&rules, Publish, "test/nosubscribe", &ALICE), Some(4));
        assert_eq!(
            line(&rules, Subscribe, "devices/alice-1/+", &ALICE),
            Some(1)
        );
        assert_eq!(line(&rules, Subscribe, "devices/+/x", &ALICE), Some(4));
        // `#` covers its parent level.
        assert_eq!(line(&rules, Publish, "devices/alice-1", &ALICE), Some(1));
    }

    #[test]
    fn no_match_denies() {
        let rules = set(&[(Allow, &[Publish], "a/b")]);
        assert_eq!(
            rules.decide(Publish, "a/c", &ALICE, &rules.applicable("alice", &[])),
            Decision::NoMatch
        );
        assert!(!allowed(&rules, Subscribe, "a/b", &ALICE));
    }

    #[test]
    fn subscribe_allows_receiving_and_receive_can_be_denied_first() {
        let rules = set(&[
            (Deny, &[Receive], "fleet/secret/#"),
            (Allow, &[Subscribe], "fleet/#"),
        ]);
        assert!(allowed(&rules, Subscribe, "fleet/#", &ALICE));
        assert!(allowed(&rules, Receive, "fleet/a/status", &ALICE));
        assert!(!allowed(&rules, Receive, "fleet/secret/key", &ALICE));
        // A deny of subscribing alone does not stop deliveries through a wider filter.
        let rules = set(&[(Deny, &[Subscribe], "x/y"), (Allow, &[Subscribe], "#")]);
        assert!(allowed(&rules, Receive, "x/y", &ALICE));
    }

    #[test]
    fn wildcards_of_a_filter_need_wildcards_of_the_rule() {
        let rules = set(&[(Allow, &[Subscribe], "a/+/c"), (Allow, &[Subscribe], "b/x")]);
        assert!(allowed(&rules, Subscribe, "a/+/c", &ALICE));
        assert!(allowed(&rules, Subscribe, "a/q/c", &ALICE));
        assert!(!allowed(&rules, Subscribe, "a/#", &ALICE));
        assert!(!allowed(&rules, Subscribe, "b/+", &ALICE));
        assert!(!allowed(&rules, Subscribe, "#", &ALICE));
        let rules = set(&[(Allow, &[Subscribe], "a/b/#")]);
        assert!(allowed(&rules, Subscribe, "a/b", &ALICE));
        assert!(allowed(&rules, Subscribe, "a/b/+/#", &ALICE));
        assert!(!allowed(&rules, Subscribe, "a/+/c", &ALICE));
    }

    #[test]
    fn variables_never_widen_a_rule() {
        let rules = set(&[
            (Deny, &[Publish], "secret/%c"),
            (Allow, &[Publish, Subscribe], "devices/%c/#"),
            (Allow, &[Publish], "secret/#"),
        ]);
        for bad in ["+", "#", "a/b", ""] {
            let subject = Subject {
                client_id: bad,
                ..ALICE
            };
            assert!(
                !allowed(&rules, Subscribe, "devices/+/x", &subject),
                "{bad:?}"
            );
            assert!(
                !allowed(&rules, Subscribe, "devices/#", &subject),
                "{bad:?}"
            );
            assert!(!allowed(&rules, Publish, "devices/a/b/x", &subject));
            // The deny rule stands as if its variable were `+`.
            assert_eq!(line(&rules, Publish, "secret/anything", &subject), Some(1));
        }
        assert!(allowed(&rules, Publish, "secret/other", &ALICE));
        assert!(!allowed(&rules, Publish, "secret/alice-1", &ALICE));
        // No certificate: %cn rules allow nothing.
        let rules = set(&[(Allow, &[Publish], "cert/%cn")]);
        assert!(!allowed(&rules, Publish, "cert/x", &ALICE));
        let with_cn = Subject {
            common_name: Some("x"),
            ..ALICE
        };
        assert!(allowed(&rules, Publish, "cert/x", &with_cn));
        // Variables inside a level, and %t, %u.
        let rules = set(&[(Allow, &[Publish], "%t/u-%u.%c/x")]);
        assert!(allowed(&rules, Publish, "lab/u-alice.alice-1/x", &ALICE));
        assert!(!allowed(&rules, Publish, "lab/u-alice.alice-2/x", &ALICE));
    }

    #[test]
    fn wildcards_do_not_match_dollar_topics() {
        let rules = set(&[
            (Allow, &[Publish, Subscribe], "#"),
            (Allow, &[Subscribe], "$events/+"),
        ]);
        assert!(!allowed(&rules, Publish, "$SYS/x", &ALICE));
        assert!(!allowed(&rules, Receive, "$SYS/x", &ALICE));
        assert!(allowed(&rules, Receive, "$events/alice-1", &ALICE));
        assert!(allowed(&rules, Subscribe, "a/$b", &ALICE));
    }

    #[test]
    fn rules_limited_to_groups_and_users() {
        let (mut a, pa) = rule_at(
            Allow,
            &[Subscribe],
            "fleet/+/status",
            Path::new("t.yaml"),
            1,
        );
        a.groups = vec!["ops".into()];
        let (mut b, pb) = rule_at(Allow, &[Publish], "x", Path::new("t.yaml"), 2);
        b.users = vec!["bob".into()];
        let rules = RuleSet::compile(vec![a, b], vec![pa, pb]);
        let ops = rules.applicable("alice", &["ops".to_owned()]);
        let none = rules.applicable("alice", &[]);
        let bob = rules.applicable("bob", &[]);
        assert!(rules
            .decide(Subscribe, "fleet/1/status", &ALICE, &ops)
            .allowed());
        assert!(!rules
            .decide(Subscribe, "fleet/1/status", &ALICE, &none)
            .allowed());
        assert!(rules.decide(Publish, "x", &ALICE, &bob).allowed());
        assert!(!rules.decide(Publish, "x", &ALICE, &none).allowed());
    }

    #[test]
    fn many_rules_decide_like_a_scan() {
        // The trie must give the same answer as trying every rule in order.
        let mut specs: Vec<(Effect, &[Action], String)> = Vec::new();
        for i in 0..50 {
            let effect = if i % 7 == 3 { Deny } else { Allow };
            let actions: &[Action] = if i % 2 == 0 {
                &[Publish]
            } else {
                &[Publish, Subscribe]
            };
            let topic = match i % 5 {
                0 => format!("site/{i}/+/temp"),
                1 => format!("site/{i}/#"),
                2 => format!("dev/%c/{i}"),
                3 => "site/+/x/#".to_owned(),
                _ => format!("other/{i}"),
            };
            specs.push((effect, actions, topic));
        }
        let borrowed: Vec<(Effect, &[Action], &str)> =
            specs.iter().map(|(e, a, t)| (*e, *a, t.as_str())).collect();
        let rules = set(&borrowed);
        let scan = |action: Action, topic: &str| -> Option<usize> {
            (0..rules.rules.len()).find_map(|i| {
                let single = set(&borrowed[i..=i]);
                line(&single, action, topic, &ALICE).map(|_| i + 1)
            })
        };
        for topic in [
            "site/1/a/temp",
            "site/0/a/temp",
            "site/11/x/y",
            "site/13/x",
            "dev/alice-1/7",
            "dev/alice-1/12",
            "other/4",
            "other/5",
            "nothing",
            "site/10/q/temp",
        ] {
            assert_eq!(
                line(&rules, Publish, topic, &ALICE),
                scan(Publish, topic),
                "{topic}"
            );
        }
    }
}
