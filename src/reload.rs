//! Live policy edits: the policy path is watched (notify) and SIGHUP forces a reload. A valid
//! policy is swapped in whole, the verification cache is dropped, and every session is told to
//! re-evaluate itself (through the registry; a session still connecting compares
//! `Shared::policy_generation` once it is registered). An invalid one is logged with file, line and
//! field, counted, and the last good policy stays in force.
//!
//! Editors often save in several steps (truncate, write, rename). Changes are therefore applied
//! only after the files have been quiet for [`SETTLE`] and read the same twice in a row, so a
//! half-written file is never applied.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::policy::{load_policies, PolicyErrors};
use crate::proxy::Shared;

/// How long the policy files must be quiet before a change is applied.
pub const SETTLE: Duration = Duration::from_millis(250);
/// How often the files are compared when the file-system watcher is unavailable.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Loads the policy and, when valid, swaps it in and tells every session.
pub fn apply(shared: &Shared) -> Result<(), PolicyErrors> {
    match load_policies(&shared.config.policies) {
        Ok(policy) => {
            let orgs = policy.orgs.len();
            shared.policy.store(Arc::new(policy));
            shared.verifier.clear_cache();
            shared.policy_generation.fetch_add(1, Ordering::Release);
            for session in shared.registry.sessions() {
                session.reevaluate();
            }
            shared
                .metrics
                .policy_reloads
                .fetch_add(1, Ordering::Relaxed);
            info!(orgs, "policy reloaded");
            Ok(())
        }
        Err(errors) => {
            shared
                .metrics
                .policy_reload_failures
                .fetch_add(1, Ordering::Relaxed);
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

/// Watches the policy path and SIGHUP until `shutdown`, reloading on every settled change.
pub fn watch(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let path = shared.config.policies.clone();
    let (tx, mut changes) = mpsc::unbounded_channel::<()>();
    // Editors replace files by rename, so the folder (or the file's folder) is what is watched.
    let watched = if path.is_dir() {
        path.clone()
    } else {
        path.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = tx.send(());
        }
    })
    .and_then(|mut watcher| {
        watcher
            .watch(&watched, RecursiveMode::NonRecursive)
            .map(|()| watcher)
    });
    let polling = match &watcher {
        Ok(_) => false,
        Err(error) => {
            warn!(%error, path = %watched.display(), "cannot watch the policy folder; polling instead");
            true
        }
    };
    tokio::spawn(async move {
        let _watcher = watcher;
        let mut hangup = hangup_signal();
        let mut last = fingerprint(&path);
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            let forced = tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                Some(()) = changes.recv() => false,
                _ = poll.tick(), if polling => false,
                Some(()) = next_hangup(&mut hangup) => true,
            };
            // Let a multi-step save finish: wait until nothing changes for SETTLE.
            loop {
                tokio::select! {
                    Some(()) = changes.recv() => continue,
                    _ = tokio::time::sleep(SETTLE) => {}
                }
                let now = fingerprint(&path);
                tokio::time::sleep(SETTLE).await;
                if fingerprint(&path) == now {
                    break;
                }
            }
            let now = fingerprint(&path);
            if forced || now != last {
                last = now;
                let _ = apply(&shared);
            }
        }
    });
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = Option<()>;

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
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
