//! Health of a backend as seen by one listener.
//!
//! Placeholder until the health-check issue: every backend is up.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::listener::Listener;

/// The result of one health probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Ok,
    Refused,
    Timeout,
    BadStatus,
}

impl CheckResult {
    pub const ALL: [CheckResult; 4] = [
        CheckResult::Ok,
        CheckResult::Refused,
        CheckResult::Timeout,
        CheckResult::BadStatus,
    ];

    /// The `result` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Ok => "ok",
            CheckResult::Refused => "refused",
            CheckResult::Timeout => "timeout",
            CheckResult::BadStatus => "bad_status",
        }
    }
}

/// Up/down state of one (listener, backend).
#[derive(Debug)]
pub struct HealthState {
    up: AtomicBool,
    checks: [AtomicU64; CheckResult::ALL.len()],
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            up: AtomicBool::new(true),
            checks: Default::default(),
        }
    }
}

impl HealthState {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// How many probes ended with `result`.
    pub fn checks(&self, result: CheckResult) -> u64 {
        self.checks[result as usize].load(Relaxed)
    }

    /// A connect failure seen on the data path.
    pub fn observe_data_path_failure(&self) -> bool {
        false
    }

    /// A successful connect on the data path.
    pub fn observe_data_path_success(&self) {}
}

/// Start the probe loops of `listener`'s backends; they end at `shutdown`.
pub fn spawn_checks(_listener: &Arc<Listener>, _shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
    Vec::new()
}
