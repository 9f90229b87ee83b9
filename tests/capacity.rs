//! AI capacity through real sockets: backend slots (`max_connections`), the
//! listener's wait queue (FIFO as slots free, timeout, full, clients that
//! leave), UDP flows past the slots, and slow start ramping a revived
//! backend's share.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{eventually, fake_on, id_server, read_id, read_line, start_lb, timeout, Lb, DEADLINE};
use slb::stats::DropReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// A TCP listener `l` (health checks off unless `extra` sets them) over
/// `backends` given as (address, max_connections).
fn config(scheduler: &str, backends: &[(SocketAddr, Option<u64>)], extra: &str) -> String {
    let mut yaml = format!(
        "runtime:\n  drain_timeout: 5s\nlisteners:\n  - name: l\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    scheduler: {scheduler}\n"
    );
    if !extra.contains("health_check") {
        yaml.push_str("    health_check:\n      enabled: false\n");
    }
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("backend_groups:\n  - name: g\n    backends:\n");
    for (addr, max) in backends {
        yaml.push_str(&format!("      - address: \"{addr}\"\n"));
        if let Some(max) = max {
            yaml.push_str(&format!("        max_connections: {max}\n"));
        }
    }
    yaml
}

/// Connect through the listener and read the backend's id: a held,
/// established connection.
async fn hold(addr: SocketAddr) -> (TcpStream, String) {
    let mut s = timeout(TcpStream::connect(addr)).await.expect("connect");
    let id = read_line(&mut s).await;
    (s, id)
}

/// Whether the peer closed (EOF or reset) without sending anything.
async fn closed_without_data(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 16];
    matches!(timeout(s.read(&mut b)).await, Ok(0) | Err(_))
}

fn dropped(lb: &Lb, reason: DropReason) -> u64 {
    lb.listener("l").stats.dropped(reason)
}

fn queued(lb: &Lb) -> usize {
    lb.listener("l").queue().expect("a queue").len()
}

fn active(lb: &Lb, i: usize) -> u64 {
    lb.listener("l").snapshot().backends[i]
        .state
        .stats
        .active
        .load(Relaxed)
}

#[tokio::test]
async fn backend_at_max_connections_gets_no_new_connection() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let lb = start_lb(&config("rr", &[(a.addr, Some(2)), (b.addr, Some(3))], "")).await;
    let addr = lb.addr("l");
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(hold(addr).await);
    }
    let ids = |held: &[(TcpStream, String)], id: &str| held.iter().filter(|(_, i)| i == id).count();
    assert_eq!(
        (ids(&held, "a"), ids(&held, "b")),
        (2, 3),
        "slots fill, none beyond"
    );
    // Every slot taken and no queue: refused at once and counted.
    let mut extra = timeout(TcpStream::connect(addr)).await.unwrap();
    assert!(closed_without_data(&mut extra).await);
    eventually("full counted", || dropped(&lb, DropReason::Full) == 1).await;
    assert_eq!((active(&lb, 0), active(&lb, 1)), (2, 3));
    // A slot on `a` frees: the next connection goes there.
    let i = held.iter().position(|(_, id)| id == "a").unwrap();
    drop(held.remove(i));
    eventually("slot freed", || active(&lb, 0) == 1).await;
    assert_eq!(read_id(addr).await, "a");
    drop(held);
    lb.stop().await;
}

#[tokio::test]
async fn queued_connections_are_served_in_fifo_order_as_slots_free() {
    let a = id_server("a").await;
    let lb = start_lb(&config(
        "lc",
        &[(a.addr, Some(1))],
        "queue: {size: 10, timeout: 30s}",
    ))
    .await;
    let addr = lb.addr("l");
    let (first, _) = hold(addr).await;
    let mut waiting = Vec::new();
    for i in 0..4 {
        waiting.push(timeout(TcpStream::connect(addr)).await.unwrap());
        eventually("queued", || queued(&lb) == i + 1).await;
    }
    assert_eq!(a.accepted(), 1, "queued connections do not reach the backend");
    let mut current = first;
    for i in 0..4 {
        drop(current);
        // Exactly the oldest waiter gets the freed slot.
        current = waiting.remove(0);
        assert_eq!(read_line(&mut current).await, "a", "waiter {i} served");
        assert_eq!(queued(&lb), 3 - i, "the others still wait");
        assert_eq!(a.accepted(), i + 2);
    }
    assert_eq!(active(&lb, 0), 1, "never more than the slots");
    let q = lb.listener("l").queue().unwrap().wait.count();
    assert_eq!(q, 4, "every waiter's wait recorded");
    drop(current);
    lb.stop().await;
}

