//! Session persistence through real sockets: a source IP sticks to its
//! backend under any scheduler, sources spread, and an entry re-points when
//! its backend stops taking connections. Expiry is unit-tested with paused
//! time in src/persistence.rs (the timeout is at least 30 s).

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};

use common::*;
use tokio::net::TcpSocket;

const STICKY: &str = "session_persistence:\n  enabled: true\n  timeout: 60s\n";

/// Connect from 127.0.0.`host` and read the backend's id.
async fn id_from(host: u8, lb: SocketAddr) -> String {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))
        .expect("bind client");
    let mut s = timeout(socket.connect(lb)).await.expect("connect");
    read_line(&mut s).await
}

const IDS: [&str; 3] = ["a", "b", "c"];

async fn three() -> [Fake; 3] {
    [
        id_server(IDS[0]).await,
        id_server(IDS[1]).await,
        id_server(IDS[2]).await,
    ]
}

#[tokio::test]
async fn twenty_connections_from_one_source_land_on_one_backend_with_any_scheduler() {
    for scheduler in ["rr", "wrr", "lc", "wlc", "p2c"] {
        let fakes = three().await;
        let backends: Vec<_> = fakes.iter().map(|f| (f.addr, 10)).collect();
        let lb = start_lb(&tcp_config(scheduler, &backends, STICKY)).await;
        let first = id_from(2, lb.addr("l")).await;
        for _ in 0..19 {
            assert_eq!(id_from(2, lb.addr("l")).await, first, "{scheduler}");
        }
        let table = lb.listener("l").sessions().expect("persistence is on").len();
        assert_eq!(table, 1);
        lb.stop().await;
    }
}

#[tokio::test]
async fn different_sources_spread_and_each_sticks() {
    let fakes = three().await;
    let backends: Vec<_> = fakes.iter().map(|f| (f.addr, 10)).collect();
    let lb = start_lb(&tcp_config("rr", &backends, STICKY)).await;
    let mut first = HashMap::new();
    for host in 10..40 {
        first.insert(host, id_from(host, lb.addr("l")).await);
    }
    // New sources are scheduled by rr: 10 each.
    for id in ["a", "b", "c"] {
        assert_eq!(first.values().filter(|v| *v == id).count(), 10, "{id}");
    }
    for host in (10..40).rev() {
        assert_eq!(id_from(host, lb.addr("l")).await, first[&host], "client {host}");
    }
    assert_eq!(lb.listener("l").sessions().expect("on").len(), 30);
    lb.stop().await;
}

#[tokio::test]
async fn entry_repoints_when_its_backend_stops_taking_connections() {
    // Health checks are a separate issue, so the backend leaves by dying:
    // the remembered backend refuses, the next candidate takes the client
    // and the entry is re-pointed there. When the old backend comes back,
    // the client stays where it was re-pointed.
    let mut fakes = three().await;
    let backends: Vec<_> = fakes.iter().map(|f| (f.addr, 10)).collect();
    let lb = start_lb(&tcp_config("rr", &backends, STICKY)).await;
    let was = id_from(2, lb.addr("l")).await;
    let gone = IDS.iter().position(|id| *id == was).expect("a known id");
    let dead = &fakes[gone];
    dead.task.abort();
    let _ = (&mut fakes[gone].task).await;
    let now = id_from(2, lb.addr("l")).await;
    assert_ne!(now, was);
    let revived = id_server_on(fakes[gone].addr, IDS[gone]).await;
    for _ in 0..10 {
        assert_eq!(id_from(2, lb.addr("l")).await, now);
    }
    assert_eq!(revived.accepted(), 0, "the old backend gets the client no more");
    // ...though it is back: rr sends one of three new clients to it.
    let mut fresh = Vec::new();
    for host in 3..6 {
        fresh.push(id_from(host, lb.addr("l")).await);
    }
    assert!(fresh.iter().any(|id| id == IDS[gone]), "{fresh:?}");
    lb.stop().await;
}

/// [`id_server`] on a given address (to bring a backend back).
async fn id_server_on(addr: SocketAddr, id: &'static str) -> Fake {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fake_on(addr, move |mut s| async move {
        let _ = s.write_all(format!("{id}\n").as_bytes()).await;
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

/// Two id servers on 127.0.0.2:P and 127.0.0.3:P, with health-check
/// listeners on the same IPs at a shared port Q (the check port is one
/// number for the whole listener).
async fn pair_with_check_ports() -> ([Fake; 2], [Fake; 2], u16) {
    let ip = |h: u8| std::net::IpAddr::from(Ipv4Addr::new(127, 0, 0, h));
    let a = fake_on((ip(2), 0).into(), |mut s| async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"a\n").await;
    })
    .await;
    let b = fake_on((ip(3), a.addr.port()).into(), |mut s| async move {
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"b\n").await;
    })
    .await;
    let check_a = fake_on((ip(2), 0).into(), |_| async {}).await;
    let q = check_a.addr.port();
    let check_b = fake_on((ip(3), q).into(), |_| async {}).await;
    ([a, b], [check_a, check_b], q)
}

#[tokio::test]
async fn entry_repoints_when_its_backend_goes_unhealthy_while_still_serving() {
    let ([a, b], [check_a, check_b], q) = pair_with_check_ports().await;
    let yaml = tcp_config("rr", &[(a.addr, 10), (b.addr, 10)], STICKY).replace(
        "    health_check:\n      enabled: false\n",
        &format!(
            "    health_check:\n      port: {q}\n      interval: 100ms\n      timeout: 50ms\n      healthy_threshold: 1\n      unhealthy_threshold: 1\n"
        ),
    );
    let lb = start_lb(&yaml).await;
    let l = lb.listener("l");
    let up = |i: usize| l.snapshot().backends[i].state.health.is_up();
    eventually("both backends up", || up(0) && up(1)).await;
    // Find a client pinned to a, then take a's check port away (its service port still answers).
    let client = 'found: {
        for host in 10..40 {
            if id_from(host, lb.addr("l")).await == "a" {
                break 'found host;
            }
        }
        panic!("no client landed on a");
    };
    check_a.task.abort();
    eventually("a marked down", || !up(0)).await;
    assert_eq!(
        id_from(client, lb.addr("l")).await,
        "b",
        "not re-pointed away from the unhealthy backend"
    );
    // a comes back: the client stays where its entry now points.
    let _check_a = fake_on(check_a.addr, |_| async {}).await;
    eventually("a back up", || up(0)).await;
    for _ in 0..5 {
        assert_eq!(id_from(client, lb.addr("l")).await, "b");
    }
    drop((check_b, a, b));
    lb.stop().await;
}
