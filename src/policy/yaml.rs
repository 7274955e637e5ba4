//! YAML helpers shared by the policy loader and the process config: deserialise with the field
//! path and line of every error ([`deserialize_all`]), and find the line of any key afterwards, so
//! that checks run after deserialisation still point at the right line.
//!
//! Field paths are written as `orgs.myorg1.devices.sensor/dev001.token`, with sequence items as
//! `listeners[0].bind`, the form `serde_path_to_error` prints.

use std::collections::{HashMap, HashSet};

use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A deserialisation failure: where, which field, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct YamlProblem {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// The field path (`.` for the document itself).
    pub field: String,
    /// What is wrong, without the location (that is in `line`).
    pub message: String,
}

/// Deserialises one YAML document, reporting the first problem with its field path and line,
/// and returns the document's [`LineMap`] for the checks that follow.
pub(crate) fn deserialize<T: DeserializeOwned>(text: &str) -> (LineMap, Result<T, YamlProblem>) {
    let lines = LineMap::new(text);
    let result = deserialize_only(text).map_err(|mut problem| {
        // serde reports a repeated key at its mapping; the line map knows the repeat itself.
        if let Some(name) = problem
            .message
            .strip_prefix("duplicate field `")
            .and_then(|m| m.split_once('`'))
        {
            let path = join(
                if problem.field == "." {
                    ""
                } else {
                    &problem.field
                },
                name.0,
            );
            if let Some((_, line)) = lines.duplicates().iter().find(|(p, _)| *p == path) {
                problem.line = Some(*line);
                problem.field = path;
            }
        }
        problem
    });
    (lines, result)
}

fn deserialize_only<T: DeserializeOwned>(text: &str) -> Result<T, YamlProblem> {
    deserialize_from(serde_yaml::Deserializer::from_str(text)).map_err(|(problem, _)| problem)
}

/// Deserialises from `de`; a failure comes with the path to the offending node.
fn deserialize_from<'de, T, D>(de: D) -> Result<T, (YamlProblem, Vec<Segment>)>
where
    T: DeserializeOwned,
    D: serde::Deserializer<'de, Error = serde_yaml::Error>,
{
    serde_path_to_error::deserialize(de).map_err(|err| {
        let field = err.path().to_string();
        let segments: Vec<Segment> = err.path().iter().cloned().collect();
        let inner = err.inner();
        let line = inner.location().map(|l| l.line());
        let mut message = inner.to_string();
        if let Some(stripped) = strip_location(&message) {
            message = stripped.to_owned();
        }
        // serde_yaml starts its message with its own path: the field, or for an unknown key
        // its parent. The path is already in `field`.
        let parent = field.rfind(['.', '[']).map(|cut| &field[..cut]);
        for prefix in [Some(field.as_str()), parent].into_iter().flatten() {
            if let Some(stripped) = message.strip_prefix(&format!("{prefix}: ")) {
                message = stripped.to_owned();
                break;
            }
        }
        (
            YamlProblem {
                line,
                field,
                message,
            },
            segments,
        )
    })
}

/// The most problems [`deserialize_all`] reports for one document.
const MAX_PROBLEMS: usize = 100;

