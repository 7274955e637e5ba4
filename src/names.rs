//! Names that survive every broker: the reversible escape of the characters a broker rejects or
//! rewrites in topic levels and client IDs (`upstream.capabilities.escape`, see
//! [`EscapeSet`]).
//!
//! The scheme is percent-encoding restricted to the escape set: each byte of the set becomes
//! `%` and its two upper-case hex digits (`.` is `%2E`), and `%` itself becomes `%25`, so that
//! a client's own `%2E` comes back as it was sent. With an empty set nothing is escaped, `%`
//! included, and every function returns its input borrowed: Mosquitto costs nothing.
//!
//! Unescaping turns back only `%25` and the `%XX` of a byte of the set; any other `%` stays as
//! it is. So unescaping never produces `/`, `+`, `#` or a control character, which the set may
//! not hold, and a topic written by a client that is not behind the proxy is read as it is.

use std::borrow::Cow;

use crate::broker::EscapeSet;

/// The escape character.
const ESCAPE: u8 = b'%';
const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Whether `byte` is written as `%XX` under `set`.
fn needs_escape(set: EscapeSet, byte: u8) -> bool {
    byte == ESCAPE || set.contains(byte)
}

/// How many bytes `text` takes once escaped under `set`.
pub fn escaped_len(set: EscapeSet, text: &str) -> usize {
    if set.is_empty() {
        return text.len();
    }
    text.len() + 2 * text.bytes().filter(|&byte| needs_escape(set, byte)).count()
}

/// `text` with every byte of `set` (and `%`) escaped; borrowed when nothing changes.
pub fn escape(set: EscapeSet, text: &str) -> Cow<'_, str> {
    if set.is_empty() || !text.bytes().any(|byte| needs_escape(set, byte)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(escaped_len(set, text));
    for c in text.chars() {
        match u8::try_from(c) {
            Ok(byte) if needs_escape(set, byte) => {
                out.push('%');
                out.push(char::from(HEX[usize::from(byte >> 4)]));
                out.push(char::from(HEX[usize::from(byte & 0x0F)]));
            }
            _ => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The byte an escape `%XX` stands for under `set`, if it is one the proxy writes.
fn escaped_byte(set: EscapeSet, high: u8, low: u8) -> Option<u8> {
    let digit = |d: u8| match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'A'..=b'F' => Some(d - b'A' + 10),
        _ => None,
    };
    let byte = digit(high)? << 4 | digit(low)?;
    needs_escape(set, byte).then_some(byte)
}

/// `text` with the escapes of [`escape`] turned back; borrowed when nothing changes.
pub fn unescape(set: EscapeSet, text: &str) -> Cow<'_, str> {
    if set.is_empty() || !text.as_bytes().contains(&ESCAPE) {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == ESCAPE && i + 2 < bytes.len() {
            if let Some(byte) = escaped_byte(set, bytes[i + 1], bytes[i + 2]) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    // Only ASCII bytes were put in place of ASCII escapes: the text is still UTF-8.
    match String::from_utf8(out) {
        Ok(text) => Cow::Owned(text),
        Err(_) => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_and_the_escape_character_round_trip() {
        let set = EscapeSet::DOT;
        for text in [
            "temp.c", "a%2Eb", "%", "%%2", "100%", "x.%.y", "é.ü", "plain", "",
        ] {
            let escaped = escape(set, text);
            assert!(!escaped.contains('.'), "{escaped}");
            assert_eq!(escaped.len(), escaped_len(set, text));
            assert_eq!(unescape(set, &escaped), text);
        }
        assert_eq!(escape(set, "temp.c"), "temp%2Ec");
        assert_eq!(escape(set, "a%2Eb"), "a%252Eb");
    }

    #[test]
    fn an_empty_set_changes_nothing_and_borrows() {
        for text in ["temp.c", "a%2Eb"] {
            assert!(matches!(escape(EscapeSet::NONE, text), Cow::Borrowed(_)));
            assert!(matches!(unescape(EscapeSet::NONE, text), Cow::Borrowed(_)));
        }
        assert!(matches!(escape(EscapeSet::DOT, "no-dot"), Cow::Borrowed(_)));
    }

    #[test]
    fn foreign_percent_signs_are_read_as_they_are() {
        let set = EscapeSet::DOT;
        // `%2F` would be a `/`, which is never escaped: it stays text.
        assert_eq!(unescape(set, "a%2Fb%zz%2"), "a%2Fb%zz%2");
        assert_eq!(unescape(set, "a%2eb"), "a%2eb");
    }
}
