//! Live counters per listener and per backend: plain atomics, the source of
//! truth for `/metrics`, `/status` and the access log. The data path only
//! ever does relaxed atomic adds on them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a client connection (or UDP flow) was closed without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No eligible backend (empty group, all weight 0, or reject-on-all-unhealthy).
    NoBackend,
    /// Every candidate refused or timed out.
    ConnectFailed,
    /// The listener was at `max_connections`.
    Limit,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::NoBackend,
        DropReason::ConnectFailed,
        DropReason::Limit,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::ConnectFailed => "connect_failed",
            DropReason::Limit => "limit",
        }
    }
}

/// Counters of one listener.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Open client connections (TCP) or live flows (UDP).
    pub active: AtomicU64,
    /// Accepted connections / new flows.
    pub total: AtomicU64,
    /// Bytes received from clients.
    pub rx_bytes: AtomicU64,
    /// Bytes sent to clients.
    pub tx_bytes: AtomicU64,
    /// Datagrams received from clients (UDP only).
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent to clients (UDP only).
    pub tx_datagrams: AtomicU64,
    /// Times a TCP listener reached `max_connections` and paused accepting.
    pub limit_events: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
}

impl ListenerStats {
    pub fn drop_one(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped[reason as usize].load(Relaxed)
    }
}

/// Counters of one backend as seen by one listener.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Open connections / live flows to this backend (including connects in progress).
    pub active: AtomicU64,
    /// Connections / flows scheduled to this backend.
    pub total: AtomicU64,
    /// Failed connects on the data path.
    pub connect_failures: AtomicU64,
    /// Bytes received from the backend.
    pub rx_bytes: AtomicU64,
    /// Bytes sent to the backend.
    pub tx_bytes: AtomicU64,
    /// Datagrams received from the backend (UDP only).
    pub rx_datagrams: AtomicU64,
    /// Datagrams sent to the backend (UDP only).
    pub tx_datagrams: AtomicU64,
}

/// Increments an `active` gauge and decrements it when dropped.
#[derive(Debug)]
pub struct ActiveGuard<'a>(&'a AtomicU64);

impl<'a> ActiveGuard<'a> {
    pub fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Relaxed);
        ActiveGuard(gauge)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}
