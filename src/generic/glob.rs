//! Client-ID patterns of a tenant's users: `*` stands for any bytes (none included), `?` for
//! exactly one byte; everything else is literal.

/// Whether `text` matches `pattern`. Linear backtracking on the last `*`: no recursion, no
/// allocation, so a long client ID cannot make it slow.
pub fn matches(pattern: &str, text: &str) -> bool {
    let pattern: &[u8] = pattern.as_bytes();
    let text: &[u8] = text.as_bytes();
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((star_p, star_t)) => {
                    p = star_p + 1;
                    t = star_t + 1;
                    star = Some((star_p, star_t + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_and_question_marks() {
        assert!(matches("alice-*", "alice-1"));
        assert!(matches("alice-*", "alice-"));
        assert!(!matches("alice-*", "bob-1"));
        assert!(matches("*-sensor-?", "lab-sensor-7"));
        assert!(!matches("*-sensor-?", "lab-sensor-17"));
        assert!(matches("exact", "exact"));
        assert!(!matches("exact", "exact2"));
        assert!(matches("*", ""));
        assert!(matches("a*b*c", "a-x-b-y-c"));
        assert!(!matches("a*b*c", "a-x-c-y-b"));
    }
}
