//! The session ledger, for crash recovery: which sessions this proxy process holds, kept on the
//! broker, which is the proxy's only storage.
//!
//! Every ledger topic is read back by its exact name: RabbitMQ 3.x delivers retained messages
//! only to filters without wildcards, so the ledger never relies on a wildcard subscription.
//! Topics, under [`LEDGER_ROOT`] and the instance's namespace `NS` (stable across restarts):
//!
//! - `NS/boots`: the *index*, retained: the processes (one boot ID a line) whose entries may be
//!   on the broker. A starting process rewrites it once it has settled the dead ones.
//! - `NS/BOOT`: a process's *marker*, retained while the process is alive. The control
//!   connection publishes it on every connect and sets an empty retained will on the same topic,
//!   so the broker clears it when the process dies; a clean shutdown clears it too.
//! - `NS/BOOT/slots`: how many entry slots the process ever used, retained (it only grows).
//! - `NS/BOOT/s/N`: the *entry* in slot `N`, retained, holding what the profile needs to settle
//!   the session ([`crate::profile::Profile::settlement`]); cleared when the session closes,
//!   and the slot is used again by a later session, so `slots` is the most sessions the
//!   process held at once.
//! - `NS/BOOT/sentinel`: published (not retained) by a starting process after its
//!   subscriptions were acknowledged; the broker delivers it after the retained messages, so it
//!   marks their end.
//!
//! A starting process reads the index, then the markers and slot counts of the processes in it,
//! then the entries of those whose marker is gone, and settles them: the profile's status
//! messages are published (unless a connection with the same presence is live again here) and
//! the entry is cleared. Processes that are alive, such as a second instance sharing the
//! namespace, are left alone and stay in the index.
//!
//! Every level is made of ASCII letters, digits, `_`, `-` and `:` ([`level`]): NATS refuses
//! `.` in topics and RabbitMQ turns it into `/`. `warden:ledger` cannot collide with a tenant's
//! space: `:` is not allowed in org IDs, and tenants live under their own mount prefix.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::profile::{Publication, Settlement};

/// The first topic level of every ledger topic.
pub const LEDGER_ROOT: &str = "warden:ledger";
/// The last level of the sentinel topic.
const SENTINEL: &str = "sentinel";
/// The last level of the index topic.
const INDEX: &str = "boots";
/// The last level of a process's slot count.
const SLOTS: &str = "slots";
/// The level in front of an entry's slot number.
const SLOT: &str = "s";

/// This process's place in the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    namespace: String,
    boot: String,
    slots: Arc<Mutex<Slots>>,
}

/// Which slot each live session's entry is in.
#[derive(Debug, Default)]
struct Slots {
    by_session: HashMap<String, u32>,
    free: BTreeSet<u32>,
    used: u32,
}

/// What a recovery does next: read more retained messages (exact topics), or publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the retained messages of these topics, then call again with everything found.
    Read(Vec<String>),
    /// Recovery is over: publish these.
    Done(Vec<Publication>),
}

