//! Health of a backend as seen by one listener.
//!
//! Placeholder until the health-check issue: every backend is up.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::listener::Listener;

/// Up/down state of one (listener, backend).
#[derive(Debug)]
pub struct HealthState {
    up: AtomicBool,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            up: AtomicBool::new(true),
        }
    }
}

impl HealthState {
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
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