/// Deserialises one YAML document and reports every problem serde meets in it, not only the first.
///
/// After each problem the offending node (the bad value, the unknown key, or the mapping that
/// misses a required key) is taken out of the document and the rest is deserialised again, so a
/// typo in one place never hides a mistake further down. The value returned, if any, is the
/// document without its bad parts: the checks that follow can still look at everything else.
/// It is `None` when the document cannot be read at all (a YAML syntax error, a duplicate key) or
/// the problem is the document itself (a required top-level key is missing).
pub(crate) fn deserialize_all<T: DeserializeOwned>(
    text: &str,
) -> (LineMap, Vec<YamlProblem>, Option<T>) {
    let (lines, first) = deserialize::<T>(text);
    let first = match first {
        Ok(value) => return (lines, Vec::new(), Some(value)),
        Err(problem) => problem,
    };
    let mut problems = vec![first];
    // The rest works on the document as a value; one that is not even that has one problem only.
    let Ok(mut document) = serde_yaml::from_str::<Value>(text) else {
        return (lines, problems, None);
    };
    // Where the first problem is, as a path through the value: parse it once more to get it.
    let Err((_, mut at)) = deserialize_from::<T, _>(document.clone()) else {
        return (lines, problems, None);
    };
    let mut removals = Removals::default();
    let mut lines = lines;
    loop {
        if !remove(&mut document, &at) {
            return (lines, problems, None);
        }
        removals.record(&at);
        match deserialize_from::<T, _>(document.clone()) {
            Ok(value) => {
                lines.removed_items = removals.items;
                return (lines, problems, Some(value));
            }
            Err((problem, segments)) => {
                let original = removals.original(&segments);
                let field = path_string(&original);
                let field = if field.is_empty() {
                    ".".to_owned()
                } else {
                    field
                };
                // A key taken out above is now missing: that is the same problem again.
                let repeat = problem
                    .message
                    .strip_prefix("missing field `")
                    .and_then(|m| m.split_once('`'))
                    .is_some_and(|(name, _)| {
                        let parent = if field == "." { "" } else { &field };
                        removals.fields.contains(&join(parent, name))
                    });
                if !repeat {
                    problems.push(YamlProblem {
                        line: lines.line(&field),
                        field,
                        message: problem.message,
                    });
                }
                if problems.len() >= MAX_PROBLEMS {
                    return (lines, problems, None);
                }
                at = segments;
            }
        }
    }
}

/// What [`deserialize_all`] took out so far: the field paths (in the original document) and, per
/// sequence, the original indices of removed items, so later paths can be told in the
/// document's own numbering.
#[derive(Default)]
struct Removals {
    fields: HashSet<String>,
    /// Original path of a sequence → original indices removed from it, ascending.
    items: HashMap<String, Vec<usize>>,
}

impl Removals {
    /// `segments` (a path in the current document) in the original document's numbering.
    fn original(&self, segments: &[Segment]) -> Vec<Segment> {
        let mut out: Vec<Segment> = Vec::with_capacity(segments.len());
        for segment in segments {
            let segment = match segment {
                Segment::Seq { index } => {
                    let mut index = *index;
                    if let Some(removed) = self.items.get(&path_string(&out)) {
                        index = renumber(removed, index);
                    }
                    Segment::Seq { index }
                }
                other => other.clone(),
            };
            out.push(segment);
        }
        out
    }

    /// Notes that the node at `segments` (current numbering) was removed.
    fn record(&mut self, segments: &[Segment]) {
        let original = self.original(segments);
        if let (Some(Segment::Seq { index }), Some(parent)) =
            (original.last(), original.get(..original.len() - 1))
        {
            let removed = self.items.entry(path_string(parent)).or_default();
            removed.push(*index);
            removed.sort_unstable();
        }
        self.fields.insert(path_string(&original));
    }
}

/// The original index of item `index` of a sequence from which the items `removed` (original
/// indices, ascending) were taken out.
fn renumber(removed: &[usize], mut index: usize) -> usize {
    for gone in removed {
        if *gone <= index {
            index += 1;
        }
    }
    index
}

/// The field path of `segments`, in the form of [`LineMap`] and error messages.
fn path_string(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } => out = join(&out, key),
            Segment::Enum { .. } | Segment::Unknown => {}
        }
    }
    out
}

