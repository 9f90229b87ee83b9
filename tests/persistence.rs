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
