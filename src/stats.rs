//! Live counters per listener and per backend: plain atomics, the source of
//! truth for `/metrics`, `/status` and the access log. The data path only
//! ever does relaxed atomic adds on them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a client connection (or UDP flow) was closed without a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// No eligible backend (empty group, all weight 0, or reject-on-all-unhealthy).
    NoBackend,
    /// Every candidate refused or timed out.
    ConnectFailed,
    /// The listener was at `max_connections`.
    Limit,
    /// Every eligible backend was at its `max_connections` and there is no
    /// queue (TCP) or the flow cannot wait (UDP).
    Full,
    /// The wait queue already held `queue.size` connections.
    QueueFull,
    /// The connection waited `queue.timeout` without getting a slot.
    QueueTimeout,
    /// The client went away while waiting in the queue.
    QueueAbandoned,
}

impl DropReason {
    pub const ALL: [DropReason; 7] = [
        DropReason::NoBackend,
        DropReason::ConnectFailed,
        DropReason::Limit,
        DropReason::Full,
        DropReason::QueueFull,
        DropReason::QueueTimeout,
        DropReason::QueueAbandoned,
    ];

    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NoBackend => "no_backend",
            DropReason::ConnectFailed => "connect_failed",
            DropReason::Limit => "limit",
            DropReason::Full => "full",
            DropReason::QueueFull => "queue_full",
            DropReason::QueueTimeout => "queue_timeout",
            DropReason::QueueAbandoned => "queue_abandoned",
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

/// A fixed-bucket histogram of durations (Prometheus `_bucket`, `_sum`,
/// `_count`), with relaxed atomic adds only.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound of [`Histogram::BOUNDS`]
    /// (not cumulative; the renderer sums them).
    buckets: [AtomicU64; Histogram::BOUNDS.len()],
    /// Observations above the last bound.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    /// Upper bounds in seconds.
    pub const BOUNDS: [f64; 14] = [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match Self::BOUNDS.iter().position(|&b| secs <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Relaxed),
            None => self.over.fetch_add(1, Relaxed),
        };
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Cumulative counts per bound, then the total (the `+Inf` bucket).
    pub fn cumulative(&self) -> ([u64; Histogram::BOUNDS.len()], u64) {
        let mut out = [0; Histogram::BOUNDS.len()];
        let mut sum = 0;
        for (o, b) in out.iter_mut().zip(&self.buckets) {
            sum += b.load(Relaxed);
            *o = sum;
        }
        (out, sum + self.over.load(Relaxed))
    }

    pub fn count(&self) -> u64 {
        self.cumulative().1
    }

    /// Sum of the observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros.load(Relaxed) as f64 / 1e6
    }
}