/// A mapping key as the path names it.
fn key_text(key: &Value) -> Option<String> {
    match key {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// Removes the node at `segments` from `document`; false when there is none (or it is the root).
fn remove(document: &mut Value, segments: &[Segment]) -> bool {
    let Some((last, parents)) = segments.split_last() else {
        return false;
    };
    let mut node = document;
    for segment in parents {
        node = match (segment, node) {
            (Segment::Map { key }, Value::Mapping(map)) => {
                match map
                    .iter_mut()
                    .find(|(k, _)| key_text(k).as_deref() == Some(key))
                {
                    Some((_, value)) => value,
                    None => return false,
                }
            }
            (Segment::Seq { index }, Value::Sequence(items)) => match items.get_mut(*index) {
                Some(value) => value,
                None => return false,
            },
            (Segment::Enum { .. }, node) => node,
            _ => return false,
        };
    }
    match (last, node) {
        (Segment::Map { key }, Value::Mapping(map)) => {
            let found = map
                .keys()
                .find(|k| key_text(k).as_deref() == Some(key))
                .cloned();
            found.is_some_and(|k| map.remove(&k).is_some())
        }
        (Segment::Seq { index }, Value::Sequence(items)) if *index < items.len() => {
            items.remove(*index);
            true
        }
        _ => false,
    }
}

/// `message` without a trailing ` at line N column M`.
fn strip_location(message: &str) -> Option<&str> {
    let (head, tail) = message.rsplit_once(" at line ")?;
    let (line, column) = tail.split_once(" column ")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(line) && digits(column)).then_some(head)
}

/// `parent.key`, or `key` at the root.
pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The line of every key and sequence item of a document, by field path.
#[derive(Debug, Default)]
pub(crate) struct LineMap {
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize)>,
    /// Sequence items [`deserialize_all`] took out, by the sequence's path.
    removed_items: HashMap<String, Vec<usize>>,
}

impl LineMap {
    /// Scans `text`. Text that does not scan gives an empty map: deserialisation reports it.
    pub fn new(text: &str) -> LineMap {
        let mut walker = Walker::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walker, false).is_err() {
            return LineMap::default();
        }
        LineMap {
            lines: walker.lines,
            duplicates: walker.duplicates,
            removed_items: HashMap::new(),
        }
    }

    /// The index in the file of item `index` of the deserialised sequence at `path`: the same,
    /// unless [`deserialize_all`] took bad items out before it.
    pub fn item_index(&self, path: &str, index: usize) -> usize {
        match self.removed_items.get(path) {
            Some(removed) => renumber(removed, index),
            None => index,
        }
    }

    /// The line of `path`, or else of its nearest ancestor that has one.
    pub fn line(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(line) = self.lines.get(path) {
                return Some(*line);
            }
            // Walk up one segment: `a.b[2]` → `a.b` → `a`. Keys may contain dots, so this is a
            // fallback only; exact paths hit above.
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    /// Keys written twice in the same mapping, as (path, line of the second), in file order.
    pub fn duplicates(&self) -> &[(String, usize)] {
        &self.duplicates
    }
}

enum Frame {
    Map {
        path: String,
        key: Option<String>,
        seen: HashSet<String>,
    },
    Seq {
        path: String,
        index: usize,
    },
}

#[derive(Default)]
struct Walker {
    stack: Vec<Frame>,
    lines: HashMap<String, usize>,
    duplicates: Vec<(String, usize)>,
}

impl Walker {
    /// Takes the slot of the next value in the innermost collection and returns its path.
    fn take_value(&mut self, mark: Marker) -> String {
        match self.stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key, .. }) => match key.take() {
                Some(k) => join(path, &k),
                // A complex (non-scalar) key: it has no path of its own.
                None => join(path, "?"),
            },
            Some(Frame::Seq { path, index }) => {
                let item = format!("{path}[{index}]");
                *index += 1;
                self.lines.entry(item.clone()).or_insert(mark.line());
                item
            }
        }
    }
}

