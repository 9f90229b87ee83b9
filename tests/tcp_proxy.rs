//! The TCP data path end to end: bytes, half-close, resets, failover,
//! timeouts, limits, IPv6 (and IPv4 <-> IPv6) and shutdown, through real
//! sockets.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use slb::stats::DropReason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_mib_each_way_at_once_arrive_identical() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let (mut r, mut w) = s.into_split();
    const TOTAL: usize = 64 << 20;
    let writer = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut seed = 0x9e37_79b9_u32;
        for _ in 0..TOTAL / chunk.len() {
            for b in chunk.iter_mut() {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                *b = seed as u8;
            }
            hash.update(&chunk);
            w.write_all(&chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        hash.finalize()
    });
    let reader = tokio::spawn(async move {
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut n_total = 0;
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            n_total += n;
        }
        (n_total, hash.finalize())
    });
    let sent = tokio::time::timeout(Duration::from_secs(120), writer)
        .await
        .unwrap()
        .unwrap();
    let (n, received) = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, TOTAL);
    assert_eq!(sent, received);
    let l = lb.listener("l");
    eventually("byte counters", || {
        l.stats.rx_bytes.load(Relaxed) == TOTAL as u64 && l.stats.tx_bytes.load(Relaxed) == TOTAL as u64
    })
    .await;
    lb.stop().await;
}

#[tokio::test]
async fn client_half_close_still_gets_the_backend_reply() {
    // The backend reads to EOF, then answers and closes.
    let backend = fake(|mut s| async move {
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(format!("got {}", got.len()).as_bytes())
            .await
            .unwrap();
    })
    .await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    s.write_all(b"hello").await.unwrap();
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    timeout(s.read_to_string(&mut reply)).await.unwrap();
    assert_eq!(reply, "got 5");
    lb.stop().await;
}

#[tokio::test]
async fn backend_half_close_still_receives_the_client_data() {
    // The backend speaks first, closes its write side, then reads to EOF.
    let (tx, rx) = oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let backend = fake(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = String::new();
            s.read_to_string(&mut got).await.unwrap();
            if let Some(tx) = tx {
                let _ = tx.send(got);
            }
        }
    })
    .await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let mut greeting = String::new();
    timeout(s.read_to_string(&mut greeting)).await.unwrap();
    assert_eq!(greeting, "greeting");
    s.write_all(b"after the backend's FIN").await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(timeout(rx).await.unwrap(), "after the backend's FIN");
    lb.stop().await;
}

#[tokio::test]
async fn backend_that_speaks_first_is_heard() {
    let backend = id_server("banner").await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    assert_eq!(read_id(lb.addr("l")).await, "banner");
    lb.stop().await;
}

#[tokio::test]
async fn client_reset_resets_the_backend() {
    let (tx, rx) = oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let backend = fake(move |mut s| {
        let tx = tx.lock().unwrap().take();
        async move {
            let mut buf = [0u8; 64];
            let mut r = s.read(&mut buf).await;
            while matches!(r, Ok(n) if n > 0) {
                r = s.read(&mut buf).await;
            }
            if let Some(tx) = tx {
                let _ = tx.send(r.map_err(|e| e.kind()));
            }
        }
    })
    .await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    s.write_all(b"x").await.unwrap();
    eventually("backend accepted", || backend.accepted() == 1).await;
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
    assert_eq!(
        timeout(rx).await.unwrap(),
        Err(std::io::ErrorKind::ConnectionReset)
    );
    lb.stop().await;
}

#[tokio::test]
async fn backend_reset_resets_the_client() {
    let backend = fake(|s| async move {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let mut s = s;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
        drop(s);
    })
    .await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    s.write_all(b"x").await.unwrap();
    let mut buf = [0u8; 16];
    let r = timeout(s.read(&mut buf)).await;
    assert_eq!(r.map_err(|e| e.kind()), Err(std::io::ErrorKind::ConnectionReset));
    lb.stop().await;
}

#[tokio::test]
async fn refused_backend_is_skipped() {
    let good = id_server("good").await;
    let lb = start_lb(&tcp_config("rr", &[(refused_addr(), 10), (good.addr, 10)], "")).await;
    for _ in 0..6 {
        assert_eq!(read_id(lb.addr("l")).await, "good");
    }
    let snap = lb.listener("l").snapshot();
    assert!(snap.backends[0].state.stats.connect_failures.load(Relaxed) >= 3);
    assert_eq!(snap.backends[1].state.stats.total.load(Relaxed), 6);
    lb.stop().await;
}

