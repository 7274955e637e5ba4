//! The topic rewrite between a client's form and the broker's form.
//!
//! A profile builds one [`TopicMap`] per session at CONNECT; the session applies it to every
//! topic and filter in both directions. Upstream, a client topic that starts with `client_strip`
//! has it replaced by `broker_add`, and every filter also gets `filter_prefix` in front (a shared
//! subscription group such as `$share/GROUP/`). Downstream, a broker topic that starts with
//! `broker_add` has it replaced by `client_strip`; any other topic is not the client's.
//!
//! A map made [`TopicMap::with_client_shares`] keeps a client's own `$share/GROUP/` in front of
//! the broker prefix, so that a shared subscription's group lives inside the client's space.
//!
//! A map made [`TopicMap::escaping`] also escapes, in the broker form, the characters the broker
//! rejects or rewrites (see [`crate::names`]): the broker prefix once, when the map is made, and
//! the client's part of each topic on its way up; a delivery's topic is unescaped on its way
//! back, so the client sees the topic as it was published.
//!
//! Rewriting is two or three slices written one after the other into the output buffer, never a
//! `format!`. Without escaping, or when a topic holds nothing to escape, the slices borrow from
//! the map and the packet, so the data path does not allocate. The broker form is checked
//! against MQTT's limits, which the client form alone does not guarantee: at most 65,535 bytes
//! and at most [`MAX_TOPIC_LEVELS`] levels.

use std::borrow::Cow;

use thiserror::Error;

use crate::broker::EscapeSet;
use crate::codec::MAX_TOPIC_LEVELS;
use crate::names::{escape, escaped_len, unescape};

/// The longest topic name or filter MQTT can carry, in bytes (a two-byte length).
pub const MAX_TOPIC_BYTES: usize = 65_535;

/// Why a client topic has no broker form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum RewriteError {
    /// The topic does not start with what this client must write.
    #[error("topic outside the client's namespace")]
    Outside,
    /// The broker form would be longer than 65,535 bytes.
    #[error("topic longer than 65535 bytes with the broker prefix")]
    TooLong,
    /// The broker form would have more levels than the broker accepts.
    #[error("topic with too many levels with the broker prefix")]
    TooDeep,
}

/// A session's topic rewrite (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopicMap {
    client_strip: Box<str>,
    broker_add: Box<str>,
    filter_prefix: Box<str>,
    /// Topic separators in `broker_add`: levels a broker topic has besides those of the rest.
    broker_add_separators: usize,
    /// A client filter's `$share/GROUP/` goes in front of the broker prefix.
    client_shares: bool,
    /// Characters escaped in the broker form ([`crate::names`]).
    escaped: EscapeSet,
}

/// A part of a broker topic: borrowed, unless it had to be escaped.
pub type Part<'a> = Cow<'a, [u8]>;

