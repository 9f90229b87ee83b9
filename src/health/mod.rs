//! Health of each backend as one listener sees it: the state
//! ([`HealthState`], kept in the backend's reload-proof state), the rise/fall
//! machine ([`rise_fall`]), the probes ([`probe`]) and one probe loop per
//! (listener, backend) ([`spawn_checks`]). Semantics: `docs/health-checks.md`.

mod checker;
pub mod probe;
pub mod rise_fall;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::HealthCheck;
use crate::listener::Listener;
use rise_fall::RiseFall;
pub use rise_fall::Status;

/// The result of one health probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckResult {
    Ok,
    /// The connect failed (refused, unreachable, reset during the handshake).
    Refused,
    /// No answer within the check's `timeout`.
    Timeout,
    /// HTTP only: connected, but the answer was not a status line in the
    /// expected range (or the connection broke before one arrived).
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

/// What fed the state machine: a probe, or a connect on the data path.
#[derive(Debug, Clone, Copy)]
enum Cause {
    Probe(CheckResult),
    DataPath,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Probe(r) => r.as_str(),
            Cause::DataPath => "data_path_connect_failure",
        }
    }
}

/// Up/down state of one (listener, backend).
///
/// Readers (`is_up`, on every scheduling decision) load one atomic. Writers
/// (probes, data-path failures) take a mutex that is never held across an
/// await; the data path's success only takes it while a failure streak is
/// open, so the common case is one relaxed load.
#[derive(Debug)]
pub struct HealthState {
    listener: Arc<str>,
    backend: SocketAddr,
    /// Mirror of the machine's status, as [`status_to_u8`].
    status: AtomicU8,
    /// True while the machine counts failures against a pending or up backend.
    failing: AtomicBool,
    /// `None` when health checks are disabled: always up, no passive ejection.
    machine: Mutex<Option<RiseFall>>,
    checks: [AtomicU64; CheckResult::ALL.len()],
    transitions: AtomicU64,
    /// When the backend last came back up after being down (slow start).
    recovered_at: Mutex<Option<Instant>>,
}

impl Default for HealthState {
    /// Health checks disabled: always up.
    fn default() -> Self {
        HealthState::new("", SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)), None)
    }
}

impl HealthState {
    /// The state of `backend` on `listener` (names used in logs). With a
    /// check configured it starts pending (not eligible until its first
    /// successful probe); without, it is always up.
    pub fn new(listener: &str, backend: SocketAddr, check: Option<&HealthCheck>) -> Self {
        let machine =
            check.map(|c| RiseFall::new(c.healthy_threshold, c.unhealthy_threshold, Status::Pending));
        let status = machine.as_ref().map_or(Status::Up, RiseFall::status);
        HealthState {
            listener: listener.into(),
            backend,
            status: AtomicU8::new(status_to_u8(status)),
            failing: AtomicBool::new(false),
            machine: Mutex::new(machine),
            checks: Default::default(),
            transitions: AtomicU64::new(0),
            recovered_at: Mutex::new(None),
        }
    }

    /// Whether the backend may get new connections (as far as health goes).
    pub fn is_up(&self) -> bool {
        self.status() == Status::Up
    }

    /// Pending (never checked successfully), up, or down.
    pub fn status(&self) -> Status {
        match self.status.load(Relaxed) {
            0 => Status::Pending,
            1 => Status::Up,
            _ => Status::Down,
        }
    }

    /// How many probes ended with `result` (data-path connects not included).
    pub fn checks(&self, result: CheckResult) -> u64 {
        self.checks[result as usize].load(Relaxed)
    }

    /// How many times the status changed.
    pub fn transitions(&self) -> u64 {
        self.transitions.load(Relaxed)
    }

