//! The session ledger, for crash recovery: which sessions this proxy process holds, kept on the
//! broker, which is the proxy's only storage.
//!
//! Topics, under [`LEDGER_ROOT`] and the instance's namespace `NS` (stable across restarts):
//!
//! - `NS/BOOT`: a process's *marker*, retained while the process is alive. The control
//!   connection publishes it on every connect and sets an empty retained will on the same topic,
//!   so the broker clears it when the process dies; a clean shutdown clears it too.
//! - `NS/BOOT/CLIENT/SESSION`: an *entry* per established session, retained, holding what the
//!   profile needs to settle the session ([`crate::profile::Profile::settlement`]); cleared
//!   when the session closes.
//! - `NS/BOOT/sentinel`: published (not retained) by a starting process after it subscribed to
//!   `NS/#`; the broker delivers it after the retained messages, so it marks their end.
//!
//! A starting process reads every marker and entry back. Entries of a process whose marker is
//! gone are settled: the profile's status messages are published (unless a connection with the
//! same presence is live again here) and the entry is cleared. Entries of processes that are
//! alive, such as a second instance sharing the namespace, are left alone.
//!
//! `warden:ledger` cannot collide with a tenant's space: `:` is not allowed in org IDs, and
//! tenants live under their own mount prefix.

use std::collections::HashSet;
use std::fmt::Display;

use crate::profile::{Publication, Settlement};

/// The first topic level of every ledger topic.
pub const LEDGER_ROOT: &str = "warden:ledger";
/// The last level of the sentinel topic.
const SENTINEL: &str = "sentinel";

/// This process's place in the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    namespace: String,
    boot: String,
}

/// A topic level made safe: no separators or wildcards.
fn level(text: &str) -> String {
    text.replace(['/', '+', '#'], "_")
}

impl Ledger {
    /// The ledger of instance `namespace`, for the process `boot` (unique per process).
    pub fn new(namespace: &str, boot: &str) -> Ledger {
        Ledger {
            namespace: level(namespace),
            boot: level(boot),
        }
    }

    /// The filter that covers every marker and entry of this namespace.
    pub fn filter(&self) -> String {
        format!("{LEDGER_ROOT}/{}/#", self.namespace)
    }

    /// The topic recovery publishes to learn that every retained message was delivered.
    pub fn sentinel_topic(&self) -> String {
        format!("{LEDGER_ROOT}/{}/{}/{SENTINEL}", self.namespace, self.boot)
    }

    fn marker_topic(&self) -> String {
        format!("{LEDGER_ROOT}/{}/{}", self.namespace, self.boot)
    }

    /// This process's marker: retained while it lives.
    pub fn marker(&self) -> Publication {
        Publication {
            topic: self.marker_topic(),
            payload: "alive".into(),
            retain: true,
        }
    }

    /// The marker's clearing: the control connection's will, and the last word of a shutdown.
    pub fn marker_clear(&self) -> Publication {
        Publication {
            topic: self.marker_topic(),
            payload: Default::default(),
            retain: true,
        }
    }

    fn topic(&self, client_id: &str, session: &dyn Display) -> String {
        format!(
            "{LEDGER_ROOT}/{}/{}/{}/{session}",
            self.namespace,
            self.boot,
            level(client_id)
        )
    }

    /// The retained entry of an established session.
    pub fn entry(
        &self,
        client_id: &str,
        session: impl Display,
        settlement: Vec<u8>,
    ) -> Publication {
        Publication {
            topic: self.topic(client_id, &session),
            payload: settlement.into(),
            retain: true,
        }
    }

    /// Clears a session's entry.
    pub fn clear(&self, client_id: &str, session: impl Display) -> Publication {
        Publication {
            topic: self.topic(client_id, &session),
            payload: Default::default(),
            retain: true,
        }
    }

    /// What to publish for the retained messages found at startup (see the module
    /// documentation). `settle` reads an entry, `is_live` says whether a presence key has a
    /// live connection here.
    pub fn recover(
        &self,
        found: &[(String, Vec<u8>)],
        settle: impl Fn(&[u8]) -> Option<Settlement>,
        is_live: impl Fn(&str) -> bool,
    ) -> Vec<Publication> {
        let prefix = format!("{LEDGER_ROOT}/{}/", self.namespace);
        let levels = |topic: &str| -> Option<Vec<String>> {
            topic
                .strip_prefix(&prefix)
                .map(|rest| rest.split('/').map(str::to_owned).collect())
        };
        let live_boots: HashSet<String> = found
            .iter()
            .filter(|(_, payload)| !payload.is_empty())
            .filter_map(|(topic, _)| match levels(topic)?.as_slice() {
                [boot] => Some(boot.clone()),
                _ => None,
            })
            .collect();
        let mut out = Vec::new();
        for (topic, payload) in found {
            let Some(parts) = levels(topic) else { continue };
            let [boot, _client, _session] = parts.as_slice() else {
                continue;
            };
            if payload.is_empty() || *boot == self.boot || live_boots.contains(boot) {
                continue;
            }
            if let Some(settlement) = settle(payload) {
                if !is_live(&settlement.presence) {
                    out.extend(settlement.publications);
                }
            }
            out.push(Publication {
                topic: topic.clone(),
                payload: Default::default(),
                retain: true,
            });
        }
        out
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

    fn found(publications: &[Publication]) -> Vec<(String, Vec<u8>)> {
        publications
            .iter()
            .map(|p| (p.topic.clone(), p.payload.to_vec()))
            .collect()
    }

    #[test]
    fn a_dead_process_entry_is_settled_and_cleared() {
        let before_crash = Ledger::new("proxy-a", "boot1");
        let entry = before_crash.entry("d:o:t:i", 7, b"d:o:t:i".to_vec());
        assert!(entry.retain && entry.topic.starts_with("warden:ledger/proxy-a/boot1/"));
        let after_restart = Ledger::new("proxy-a", "boot2");
        let published =
            after_restart.recover(&found(std::slice::from_ref(&entry)), settle, |_| false);
        assert_eq!(published.len(), 2);
        assert_eq!(published[0].topic, "status/d:o:t:i");
        assert_eq!(published[1].topic, entry.topic);
        assert!(published[1].payload.is_empty() && published[1].retain);

        // A client that is connected again only has its stale entry cleared.
        assert_eq!(
            after_restart
                .recover(&found(std::slice::from_ref(&entry)), settle, |_| true)
                .len(),
            1
        );
        // The process's own entries are never settled.
        assert!(before_crash
            .recover(&found(&[entry]), settle, |_| false)
            .is_empty());
    }

    #[test]
    fn entries_of_a_live_process_are_left_alone() {
        let sibling = Ledger::new("shared", "boot1");
        let entry = sibling.entry("d:o:t:i", 1, b"d:o:t:i".to_vec());
        let starting = Ledger::new("shared", "boot2");
        let alive = found(&[sibling.marker(), entry.clone()]);
        assert!(starting.recover(&alive, settle, |_| false).is_empty());
        // Once the sibling's marker is cleared (its will), its entries are settled.
        assert_eq!(
            starting.recover(&found(&[entry]), settle, |_| false).len(),
            2
        );
    }

    #[test]
    fn client_ids_cannot_escape_their_level() {
        let ledger = Ledger::new("ns/+", "b#");
        let entry = ledger.entry("a/b+c#", 1, Vec::new());
        assert_eq!(entry.topic, "warden:ledger/ns__/b_/a_b_c_/1");
    }
}
