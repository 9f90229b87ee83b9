//! A backend as one listener sees it: address, weight, and the state that
//! outlives a configuration reload (health and counters), shared through an
//! `Arc` keyed by (listener, backend address).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::health::HealthState;
use crate::stats::BackendStats;

/// One backend of a listener's group, as configured now.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Configured weight, 0-100. 0 = no new connections.
    pub weight: u32,
    /// Health and counters; kept across reloads for the same address.
    pub state: Arc<BackendState>,
}

/// The part of a backend that survives a configuration reload.
#[derive(Debug, Default)]
pub struct BackendState {
    pub health: HealthState,
    pub stats: BackendStats,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32, state: Arc<BackendState>) -> Self {
        Backend { addr, weight, state }
    }

    /// Whether the backend may receive new connections: weight > 0 and healthy.
    pub fn is_eligible(&self) -> bool {
        self.weight > 0 && self.state.health.is_up()
    }
}
