//! A listener's running state: its counters, its backends' state, and the
//! current [`Snapshot`] (spec + eligible backends + scheduler), swapped
//! atomically whenever the eligible set changes.
//!
//! The data path calls [`Listener::acquire`] once per connection (or new
//! UDP flow): the candidates in order of preference, the first with a free
//! slot wins. No lock, one `Arc` clone. Connections that find every backend
//! full wait in the listener's [`WaitQueue`], fed by [`Listener::dispatch_queue`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use dashmap::DashMap;

use crate::backend::{Backend, BackendState, Slot};
use crate::config::{AllUnhealthy, ListenerSpec};
use crate::health::{HealthState, Status};
use crate::persistence::SessionTable;
use crate::queue::WaitQueue;
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
    /// Where connections wait for a slot, when `queue` is configured.
    queue: Option<WaitQueue>,
    /// Whether a task is rebuilding the snapshot while backends ramp up.
    ramp_ticking: AtomicBool,
    me: Weak<Listener>,
}

/// What [`Listener::acquire`] found.
#[derive(Debug)]
pub enum Acquired {
    /// A slot on the best candidate that had one free.
    Slot(Slot),
    /// Candidates exist, but every one is at its `max_connections`.
    Full,
    /// No candidate at all.
    NoBackend,
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
    /// True when no backend is healthy and the listener fails open
    /// (scheduling across every backend with weight > 0).
    pub fail_open: bool,
    /// Failing open because backends are confirmed down, not merely pending
    /// their first probe at start: what status and metrics report.
    pub all_down: bool,
    /// Some backend is in slow start.
    pub ramping: bool,
}

impl Listener {
    pub fn new(spec: ListenerSpec) -> Arc<Listener> {
        Arc::new_cyclic(|me| {
            let states = DashMap::new();
            let sessions = spec.session_persistence.as_ref().map(SessionTable::new);
            let queue = spec.queue.as_ref().map(WaitQueue::new);
            let snapshot = build_snapshot(Arc::new(spec), &states, me);
            Listener {
                name: snapshot.spec.name.as_str().into(),
                stats: ListenerStats::default(),
                snapshot: ArcSwap::from_pointee(snapshot),
                states,
                rebuild_lock: Mutex::new(false),
                sessions,
                queue,
                ramp_ticking: AtomicBool::new(false),
                me: me.clone(),
            }
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
        self.rebuild_snapshot();
    }

    /// [`Listener::rebuild`]; returns whether a backend is still ramping.
    fn rebuild_snapshot(&self) -> bool {
        let mut warned = self.rebuild_lock.lock().unwrap_or_else(|e| e.into_inner());
        let spec = self.snapshot.load().spec.clone();
        let snap = build_snapshot(spec, &self.states, &self.me);
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
        let ramping = snap.ramping;
        self.snapshot.store(Arc::new(snap));
        // Under the rebuild lock, so a ramp never loses its ticker.
        if !ramping {
            self.ramp_ticking.store(false, SeqCst);
        } else if !self.ramp_ticking.swap(true, SeqCst) {
            self.spawn_ramp_ticker();
        }
        drop(warned);
        // A backend back up (or ramped up) may take waiting connections.
        self.dispatch_queue();
        ramping
    }

    /// While some backend is in slow start, rebuild the snapshot in small
    /// steps so that its weight climbs; the task ends with the ramp.
    fn spawn_ramp_ticker(&self) {
        let Some(ramp) = self.snapshot.load().spec.slow_start else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            self.ramp_ticking.store(false, SeqCst);
            return;
        };
        let step = (ramp / 20).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let me = self.me.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(step).await;
                let Some(l) = me.upgrade() else { return };
                if !l.rebuild_snapshot() {
                    return;
                }
            }
        });
    }

    /// A slot on the best candidate for `client` that has one free, skipping
    /// the backends in `exclude` (already tried for this connection).
    pub fn acquire(&self, client: IpAddr, exclude: &[SocketAddr]) -> Acquired {
        let mut found = Acquired::NoBackend;
        for b in self.candidates(client) {
            if exclude.contains(&b.addr) {
                continue;
            }
            match b.try_slot() {
                Some(slot) => return Acquired::Slot(slot),
                None => found = Acquired::Full,
            }
        }
        found
    }

    /// The wait queue, when configured.
    pub fn queue(&self) -> Option<&WaitQueue> {
        self.queue.as_ref()
    }

    /// Hand free slots to the connections waiting in the queue, oldest
    /// first, each through the scheduler (persistence, weights, health).
    pub fn dispatch_queue(&self) {
        if let Some(q) = &self.queue {
            q.dispatch(|client| self.slot_for(client));
        }
    }

    /// A slot for `client` on the best candidate with one free.
    pub fn slot_for(&self, client: IpAddr) -> Option<Slot> {
        match self.acquire(client, &[]) {
            Acquired::Slot(s) => Some(s),
            _ => None,
        }
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

fn build_snapshot(
    spec: Arc<ListenerSpec>,
    states: &DashMap<SocketAddr, Arc<BackendState>>,
    me: &Weak<Listener>,
) -> Snapshot {
    let now = tokio::time::Instant::now();
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
            let ramp = ramp_percent(spec.slow_start, state.health.recovered_at(), now);
            let mut backend = Backend::new(b.address, b.weight, state)
                .with_slots(b.max_connections)
                .ramped(ramp);
            if spec.queue.is_some() {
                backend = backend.with_queue(me.clone());
            }
            Arc::new(backend)
        })
        .collect();
    let mut eligible: Vec<Arc<Backend>> = backends.iter().filter(|b| b.is_eligible()).cloned().collect();
    let mut fail_open = false;
    if eligible.is_empty() && spec.on_all_unhealthy == AllUnhealthy::FailOpen {
        eligible = backends.iter().filter(|b| b.weight > 0).cloned().collect();
        fail_open = !eligible.is_empty();
    }
    let scheduler = Scheduler::new(spec.scheduler, &eligible);
    let all_down = fail_open && backends.iter().any(|b| b.state.health.status() == Status::Down);
    let ramping = eligible.iter().any(|b| b.ramp < 100);
    Snapshot {
        spec,
        backends,
        eligible,
        scheduler,
        fail_open,
        all_down,
        ramping,
    }
}

