//! A backend as one listener sees it: address, weight, slots, and the state
//! that outlives a configuration reload (health and counters), shared
//! through an `Arc` keyed by (listener, backend address).
//!
//! A connection or UDP flow holds a [`Slot`] of its backend for as long as
//! it lives: the backend's `active` count. A backend with `max_connections`
//! hands out at most that many; dropping a slot gives it back, and when the
//! listener has a wait queue, the freed slot goes to the head of the queue.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Weak};

use crate::health::HealthState;
use crate::listener::Listener;
use crate::stats::BackendStats;

/// One backend of a listener's group, as configured now.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// The weight the schedulers use: the configured weight, or less while
    /// the backend is in slow start. 0 = no new connections.
    pub weight: u32,
    /// The configured weight, 0-100.
    pub configured_weight: u32,
    /// Percent of its full share the backend gets now (slow start): 1-100.
    pub ramp: u32,
    /// The backend's slots (`max_connections`); `None` = unlimited.
    pub max_connections: Option<u64>,
    /// Health and counters; kept across reloads for the same address.
    pub state: Arc<BackendState>,
    /// The listener whose wait queue a freed slot is offered to, when it
    /// has one (a weak link: the listener owns its backends).
    queue: Option<Weak<Listener>>,
}

/// The part of a backend that survives a configuration reload.
#[derive(Debug, Default)]
pub struct BackendState {
    pub health: HealthState,
    pub stats: BackendStats,
}

impl Backend {
    /// A backend at full weight, without a slot limit or queue.
    pub fn new(addr: SocketAddr, weight: u32, state: Arc<BackendState>) -> Self {
        Backend {
            addr,
            weight,
            configured_weight: weight,
            ramp: 100,
            max_connections: None,
            state,
            queue: None,
        }
    }

    /// Limit the backend to `max` slots (`None` = unlimited).
    pub fn with_slots(mut self, max: Option<u64>) -> Self {
        self.max_connections = max;
        self
    }

    /// Offer freed slots to `listener`'s wait queue.
    pub fn with_queue(mut self, listener: Weak<Listener>) -> Self {
        self.queue = Some(listener);
        self
    }

    /// Scale the backend's share to `ramp` percent (slow start): the
    /// scheduling weight becomes `ceil(weight * ramp / 100)`, at least 1.
    pub fn ramped(mut self, ramp: u32) -> Self {
        let ramp = ramp.clamp(1, 100);
        self.ramp = ramp;
        if self.configured_weight > 0 {
            self.weight = (self.configured_weight * ramp).div_ceil(100).max(1);
        }
        self
    }

    /// Whether the backend may receive new connections as far as health and
    /// weight go: weight > 0 and healthy. (Slots are checked by
    /// [`Backend::try_slot`].)
    pub fn is_eligible(&self) -> bool {
        self.weight > 0 && self.state.health.is_up()
    }

    /// Whether a slot is free now (always, without `max_connections`).
    pub fn has_free_slot(&self) -> bool {
        self.max_connections
            .map_or(true, |max| self.state.stats.active.load(SeqCst) < max)
    }

    /// Take one of the backend's slots, or `None` if all are in use.
    ///
    /// The counter is the backend's `active` gauge. Sequentially consistent
    /// (free on x86, where every read-modify-write is a locked instruction)
    /// so that a connection joining the wait queue and a slot being freed
    /// cannot miss each other.
    pub fn try_slot(self: &Arc<Self>) -> Option<Slot> {
        let active = &self.state.stats.active;
        match self.max_connections {
            None => {
                active.fetch_add(1, SeqCst);
            }
            Some(max) => {
                active
                    .fetch_update(SeqCst, SeqCst, |a| (a < max).then_some(a + 1))
                    .ok()?;
            }
        }
        Some(Slot(Some(self.clone())))
    }

    fn release(&self) {
        self.state.stats.active.fetch_sub(1, SeqCst);
        if let Some(listener) = self.queue.as_ref().and_then(Weak::upgrade) {
            listener.dispatch_queue();
        }
    }
}

/// One slot of a backend, held by a connection (or UDP flow) for as long as
/// it lives; counted in the backend's `active` gauge. Dropping it gives the
/// slot back, to the listener's wait queue first.
#[derive(Debug)]
pub struct Slot(Option<Arc<Backend>>);

impl Slot {
    /// The backend this slot belongs to.
    pub fn backend(&self) -> &Arc<Backend> {
        self.0.as_ref().expect("a slot has its backend until dropped")
    }

    /// Give the slot back without offering it to the wait queue: for the
    /// queue itself, which holds its lock while dispatching.
    pub(crate) fn release_quietly(mut self) {
        if let Some(b) = self.0.take() {
            b.state.stats.active.fetch_sub(1, SeqCst);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(max: Option<u64>) -> Arc<Backend> {
        let addr = "127.0.0.1:1".parse().unwrap();
        Arc::new(Backend::new(addr, 10, Arc::default()).with_slots(max))
    }

    #[test]
    fn a_backend_hands_out_at_most_its_slots_and_takes_them_back() {
        let b = backend(Some(2));
        let (s1, s2) = (b.try_slot().unwrap(), b.try_slot().unwrap());
        assert!(b.try_slot().is_none() && !b.has_free_slot());
        drop(s1);
        assert!(b.has_free_slot());
        let s3 = b.try_slot().unwrap();
        assert_eq!(b.state.stats.active.load(SeqCst), 2);
        drop((s2, s3));
        assert_eq!(b.state.stats.active.load(SeqCst), 0);
    }

    #[test]
    fn unlimited_backends_count_slots_without_refusing() {
        let b = backend(None);
        let slots: Vec<_> = (0..100).map(|_| b.try_slot().unwrap()).collect();
        assert_eq!(b.state.stats.active.load(SeqCst), 100);
        drop(slots);
        assert_eq!(b.state.stats.active.load(SeqCst), 0);
    }

    #[test]
    fn ramped_weight_is_a_share_of_the_configured_weight_never_zero() {
        let b = |w, r| Backend::new("127.0.0.1:1".parse().unwrap(), w, Arc::default()).ramped(r);
        assert_eq!(b(10, 100).weight, 10);
        assert_eq!(b(10, 50).weight, 5);
        assert_eq!(b(10, 1).weight, 1);
        assert_eq!(b(100, 1).weight, 1);
        assert_eq!(b(10, 0).ramp, 1);
        assert_eq!(b(0, 50).weight, 0);
        assert_eq!(b(10, 50).configured_weight, 10);
    }
}
