//! Live reloads: one service watches the policy files and the TLS listeners' files (notify, with
//! polling as the fallback) and listens for SIGHUP, which forces a reload of both.
//!
//! A valid policy is swapped in whole, the verification cache is dropped, and every session is
//! told to re-evaluate itself (a session still connecting notices through the policy
//! generation). An invalid one is logged with file, line and field, counted, and the last good
//! policy stays in force. TLS files that do not load leave the last good certificate in force.
//!
//! Editors often save in several steps (truncate, write, rename). Policy changes are therefore
//! applied only after the files have been quiet for [`SETTLE`] and read the same twice in a row,
//! so a half-written file is never applied.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::auth::Verifier;
use crate::coord::Admission;
use crate::metrics::Metrics;
use crate::policy::{check_isolation, load_policies, PolicyErrors, PolicyStore};
use crate::transport::ServerTls;

/// How long the policy files must be quiet before a change is applied.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How often the files are compared, whether or not the file-system watcher works.
const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// File-system events waiting to be looked at, at most (more only repeat "something changed").
const EVENT_QUEUE: usize = 16;

/// What a reload touches.
pub struct Reloader {
    /// A policy file or a folder of them.
    pub policy_path: PathBuf,
    /// The orgs' prefix template (`upstream.topic_prefix`), which tenants' mounts must not
    /// overlap.
    pub org_prefix: String,
    /// The policy in force.
    pub store: Arc<PolicyStore>,
    /// Its verification cache is dropped on every policy change.
    pub verifier: Arc<Verifier>,
    /// The sessions to tell.
    pub admission: Arc<dyn Admission>,
    /// Reload counters.
    pub metrics: Arc<Metrics>,
    /// The TLS listeners.
    pub tls: Vec<Arc<ServerTls>>,
}

impl Reloader {
    /// Loads the policy and, when valid, puts it in force and tells every session.
    pub fn reload_policy(&self) -> Result<(), PolicyErrors> {
        let loaded = load_policies(&self.policy_path).and_then(|policy| {
            let isolation = check_isolation(&policy, &self.org_prefix);
            if isolation.is_empty() {
                Ok(policy)
            } else {
                Err(PolicyErrors(isolation))
            }
        });
        match loaded {
            Ok(policy) => {
                let orgs = policy.orgs.len();
                self.store.replace(policy);
                self.verifier.clear_cache();
                for session in self.admission.sessions() {
                    session.reevaluate();
                }
                self.metrics.policy_reloads.inc();
                info!(orgs, "policy reloaded");
                Ok(())
            }
            Err(errors) => {
                self.metrics.policy_reload_failures.inc();
                for error in &errors.0 {
                    warn!(
                        file = %error.file.display(),
                        line = error.line,
                        field = %error.field,
                        message = %error.message,
                        "policy edit rejected; the last good policy stays"
                    );
                }
                Err(errors)
            }
        }
    }

    /// Reloads the TLS files that changed (every one when `forced`).
    pub fn reload_tls(&self, forced: bool) {
        for tls in &self.tls {
            let result = if forced {
                tls.reload().map(|()| true)
            } else {
                tls.reload_if_changed()
            };
            if let Err(error) = result {
                warn!(%error, "TLS files not reloaded; the previous certificate stays in force");
            }
        }
    }

    /// Watches the files and SIGHUP until `shutdown`. The SIGHUP handler is installed before this
    /// returns, so no signal is missed once the listeners are bound.
    pub fn spawn(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut hangup = hangup_signal();
        let (tx, mut changes) = mpsc::channel::<()>(EVENT_QUEUE);
        // Editors replace files by rename, so folders are watched, not files.
        let mut folders: Vec<PathBuf> = vec![folder_of(&self.policy_path)];
        for tls in &self.tls {
            for file in tls.files() {
                folders.push(folder_of(file));
            }
        }
        folders.sort();
        folders.dedup();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok() {
                // A full queue already says that something changed.
                let _ = tx.try_send(());
            }
        })
        .and_then(|mut watcher| {
            for folder in &folders {
                watcher.watch(folder, RecursiveMode::NonRecursive)?;
            }
            Ok(watcher)
        });
        if let Err(error) = &watcher {
            warn!(%error, "cannot watch the policy and certificate folders; polling only");
        }
        tokio::spawn(async move {
            let _watcher = watcher;
            let mut last = fingerprint(&self.policy_path);
            let mut poll = tokio::time::interval(POLL_INTERVAL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let forced = tokio::select! {
                    _ = shutdown.wait_for(|stop| *stop) => return,
                    Some(()) = changes.recv() => false,
                    _ = poll.tick() => false,
                    Some(()) = next_hangup(&mut hangup) => true,
                };
                self.reload_tls(forced);
                if !forced && fingerprint(&self.policy_path) == last {
                    continue;
                }
                // Let a multi-step save finish: wait until nothing changes for SETTLE.
                loop {
                    tokio::select! {
                        Some(()) = changes.recv() => continue,
                        _ = tokio::time::sleep(SETTLE) => {}
                    }
                    let now = fingerprint(&self.policy_path);
                    tokio::time::sleep(SETTLE).await;
                    if fingerprint(&self.policy_path) == now {
                        break;
                    }
                }
                let now = fingerprint(&self.policy_path);
                if forced || now != last {
                    last = now;
                    let _ = self.reload_policy();
                }
            }
        });
    }
}

/// The folder a path lives in (the path itself when it is a folder).
fn folder_of(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    }
}

/// What identifies the policy files' current state: each file's path, length and mtime.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok().map(|e| e.path()))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        vec![path.to_path_buf()]
    };
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let meta = std::fs::metadata(&file).ok();
            let len = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (file, len, modified)
        })
        .collect()
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP; reloads follow file changes only");
            None
        }
    }
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {
    None
}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_hangup: &mut Hangup) -> Option<()> {
    std::future::pending().await
}