/// The share (percent, 1-100) of its weight a backend gets `now`, having
/// recovered at `since`, with slow start over `ramp`: linear, so that a cold
/// server starts with a trickle and takes its full share after `ramp`.
pub fn ramp_percent(
    ramp: Option<Duration>,
    since: Option<tokio::time::Instant>,
    now: tokio::time::Instant,
) -> u32 {
    let (Some(ramp), Some(since)) = (ramp, since) else {
        return 100;
    };
    let elapsed = now.saturating_duration_since(since);
    if elapsed >= ramp {
        return 100;
    }
    let pct = elapsed.as_micros() * 100 / ramp.as_micros().max(1);
    (pct as u32).clamp(1, 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::CheckResult;
    use tokio::time::{advance, Instant};

    #[test]
    fn ramp_is_linear_from_a_trickle_to_full() {
        let t0 = Instant::now();
        let ramp = Some(Duration::from_secs(10));
        let at = |ms| ramp_percent(ramp, Some(t0), t0 + Duration::from_millis(ms));
        assert_eq!(
            [at(0), at(1_000), at(5_000), at(9_990), at(10_000), at(99_000)],
            [1, 10, 50, 99, 100, 100]
        );
        assert_eq!(ramp_percent(None, Some(t0), t0), 100, "slow start off");
        assert_eq!(ramp_percent(ramp, None, t0), 100, "never recovered");
    }

    fn listener(extra: &str) -> Arc<Listener> {
        let yaml = format!(
            "listeners:\n  - name: l\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    health_check: {{interval: 1s, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1}}\n{extra}backend_groups:\n  - name: g\n    backends:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n"
        );
        let spec = crate::config::parse(&yaml).unwrap().listeners.remove(0);
        Listener::new(spec)
    }

    fn probe(l: &Listener, i: usize, r: CheckResult) {
        if l.snapshot().backends[i].state.health.observe_probe(r) {
            l.rebuild();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_revived_backend_ramps_its_weight_over_slow_start() {
        let l = listener("    slow_start: 10s\n");
        probe(&l, 0, CheckResult::Ok);
        probe(&l, 1, CheckResult::Ok);
        let weight = |l: &Listener| l.snapshot().backends[1].weight;
        assert_eq!(weight(&l), 10, "up at start: no ramp");
        probe(&l, 1, CheckResult::Refused);
        probe(&l, 1, CheckResult::Ok);
        // Let the ramp ticker start its first step now.
        tokio::task::yield_now().await;
        let mut seen = vec![weight(&l)];
        for _ in 0..6 {
            advance(Duration::from_secs(2)).await;
            // Let the ramp ticker run its rebuilds.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            seen.push(weight(&l));
        }
        assert_eq!(seen, [1, 2, 4, 6, 8, 10, 10], "climbs with time, then stays full");
        assert!(!l.snapshot().ramping);
        assert_eq!(
            l.snapshot().backends[0].weight,
            10,
            "the other backend is untouched"
        );
    }
}
