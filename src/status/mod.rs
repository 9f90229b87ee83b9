//! The `/status` JSON document ([`Report`]): its schema, built from the live
//! counters by the admin server and read back by `slb status` ([`cli`]).
//! The schema is documented in `docs/observability.md`; changing a field
//! here means changing it there.

pub mod cli;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::config::{AllUnhealthy, CheckType, Protocol};
use crate::health::CheckResult;
use crate::stats::DropReason;
use crate::{Running, State};

/// The whole `/status` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// slb's version.
    pub version: String,
    /// Seconds since the admin server started; clients compute rates from
    /// differences of this and the counters.
    pub uptime_seconds: f64,
    pub listeners: Vec<ListenerReport>,
}

/// One listener: its settings and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerReport {
    pub name: String,
    /// "tcp" or "udp".
    pub protocol: String,
    /// The bound address (port 0 in the configuration is resolved).
    pub address: String,
    pub backend_group: String,
    pub scheduler: String,
    pub max_connections: u64,
    pub connect_timeout_seconds: f64,
    pub idle_timeout_seconds: f64,
    /// `null` when health checks are disabled.
    pub health_check: Option<HealthReport>,
    /// `null` when session persistence is disabled.
    pub session_persistence: Option<PersistenceReport>,
    /// "fail_open" or "reject".
    pub on_all_unhealthy: String,
    /// True while every backend is unhealthy (at least one confirmed down)
    /// and traffic goes to all of them.
    pub fail_open: bool,
    /// `null` when the listener has no wait queue.
    #[serde(default)]
    pub queue: Option<QueueReport>,
    /// `null` when slow start is off.
    #[serde(default)]
    pub slow_start_seconds: Option<f64>,
    pub backends_unhealthy: u64,
    pub active: u64,
    pub total: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
    pub limit_events: u64,
    /// Dropped connections by reason (every reason is present).
    pub dropped: BTreeMap<String, u64>,
    pub backends: Vec<BackendReport>,
}

/// Health-check settings of a listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HealthReport {
    /// "tcp" or "http".
    #[serde(rename = "type")]
    pub kind: String,
    /// `null` = each backend's own port.
    pub port: Option<u16>,
    pub interval_seconds: f64,
    pub timeout_seconds: f64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// HTTP checks only.
    pub path: Option<String>,
    /// HTTP checks only: accepted status range, inclusive.
    pub expected_status: Option<[u16; 2]>,
}

/// The wait queue of a listener: settings and live state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueReport {
    pub size: u64,
    pub timeout_seconds: f64,
    /// Connections waiting now.
    pub length: u64,
    /// Connections that got a slot after waiting, and their total wait.
    pub dispatched: u64,
    pub wait_seconds_sum: f64,
}

/// Session-persistence settings of a listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PersistenceReport {
    pub timeout_seconds: f64,
    pub max_entries: u64,
}

/// One backend as its listener sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendReport {
    pub address: String,
    /// Configured weight.
    pub weight: u32,
    /// The weight the scheduler uses now: below `weight` during slow start.
    #[serde(default)]
    pub effective_weight: u32,
    pub healthy: bool,
    /// "pending" (not probed successfully yet), "up" or "down".
    #[serde(default)]
    pub health: String,
    /// The backend's slots; `null` = unlimited. `active` is the slots in use.
    #[serde(default)]
    pub max_connections: Option<u64>,
    pub active: u64,
    pub total: u64,
    /// Failed connects on the data path.
    pub failures: u64,
    /// Bytes received from the backend.
    pub rx_bytes: u64,
    /// Bytes sent to the backend.
    pub tx_bytes: u64,
    pub rx_datagrams: u64,
    pub tx_datagrams: u64,
    /// Health probes by result (every result is present).
    pub checks: BTreeMap<String, u64>,
}

impl Report {
    /// Read every listener's live counters.
    pub fn collect(state: &State, uptime_seconds: f64) -> Report {
        Report {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds,
            listeners: state.listeners.iter().map(listener_report).collect(),
        }
    }
}

fn listener_report(r: &Running) -> ListenerReport {
    let snap = r.listener.snapshot();
    let spec = &snap.spec;
    let s = &r.listener.stats;
    ListenerReport {
        name: spec.name.clone(),
        protocol: match spec.protocol {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
        .into(),
        address: r.local_addr.to_string(),
        backend_group: spec.backend_group.clone(),
        scheduler: spec.scheduler.as_str().into(),
        max_connections: spec.max_connections as u64,
        connect_timeout_seconds: spec.connect_timeout.as_secs_f64(),
        idle_timeout_seconds: spec.idle_timeout.as_secs_f64(),
        health_check: spec.health_check.as_ref().map(|h| {
            let http = h.kind == CheckType::Http;
            HealthReport {
                kind: if http { "http" } else { "tcp" }.into(),
                port: h.port,
                interval_seconds: h.interval.as_secs_f64(),
                timeout_seconds: h.timeout.as_secs_f64(),
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
                path: http.then(|| h.path.clone()),
                expected_status: http.then_some([h.expected_status.0, h.expected_status.1]),
            }
        }),
        session_persistence: spec.session_persistence.as_ref().map(|p| PersistenceReport {
            timeout_seconds: p.timeout.as_secs_f64(),
            max_entries: p.max_entries as u64,
        }),
        on_all_unhealthy: match spec.on_all_unhealthy {
            AllUnhealthy::FailOpen => "fail_open",
            AllUnhealthy::Reject => "reject",
        }
        .into(),
        fail_open: snap.all_down,
        queue: r.listener.queue().map(|q| QueueReport {
            size: q.size() as u64,
            timeout_seconds: q.timeout().as_secs_f64(),
            length: q.len() as u64,
            dispatched: q.wait.count(),
            wait_seconds_sum: q.wait.sum_seconds(),
        }),
        slow_start_seconds: spec.slow_start.map(|d| d.as_secs_f64()),
        backends_unhealthy: snap.backends.iter().filter(|b| !b.state.health.is_up()).count() as u64,
        active: s.active.load(Relaxed),
        total: s.total.load(Relaxed),
        rx_bytes: s.rx_bytes.load(Relaxed),
        tx_bytes: s.tx_bytes.load(Relaxed),
        rx_datagrams: s.rx_datagrams.load(Relaxed),
        tx_datagrams: s.tx_datagrams.load(Relaxed),
        limit_events: s.limit_events.load(Relaxed),
        dropped: DropReason::ALL
            .iter()
            .map(|&d| (d.as_str().to_owned(), s.dropped(d)))
            .collect(),
        backends: snap.backends.iter().map(|b| backend_report(b)).collect(),
    }
}

fn backend_report(b: &Backend) -> BackendReport {
    let s = &b.state.stats;
    BackendReport {
        address: b.addr.to_string(),
        weight: b.configured_weight,
        effective_weight: b.weight,
        healthy: b.state.health.is_up(),
        health: b.state.health.status().as_str().into(),
        max_connections: b.max_connections,
        active: s.active.load(Relaxed),
        total: s.total.load(Relaxed),
        failures: s.connect_failures.load(Relaxed),
        rx_bytes: s.rx_bytes.load(Relaxed),
        tx_bytes: s.tx_bytes.load(Relaxed),
        rx_datagrams: s.rx_datagrams.load(Relaxed),
        tx_datagrams: s.tx_datagrams.load(Relaxed),
        checks: CheckResult::ALL
            .iter()
            .map(|&c| (c.as_str().to_owned(), b.state.health.checks(c)))
            .collect(),
    }
}
