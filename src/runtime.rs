//! The process's async runtime: how many worker threads run sessions, and how the kernel
//! schedules them. The binary sets both up once, before anything else starts a thread.
//!
//! The scheduling policy is the crate's one call into the C library: no maintained crate sets
//! `SCHED_BATCH` without also changing the thread's nice value, which is the operator's to set.

use std::io;

use crate::config::{RuntimeConfig, Scheduling};

/// Why the runtime could not be set up as configured.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The kernel refused the scheduling policy (a seccomp filter, or not Linux).
    #[error(
        "runtime.scheduling: the kernel refused SCHED_BATCH ({0}); the proxy runs with the \
         policy it was started with"
    )]
    Scheduling(io::Error),
    /// The async runtime did not start.
    #[error("starting the async runtime: {0}")]
    Start(io::Error),
}

/// Applies `scheduling` to the calling thread. Threads it starts afterwards inherit the policy,
/// so the binary calls this before it starts any: the runtime's workers, its blocking pool and
/// the telemetry exporter all run under it.
pub fn apply_scheduling(scheduling: Scheduling) -> Result<(), RuntimeError> {
    match scheduling {
        Scheduling::Inherit => Ok(()),
        Scheduling::Batch => set_batch().map_err(RuntimeError::Scheduling),
    }
}

/// The calling thread's scheduling policy, by its Linux name (`SCHED_OTHER`, `SCHED_BATCH`, …).
pub fn current_policy() -> &'static str {
    policy_name(current_policy_number())
}

/// The Linux name of the policy `number` (as in `/proc/PID/stat`'s 41st field).
pub fn policy_name(number: i32) -> &'static str {
    match number {
        0 => "SCHED_OTHER",
        1 => "SCHED_FIFO",
        2 => "SCHED_RR",
        3 => "SCHED_BATCH",
        5 => "SCHED_IDLE",
        6 => "SCHED_DEADLINE",
        _ => "unknown",
    }
}

/// Builds the multi-threaded runtime: `worker_threads` workers, or one per CPU the process may
/// run on (its affinity and cgroup quota).
pub fn build(config: &RuntimeConfig) -> Result<tokio::runtime::Runtime, RuntimeError> {
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = config.worker_threads {
        runtime.worker_threads(threads);
    }
    runtime.enable_all().build().map_err(RuntimeError::Start)
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn set_batch() -> io::Result<()> {
    // Normal policies take static priority 0; the nice value is left as it is. The pid 0 is the
    // calling thread.
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, initialised `sched_param` that outlives the call, which only
    // reads it.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn set_batch() -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "SCHED_BATCH is a Linux policy",
    ))
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn current_policy_number() -> i32 {
    // SAFETY: takes no pointers; pid 0 is the calling thread.
    unsafe { libc::sched_getscheduler(0) }
}

#[cfg(not(target_os = "linux"))]
fn current_policy_number() -> i32 {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    // Each test changes only a thread of its own: the policy is per thread. The test process
    // may itself run under any policy (`chrt`), so "unchanged" is compared with its own.
    #[test]
    fn batch_applies_to_the_calling_thread_and_the_threads_it_starts() {
        std::thread::spawn(|| {
            apply_scheduling(Scheduling::Batch).expect("SCHED_BATCH needs no privilege");
            assert_eq!(current_policy(), "SCHED_BATCH");
            let child = std::thread::spawn(current_policy)
                .join()
                .expect("child thread");
            assert_eq!(child, "SCHED_BATCH");
        })
        .join()
        .expect("test thread");
    }

    #[test]
    fn inherit_leaves_the_policy_alone() {
        let started_with = current_policy();
        let after = std::thread::spawn(|| {
            apply_scheduling(Scheduling::Inherit).expect("nothing to refuse");
            current_policy()
        })
        .join()
        .expect("test thread");
        assert_eq!(after, started_with);
    }

    #[test]
    fn the_runtime_has_the_configured_workers() {
        let config = RuntimeConfig {
            worker_threads: Some(2),
            scheduling: Scheduling::Inherit,
        };
        let runtime = build(&config).expect("runtime");
        assert_eq!(runtime.metrics().num_workers(), 2);
    }
}
