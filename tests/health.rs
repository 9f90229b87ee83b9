//! Health checks end to end through real sockets: probes against fake
//! backends (killed, restarted, check port vs service port, blackholed,
//! HTTP status), rise/fall, passive ejection, fail-open and reject, and no
//! descriptor leaks.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use slb::backend::Backend;
use slb::config::{CheckType, HealthCheck};
use slb::health::{probe, CheckResult, Status};
use slb::stats::DropReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A fast check: 150ms interval, 100ms timeout (generous on a loaded
/// machine: a spurious timeout must not flip a test), rise 2, fall 2.
const FAST: &str = "interval: 150ms\ntimeout: 100ms\nhealthy_threshold: 2\nunhealthy_threshold: 2\n";

/// [`tcp_config`] with `health` (YAML lines) as the listener's health check.
fn config(backends: &[(SocketAddr, u32)], health: &str, extra: &str) -> String {
    let mut hc = String::from("    health_check:\n");
    for line in health.lines().filter(|l| !l.trim().is_empty()) {
        hc.push_str(&format!("      {line}\n"));
    }
    tcp_config("rr", backends, extra).replace("    health_check:\n      enabled: false\n", &hc)
}

/// Backend `i` of listener `l`, as its current snapshot has it.
fn backend(lb: &Lb, i: usize) -> Arc<Backend> {
    lb.listener("l").snapshot().backends[i].clone()
}

fn probes(b: &Backend) -> u64 {
    CheckResult::ALL.iter().map(|&r| b.state.health.checks(r)).sum()
}

/// Make a fake vanish: stop accepting and close its listening socket.
async fn kill(f: Fake) -> SocketAddr {
    f.task.abort();
    let _ = f.task.await;
    f.addr
}

/// Accepts and closes at once: a check port.
async fn check_port() -> Fake {
    fake(|_s| async {}).await
}

/// An HTTP server answering every request with `status`, remembering the
/// request heads it got.
async fn http_server(status: Arc<AtomicU16>, heads: Arc<Mutex<Vec<String>>>) -> Fake {
    fake(move |mut s| {
        let (status, heads) = (status.clone(), heads.clone());
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            heads
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let code = status.load(Relaxed);
            let reply = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
            let _ = s.write_all(reply.as_bytes()).await;
        }
    })
    .await
}

async fn both_up(lb: &Lb) {
    let (a, b) = (backend(lb, 0), backend(lb, 1));
    eventually("both backends up", || {
        a.state.health.is_up() && b.state.health.is_up()
    })
    .await;
}

#[tokio::test]
async fn killed_backend_goes_down_within_about_fall_intervals_and_gets_no_new_connections() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], FAST, "")).await;
    both_up(&lb).await;
    let dead = backend(&lb, 1);
    let killed = Instant::now();
    kill(b).await;
    eventually("killed backend down", || {
        dead.state.health.status() == Status::Down
    })
    .await;
    // fall = 2 probes at 100ms (±10%): about 200ms; generous on a loaded box.
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(3), "marked down after {took:?}");
    assert!(dead.state.health.checks(CheckResult::Refused) >= 2);
    let (total, failures) = (
        dead.state.stats.total.load(Relaxed),
        dead.state.stats.connect_failures.load(Relaxed),
    );
    for _ in 0..20 {
        assert_eq!(read_id(lb.addr("l")).await, "a");
    }
    assert_eq!(dead.state.stats.total.load(Relaxed), total);
    assert_eq!(
        dead.state.stats.connect_failures.load(Relaxed),
        failures,
        "no connection even tried it"
    );
    lb.stop().await;
}

#[tokio::test]
async fn restarted_backend_is_back_after_healthy_threshold_successes() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], FAST, "")).await;
    both_up(&lb).await;
    let back = backend(&lb, 1);
    let addr = kill(b).await;
    eventually("killed backend down", || {
        back.state.health.status() == Status::Down
    })
    .await;
    let ok_before = back.state.health.checks(CheckResult::Ok);
    let _b = fake_on(addr, |mut s| async move {
        let _ = s.write_all(b"b\n").await;
    })
    .await;
    eventually("restarted backend up", || back.state.health.is_up()).await;
    let oks = back.state.health.checks(CheckResult::Ok) - ok_before;
    assert!(
        oks >= 2,
        "up after {oks} successful probes, healthy_threshold is 2"
    );
    let mut seen_b = false;
    for _ in 0..10 {
        seen_b |= read_id(lb.addr("l")).await == "b";
    }
    assert!(seen_b, "the restarted backend gets new connections again");
    lb.stop().await;
}