#[tokio::test]
async fn a_request_sent_while_queued_reaches_the_backend_when_dispatched() {
    let backend = common::echo().await;
    let yaml = config(
        "lc",
        &[(backend.addr, Some(1))],
        "queue: {size: 10, timeout: 30s}",
    );
    let lb = start_lb(&yaml).await;
    let addr = lb.addr("l");
    let mut first = timeout(TcpStream::connect(addr)).await.unwrap();
    first.write_all(b"one\n").await.unwrap();
    assert_eq!(read_line(&mut first).await, "one");
    // Two waiters send their requests at once, before they get a slot; the
    // second also closes its write side (a half-close counts as gone).
    let mut waiter = timeout(TcpStream::connect(addr)).await.unwrap();
    waiter.write_all(b"two\n").await.unwrap();
    eventually("queued", || queued(&lb) == 1).await;
    let mut leaver = timeout(TcpStream::connect(addr)).await.unwrap();
    leaver.write_all(b"three\n").await.unwrap();
    eventually("queued behind", || queued(&lb) == 2).await;
    leaver.shutdown().await.unwrap();
    eventually("a waiter with bytes pending that hangs up leaves", || {
        dropped(&lb, DropReason::QueueAbandoned) == 1
    })
    .await;
    drop(first);
    assert_eq!(
        read_line(&mut waiter).await,
        "two",
        "the queued request was delivered"
    );
    waiter.write_all(b"more\n").await.unwrap();
    assert_eq!(read_line(&mut waiter).await, "more");
    drop((waiter, leaver));
    lb.stop().await;
}

#[tokio::test]
async fn queue_timeout_closes_and_counts() {
    let a = id_server("a").await;
    let lb = start_lb(&config(
        "wrr",
        &[(a.addr, Some(1))],
        "queue: {size: 10, timeout: 300ms}",
    ))
    .await;
    let addr = lb.addr("l");
    let (_held, _) = hold(addr).await;
    let started = tokio::time::Instant::now();
    let mut late = timeout(TcpStream::connect(addr)).await.unwrap();
    assert!(closed_without_data(&mut late).await);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "waited for the timeout"
    );
    eventually("timeout counted", || dropped(&lb, DropReason::QueueTimeout) == 1).await;
    assert_eq!((queued(&lb), a.accepted()), (0, 1));
    lb.stop().await;
}

#[tokio::test]
async fn queue_full_refuses_at_once_and_counts() {
    let a = id_server("a").await;
    let lb = start_lb(&config(
        "wrr",
        &[(a.addr, Some(1))],
        "queue: {size: 2, timeout: 30s}",
    ))
    .await;
    let addr = lb.addr("l");
    let (held, _) = hold(addr).await;
    let w1 = timeout(TcpStream::connect(addr)).await.unwrap();
    let w2 = timeout(TcpStream::connect(addr)).await.unwrap();
    eventually("two queued", || queued(&lb) == 2).await;
    let mut third = timeout(TcpStream::connect(addr)).await.unwrap();
    let t = tokio::time::Instant::now();
    assert!(closed_without_data(&mut third).await);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused at once, not at the queue timeout"
    );
    eventually("queue_full counted", || dropped(&lb, DropReason::QueueFull) == 1).await;
    assert_eq!(queued(&lb), 2);
    drop((held, w1, w2));
    lb.stop().await;
}

