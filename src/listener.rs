//! A listener's running state: its counters, its backends' state, and the
//! current [`Snapshot`] (spec + eligible backends + scheduler), swapped
//! atomically whenever the eligible set changes.
//!
//! The data path calls [`Listener::candidates`] once per connection (or new
//! UDP flow) and walks the result: no lock, one `Arc` clone.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::backend::{Backend, BackendState};
use crate::config::{AllUnhealthy, ListenerSpec};
use crate::health::{HealthState, Status};
use crate::persistence::SessionTable;
use crate::scheduler::Scheduler;
use crate::stats::ListenerStats;

/// One configured listener, independent of its socket.
#[derive(Debug)]
pub struct Listener {
    name: Arc<str>,
    pub stats: ListenerStats,
    snapshot: ArcSwap<Snapshot>,
    /// Per-backend state by address, so it survives a rebuild or reload.
    states: DashMap<SocketAddr, Arc<BackendState>>,
    /// Serialises rebuilds (health flips); never taken on the data path.
    /// Holds whether "every backend is unhealthy" has been logged.
    rebuild_lock: Mutex<bool>,
    /// Session persistence, when enabled; outlives snapshot rebuilds.
    sessions: Option<SessionTable>,
}

/// An immutable view of a listener: what the data path schedules against.
#[derive(Debug)]
pub struct Snapshot {
    pub spec: Arc<ListenerSpec>,
    /// Every configured backend, in configuration order.
    pub backends: Vec<Arc<Backend>>,
    /// The backends the scheduler picks from.
    pub eligible: Vec<Arc<Backend>>,
    pub scheduler: Scheduler,
    /// True when no backend is healthy and the listener fails open.
    pub fail_open: bool,
}

impl Listener {
    pub fn new(spec: ListenerSpec) -> Arc<Listener> {
        let states = DashMap::new();
        let sessions = spec.session_persistence.as_ref().map(SessionTable::new);
        let snapshot = build_snapshot(Arc::new(spec), &states);
        Arc::new(Listener {
            name: snapshot.spec.name.as_str().into(),
            stats: ListenerStats::default(),
            snapshot: ArcSwap::from_pointee(snapshot),
            states,
            rebuild_lock: Mutex::new(false),
            sessions,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Recompute the eligible set from the backends' current health and swap
    /// in a new snapshot. Called when a backend's health flips.
    pub fn rebuild(&self) {
        let mut warned = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let spec = self.snapshot.load().spec.clone();
        let snap = build_snapshot(spec, &self.states);
        // "All unhealthy" once a backend is confirmed down and none is up;
        // backends still pending their first probe at start do not count.
        let live = snap.backends.iter().filter(|b| b.weight > 0);
        let all_unhealthy = !live.clone().any(|b| b.is_eligible())
            && live.clone().any(|b| b.state.health.status() == Status::Down);
        if all_unhealthy && !*warned {
            if snap.fail_open {
                tracing::warn!(listener = %self.name, "every backend is unhealthy: failing open, scheduling across all of them");
            } else {
                tracing::warn!(listener = %self.name, "every backend is unhealthy: rejecting new connections (on_all_unhealthy: reject)");
            }
        } else if !all_unhealthy && *warned {
            tracing::info!(listener = %self.name, "a backend is healthy again: scheduling across healthy backends only");
        }
        *warned = all_unhealthy;
        self.snapshot.store(Arc::new(snap));
    }

    /// Backends to try for a new connection from `client`, best first; each
    /// backend appears at most once. With session persistence, a client's
    /// remembered backend comes first if it is still eligible; otherwise the
    /// scheduler picks afresh (and [`Listener::record`] re-points the entry).
    pub fn candidates(&self, client: IpAddr) -> Candidates {
        let snap = self.snapshot();
        let first = self
            .remembered(&snap, client)
            .or_else(|| snap.scheduler.pick(&snap.eligible, client));
        Candidates { snap, first, step: 0 }
    }

    /// The index in `snap.eligible` of `client`'s fresh, still eligible
    /// session backend.
    fn remembered(&self, snap: &Snapshot, client: IpAddr) -> Option<usize> {
        let addr = self.sessions.as_ref()?.lookup(client)?;
        snap.eligible
            .iter()
            .position(|b| b.addr == addr && (snap.fail_open || b.is_eligible()))
    }

    /// Remember that `client` reached `backend` (session persistence): call
    /// once a connection (or new UDP flow) is established.
    pub fn record(&self, client: IpAddr, backend: &Backend) {
        if let Some(sessions) = &self.sessions {
            sessions.record(client, backend.addr);
        }
    }

    /// The session table, when session persistence is enabled.
    pub fn sessions(&self) -> Option<&SessionTable> {
        self.sessions.as_ref()
    }
}

/// Candidates in order of preference: the scheduler's pick, then the other
/// eligible backends in ring order after it. Backends that became ineligible
/// since the snapshot was taken are skipped (unless failing open).
#[derive(Debug)]
pub struct Candidates {
    snap: Arc<Snapshot>,
    first: Option<usize>,
    step: usize,
}

impl Iterator for Candidates {
    type Item = Arc<Backend>;

    fn next(&mut self) -> Option<Arc<Backend>> {
        let first = self.first?;
        let n = self.snap.eligible.len();
        while self.step < n {
            let b = &self.snap.eligible[(first + self.step) % n];
            self.step += 1;
            if self.snap.fail_open || b.is_eligible() {
                return Some(b.clone());
            }
        }
        None
    }
}

fn build_snapshot(spec: Arc<ListenerSpec>, states: &DashMap<SocketAddr, Arc<BackendState>>) -> Snapshot {
    let backends: Vec<Arc<Backend>> = spec
        .backends
        .iter()
        .map(|b| {
            let state = states
                .entry(b.address)
                .or_insert_with(|| {
                    let health = HealthState::new(&spec.name, b.address, spec.health_check.as_ref());
                    Arc::new(BackendState {
                        health,
                        stats: Default::default(),
                    })
                })
                .clone();
            Arc::new(Backend::new(b.address, b.weight, state))
        })
        .collect();
    let mut eligible: Vec<Arc<Backend>> = backends.iter().filter(|b| b.is_eligible()).cloned().collect();
    let mut fail_open = false;
    if eligible.is_empty() && spec.on_all_unhealthy == AllUnhealthy::FailOpen {
        eligible = backends.iter().filter(|b| b.weight > 0).cloned().collect();
        fail_open = !eligible.is_empty();
    }
    let scheduler = Scheduler::new(spec.scheduler, &eligible);
    Snapshot {
        spec,
        backends,
        eligible,
        scheduler,
        fail_open,
    }
}