#[tokio::test]
async fn closed_check_port_marks_down_while_the_service_port_is_open_and_open_connections_stay() {
    let service = id_server("a").await;
    let check = check_port().await;
    let health = format!("{FAST}port: {}\n", check.addr.port());
    let lb = start_lb(&config(&[(service.addr, 10)], &health, "")).await;
    let b = backend(&lb, 0);
    eventually("backend up", || b.state.health.is_up()).await;
    let mut open = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    assert_eq!(read_line(&mut open).await, "a");
    let check_addr = kill(check).await;
    eventually("backend down", || b.state.health.status() == Status::Down).await;
    assert!(b.state.health.checks(CheckResult::Refused) >= 2);
    // The service port itself still answers, and the connection opened
    // before the flip is left alone.
    assert_eq!(read_id(service.addr).await, "a");
    open.write_all(b"still here\n").await.unwrap();
    assert_eq!(read_line(&mut open).await, "still here");
    // And the reverse: the check port comes back, the backend follows.
    let _check = fake_on(check_addr, |_s| async {}).await;
    eventually("backend up again", || b.state.health.is_up()).await;
    drop(open);
    lb.stop().await;
}

#[tokio::test]
async fn open_check_port_marks_up_while_the_service_port_is_closed() {
    let check = check_port().await;
    let health = format!("{FAST}port: {}\n", check.addr.port());
    let lb = start_lb(&config(&[(refused_addr(), 10)], &health, "")).await;
    let b = backend(&lb, 0);
    eventually("backend up", || b.state.health.is_up()).await;
    assert_eq!(b.state.health.checks(CheckResult::Refused), 0);
    lb.stop().await;
}

#[tokio::test]
async fn blackholed_check_port_fails_at_the_timeout() {
    let service = echo().await;
    let hole = blackhole();
    let health = format!(
        "interval: 200ms\ntimeout: 50ms\nhealthy_threshold: 1\nunhealthy_threshold: 1\nport: {}\n",
        hole.addr.port()
    );
    let started = Instant::now();
    let lb = start_lb(&config(&[(service.addr, 10)], &health, "")).await;
    let b = backend(&lb, 0);
    eventually("first timeout", || {
        b.state.health.checks(CheckResult::Timeout) >= 1
    })
    .await;
    // The kernel would keep retrying the SYN for minutes; the probe gives up
    // at its 50ms timeout.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "first probe result after {took:?}");
    eventually("three timeouts", || {
        b.state.health.checks(CheckResult::Timeout) >= 3
    })
    .await;
    assert_eq!(b.state.health.status(), Status::Down);
    assert_eq!(b.state.health.checks(CheckResult::Refused), 0);
    assert_eq!(b.state.health.checks(CheckResult::Ok), 0);
    lb.stop().await;
}

#[tokio::test]
async fn flapping_check_never_flips_the_state() {
    // An HTTP check port answering 200, 500, 200, 500...: only the probes
    // connect to it, so results strictly alternate after the first success.
    let n = Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    let flappy = fake(move |mut s| {
        let i = counter.fetch_add(1, Relaxed);
        async move {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let code = if i % 2 == 0 { 200 } else { 500 };
            let _ = s.write_all(format!("HTTP/1.0 {code} X\r\n\r\n").as_bytes()).await;
        }
    })
    .await;
    // A long timeout: a probe that timed out on a loaded machine would break
    // the alternation.
    let health = format!(
        "interval: 200ms\ntimeout: 180ms\nhealthy_threshold: 2\nunhealthy_threshold: 2\ntype: http\nport: {}\n",
        flappy.addr.port()
    );
    let service = echo().await;
    let lb = start_lb(&config(&[(service.addr, 10)], &health, "")).await;
    let b = backend(&lb, 0);
    eventually("ten bad statuses", || {
        b.state.health.checks(CheckResult::BadStatus) >= 10
    })
    .await;
    assert!(b.state.health.is_up());
    assert_eq!(b.state.health.transitions(), 1, "only pending -> up");
    lb.stop().await;
}