impl MarkedEventReceiver for Walker {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(value, ..) => {
                if let Some(Frame::Map {
                    path,
                    key: key @ None,
                    seen,
                }) = self.stack.last_mut()
                {
                    let full = join(path, &value);
                    if seen.insert(value.clone()) {
                        self.lines.insert(full, mark.line());
                    } else {
                        self.duplicates.push((full, mark.line()));
                    }
                    *key = Some(value);
                } else {
                    self.take_value(mark);
                }
            }
            Event::Alias(_) => {
                self.take_value(mark);
            }
            Event::MappingStart(..) => {
                let path = self.take_value(mark);
                self.stack.push(Frame::Map {
                    path,
                    key: None,
                    seen: HashSet::new(),
                });
            }
            Event::SequenceStart(..) => {
                let path = self.take_value(mark);
                self.stack.push(Frame::Seq { path, index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_block_and_flow_keys() {
        let text = "orgs:\n  o1:\n    devices:\n      t/d1: { token: x, groups: [a, b] }\n      t/d2:\n        token: y\nlist:\n  - bind: z\n  - bind: w\n";
        let map = LineMap::new(text);
        assert_eq!(map.line("orgs"), Some(1));
        assert_eq!(map.line("orgs.o1.devices.t/d1.token"), Some(4));
        assert_eq!(map.line("orgs.o1.devices.t/d1.groups[1]"), Some(4));
        assert_eq!(map.line("orgs.o1.devices.t/d2.token"), Some(6));
        assert_eq!(map.line("list[1].bind"), Some(9));
        assert_eq!(map.line("orgs.o1.devices.t/d2.missing"), Some(5));
    }

    #[test]
    fn reports_duplicate_keys() {
        let map = LineMap::new("a: 1\nb:\n  c: 1\n  c: 2\n");
        assert_eq!(map.duplicates(), &[("b.c".to_owned(), 4)]);
    }

    #[test]
    fn deserialize_all_reports_every_problem_and_keeps_the_rest() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Item {
            bind: u32,
            #[serde(default)]
            name: Option<String>,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Doc {
            items: Vec<Item>,
            #[serde(default)]
            level: Option<u8>,
            #[serde(default)]
            keep: Option<String>,
        }
        let text = "items:\n  - bind: x\n  - bind: 2\n    nmae: b\n  - name: c\n  - bind: 4\nlevel: 300\ntypo: 1\nkeep: yes-kept\n";
        let (lines, problems, value) = deserialize_all::<Doc>(text);
        let got: Vec<_> = problems
            .iter()
            .map(|p| (p.line, p.field.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(2), "items[0].bind"),
                (Some(4), "items[1].nmae"),
                (Some(5), "items[2]"),
                (Some(7), "level"),
                (Some(8), "typo"),
            ],
            "{problems:?}"
        );
        assert!(problems[2].message.contains("missing field `bind`"));
        // The good parts are still there for the checks that follow.
        let value = value.unwrap();
        assert_eq!(value.items.len(), 2);
        assert_eq!(value.items[1].bind, 4);
        assert_eq!(lines.item_index("items", 0), 1);
        assert_eq!(lines.item_index("items", 1), 3);
        assert_eq!(lines.item_index("other", 1), 1);
        assert_eq!(value.keep.as_deref(), Some("yes-kept"));

        // A removed key is not reported again as missing.
        let (_, problems, value) = deserialize_all::<Doc>("items:\n  - bind: [1]\n");
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(value.unwrap().items.len(), 0);

        // Nothing to keep when the document itself is wrong.
        let (_, problems, value) = deserialize_all::<Doc>("level: 1\nbogus: 2\n");
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert_eq!(problems[1].field, ".");
        assert!(value.is_none());
    }

    #[test]
    fn deserialize_reports_field_and_line() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Inner {
            n: u32,
        }
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Outer {
            inner: Inner,
        }
        let err = deserialize::<Outer>("inner:\n  n: -1\n").1.unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(2), "inner.n"));
        assert!(!err.message.contains("line"), "{}", err.message);
        let err = deserialize::<Outer>("inner:\n  n: 1\n  m: 2\n")
            .1
            .unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(3), "inner.m"));
        assert!(
            err.message.starts_with("unknown field `m`"),
            "{}",
            err.message
        );
        let err = deserialize::<Outer>("inner:\n  n: 1\n  n: 2\n")
            .1
            .unwrap_err();
        assert_eq!((err.line, err.field.as_str()), (Some(3), "inner.n"));
    }
}
