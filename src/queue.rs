//! A listener's wait queue: TCP connections that found every eligible
//! backend at its `max_connections` wait here, first in, first out, and are
//! handed a [`Slot`] the moment one frees (or a backend comes back).
//!
//! The queue never picks a backend itself: [`WaitQueue::dispatch`] asks the
//! listener (through a closure: scheduler, persistence, health) for a slot
//! for the client at the head, so weights and persistence still count. The
//! lock is taken only by connections joining or leaving the queue and by
//! slots freed while someone waits; an empty queue costs one atomic load.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::backend::Slot;
use crate::config::Queue;
use crate::stats::Histogram;

/// The wait queue of one listener.
#[derive(Debug)]
pub struct WaitQueue {
    size: usize,
    timeout: Duration,
    inner: Mutex<Inner>,
    /// Mirror of `inner.waiters.len()`, read without the lock.
    len: AtomicUsize,
    /// How long connections that got a slot waited for it, in seconds.
    pub wait: Histogram,
}

#[derive(Debug, Default)]
struct Inner {
    /// Oldest first; ids increase from front to back.
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    client: IpAddr,
    tx: oneshot::Sender<Slot>,
}

/// The queue already holds `size` connections.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl WaitQueue {
    pub fn new(cfg: &Queue) -> Self {
        WaitQueue {
            size: cfg.size,
            timeout: cfg.timeout,
            inner: Mutex::default(),
            len: AtomicUsize::new(0),
            wait: Histogram::default(),
        }
    }

    /// Connections waiting now.
    pub fn len(&self) -> usize {
        self.len.load(SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most connections that may wait at once.
    pub fn size(&self) -> usize {
        self.size
    }

    /// How long a connection may wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Join the tail of the queue. `find` is then asked at once for a slot
    /// for the head, since one may have freed after the caller looked.
    pub fn join(&self, client: IpAddr, find: impl FnMut(IpAddr) -> Option<Slot>) -> Result<Ticket<'_>, Full> {
        let mut inner = self.lock();
        if inner.waiters.len() >= self.size {
            return Err(Full);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let (tx, rx) = oneshot::channel();
        inner.waiters.push_back(Waiter { id, client, tx });
        self.dispatch_locked(&mut inner, find);
        Ok(Ticket {
            queue: self,
            id,
            rx,
            since: Instant::now(),
        })
    }

    /// Hand slots to the waiters from the head, for as long as `find` finds
    /// one for the head's client.
    pub fn dispatch(&self, find: impl FnMut(IpAddr) -> Option<Slot>) {
        if self.is_empty() {
            return;
        }
        let mut inner = self.lock();
        self.dispatch_locked(&mut inner, find);
    }

    fn dispatch_locked(&self, inner: &mut Inner, mut find: impl FnMut(IpAddr) -> Option<Slot>) {
        while let Some(head) = inner.waiters.front() {
            if head.tx.is_closed() {
                inner.waiters.pop_front();
                continue;
            }
            let Some(slot) = find(head.client) else {
                break;
            };
            let w = inner.waiters.pop_front().expect("the head was just seen");
            if let Err(slot) = w.tx.send(slot) {
                // Gone in the meantime: the next waiter may have it.
                slot.release_quietly();
            }
        }
        self.len.store(inner.waiters.len(), SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the deque consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A place in the queue. Dropping it (timeout, client gone) leaves the
/// queue; a slot handed over in that instant is passed on, never lost.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    id: u64,
    rx: oneshot::Receiver<Slot>,
    since: Instant,
}

impl Ticket<'_> {
    /// Wait for a slot. Never resolves if the queue is dropped first.
    pub async fn slot(&mut self) -> Slot {
        match (&mut self.rx).await {
            Ok(slot) => {
                self.queue.wait.observe(self.since.elapsed());
                slot
            }
            Err(_) => std::future::pending().await,
        }
    }

    /// How long this ticket has waited so far.
    pub fn waited(&self) -> Duration {
        self.since.elapsed()
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        {
            let mut inner = self.queue.lock();
            if let Ok(i) = inner.waiters.binary_search_by_key(&self.id, |w| w.id) {
                inner.waiters.remove(i);
                self.queue.len.store(inner.waiters.len(), SeqCst);
            }
        }
        // Outside the lock: dropping a slot may dispatch it to the next waiter.
        self.rx.close();
        if let Ok(slot) = self.rx.try_recv() {
            drop(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::backend::Backend;

    fn queue(size: usize) -> WaitQueue {
        WaitQueue::new(&Queue {
            size,
            timeout: Duration::from_secs(1),
        })
    }

    fn backend(slots: u64) -> Arc<Backend> {
        let addr = "127.0.0.1:1".parse().unwrap();
        Arc::new(Backend::new(addr, 10, Arc::default()).with_slots(Some(slots)))
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    #[tokio::test(start_paused = true)]
    async fn waiters_get_freed_slots_in_fifo_order() {
        let (q, b) = (queue(10), backend(1));
        let held = b.try_slot().unwrap();
        let find = |_| b.try_slot();
        let mut tickets: Vec<_> = (0..3).map(|_| q.join(IP, find).unwrap()).collect();
        assert_eq!(q.len(), 3);
        let mut order = Vec::new();
        drop(held);
        for round in 0..3 {
            q.dispatch(find);
            let i = tickets
                .iter_mut()
                .position(|t| !t.rx.is_empty())
                .expect("one was served");
            tokio::time::advance(Duration::from_millis(10)).await;
            let slot = tickets[i].slot().await;
            order.push(tickets[i].id);
            assert_eq!(q.len(), 2 - round);
            drop(slot);
        }
        assert_eq!(order, [0, 1, 2]);
        assert_eq!(q.wait.count(), 3);
    }

    #[test]
    fn a_full_queue_refuses_and_a_dropped_ticket_leaves() {
        let (q, b) = (queue(2), backend(1));
        let _held = b.try_slot().unwrap();
        let t1 = q.join(IP, |_| b.try_slot()).unwrap();
        let _t2 = q.join(IP, |_| b.try_slot()).unwrap();
        assert_eq!(q.join(IP, |_| b.try_slot()).unwrap_err(), Full);
        drop(t1);
        assert_eq!(q.len(), 1);
        assert!(q.join(IP, |_| b.try_slot()).is_ok());
    }

    #[test]
    fn a_slot_handed_to_a_leaving_ticket_goes_back() {
        let (q, b) = (queue(2), backend(1));
        let held = b.try_slot().unwrap();
        let t = q.join(IP, |_| b.try_slot()).unwrap();
        drop(held);
        q.dispatch(|_| b.try_slot());
        assert_eq!(b.state.stats.active.load(SeqCst), 1, "handed to the ticket");
        drop(t);
        assert_eq!(b.state.stats.active.load(SeqCst), 0, "given back, not leaked");
    }

    #[test]
    fn joining_takes_a_slot_freed_just_before() {
        let (q, b) = (queue(2), backend(1));
        let mut t = q.join(IP, |_| b.try_slot()).unwrap();
        assert!(t.rx.try_recv().is_ok(), "served at once");
        assert!(q.is_empty());
    }
}
