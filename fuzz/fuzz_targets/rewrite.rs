//! The topic rewrite in both directions (`TopicRewrite`), for an arbitrary prefix template, client
//! ID and client topic or filter.
//!
//! Input: three lines, `TEMPLATE\nCLIENT_ID\nTOPIC` (the topic is the rest, newlines included).
//! The template is used only when the config would accept it (contains `{org}`, ends with `/`,
//! no `+`, `#` or U+0000), the client ID only when it parses.
//!
//! Asserted, for a client topic (or filter) that `check_topic_name` (or `check_topic_filter`)
//! accepts and that `to_broker` maps: the broker form maps back with `to_client` to the same
//! bytes, is never empty, and is at most `expansion()` bytes longer.
//!
//! Recorded, not asserted (known, to be fixed in the rewrite's next form): a broker form over
//! 65,535 bytes or over `MAX_TOPIC_LEVELS` levels. The first input of each kind is printed to
//! stderr; with `REWRITE_FINDINGS=DIR` the first 20 of each kind are also written to DIR.
//!
//! Kept small on purpose: it is to be ported to the generic rewrite.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use mqtt_warden::codec::{check_topic_filter, check_topic_name, MAX_TOPIC_LEVELS};
use mqtt_warden::identity::parse_client_id;
use mqtt_warden::topics::TopicRewrite;

/// The longest topic a UTF-8 Encoded String can carry.
const MAX_TOPIC_BYTES: usize = 65_535;

/// How many inputs of each kind are written to `$REWRITE_FINDINGS` (the fuzzer finds thousands).
const FINDINGS_KEPT: usize = 20;

static SEEN_TOO_LONG: AtomicUsize = AtomicUsize::new(0);
static SEEN_TOO_DEEP: AtomicUsize = AtomicUsize::new(0);

/// The rule `config.rs` applies to `upstream.topic_prefix`.
fn template_accepted(template: &str) -> bool {
    template.contains("{org}") && template.ends_with('/') && !template.contains(['+', '#', '\0'])
}

fn finding(kind: &str, seen: &AtomicUsize, data: &[u8], broker_len: usize, levels: usize) {
    let count = seen.fetch_add(1, Ordering::Relaxed);
    if count == 0 {
        eprintln!("FINDING rewrite {kind}: broker form of {broker_len} bytes, {levels} levels");
    }
    if count >= FINDINGS_KEPT {
        return;
    }
    if let Ok(dir) = std::env::var("REWRITE_FINDINGS") {
        let name = format!("{kind}-{:016x}", fnv1a(data));
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::write(std::path::Path::new(&dir).join(name), data);
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check(rewrite: &TopicRewrite, client: &str, data: &[u8]) {
    let Some(parts) = rewrite.to_broker(client) else {
        return;
    };
    let broker = parts.concat();
    assert!(!broker.is_empty(), "empty broker topic for {client:?}");
    assert!(
        broker.len() <= client.len() + rewrite.expansion(),
        "expansion() understates the growth"
    );
    let broker = std::str::from_utf8(&broker).expect("broker form is UTF-8");
    let back = rewrite
        .to_client(broker)
        .expect("broker form maps back to the client");
    assert_eq!(
        back.concat(),
        client.as_bytes(),
        "round trip changes the topic"
    );
    let levels = broker.split('/').count();
    if broker.len() > MAX_TOPIC_BYTES {
        finding("too-long", &SEEN_TOO_LONG, data, broker.len(), levels);
    }
    if levels > MAX_TOPIC_LEVELS {
        finding("too-deep", &SEEN_TOO_DEEP, data, broker.len(), levels);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.splitn(3, '\n');
    let (Some(template), Some(client_id), Some(client)) =
        (lines.next(), lines.next(), lines.next())
    else {
        return;
    };
    if !template_accepted(template) {
        return;
    }
    let Ok(identity) = parse_client_id(client_id) else {
        return;
    };
    let rewrite = TopicRewrite::for_identity(&identity, template);
    if check_topic_name(client).is_ok() || check_topic_filter(client).is_ok() {
        check(&rewrite, client, data);
    }
});
