//! Session persistence: a bounded table client IP -> backend address with a
//! TTL refreshed by every connection.
//!
//! The table is split into [`SHARDS`] independently locked maps, chosen by a
//! stable hash of the client IP, so connections from different clients
//! rarely contend and no operation ever locks the whole table. Expired
//! entries are swept one shard at a time by the inserts that touch it (at
//! most once per sweep interval per shard), never in one pass over
//! everything, so no background task is needed.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Persistence;
use crate::scheduler::hash::{canonical, hash_ip, SEED_SKIP};

/// Number of shards: a full default table (1M entries) is ~4k per shard, so
/// sweeping one holds its lock for microseconds.
pub const SHARDS: usize = 256;

/// A shard is swept at most this often (or every `timeout / 8` if shorter).
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// At the cap, a shard may be swept again after this long, whatever its
/// regular interval, to make room for a new client.
const SWEEP_AT_CAP: Duration = Duration::from_secs(1);

/// Where each client went last, and when.
pub struct SessionTable {
    shards: Box<[Mutex<Shard>]>,
    timeout: Duration,
    max_entries: usize,
    sweep_interval: Duration,
    /// Entries across all shards; kept exact so the cap is exact.
    len: AtomicUsize,
    /// New clients not remembered because the table was full.
    refused: AtomicU64,
}

/// Sizes only: the entries are client addresses, and there may be millions.
impl std::fmt::Debug for SessionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionTable")
            .field("len", &self.len())
            .field("max_entries", &self.max_entries)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Shard {
    entries: HashMap<IpAddr, Entry>,
    swept: Instant,
}

#[derive(Clone, Copy)]
struct Entry {
    backend: SocketAddr,
    last_seen: Instant,
}