#[tokio::test]
async fn every_backend_down_fails_open_across_all_of_them() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let health = format!("{FAST}port: {}\n", refused_addr().port());
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], &health, "")).await;
    let (x, y) = (backend(&lb, 0), backend(&lb, 1));
    let l = lb.listener("l");
    eventually("both down", || {
        x.state.health.status() == Status::Down && y.state.health.status() == Status::Down
    })
    .await;
    assert!(l.snapshot().fail_open);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..10 {
        ids.insert(read_id(lb.addr("l")).await);
    }
    assert_eq!(ids.len(), 2, "fail-open schedules across every backend: {ids:?}");
    // Data-path successes do not raise a down backend; only probes do.
    assert_eq!(x.state.health.status(), Status::Down);
    assert_eq!(l.stats.dropped(DropReason::NoBackend), 0);
    lb.stop().await;
}

#[tokio::test]
async fn every_backend_down_with_reject_closes_new_connections_at_once() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let health = format!("{FAST}port: {}\n", refused_addr().port());
    let lb = start_lb(&config(
        &[(a.addr, 10), (b.addr, 10)],
        &health,
        "on_all_unhealthy: reject",
    ))
    .await;
    let (x, y) = (backend(&lb, 0), backend(&lb, 1));
    let l = lb.listener("l");
    eventually("both down", || {
        x.state.health.status() == Status::Down && y.state.health.status() == Status::Down
    })
    .await;
    assert!(!l.snapshot().fail_open);
    let dropped = l.stats.dropped(DropReason::NoBackend);
    let start = Instant::now();
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(s.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "closed without data: {read:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        start.elapsed()
    );
    eventually("drop counted", || {
        l.stats.dropped(DropReason::NoBackend) == dropped + 1
    })
    .await;
    assert_eq!(a.accepted() + b.accepted(), 0, "no connection reached a backend");
    lb.stop().await;
}

#[tokio::test]
async fn http_check_follows_the_status_code() {
    let status = Arc::new(AtomicU16::new(200));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let server = http_server(status.clone(), heads.clone()).await;
    let health = format!("{FAST}type: http\npath: /healthz\nexpected_status: 200-299\n");
    let lb = start_lb(&config(&[(server.addr, 10)], &health, "")).await;
    let b = backend(&lb, 0);
    eventually("up on 200", || b.state.health.is_up()).await;
    let head = heads.lock().unwrap()[0].clone();
    assert!(head.starts_with("GET /healthz HTTP/1.0\r\n"), "{head:?}");
    assert!(
        head.contains(&format!("\r\nHost: {}\r\n", server.addr)),
        "{head:?}"
    );
    status.store(503, Relaxed);
    eventually("down on 503", || b.state.health.status() == Status::Down).await;
    assert!(b.state.health.checks(CheckResult::BadStatus) >= 2);
    status.store(302, Relaxed);
    let bad = b.state.health.checks(CheckResult::BadStatus);
    eventually("302 is outside 200-299", || {
        b.state.health.checks(CheckResult::BadStatus) >= bad + 3
    })
    .await;
    assert_eq!(b.state.health.status(), Status::Down);
    status.store(204, Relaxed);
    eventually("up on 204", || b.state.health.is_up()).await;
    lb.stop().await;
}

