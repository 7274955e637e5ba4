//! The session ledger, for crash recovery: which clients this proxy instance has connected.
//!
//! The broker is the proxy's only storage. For every established session the monitor publishes a
//! retained entry on `warden:ledger/INSTANCE/BOOT/CLIENT_ID/SESSION` (holding the Connect
//! monitoring message) and clears it when the session closes. After a crash, nothing clears the
//! entries. The next process of the same instance reads them back when its control connection
//! first comes up, publishes a Disconnect (92) for each client that is not connected again, and
//! clears them. Each process has its own BOOT, so it never settles its own live sessions, and each
//! instance has its own INSTANCE, so several proxies in front of one broker only settle their own
//! clients.
//!
//! `warden:ledger` cannot collide with an org's space: `:` is not allowed in org IDs.

use serde::{Deserialize, Serialize};

use crate::close::{CloseCode, CloseReason};
use crate::identity::{parse_client_id, Identity};
use crate::monitor::{iso_time, publications, Action, MonitorMessage, Publication};

/// The first topic level of every ledger entry.
pub const LEDGER_ROOT: &str = "warden:ledger";

/// What a ledger entry stores.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    /// The org prefix the client's monitoring messages go under.
    org_prefix: String,
    /// Whether the client was in the quickstart org.
    quickstart: bool,
    /// The client's Connect monitoring message.
    connect: MonitorMessage,
}

/// This process's place in the ledger.
#[derive(Debug, Clone)]
pub struct Ledger {
    instance: String,
    boot: String,
}

impl Ledger {
    /// The ledger of `instance`, for a new process (a fresh random boot ID).
    pub fn new(instance: &str) -> Ledger {
        // Topic levels must not contain wildcards or separators.
        let instance = instance.replace(['/', '+', '#'], "_");
        Ledger {
            instance,
            boot: format!("{:016x}", rand::random::<u64>()),
        }
    }

    /// The filter that covers every entry of this instance, from any process.
    pub fn filter(&self) -> String {
        format!("{LEDGER_ROOT}/{}/#", self.instance)
    }

    /// A topic under [`Ledger::filter`] that is no entry: recovery publishes to it to learn that
    /// every retained entry was delivered.
    pub fn sentinel_topic(&self) -> String {
        format!("{LEDGER_ROOT}/{}/{}", self.instance, self.boot)
    }

    fn topic(&self, client_id: &str, session_id: u64) -> String {
        format!(
            "{LEDGER_ROOT}/{}/{}/{client_id}/{session_id:x}",
            self.instance, self.boot
        )
    }

    /// The retained entry for an established session.
    pub fn entry(
        &self,
        connect: &MonitorMessage,
        org_prefix: &str,
        quickstart: bool,
        session_id: u64,
    ) -> Publication {
        let entry = Entry {
            org_prefix: org_prefix.to_string(),
            quickstart,
            connect: connect.clone(),
        };
        Publication {
            topic: self.topic(&connect.client_id, session_id),
            payload: serde_json::to_vec(&entry).unwrap_or_default().into(),
            retain: true,
        }
    }

    /// Clears a session's entry.
    pub fn clear(&self, client_id: &str, session_id: u64) -> Publication {
        Publication {
            topic: self.topic(client_id, session_id),
            payload: Default::default(),
            retain: true,
        }
    }

    /// What to publish for an entry found at startup: nothing for this process's own entries;
    /// otherwise the Disconnect the crashed process could not send (unless `is_live` says the
    /// client is connected again) and the entry's clearing.
    pub fn recover(
        &self,
        topic: &str,
        payload: &[u8],
        is_live: impl Fn(&Identity) -> bool,
    ) -> Vec<Publication> {
        let own_boot = format!("{LEDGER_ROOT}/{}/{}/", self.instance, self.boot);
        if payload.is_empty() || topic.starts_with(&own_boot) {
            return Vec::new();
        }
        let clear = Publication {
            topic: topic.to_string(),
            payload: Default::default(),
            retain: true,
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(payload) else {
            return vec![clear];
        };
        let Ok(identity) = parse_client_id(&entry.connect.client_id) else {
            return vec![clear];
        };
        let mut out = Vec::new();
        if !is_live(&identity) {
            let reason = CloseReason::with_detail(
                CloseCode::ClosedByServer,
                "settled after a proxy restart",
            );
            let mut message = entry.connect;
            message.action = Action::Disconnect;
            message.time = iso_time(std::time::SystemTime::now());
            message.close_code = reason.number();
            message.reason = reason.reason_string();
            let clear_status =
                crate::monitor::clears_on_disconnect(identity.class, entry.quickstart);
            out = publications(
                &message,
                &identity,
                &entry.org_prefix,
                entry.quickstart,
                clear_status,
            );
        }
        out.push(clear);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::monitor::{ConnectionFacts, Counters};

    fn connect_message(client_id: &str) -> MonitorMessage {
        let facts = ConnectionFacts {
            peer: "127.0.0.1:5000".parse().unwrap(),
            local: "127.0.0.1:1883".parse().unwrap(),
            secure: false,
            protocol: "mqtt4",
            user: None,
            certname: None,
            connected_at: std::time::SystemTime::UNIX_EPOCH,
        };
        let identity = parse_client_id(client_id).unwrap();
        MonitorMessage::new(
            Action::Connect,
            &identity,
            &facts,
            None,
            Counters::default(),
        )
    }

    #[test]
    fn a_previous_process_entry_becomes_a_disconnect() {
        let before_crash = Ledger::new("proxy-a");
        let entry = before_crash.entry(&connect_message("d:org1:sensor:d1"), "org1/", false, 7);
        assert!(entry.retain && entry.topic.starts_with("warden:ledger/proxy-a/"));
        let after_restart = Ledger::new("proxy-a");
        let published = after_restart.recover(&entry.topic, &entry.payload, |_| false);
        assert_eq!(published.len(), 2);
        assert_eq!(published[0].topic, "org1/iot-2/type/sensor/id/d1/mon");
        assert!(
            published[0].retain,
            "devices keep their retained Disconnect"
        );
        let status: serde_json::Value = serde_json::from_slice(&published[0].payload).unwrap();
        assert_eq!(status["Action"], "Disconnect");
        assert_eq!(status["CloseCode"], 92);
        assert_eq!(
            published[1],
            Publication {
                topic: entry.topic.clone(),
                payload: Default::default(),
                retain: true
            }
        );

        // A client that is connected again only has its stale entry cleared.
        assert_eq!(
            after_restart
                .recover(&entry.topic, &entry.payload, |_| true)
                .len(),
            1
        );
        // The process's own entries are never settled.
        assert!(before_crash
            .recover(&entry.topic, &entry.payload, |_| false)
            .is_empty());
    }
}