#[tokio::test]
async fn blackholed_backend_is_skipped_after_connect_timeout() {
    let hole = blackhole();
    let good = id_server("good").await;
    let lb = start_lb(&tcp_config(
        "rr",
        &[(hole.addr, 10), (good.addr, 10)],
        "connect_timeout: 300ms",
    ))
    .await;
    // rr starts with the blackhole: this connection pays the connect timeout.
    let t = Instant::now();
    assert_eq!(read_id(lb.addr("l")).await, "good");
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(290), "took {took:?}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    lb.stop().await;
}

#[tokio::test]
async fn every_backend_down_closes_the_client_promptly() {
    let lb = start_lb(&tcp_config(
        "rr",
        &[(refused_addr(), 10), (refused_addr(), 10)],
        "",
    ))
    .await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let mut buf = [0u8; 8];
    let t = Instant::now();
    let r = timeout(s.read(&mut buf)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(2));
    let l = lb.listener("l");
    eventually("drop counted", || l.stats.dropped(DropReason::ConnectFailed) == 1).await;
    // One client connection tries each backend exactly once, then gives up.
    for b in &l.snapshot().backends {
        assert_eq!(
            b.state.stats.connect_failures.load(Relaxed),
            1,
            "connect attempts to {} for one client connection",
            b.addr
        );
    }
    lb.stop().await;
}

#[tokio::test]
async fn empty_group_drops_with_no_backend() {
    let lb = start_lb(&tcp_config("rr", &[], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(timeout(s.read(&mut buf)).await, Ok(0) | Err(_)));
    let l = lb.listener("l");
    eventually("drop counted", || l.stats.dropped(DropReason::NoBackend) == 1).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_connections() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let addr = lb.addr("l");
    let mut conns = Vec::new();
    for _ in 0..1000 {
        conns.push(timeout(TcpStream::connect(addr)).await.unwrap());
    }
    let l = lb.listener("l");
    eventually("1000 active", || l.stats.active.load(Relaxed) == 1000).await;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            tokio::spawn(async move {
                let msg = format!("message {i}\n");
                s.write_all(msg.as_bytes()).await.unwrap();
                let mut buf = vec![0u8; msg.len()];
                s.read_exact(&mut buf).await.unwrap();
                assert_eq!(buf, msg.as_bytes());
            })
        })
        .collect();
    for t in tasks {
        timeout(t).await.unwrap();
    }
    assert_eq!(backend.accepted(), 1000);
    eventually("gauge back to 0", || l.stats.active.load(Relaxed) == 0).await;
    lb.stop().await;
}

#[tokio::test]
async fn weight_zero_backend_gets_no_new_connections() {
    let zero = id_server("zero").await;
    let ten = id_server("ten").await;
    let lb = start_lb(&tcp_config("wrr", &[(zero.addr, 0), (ten.addr, 10)], "")).await;
    for _ in 0..10 {
        assert_eq!(read_id(lb.addr("l")).await, "ten");
    }
    assert_eq!(zero.accepted(), 0);
    lb.stop().await;
}

#[tokio::test]
async fn rr_cycles_in_order_ignoring_weights() {
    let (a, b, c) = (id_server("a").await, id_server("b").await, id_server("c").await);
    let lb = start_lb(&tcp_config("rr", &[(a.addr, 1), (b.addr, 50), (c.addr, 100)], "")).await;
    let mut order = Vec::new();
    for _ in 0..9 {
        order.push(read_id(lb.addr("l")).await);
    }
    assert_eq!(order.join(""), "abcabcabc");
    lb.stop().await;
}

#[tokio::test]
async fn wrr_one_to_two_follows_the_smooth_cycle_exactly() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let lb = start_lb(&tcp_config("wrr", &[(a.addr, 1), (b.addr, 2)], "")).await;
    let mut order = String::new();
    for _ in 0..30 {
        order.push_str(&read_id(lb.addr("l")).await);
    }
    // Smooth WRR's 1:2 cycle is b a b (src/scheduler/wrr.rs); wherever the
    // cursor starts, 30 picks are ten turns of one rotation of it.
    let rotations: Vec<String> = ["bab", "abb", "bba"].iter().map(|c| c.repeat(10)).collect();
    assert!(
        rotations.contains(&order),
        "{order} is not ten turns of the cycle b a b"
    );
    assert_eq!(order.matches('a').count(), 10);
    lb.stop().await;
}

