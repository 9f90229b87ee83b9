//! The pick path: every scheduler at 2, 16 and 256 eligible backends, and the
//! session-table lookup and refresh a connection pays with persistence on.
//!
//! `cargo bench --bench scheduler -- --warm-up-time 1 --measurement-time 2`

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use slb::backend::{Backend, BackendState};
use slb::config::{Persistence, SchedulerKind};
use slb::persistence::SessionTable;
use slb::scheduler::Scheduler;

const KINDS: [SchedulerKind; 6] = [
    SchedulerKind::Rr,
    SchedulerKind::Wrr,
    SchedulerKind::Lc,
    SchedulerKind::Wlc,
    SchedulerKind::IpHash,
    SchedulerKind::P2c,
];

/// `n` backends with weights 1..=10 and a few live connections each, as in
/// a busy group.
fn backends(n: usize) -> Vec<Arc<Backend>> {
    (0..n)
        .map(|i| {
            let state = Arc::new(BackendState::default());
            state.stats.active.store((i * 7 % 13) as u64, Relaxed);
            let addr = SocketAddr::from(([10, 0, (i >> 8) as u8, i as u8], 8000));
            Arc::new(Backend::new(addr, (i % 10) as u32 + 1, state))
        })
        .collect()
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 ^ i.wrapping_mul(2_654_435_761)))
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for kind in KINDS {
        for n in [2, 16, 256] {
            let b = backends(n);
            let s = Scheduler::new(kind, &b);
            let mut i = 0u32;
            group.bench_with_input(BenchmarkId::new(kind.as_str(), n), &n, |bench, _| {
                bench.iter(|| {
                    i = i.wrapping_add(1);
                    black_box(s.pick(&b, client(i)))
                })
            });
        }
    }
    group.finish();
}

/// Building a scheduler happens on every health flip; Maglev's table is the
/// only costly one.
fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("build");
    for n in [2, 16, 256] {
        let b = backends(n);
        group.bench_with_input(BenchmarkId::new("ip_hash", n), &n, |bench, _| {
            bench.iter(|| black_box(Scheduler::new(SchedulerKind::IpHash, &b)))
        });
    }
    group.finish();
}

fn sessions(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    const ENTRIES: u32 = 100_000;
    let table = SessionTable::new(&Persistence {
        timeout: Duration::from_secs(1800),
        max_entries: 1_000_000,
    });
    let be = SocketAddr::from(([10, 0, 0, 1], 8000));
    (0..ENTRIES).for_each(|i| table.record(client(i), be));
    let mut group = c.benchmark_group("sessions");
    let mut i = 0u32;
    // The clock read inside lookup and record, for scale (tokio's clock under
    // the dev-only `test-util` feature against std's).
    group.bench_function("tokio_instant_now", |bench| {
        bench.iter(|| black_box(tokio::time::Instant::now()))
    });
    group.bench_function("std_instant_now", |bench| {
        bench.iter(|| black_box(std::time::Instant::now()))
    });
    group.bench_function("lookup_hit_100k", |bench| {
        bench.iter(|| {
            i = (i + 1) % ENTRIES;
            black_box(table.lookup(client(i)))
        })
    });
    group.bench_function("lookup_miss_100k", |bench| {
        bench.iter(|| {
            i = i.wrapping_add(1);
            black_box(table.lookup(client(ENTRIES + i)))
        })
    });
    group.bench_function("record_refresh_100k", |bench| {
        bench.iter(|| {
            i = (i + 1) % ENTRIES;
            table.record(client(i), be)
        })
    });
    group.finish();
}

criterion_group!(benches, pick, build, sessions);
criterion_main!(benches);