#[tokio::test]
async fn client_that_leaves_the_queue_does_not_consume_a_slot() {
    let a = id_server("a").await;
    let lb = start_lb(&config(
        "wrr",
        &[(a.addr, Some(1))],
        "queue: {size: 10, timeout: 30s}",
    ))
    .await;
    let addr = lb.addr("l");
    let (held, _) = hold(addr).await;
    // One client leaves by closing, one by resetting.
    let mut leaving = timeout(TcpStream::connect(addr)).await.unwrap();
    leaving.write_all(b"request bytes").await.unwrap();
    eventually("queued", || queued(&lb) == 1).await;
    drop(leaving);
    let resetting = timeout(TcpStream::connect(addr)).await.unwrap();
    eventually("queued again", || queued(&lb) == 1).await;
    socket2::SockRef::from(&resetting)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(resetting);
    eventually("both left the queue", || {
        dropped(&lb, DropReason::QueueAbandoned) == 2
    })
    .await;
    assert_eq!(queued(&lb), 0);
    drop(held);
    eventually("slot freed", || active(&lb, 0) == 0).await;
    assert_eq!(read_id(addr).await, "a", "the slot went to a live client");
    assert_eq!(a.accepted(), 2, "the leavers never reached the backend");
    lb.stop().await;
}

#[tokio::test]
async fn a_waiter_gets_the_slot_of_a_backend_that_comes_back() {
    // One backend full, the other down: a waiter is served by the down one
    // the moment it comes back (a health flip dispatches the queue).
    let a = id_server("a").await;
    let spare = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let b_addr = spare.local_addr().unwrap();
    drop(spare);
    let yaml = config(
        "rr",
        &[(a.addr, Some(1)), (b_addr, Some(1))],
        "health_check: {interval: 100ms, timeout: 50ms, healthy_threshold: 1, unhealthy_threshold: 1}\nqueue: {size: 10, timeout: 30s}",
    );
    let lb = start_lb(&yaml).await;
    let l = lb.listener("l");
    eventually("a up, b down", || {
        let s = l.snapshot();
        s.backends[0].state.health.is_up() && s.backends[1].state.health.status() == slb::health::Status::Down
    })
    .await;
    let addr = lb.addr("l");
    let (_held, id) = hold(addr).await;
    assert_eq!(id, "a");
    let mut waiter = timeout(TcpStream::connect(addr)).await.unwrap();
    eventually("queued", || queued(&lb) == 1).await;
    let _b = fake_on(b_addr, |mut s| async move {
        let _ = s.write_all(b"b\n").await;
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await;
    assert_eq!(read_line(&mut waiter).await, "b", "served by the revived backend");
    assert_eq!(queued(&lb), 0);
    lb.stop().await;
}

#[tokio::test]
async fn udp_flows_past_the_slots_are_dropped_and_counted() {
    let backend = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let b_addr = backend.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        while let Ok((n, peer)) = backend.recv_from(&mut buf).await {
            let _ = backend.send_to(&buf[..n], peer).await;
        }
    });
    let yaml = format!(
        "listeners:\n  - name: u\n    protocol: udp\n    listen: 127.0.0.1:0\n    backend_group: g\n    health_check: {{enabled: false}}\nbackend_groups:\n  - name: g\n    backends:\n      - address: \"{b_addr}\"\n        max_connections: 2\n"
    );
    let lb = start_lb(&yaml).await;
    let addr = lb.addr("u");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    }
    let mut buf = [0u8; 64];
    for c in &clients[..2] {
        c.send_to(b"hi", addr).await.unwrap();
        let (n, _) = timeout(c.recv_from(&mut buf)).await.unwrap();
        assert_eq!(&buf[..n], b"hi");
    }
    clients[2].send_to(b"hi", addr).await.unwrap();
    let l = lb.listener("u");
    eventually("full counted", || l.stats.dropped(DropReason::Full) == 1).await;
    let got = tokio::time::timeout(Duration::from_millis(300), clients[2].recv_from(&mut buf)).await;
    assert!(got.is_err(), "no reply for a flow past the slots");
    assert_eq!(l.snapshot().backends[0].state.stats.active.load(Relaxed), 2);
    // The first flows keep working.
    clients[0].send_to(b"again", addr).await.unwrap();
    let (n, _) = timeout(clients[0].recv_from(&mut buf)).await.unwrap();
    assert_eq!(&buf[..n], b"again");
    echo.abort();
    lb.stop().await;
}