fn part(text: Cow<'_, str>) -> Part<'_> {
    match text {
        Cow::Borrowed(text) => Cow::Borrowed(text.as_bytes()),
        Cow::Owned(text) => Cow::Owned(text.into_bytes()),
    }
}

/// The parts as slices, as the encoders take them.
pub fn slices<'a, const N: usize>(parts: &'a [Part<'_>; N]) -> [&'a [u8]; N] {
    parts.each_ref().map(|part| &**part)
}

impl TopicMap {
    /// A rewrite that replaces `client_strip` by `broker_add`, with `filter_prefix` in front of
    /// every filter.
    pub fn new(client_strip: &str, broker_add: &str, filter_prefix: &str) -> TopicMap {
        TopicMap {
            client_strip: client_strip.into(),
            broker_add: broker_add.into(),
            filter_prefix: filter_prefix.into(),
            broker_add_separators: broker_add.bytes().filter(|&b| b == b'/').count(),
            client_shares: false,
            escaped: EscapeSet::NONE,
        }
    }

    /// The same rewrite, escaping the characters of `set` in the broker form (the broker
    /// prefix, a shared subscription's group, and the client's part of every topic).
    pub fn escaping(mut self, set: EscapeSet) -> TopicMap {
        if set.is_empty() {
            return self;
        }
        self.broker_add = escape(set, &self.broker_add).into();
        self.filter_prefix = escape(set, &self.filter_prefix).into();
        self.escaped = set;
        self
    }

    /// The characters escaped in the broker form.
    pub fn escaped(&self) -> EscapeSet {
        self.escaped
    }

    /// The same rewrite, keeping a client filter's `$share/GROUP/` in front of the broker prefix.
    pub fn with_client_shares(mut self) -> TopicMap {
        self.client_shares = true;
        self
    }

    /// A client filter as its share part (`$share/GROUP/`, or the map's filter prefix) and the
    /// filter itself.
    fn split_share<'a>(&'a self, client_filter: &'a str) -> (Cow<'a, str>, &'a str) {
        if self.client_shares {
            if let Some(rest) = client_filter.strip_prefix("$share/") {
                if let Some(slash) = rest.find('/') {
                    let cut = "$share/".len() + slash + 1;
                    return (
                        escape(self.escaped, &client_filter[..cut]),
                        &client_filter[cut..],
                    );
                }
            }
        }
        (Cow::Borrowed(&self.filter_prefix), client_filter)
    }

    /// What the broker has in front of every topic of this client.
    pub fn broker_prefix(&self) -> &str {
        &self.broker_add
    }

    /// Whether filters go to the broker as shared subscriptions (`$share/GROUP/...`).
    pub fn is_shared(&self) -> bool {
        self.filter_prefix.starts_with("$share/")
    }

    /// How many bytes longer a topic is on the broker than at the client (filters: plus the
    /// filter prefix).
    pub fn expansion(&self) -> usize {
        self.broker_add
            .len()
            .saturating_sub(self.client_strip.len())
    }

    /// The broker form of a client topic name as two parts.
    pub fn to_broker<'a>(&'a self, client_topic: &'a str) -> Result<[Part<'a>; 2], RewriteError> {
        let rest = self.rest_of(client_topic, 0)?;
        Ok([
            Cow::Borrowed(self.broker_add.as_bytes()),
            part(escape(self.escaped, rest)),
        ])
    }

    /// The broker form of a client filter as three parts: the filter prefix, the broker prefix
    /// and the rest.
    pub fn filter_to_broker<'a>(
        &'a self,
        client_filter: &'a str,
    ) -> Result<[Part<'a>; 3], RewriteError> {
        let (share, client_filter) = self.split_share(client_filter);
        let rest = self.rest_of(client_filter, share.len())?;
        Ok([
            part(share),
            Cow::Borrowed(self.broker_add.as_bytes()),
            part(escape(self.escaped, rest)),
        ])
    }

    /// The broker form of a filter of an UNSUBSCRIBE: as [`TopicMap::filter_to_broker`], except
    /// that a filter outside the client's form is put whole behind the broker prefix. It can
    /// name nothing the client subscribed to, and it stays inside the client's space, so it can
    /// never touch another's.
    pub fn unsubscribe_to_broker<'a>(
        &'a self,
        client_filter: &'a str,
    ) -> Result<[Part<'a>; 3], RewriteError> {
        match self.filter_to_broker(client_filter) {
            Err(RewriteError::Outside) => {
                let (share, client_filter) = self.split_share(client_filter);
                self.check_fits(share.len(), client_filter)?;
                Ok([
                    part(share),
                    Cow::Borrowed(self.broker_add.as_bytes()),
                    part(escape(self.escaped, client_filter)),
                ])
            }
            other => other,
        }
    }

    /// The broker form of a client topic as one string (CONNECT-time use, such as will topics).
    pub fn to_broker_string(&self, client_topic: &str) -> Result<String, RewriteError> {
        let rest = escape(self.escaped, self.rest_of(client_topic, 0)?);
        let mut topic = String::with_capacity(self.broker_add.len() + rest.len());
        topic.push_str(&self.broker_add);
        topic.push_str(&rest);
        Ok(topic)
    }

    /// The client form of a broker topic as two parts, or `None` when the topic is not in this
    /// client's space or has no valid client form (it is then never delivered).
    pub fn to_client<'a>(&'a self, broker_topic: &'a str) -> Option<[Part<'a>; 2]> {
        let rest = self.client_rest(broker_topic)?;
        Some([Cow::Borrowed(self.client_strip.as_bytes()), part(rest)])
    }

    /// The part of a broker topic in this client's space that follows the broker prefix, in the
    /// client's form (unescaped), or `None` as for [`TopicMap::to_client`].
    pub fn client_rest<'a>(&'a self, broker_topic: &'a str) -> Option<Cow<'a, str>> {
        let rest = unescape(self.escaped, broker_topic.strip_prefix(&*self.broker_add)?);
        // The bare prefix would be an empty topic for the client, which MQTT forbids.
        if rest.is_empty() || self.client_strip.len() + rest.len() > MAX_TOPIC_BYTES {
            return None;
        }
        Some(rest)
    }

    /// What the client writes in front of its topics in place of the broker prefix.
    pub fn client_strip(&self) -> &str {
        &self.client_strip
    }

    /// The part of a client topic or filter that follows `client_strip`, once the broker form
    /// (with `extra` bytes in front) is known to fit MQTT's limits.
    fn rest_of<'a>(&self, client: &'a str, extra: usize) -> Result<&'a str, RewriteError> {
        let rest = client
            .strip_prefix(&*self.client_strip)
            .ok_or(RewriteError::Outside)?;
        self.check_fits(extra, rest)?;
        Ok(rest)
    }

    /// Whether `extra` bytes, the broker prefix and `rest` make a topic within MQTT's limits.
    fn check_fits(&self, extra: usize, rest: &str) -> Result<(), RewriteError> {
        if extra + self.broker_add.len() + escaped_len(self.escaped, rest) > MAX_TOPIC_BYTES {
            return Err(RewriteError::TooLong);
        }
        // A topic has at most one level more than it has bytes, so short topics need no count.
        let most_levels = self.broker_add_separators + rest.len() + 1;
        if most_levels > MAX_TOPIC_LEVELS {
            let levels =
                self.broker_add_separators + rest.bytes().filter(|&b| b == b'/').count() + 1;
            if levels > MAX_TOPIC_LEVELS {
                return Err(RewriteError::TooDeep);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined<const N: usize>(parts: [Part<'_>; N]) -> String {
        String::from_utf8(parts.concat()).unwrap()
    }

    #[test]
    fn swaps_prefixes_both_ways() {
        let map = TopicMap::new("iot-2/", "org1/iot-2/type/t/id/i/", "");
        let broker = joined(map.to_broker("iot-2/evt/e/fmt/f").unwrap());
        assert_eq!(broker, "org1/iot-2/type/t/id/i/evt/e/fmt/f");
        assert_eq!(joined(map.to_client(&broker).unwrap()), "iot-2/evt/e/fmt/f");
        assert_eq!(map.to_broker("other/x"), Err(RewriteError::Outside));
        assert_eq!(map.to_client("org2/iot-2/type/t/id/i/cmd/c/fmt/f"), None);
    }

    #[test]
    fn filters_get_the_filter_prefix() {
        let map = TopicMap::new("", "org1/", "$share/g/");
        assert!(map.is_shared());
        assert_eq!(
            joined(map.filter_to_broker("iot-2/app/+/mon").unwrap()),
            "$share/g/org1/iot-2/app/+/mon"
        );
    }

    #[test]
    fn client_shares_stay_in_front_of_the_prefix() {
        let map = TopicMap::new("", "lab/", "").with_client_shares();
        assert!(!map.is_shared());
        assert_eq!(
            joined(map.filter_to_broker("$share/g1/a/+").unwrap()),
            "$share/g1/lab/a/+"
        );
        assert_eq!(joined(map.filter_to_broker("a/#").unwrap()), "lab/a/#");
        assert_eq!(
            joined(map.unsubscribe_to_broker("$share/g1/a/+").unwrap()),
            "$share/g1/lab/a/+"
        );
        // Without the option, `$share` is a topic like any other, inside the prefix.
        let plain = TopicMap::new("", "lab/", "");
        assert_eq!(
            joined(plain.filter_to_broker("$share/g1/a").unwrap()),
            "lab/$share/g1/a"
        );
    }

    #[test]
    fn escaping_is_reversed_on_the_way_back() {
        let map = TopicMap::new("iot-2/", "org1/iot-2/type/t.1/id/d.1/", "$share/wiotp.a.b/")
            .escaping(EscapeSet::DOT);
        let broker = joined(map.to_broker("iot-2/evt/temp.c/fmt/json").unwrap());
        assert_eq!(
            broker,
            "org1/iot-2/type/t%2E1/id/d%2E1/evt/temp%2Ec/fmt/json"
        );
        assert_eq!(
            joined(map.to_client(&broker).unwrap()),
            "iot-2/evt/temp.c/fmt/json"
        );
        assert_eq!(
            joined(map.filter_to_broker("iot-2/cmd/+/fmt/a.b").unwrap()),
            "$share/wiotp%2Ea%2Eb/org1/iot-2/type/t%2E1/id/d%2E1/cmd/+/fmt/a%2Eb"
        );
        // A client's own `%` survives the trip.
        let broker = map.to_broker_string("iot-2/evt/100%/fmt/json").unwrap();
        assert_eq!(broker, "org1/iot-2/type/t%2E1/id/d%2E1/evt/100%25/fmt/json");
        assert_eq!(
            joined(map.to_client(&broker).unwrap()),
            "iot-2/evt/100%/fmt/json"
        );
        // Escaping counts against MQTT's length limit.
        let dots = ".".repeat(MAX_TOPIC_BYTES / 3);
        assert_eq!(
            map.to_broker(&format!("iot-2/{dots}")),
            Err(RewriteError::TooLong)
        );
    }

    #[test]
    fn without_escaping_every_part_is_borrowed() {
        let map =
            TopicMap::new("iot-2/", "org1/iot-2/type/t.1/id/d.1/", "").escaping(EscapeSet::NONE);
        let parts = map.to_broker("iot-2/evt/temp.c/fmt/json").unwrap();
        assert!(parts.iter().all(|part| matches!(part, Cow::Borrowed(_))));
        let parts = map.to_client("org1/iot-2/type/t.1/id/d.1/evt/a.b").unwrap();
        assert!(parts.iter().all(|part| matches!(part, Cow::Borrowed(_))));
    }

    #[test]
    fn the_bare_prefix_is_no_client_topic() {
        let map = TopicMap::new("", "org1/", "");
        assert_eq!(map.to_client("org1/"), None);
        assert_eq!(map.to_client("org1"), None);
    }

    #[test]
    fn the_broker_form_must_fit_mqtt() {
        let map = TopicMap::new("", "org1/", "$share/g/");
        let long = "a".repeat(MAX_TOPIC_BYTES - "org1/".len());
        assert!(map.to_broker(&long).is_ok());
        let too_long = "a".repeat(MAX_TOPIC_BYTES - "org1/".len() + 1);
        assert_eq!(map.to_broker(&too_long), Err(RewriteError::TooLong));
        assert_eq!(map.filter_to_broker(&long), Err(RewriteError::TooLong));

        let deep = vec!["l"; MAX_TOPIC_LEVELS - 1].join("/");
        assert!(map.to_broker(&deep).is_ok());
        let too_deep = vec!["l"; MAX_TOPIC_LEVELS].join("/");
        assert_eq!(map.to_broker(&too_deep), Err(RewriteError::TooDeep));
    }
}