    /// When the backend last went from down to up (not pending to up: a
    /// backend found up at start is not cold). Drives slow start.
    pub fn recovered_at(&self) -> Option<Instant> {
        *self.recovered_at.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Apply a (possibly reloaded) check configuration; returns true when
    /// the status changed. Thresholds change in place; disabling makes the
    /// backend up; enabling on a backend that was unchecked keeps it up and
    /// lets the probes decide (no traffic cut on reload).
    pub fn configure(&self, check: Option<&HealthCheck>) -> bool {
        let mut machine = self.lock();
        let before = self.status();
        match (check, machine.as_mut()) {
            (None, _) => *machine = None,
            (Some(c), Some(m)) => m.set_thresholds(c.healthy_threshold, c.unhealthy_threshold),
            (Some(c), None) => {
                *machine = Some(RiseFall::new(c.healthy_threshold, c.unhealthy_threshold, before))
            }
        }
        let after = machine.as_ref().map_or(Status::Up, RiseFall::status);
        self.failing.store(machine.as_ref().is_some_and(failing), Relaxed);
        self.status.store(status_to_u8(after), Relaxed);
        before != after
    }

    /// Record one probe result; returns true when it flipped the status.
    pub fn observe_probe(&self, result: CheckResult) -> bool {
        self.checks[result as usize].fetch_add(1, Relaxed);
        self.observe(result == CheckResult::Ok, Cause::Probe(result))
    }

    /// A connect failure seen on the data path: counts as a failed probe.
    /// Returns true when it flipped the status (the caller then rebuilds the
    /// listener's snapshot).
    pub fn observe_data_path_failure(&self) -> bool {
        self.observe(false, Cause::DataPath)
    }

    /// A successful connect on the data path: ends a failure streak, never
    /// raises a down backend (only probes do). One atomic load when there
    /// is no streak, which is nearly always.
    pub fn observe_data_path_success(&self) {
        if self.failing.load(Relaxed) {
            let mut machine = self.lock();
            if let Some(m) = machine.as_mut() {
                m.clear_failures();
                self.failing.store(failing(m), Relaxed);
            }
        }
    }

    fn observe(&self, ok: bool, cause: Cause) -> bool {
        let (to, streak_before) = {
            let mut machine = self.lock();
            let Some(m) = machine.as_mut() else {
                return false;
            };
            // The length of the streak this result ends or extends (the
            // first success of a pending backend is enough on its own).
            let streak = if ok && m.status() == Status::Pending {
                1
            } else {
                m.streak() + 1
            };
            let from = m.status();
            let to = m.observe(ok);
            self.failing.store(failing(m), Relaxed);
            if from == Status::Down && to == Some(Status::Up) {
                *self.recovered_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            if let Some(to) = to {
                self.status.store(status_to_u8(to), Relaxed);
            }
            (to, streak)
        };
        let Some(to) = to else {
            return false;
        };
        self.transitions.fetch_add(1, Relaxed);
        let (listener, backend) = (&*self.listener, self.backend);
        match to {
            Status::Down => warn!(
                %listener, %backend, reason = cause.as_str(), failures = streak_before,
                "backend down: no new connections"
            ),
            _ => info!(%listener, %backend, successes = streak_before, "backend up"),
        }
        true
    }

    fn lock(&self) -> MutexGuard<'_, Option<RiseFall>> {
        // Every critical section leaves the machine consistent: a poisoned
        // lock is still usable.
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn failing(m: &RiseFall) -> bool {
    m.status() != Status::Down && m.streak() > 0
}

fn status_to_u8(s: Status) -> u8 {
    match s {
        Status::Pending => 0,
        Status::Up => 1,
        Status::Down => 2,
    }
}

/// Start the probe loops of `listener`'s backends (one per backend, weight 0
/// included); they end at `shutdown`. Also applies the listener's check
/// configuration to every backend's state first.
pub fn spawn_checks(listener: &Arc<Listener>, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
    let snap = listener.snapshot();
    let check = snap.spec.health_check.as_ref();
    let mut changed = false;
    for b in &snap.backends {
        changed |= b.state.health.configure(check);
    }
    if changed {
        listener.rebuild();
    }
    let Some(check) = check else {
        return Vec::new();
    };
    info!(
        listener = %listener.name(), kind = ?check.kind,
        port = %check.port.map_or_else(|| "backend's own".to_string(), |p| p.to_string()), interval = ?check.interval,
        timeout = ?check.timeout, rise = check.healthy_threshold, fall = check.unhealthy_threshold,
        "health checks on: backends are eligible after their first successful probe"
    );
    let check = Arc::new(check.clone());
    snap.backends
        .iter()
        .map(|b| {
            let target = SocketAddr::new(b.addr.ip(), check.port.unwrap_or(b.addr.port()));
            let c = check.clone();
            let probe = move || {
                let c = c.clone();
                async move { probe::check(target, &c).await }
            };
            let run = checker::run(
                listener.clone(),
                b.clone(),
                check.interval,
                probe,
                shutdown.clone(),
            );
            tokio::spawn(run)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckType;
    use std::time::Duration;

    fn check(rise: u32, fall: u32) -> HealthCheck {
        HealthCheck {
            kind: CheckType::Tcp,
            port: None,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            healthy_threshold: rise,
            unhealthy_threshold: fall,
            path: "/health".into(),
            expected_status: (200, 399),
        }
    }

    fn state(c: Option<&HealthCheck>) -> HealthState {
        HealthState::new("l", "127.0.0.1:1".parse().unwrap(), c)
    }

    #[test]
    fn checks_enabled_start_pending_disabled_start_up() {
        assert_eq!(state(Some(&check(3, 3))).status(), Status::Pending);
        assert!(state(None).is_up());
        assert!(HealthState::default().is_up());
    }

    #[test]
    fn data_path_failures_count_as_failed_probes_and_successes_break_the_streak() {
        let h = state(Some(&check(2, 3)));
        assert!(h.observe_probe(CheckResult::Ok));
        assert!(!h.observe_data_path_failure());
        assert!(!h.observe_data_path_failure());
        h.observe_data_path_success();
        assert!(!h.observe_data_path_failure());
        assert!(!h.observe_probe(CheckResult::Refused));
        assert!(h.observe_data_path_failure());
        assert_eq!(h.status(), Status::Down);
        assert_eq!(h.transitions(), 2);
        // Probe counters count probes only.
        assert_eq!(
            (h.checks(CheckResult::Ok), h.checks(CheckResult::Refused)),
            (1, 1)
        );
        // A data-path success never raises a down backend.
        h.observe_data_path_success();
        assert_eq!(h.status(), Status::Down);
    }

    #[test]
    fn disabled_checks_never_eject() {
        let h = state(None);
        for _ in 0..100 {
            assert!(!h.observe_data_path_failure());
        }
        assert!(h.is_up());
    }

    #[test]
    fn reconfiguring_keeps_the_status_and_disabling_makes_up() {
        let h = state(Some(&check(1, 1)));
        h.observe_probe(CheckResult::Timeout);
        assert_eq!(h.status(), Status::Down);
        assert!(!h.configure(Some(&check(2, 2))));
        assert_eq!(h.status(), Status::Down);
        assert!(h.configure(None));
        assert!(h.is_up());
        // Enabling on an unchecked backend keeps it up until probes decide.
        assert!(!h.configure(Some(&check(1, 1))));
        assert!(h.is_up());
        assert!(h.observe_probe(CheckResult::BadStatus));
        assert_eq!(h.status(), Status::Down);
    }
}