/// A topic level made safe on every supported broker: anything but ASCII letters, digits, `_`,
/// `-` and `:` becomes `_`. The one place ledger levels are built from outside text.
pub fn level(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Ledger {
    /// The ledger of instance `namespace`, for the process `boot` (unique per process).
    pub fn new(namespace: &str, boot: &str) -> Ledger {
        Ledger {
            namespace: level(namespace),
            boot: level(boot),
            slots: Arc::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slots> {
        // Every update leaves the table consistent; a poisoned one is still usable.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The ledger topic `NS/rest`.
    fn topic(&self, rest: &str) -> String {
        format!("{LEDGER_ROOT}/{}/{rest}", self.namespace)
    }

    /// The topic recovery publishes to learn that every retained message was delivered.
    pub fn sentinel_topic(&self) -> String {
        self.topic(&format!("{}/{SENTINEL}", self.boot))
    }

    fn marker_topic(&self, boot: &str) -> String {
        self.topic(boot)
    }

    fn slots_topic(&self, boot: &str) -> String {
        self.topic(&format!("{boot}/{SLOTS}"))
    }

    fn entry_topic(&self, boot: &str, slot: u32) -> String {
        self.topic(&format!("{boot}/{SLOT}/{slot}"))
    }

    /// This process's marker: retained while it lives.
    pub fn marker(&self) -> Publication {
        retained(self.marker_topic(&self.boot), "alive")
    }

    /// The marker's clearing: the control connection's will, and the last word of a shutdown.
    pub fn marker_clear(&self) -> Publication {
        retained(self.marker_topic(&self.boot), "")
    }

    /// The retained entry of an established session, preceded by the slot count when the
    /// entry needs a new slot.
    pub fn entry(
        &self,
        _client_id: &str,
        session: impl Display,
        settlement: Vec<u8>,
    ) -> Vec<Publication> {
        let mut out = Vec::with_capacity(2);
        let slot = {
            let mut slots = self.lock();
            let slot = match slots.free.pop_first() {
                Some(slot) => slot,
                None => {
                    slots.used += 1;
                    out.push(retained(
                        self.slots_topic(&self.boot),
                        slots.used.to_string(),
                    ));
                    slots.used - 1
                }
            };
            slots.by_session.insert(session.to_string(), slot);
            slot
        };
        out.push(Publication {
            topic: self.entry_topic(&self.boot, slot),
            payload: settlement.into(),
            retain: true,
        });
        out
    }

    /// Clears a session's entry and frees its slot (`None` for a session without an entry).
    pub fn clear(&self, _client_id: &str, session: impl Display) -> Option<Publication> {
        let mut slots = self.lock();
        let slot = slots.by_session.remove(&session.to_string())?;
        slots.free.insert(slot);
        Some(retained(self.entry_topic(&self.boot, slot), ""))
    }

    /// One round of recovery (see the module documentation). `round` counts from 0 and `found`
    /// holds every retained message (topic, payload) read in the earlier rounds. `settle` reads
    /// an entry, `is_live` says whether a presence key has a live connection here.
    pub fn recover(
        &self,
        round: usize,
        found: &[(String, Vec<u8>)],
        settle: impl Fn(&[u8]) -> Option<Settlement>,
        is_live: impl Fn(&str) -> bool,
    ) -> Step {
        let index_topic = self.topic(INDEX);
        if round == 0 {
            return Step::Read(vec![index_topic]);
        }
        let value = |topic: &str| -> Option<&[u8]> {
            found
                .iter()
                .rev()
                .find(|(t, _)| t == topic)
                .map(|(_, payload)| payload.as_slice())
                .filter(|payload| !payload.is_empty())
        };
        let boots: Vec<String> = value(&index_topic)
            .map(|index| {
                String::from_utf8_lossy(index)
                    .lines()
                    .map(level)
                    .filter(|boot| !boot.is_empty() && *boot != self.boot)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        if round == 1 {
            let topics: Vec<String> = boots
                .iter()
                .flat_map(|boot| [self.marker_topic(boot), self.slots_topic(boot)])
                .collect();
            if !topics.is_empty() {
                return Step::Read(topics);
            }
        }
        let alive = |boot: &String| value(&self.marker_topic(boot)).is_some();
        let used = |boot: &String| -> u32 {
            value(&self.slots_topic(boot))
                .and_then(|count| std::str::from_utf8(count).ok()?.trim().parse().ok())
                .unwrap_or(0)
        };
        let dead: Vec<&String> = boots.iter().filter(|boot| !alive(boot)).collect();
        if round == 2 {
            let topics: Vec<String> = dead
                .iter()
                .flat_map(|boot| (0..used(boot)).map(|slot| self.entry_topic(boot, slot)))
                .collect();
            if !topics.is_empty() {
                return Step::Read(topics);
            }
        }
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for boot in &dead {
            for slot in 0..used(boot) {
                let topic = self.entry_topic(boot, slot);
                let Some(entry) = value(&topic) else { continue };
                if !seen.insert(topic.clone()) {
                    continue;
                }
                if let Some(settlement) = settle(entry) {
                    if !is_live(&settlement.presence) {
                        out.extend(settlement.publications);
                    }
                }
                out.push(retained(topic, ""));
            }
            out.push(retained(self.slots_topic(boot), ""));
        }
        let mut index: Vec<&str> = boots
            .iter()
            .filter(|boot| alive(boot))
            .map(String::as_str)
            .collect();
        index.push(&self.boot);
        out.push(retained(index_topic, index.join("\n")));
        Step::Done(out)
    }
}

fn retained(topic: String, payload: impl Into<String>) -> Publication {
    Publication {
        topic,
        payload: payload.into().into_bytes().into(),
        retain: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settle(entry: &[u8]) -> Option<Settlement> {
        let presence = std::str::from_utf8(entry).ok()?.to_owned();
        Some(Settlement {
            publications: vec![Publication {
                topic: format!("status/{presence}"),
                payload: "Disconnect".into(),
                retain: true,
            }],
            presence,
        })
    }

    /// A broker's retained store: what each round reads back.
    #[derive(Default)]
    struct Retained(HashMap<String, Vec<u8>>);

    impl Retained {
        fn publish(&mut self, publications: &[Publication]) {
            for p in publications {
                if p.payload.is_empty() {
                    self.0.remove(&p.topic);
                } else {
                    self.0.insert(p.topic.clone(), p.payload.to_vec());
                }
            }
        }

        /// Runs a whole recovery of `ledger` as the monitor does, reading exact topics only.
        fn recover(&mut self, ledger: &Ledger, is_live: impl Fn(&str) -> bool) -> Vec<Publication> {
            let mut found = Vec::new();
            for round in 0.. {
                match ledger.recover(round, &found, settle, &is_live) {
                    Step::Read(topics) => {
                        for topic in topics {
                            if let Some(payload) = self.0.get(&topic) {
                                found.push((topic, payload.clone()));
                            }
                        }
                    }
                    Step::Done(out) => {
                        self.publish(&out);
                        return out;
                    }
                }
            }
            unreachable!()
        }
    }

    fn statuses(out: &[Publication]) -> Vec<&str> {
        out.iter()
            .filter(|p| p.topic.starts_with("status/"))
            .map(|p| p.topic.as_str())
            .collect()
    }

    #[test]
    fn a_dead_process_entries_are_settled_and_cleared() {
        let mut broker = Retained::default();
        let before_crash = Ledger::new("proxy-a", "boot1");
        broker.recover(&before_crash, |_| false);
        broker.publish(&[before_crash.marker()]);
        broker.publish(&before_crash.entry("d:o:t:1", 7, b"d:o:t:1".to_vec()));
        broker.publish(&before_crash.entry("d:o:t:2", 8, b"d:o:t:2".to_vec()));
        broker.publish(&before_crash.entry("d:o:t:3", 9, b"d:o:t:3".to_vec()));
        // Session 8 closed; its slot is used again by session 10.
        broker.publish(&[before_crash.clear("d:o:t:2", 8).unwrap()]);
        let reused = before_crash.entry("d:o:t:4", 10, b"d:o:t:4".to_vec());
        assert_eq!(reused.len(), 1, "no new slot, so no new slot count");
        broker.publish(&reused);
        // The crash: the will clears the marker.
        broker.publish(&[before_crash.marker_clear()]);

        let after_restart = Ledger::new("proxy-a", "boot2");
        let out = broker.recover(&after_restart, |_| false);
        let mut settled = statuses(&out);
        settled.sort_unstable();
        assert_eq!(
            settled,
            ["status/d:o:t:1", "status/d:o:t:3", "status/d:o:t:4"]
        );
        // Only the index is left of the ledger, naming the new process.
        let ledger_topics = |broker: &Retained| {
            broker
                .0
                .keys()
                .filter(|t| t.starts_with(LEDGER_ROOT))
                .count()
        };
        assert_eq!(ledger_topics(&broker), 1, "{:?}", broker.0.keys());
        assert_eq!(
            broker
                .0
                .get("warden:ledger/proxy-a/boots")
                .map(Vec::as_slice),
            Some(&b"boot2"[..])
        );
    }

    #[test]
    fn a_client_connected_again_only_has_its_stale_entry_cleared() {
        let mut broker = Retained::default();
        let before_crash = Ledger::new("proxy-a", "boot1");
        broker.recover(&before_crash, |_| false);
        broker.publish(&before_crash.entry("d:o:t:1", 1, b"d:o:t:1".to_vec()));
        let out = broker.recover(&Ledger::new("proxy-a", "boot2"), |_| true);
        assert!(statuses(&out).is_empty());
        assert_eq!(broker.0.len(), 1, "only the index is left");
    }

    #[test]
    fn entries_of_a_live_process_are_left_alone() {
        let mut broker = Retained::default();
        let sibling = Ledger::new("shared", "boot1");
        broker.recover(&sibling, |_| false);
        broker.publish(&[sibling.marker()]);
        broker.publish(&sibling.entry("d:o:t:i", 1, b"d:o:t:i".to_vec()));
        let starting = Ledger::new("shared", "boot2");
        assert!(statuses(&broker.recover(&starting, |_| false)).is_empty());
        assert_eq!(
            broker
                .0
                .get("warden:ledger/shared/boots")
                .map(Vec::as_slice),
            Some(&b"boot1\nboot2"[..])
        );
        // Once the sibling's marker is cleared (its will), a third process settles its entries.
        broker.publish(&[sibling.marker_clear(), starting.marker()]);
        let third = Ledger::new("shared", "boot3");
        assert_eq!(
            statuses(&broker.recover(&third, |_| false)),
            ["status/d:o:t:i"]
        );
        assert_eq!(
            broker
                .0
                .get("warden:ledger/shared/boots")
                .map(Vec::as_slice),
            Some(&b"boot2\nboot3"[..])
        );
    }

    #[test]
    fn levels_hold_no_separator_wildcard_or_dot() {
        let ledger = Ledger::new("mqtt-warden-127.0.0.1_1883/+", "b#");
        assert_eq!(
            ledger.marker().topic,
            "warden:ledger/mqtt-warden-127_0_0_1_1883__/b_"
        );
        let entry = ledger.entry("a/b+c#.d", 1, Vec::new());
        assert!(entry
            .iter()
            .all(|p| !p.topic.contains('.') && p.topic.split('/').count() <= 5));
    }
}