#[tokio::test]
async fn slow_start_ramps_a_revived_backends_share() {
    let a = id_server("a").await;
    let b = id_server("b").await;
    let b_addr = b.addr;
    let yaml = config(
        "wrr",
        &[(a.addr, None), (b_addr, None)],
        "health_check: {interval: 100ms, timeout: 50ms, healthy_threshold: 1, unhealthy_threshold: 1}\nslow_start: 3s",
    );
    let lb = start_lb(&yaml).await;
    let l = lb.listener("l");
    let up = |i: usize| l.snapshot().backends[i].state.health.is_up();
    eventually("both up at start", || up(0) && up(1)).await;
    assert!(!l.snapshot().ramping, "a backend up at start is not ramped");
    // b dies and comes back on the same port.
    b.task.abort();
    eventually("b down", || !up(1)).await;
    let _b = fake_on(b_addr, |mut s| async move {
        let _ = s.write_all(b"b\n").await;
    })
    .await;
    eventually("b up again", || up(1)).await;
    let ramp_start = tokio::time::Instant::now();
    let addr = lb.addr("l");
    // The share of b in consecutive windows of the ramp, then after it.
    let mut shares = Vec::new();
    for until in [1.0, 2.0, 3.0, 4.5] {
        let (mut to_b, mut n) = (0, 0);
        while ramp_start.elapsed() < Duration::from_secs_f64(until) {
            to_b += usize::from(read_id(addr).await == "b");
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        shares.push(to_b as f64 / n.max(1) as f64);
    }
    eprintln!("share of the revived backend per window: {shares:?}");
    assert!(shares[0] < 0.3, "a trickle at first: {shares:?}");
    assert!(shares[3] > 0.4, "a full share after the ramp: {shares:?}");
    assert!(shares[0] < shares[2], "rising: {shares:?}");
    assert!(!l.snapshot().ramping, "the ramp ended");
    let w = &l.snapshot().backends[1];
    assert_eq!((w.weight, w.configured_weight), (10, 10));
    lb.stop().await;
}

#[tokio::test]
async fn capacity_settings_show_in_status_and_metrics() {
    let a = id_server("a").await;
    let lb = start_lb(&config(
        "lc",
        &[(a.addr, Some(1))],
        "queue: {size: 5, timeout: 30s}\nslow_start: 10s",
    ))
    .await;
    let addr = lb.addr("l");
    let (held, _) = hold(addr).await;
    let waiter = timeout(TcpStream::connect(addr)).await.unwrap();
    eventually("queued", || queued(&lb) == 1).await;
    let admin = lb.state.admin_addr.expect("admin");
    let status = http_get(admin, "/status").await;
    let v: serde_json::Value = serde_json::from_str(&status).expect("json");
    let l = &v["listeners"][0];
    assert_eq!(l["queue"]["size"], 5);
    assert_eq!(l["queue"]["length"], 1);
    assert_eq!(l["slow_start_seconds"], 10.0);
    assert_eq!(l["backends"][0]["max_connections"], 1);
    assert_eq!(l["backends"][0]["active"], 1);
    let metrics = http_get(admin, "/metrics").await;
    for want in [
        "slb_listener_queue_length{listener=\"l\"} 1",
        &format!(
            "slb_backend_max_connections{{listener=\"l\",backend=\"{}\"}} 1",
            a.addr
        ),
        "# TYPE slb_listener_queue_wait_seconds histogram",
        "slb_listener_queue_wait_seconds_count{listener=\"l\"} 0",
    ] {
        assert!(metrics.contains(want), "missing {want:?} in\n{metrics}");
    }
    drop(held);
    eventually("waiter dispatched", || queued(&lb) == 0).await;
    let metrics = http_get(admin, "/metrics").await;
    assert!(
        metrics.contains("slb_listener_queue_wait_seconds_count{listener=\"l\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("slb_listener_queue_wait_seconds_bucket{listener=\"l\",le=\"+Inf\"} 1"),
        "{metrics}"
    );
    drop(waiter);
    lb.stop().await;
}

/// A bare HTTP/1.0 GET; the body.
async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = timeout(TcpStream::connect(addr)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(DEADLINE, s.read_to_string(&mut out))
        .await
        .expect("admin answers")
        .unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}
