//! YAML helpers shared by the policy loader and the process config: deserialise with the field
//! path and line of the first error, and find the line of any key afterwards, so that checks run
//! after deserialisation still point at the right line.
//!
//! Field paths are written as `orgs.myorg1.devices.sensor/dev001.token`, with sequence items as
//! `listeners[0].bind`, the form `serde_path_to_error` prints.

use std::collections::{HashMap, HashSet};

use serde::de::DeserializeOwned;
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
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let field = err.path().to_string();
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
        YamlProblem {
            line,
            field,
            message,
        }
    })
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