#[tokio::test]
async fn passive_ejection_marks_a_dead_backend_down_before_the_next_probe() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    // One probe at start, the next one 30-60s later: anything that happens
    // within the test is the data path's doing.
    let health = "interval: 60s\ntimeout: 1s\nhealthy_threshold: 1\nunhealthy_threshold: 2\n";
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], health, "")).await;
    both_up(&lb).await;
    let dead = backend(&lb, 1);
    kill(b).await;
    let mut connections = 0;
    while dead.state.health.status() != Status::Down {
        assert_eq!(read_id(lb.addr("l")).await, "a", "the client never notices");
        connections += 1;
        assert!(connections < 50, "not ejected after {connections} connections");
    }
    assert_eq!(probes(&dead), 1, "only the start-up probe ran");
    assert_eq!(
        dead.state.stats.connect_failures.load(Relaxed),
        2,
        "unhealthy_threshold failures"
    );
    for _ in 0..10 {
        assert_eq!(read_id(lb.addr("l")).await, "a");
    }
    assert_eq!(
        dead.state.stats.connect_failures.load(Relaxed),
        2,
        "an ejected backend is not tried"
    );
    lb.stop().await;
}

#[tokio::test]
async fn disabled_checks_keep_every_backend_eligible() {
    let a = id_server("a").await;
    let lb = start_lb(&tcp_config("rr", &[(a.addr, 10), (refused_addr(), 10)], "")).await;
    for _ in 0..10 {
        assert_eq!(read_id(lb.addr("l")).await, "a");
    }
    let dead = backend(&lb, 1);
    assert!(dead.state.stats.connect_failures.load(Relaxed) >= 5);
    assert!(
        dead.state.health.is_up(),
        "no passive ejection without health checks"
    );
    assert_eq!(probes(&dead), 0);
    lb.stop().await;
}

#[tokio::test]
async fn two_listeners_sharing_a_group_keep_separate_health() {
    let service = id_server("a").await;
    let check = check_port().await;
    let listener = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    health_check:\n      interval: 150ms\n      timeout: 100ms\n      unhealthy_threshold: 1\n      port: {port}\n"
        )
    };
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n{}{}backend_groups:\n  - name: g\n    backends:\n      - address: \"{}\"\n",
        listener("good", check.addr.port()),
        listener("bad", refused_addr().port()),
        service.addr
    );
    let lb = start_lb(&yaml).await;
    let good = lb.listener("good").snapshot().backends[0].clone();
    let bad = lb.listener("bad").snapshot().backends[0].clone();
    eventually("checked on both listeners", || {
        good.state.health.is_up() && bad.state.health.status() == Status::Down
    })
    .await;
    assert!(!Arc::ptr_eq(&good.state, &bad.state));
    lb.stop().await;
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

#[tokio::test]
async fn thousands_of_probes_leak_no_descriptors() {
    let status = Arc::new(AtomicU16::new(200));
    let tcp = check_port().await;
    let http = http_server(status, Arc::default()).await;
    let refused = refused_addr();
    let hole = blackhole();
    let check = |kind, timeout| HealthCheck {
        kind,
        port: None,
        interval: Duration::from_secs(10),
        timeout,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        path: "/".into(),
        expected_status: (200, 399),
    };
    // Generous timeouts where the answer must be Ok on a loaded machine; a
    // short one for the blackhole, whose answer is always a timeout.
    let t = check(CheckType::Tcp, Duration::from_secs(5));
    let h = check(CheckType::Http, Duration::from_secs(5));
    let short = check(CheckType::Tcp, Duration::from_millis(20));
    let run = |n: usize| {
        let (t, h, short) = (t.clone(), h.clone(), short.clone());
        async move {
            for i in 0..n {
                assert_eq!(probe::check(tcp.addr, &t).await, CheckResult::Ok, "tcp probe {i}");
                if i % 3 == 0 {
                    assert_eq!(
                        probe::check(http.addr, &h).await,
                        CheckResult::Ok,
                        "http probe {i}"
                    );
                    assert_eq!(probe::check(refused, &t).await, CheckResult::Refused);
                }
                if i % 100 == 0 {
                    assert_eq!(probe::check(hole.addr, &short).await, CheckResult::Timeout);
                }
            }
        }
    };
    run(50).await;
    let before = open_fds();
    tokio::time::timeout(Duration::from_secs(120), run(3000))
        .await
        .expect("3000 probes in time");
    // A leak would be thousands of descriptors (or EMFILE, failing a probe
    // above); the slack only absorbs the other tests of this binary.
    eventually("descriptors back to the baseline", || open_fds() <= before + 200).await;
}
