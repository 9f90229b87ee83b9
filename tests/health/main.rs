//! Health checks end to end through real sockets. Here: probes against
//! fake backends (killed, restarted, check port vs service port, blackholed,
//! flapping, HTTP status). `ejection.rs`: passive ejection, fail-open and
//! reject, disabled checks, per-listener state. `leaks.rs`: descriptors.
//! `logs.rs`: what the binary logs on each transition (`slb_process.rs`
//! runs it).

#[path = "../common/mod.rs"]
mod common;
mod ejection;
mod leaks;
mod logs;
mod slb_process;

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
    // fall = 2 failed probes, 150ms (±10%) apart, the first within one
    // interval of the kill: at most about 330ms. The 3s bound is generous
    // on a loaded box.
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
