//! Scheduling algorithms: pure functions of (eligible backends, client) ->
//! the preferred backend. No I/O, no lock.
//!
//! A [`Scheduler`] is immutable apart from its atomic cursors and is rebuilt
//! whenever the eligible set changes (health flip, reload). The caller turns
//! a pick into an ordered list of candidates (see `listener::Candidates`).
//! Adding a scheduler is a variant here, its `new` arm and its `pick` arm.
//! `docs/scheduling.md` says what each one does and when to choose it.

pub mod hash;
mod least;
mod maglev;
mod wrr;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use crate::backend::Backend;
use crate::config::SchedulerKind;

pub use least::P2c;
pub use maglev::Maglev;

/// A scheduler over one fixed (possibly empty) set of eligible backends.
#[derive(Debug)]
pub enum Scheduler {
    /// Round robin: a cursor over the eligible backends.
    Rr { next: AtomicUsize },
    /// Smooth weighted round robin, precomputed as one full cycle so a pick is
    /// a single atomic increment and an index.
    Wrr { cycle: Box<[u32]>, next: AtomicUsize },
    /// Fewest active connections; `next` rotates where the scan starts, so
    /// ties go round-robin.
    Lc { next: AtomicUsize },
    /// Fewest active connections relative to weight; ties round-robin.
    Wlc { next: AtomicUsize },
    /// Consistent hash of the client IP (weighted Maglev).
    IpHash(Maglev),
    /// Power of two weighted random choices, the less loaded wins.
    P2c(P2c),
}

impl Scheduler {
    /// Build a scheduler of `kind` over `backends` (all with weight > 0).
    pub fn new(kind: SchedulerKind, backends: &[Arc<Backend>]) -> Self {
        let cursor = || AtomicUsize::new(0);
        match kind {
            // A backend in slow start gets a ramped share even under rr:
            // equal weights, scaled by each backend's ramp.
            SchedulerKind::Rr if backends.iter().any(|b| b.ramp < 100) => Scheduler::Wrr {
                cycle: wrr::smooth_wrr_cycle(backends.iter().map(|b| b.ramp)),
                next: cursor(),
            },
            SchedulerKind::Rr => Scheduler::Rr { next: cursor() },
            SchedulerKind::Wrr => Scheduler::Wrr {
                cycle: wrr::smooth_wrr_cycle(backends.iter().map(|b| b.weight)),
                next: cursor(),
            },
            SchedulerKind::Lc => Scheduler::Lc { next: cursor() },
            SchedulerKind::Wlc => Scheduler::Wlc { next: cursor() },
            SchedulerKind::IpHash => Scheduler::IpHash(Maglev::new(backends)),
            SchedulerKind::P2c => Scheduler::P2c(P2c::new(backends)),
        }
    }

    /// The preferred backend for a new connection from `client`, as an index
    /// into `backends` (the same slice the scheduler was built over).
    pub fn pick(&self, backends: &[Arc<Backend>], client: IpAddr) -> Option<usize> {
        if backends.is_empty() {
            return None;
        }
        let n = backends.len();
        let i = match self {
            Scheduler::Rr { next } => next.fetch_add(1, Relaxed) % n,
            Scheduler::Wrr { cycle, next } => cycle[next.fetch_add(1, Relaxed) % cycle.len()] as usize,
            Scheduler::Lc { next } => least::least_loaded(backends, next.fetch_add(1, Relaxed), false),
            Scheduler::Wlc { next } => least::least_loaded(backends, next.fetch_add(1, Relaxed), true),
            Scheduler::IpHash(m) => m.pick(client)?,
            Scheduler::P2c(p) => p.pick(backends),
        };
        // A scheduler built over another slice must not index out of bounds.
        (i < n).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendState;

    fn backends(n: usize) -> Vec<Arc<Backend>> {
        (0..n)
            .map(|i| {
                let addr = format!("127.0.0.1:{}", 2000 + i).parse().unwrap();
                Arc::new(Backend::new(addr, 10, Arc::new(BackendState::default())))
            })
            .collect()
    }

    const ALL: [SchedulerKind; 6] = [
        SchedulerKind::Rr,
        SchedulerKind::Wrr,
        SchedulerKind::Lc,
        SchedulerKind::Wlc,
        SchedulerKind::IpHash,
        SchedulerKind::P2c,
    ];

    #[test]
    fn every_scheduler_picks_nothing_from_nothing_and_stays_in_bounds() {
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        for kind in ALL {
            assert_eq!(Scheduler::new(kind, &[]).pick(&[], ip), None, "{kind:?}");
            for n in [1, 2, 7] {
                let b = backends(n);
                let s = Scheduler::new(kind, &b);
                assert!((0..50).all(|_| s.pick(&b, ip).is_some_and(|i| i < n)), "{kind:?}");
            }
        }
    }

    #[test]
    fn lc_spreads_idle_ties_round_robin() {
        let b = backends(3);
        let s = Scheduler::new(SchedulerKind::Lc, &b);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let picks: Vec<_> = (0..6).map(|_| s.pick(&b, ip).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn ip_hash_is_stable_per_client() {
        let b = backends(5);
        let s = Scheduler::new(SchedulerKind::IpHash, &b);
        let again = Scheduler::new(SchedulerKind::IpHash, &b);
        for i in 0..200u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x7f00_0000 + i));
            assert_eq!(s.pick(&b, ip), again.pick(&b, ip));
            assert_eq!(s.pick(&b, ip), s.pick(&b, ip));
        }
    }
}