impl SessionTable {
    pub fn new(p: &Persistence) -> Self {
        let now = Instant::now();
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    entries: HashMap::new(),
                    swept: now,
                })
            })
            .collect();
        SessionTable {
            shards,
            timeout: p.timeout,
            max_entries: p.max_entries,
            sweep_interval: (p.timeout / 8).min(SWEEP_INTERVAL),
            len: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// The backend `client` was last sent to, if that was less than
    /// `timeout` ago. Does not refresh the entry: a connection refreshes it
    /// through [`SessionTable::record`] once it reaches a backend.
    pub fn lookup(&self, client: IpAddr) -> Option<SocketAddr> {
        let client = canonical(client);
        let shard = self.shard(client);
        let e = *shard.entries.get(&client)?;
        drop(shard);
        (Instant::now().saturating_duration_since(e.last_seen) < self.timeout).then_some(e.backend)
    }

    /// Remember that `client` was sent to `backend` now, re-pointing and
    /// refreshing its entry. A new client is not remembered when the table
    /// is full of fresh entries: existing clients keep their backend rather
    /// than being evicted by a flood of new addresses (the new client is
    /// still served, just not pinned).
    pub fn record(&self, client: IpAddr, backend: SocketAddr) {
        let client = canonical(client);
        let now = Instant::now();
        let entry = Entry {
            backend,
            last_seen: now,
        };
        let mut shard = self.shard(client);
        if let Some(e) = shard.entries.get_mut(&client) {
            *e = entry;
            return;
        }
        let since = now.saturating_duration_since(shard.swept);
        if since >= self.sweep_interval {
            self.sweep(&mut shard, now);
        }
        if !self.reserve() {
            if since >= SWEEP_AT_CAP {
                self.sweep(&mut shard, now);
            }
            if !self.reserve() {
                self.refused.fetch_add(1, Relaxed);
                return;
            }
        }
        shard.entries.insert(client, entry);
    }

    /// Entries in the table, fresh or not yet swept.
    pub fn len(&self) -> usize {
        self.len.load(Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// New clients that were not remembered because the table was full.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// Count one more entry if that stays within the cap.
    fn reserve(&self) -> bool {
        self.len
            .fetch_update(Relaxed, Relaxed, |n| (n < self.max_entries).then_some(n + 1))
            .is_ok()
    }

    /// Drop `shard`'s expired entries.
    fn sweep(&self, shard: &mut Shard, now: Instant) {
        let before = shard.entries.len();
        let timeout = self.timeout;
        shard
            .entries
            .retain(|_, e| now.saturating_duration_since(e.last_seen) < timeout);
        shard.swept = now;
        self.len.fetch_sub(before - shard.entries.len(), Relaxed);
    }

    fn shard(&self, client: IpAddr) -> std::sync::MutexGuard<'_, Shard> {
        // Seeded apart from ip_hash's client hash so that shard and Maglev
        // slot are independent.
        let i = hash_ip(client, SEED_SKIP) as usize % self.shards.len();
        // A poisoned shard only means a panic elsewhere mid-update of plain
        // data; the map is still valid.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn table(timeout_s: u64, max_entries: usize) -> SessionTable {
        SessionTable::new(&Persistence {
            timeout: Duration::from_secs(timeout_s),
            max_entries,
        })
    }

    fn ip(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
    }

    fn be(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn entry_expires_after_timeout_without_connections() {
        let t = table(60, 100);
        t.record(ip(1), be(1));
        tokio::time::advance(Duration::from_secs(59)).await;
        assert_eq!(t.lookup(ip(1)), Some(be(1)));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(t.lookup(ip(1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn each_connection_refreshes_and_can_repoint() {
        let t = table(60, 100);
        t.record(ip(1), be(1));
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(50)).await;
            t.record(ip(1), be(1));
        }
        assert_eq!(t.lookup(ip(1)), Some(be(1)));
        t.record(ip(1), be(2));
        assert_eq!(t.lookup(ip(1)), Some(be(2)));
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn mapped_ipv6_client_is_the_ipv4_client() {
        let t = table(60, 100);
        t.record("::ffff:10.0.0.1".parse().unwrap(), be(7));
        assert_eq!(t.lookup(ip(1)), Some(be(7)));
        assert_eq!(t.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_refuses_new_clients_and_keeps_old_ones() {
        let t = table(60, 10);
        (0..10).for_each(|i| t.record(ip(i), be(1)));
        t.record(ip(99), be(2));
        assert_eq!((t.len(), t.refused()), (10, 1));
        assert_eq!(t.lookup(ip(99)), None);
        assert!((0..10).all(|i| t.lookup(ip(i)) == Some(be(1))));
    }

    #[tokio::test(start_paused = true)]
    async fn full_table_evicts_expired_entries_first() {
        let t = table(60, 2 * SHARDS);
        (0..2 * SHARDS as u32).for_each(|i| t.record(ip(i), be(1)));
        tokio::time::advance(Duration::from_secs(61)).await;
        // Each new client sweeps its own shard only, then finds room.
        for i in 1000..1100 {
            t.record(ip(i), be(2));
            assert_eq!(t.lookup(ip(i)), Some(be(2)));
        }
        assert_eq!(t.refused(), 0);
        assert!(t.len() < 2 * SHARDS, "{}", t.len());
    }

    #[tokio::test(start_paused = true)]
    async fn listener_keeps_a_client_until_its_entry_expires() {
        let yaml = "listeners:\n  - name: l\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    scheduler: rr\n    session_persistence:\n      enabled: true\n      timeout: 30s\nbackend_groups:\n  - name: g\n    backends:\n      - address: 127.0.0.1:1\n      - address: 127.0.0.1:2\n";
        let config = crate::config::parse(yaml).expect("valid config");
        let l = crate::listener::Listener::new(config.listeners[0].clone());
        let first = |l: &crate::listener::Listener| l.candidates(ip(1)).next().expect("a backend");
        let b = first(&l);
        l.record(ip(1), &b);
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(20)).await;
            let again = first(&l);
            assert_eq!(again.addr, b.addr);
            l.record(ip(1), &again);
        }
        // Without persistence rr would alternate; after 30s of silence the
        // entry is gone and rr's cursor (still at its second pick) decides.
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_ne!(first(&l).addr, b.addr);
    }

    #[tokio::test(start_paused = true)]
    async fn sweeps_are_incremental_per_shard() {
        let t = table(30, 100_000);
        (0..10_000).for_each(|i| t.record(ip(i), be(1)));
        tokio::time::advance(Duration::from_secs(31)).await;
        // One new client sweeps one shard, not the table.
        t.record(ip(20_000), be(1));
        let left = t.len();
        assert!(left > 10_000 - 200 && left < 10_001, "{left}");
        // Touching every shard eventually clears every expired entry.
        (20_001..30_000).for_each(|i| t.record(ip(i), be(1)));
        assert_eq!(t.len(), 10_000);
    }
}