#[tokio::test]
async fn max_connections_pauses_accept_until_a_slot_frees() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "max_connections: 2")).await;
    let addr = lb.addr("l");
    let mut first = timeout(TcpStream::connect(addr)).await.unwrap();
    let mut second = timeout(TcpStream::connect(addr)).await.unwrap();
    for s in [&mut first, &mut second] {
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        timeout(s.read_exact(&mut b)).await.unwrap();
    }
    // The third handshake completes in the kernel backlog, but slb does not
    // accept it while two are open.
    let mut third = timeout(TcpStream::connect(addr)).await.unwrap();
    third.write_all(b"pong").await.unwrap();
    let l = lb.listener("l");
    eventually("limit reached", || l.stats.limit_events.load(Relaxed) >= 1).await;
    let mut b = [0u8; 4];
    assert!(
        tokio::time::timeout(Duration::from_millis(200), third.read_exact(&mut b))
            .await
            .is_err()
    );
    assert_eq!(backend.accepted(), 2);
    drop(first);
    timeout(third.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"pong");
    drop((second, third));
    lb.stop().await;
}

#[tokio::test]
async fn idle_connection_is_closed_after_idle_timeout() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "idle_timeout: 300ms")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    // Traffic keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        s.write_all(b"k").await.unwrap();
        let mut b = [0u8; 1];
        timeout(s.read_exact(&mut b)).await.unwrap();
    }
    // ...silence closes it.
    let t = Instant::now();
    let mut b = [0u8; 1];
    let r = timeout(s.read(&mut b)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    lb.stop().await;
}

#[tokio::test]
async fn ipv6_listener_and_backend() {
    if !ipv6_loopback_available() {
        return;
    }
    let backend = fake_on("[::1]:0".parse().unwrap(), |mut s| async move {
        let _ = s.write_all(b"six\n").await;
    })
    .await;
    let lb = start_lb(&ipv6_listener_config(backend.addr)).await;
    assert!(lb.addr("l").is_ipv6());
    assert_eq!(read_id(lb.addr("l")).await, "six");
    lb.stop().await;
}

/// A one-listener rr configuration whose listener is on `[::1]:0`.
fn ipv6_listener_config(backend: std::net::SocketAddr) -> String {
    tcp_config("rr", &[(backend, 10)], "").replace(
        "listen: 127.0.0.1:0\n    backend_group",
        "listen: \"[::1]:0\"\n    backend_group",
    )
}

/// Whether this host can bind `[::1]` (IPv6 loopback); tests that need it
/// skip, saying so, when it cannot.
fn ipv6_loopback_available() -> bool {
    let ok = std::net::TcpListener::bind("[::1]:0").is_ok();
    if !ok {
        eprintln!("skipped: [::1] is not available on this host");
    }
    ok
}

#[tokio::test]
async fn ipv4_listener_forwards_to_an_ipv6_backend() {
    if !ipv6_loopback_available() {
        return;
    }
    let backend = fake_on("[::1]:0".parse().unwrap(), |mut s| async move {
        let _ = s
            .write_all(format!("from {}\n", s.peer_addr().unwrap().ip()).as_bytes())
            .await;
    })
    .await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    assert!(lb.addr("l").is_ipv4());
    // The backend sees slb connect from ::1: the backend leg is IPv6.
    assert_eq!(read_id(lb.addr("l")).await, "from ::1");
    lb.stop().await;
}

#[tokio::test]
async fn ipv6_listener_forwards_to_an_ipv4_backend() {
    if !ipv6_loopback_available() {
        return;
    }
    let backend = fake(|mut s| async move {
        let _ = s
            .write_all(format!("from {}\n", s.peer_addr().unwrap().ip()).as_bytes())
            .await;
    })
    .await;
    let lb = start_lb(&ipv6_listener_config(backend.addr)).await;
    assert!(lb.addr("l").is_ipv6());
    assert_eq!(read_id(lb.addr("l")).await, "from 127.0.0.1");
    lb.stop().await;
}

#[tokio::test]
async fn shutdown_stops_accepting_and_drains_live_connections() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let addr = lb.addr("l");
    let mut live = timeout(TcpStream::connect(addr)).await.unwrap();
    live.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    timeout(live.read_exact(&mut b)).await.unwrap();
    lb.shutdown.cancel();
    // New connections are refused once the accept loop has stopped.
    let mut refused = false;
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "listener still accepting after shutdown");
    // The live connection still works, then ends and the server exits.
    live.write_all(b"b").await.unwrap();
    timeout(live.read_exact(&mut b)).await.unwrap();
    assert_eq!(&b, b"b");
    assert!(!lb.task.is_finished());
    drop(live);
    timeout(lb.task).await.unwrap().unwrap();
}
