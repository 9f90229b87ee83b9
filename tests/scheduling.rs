//! Schedulers through real sockets: lc, wlc and p2c steer new connections
//! away from busy backends, ip_hash is stable and consistent, and the AI case
//! (connections held for uneven times) under rr, lc and p2c.
//! Exact rr/wrr orders are in tests/tcp_proxy.rs.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;

use common::*;
use slb::listener::Listener;
use tokio::net::{TcpSocket, TcpStream};

const IDS: [&str; 5] = ["a", "b", "c", "d", "e"];

async fn id_servers(n: usize) -> Vec<Fake> {
    let mut v = Vec::new();
    for id in &IDS[..n] {
        v.push(id_server(id).await);
    }
    v
}

fn equal_weights(fakes: &[Fake]) -> Vec<(SocketAddr, u32)> {
    fakes.iter().map(|f| (f.addr, 10)).collect()
}

/// Connect to `lb` from 127.0.0.`host` (a distinct client IP per host).
async fn connect_from(host: u8, lb: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))
        .expect("bind client");
    timeout(socket.connect(lb)).await.expect("connect")
}

/// Open a connection and read the backend's id; the connection stays open.
async fn open(lb: SocketAddr) -> (TcpStream, String) {
    let mut s = timeout(TcpStream::connect(lb)).await.expect("connect");
    let id = read_line(&mut s).await;
    (s, id)
}

/// Live connections per backend, as the balancer counts them.
fn active(l: &Listener) -> Vec<u64> {
    let snap = l.snapshot();
    snap.backends
        .iter()
        .map(|b| b.state.stats.active.load(Relaxed))
        .collect()
}

/// Wait until the balancer counts exactly `n` live backend connections.
async fn settle(l: &Listener, n: u64) {
    eventually("backend connections to settle", || {
        active(l).iter().sum::<u64>() == n
    })
    .await;
}

/// One long-lived connection lands on a backend; every following short
/// connection goes elsewhere, and the other backends all get some.
async fn short_connections_avoid_the_busy_backend(scheduler: &str) {
    let fakes = id_servers(4).await;
    let lb = start_lb(&tcp_config(scheduler, &equal_weights(&fakes), "")).await;
    let l = lb.listener("l");
    let (long, busy) = open(lb.addr("l")).await;
    let mut got: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let (s, id) = open(lb.addr("l")).await;
        drop(s);
        settle(&l, 1).await;
        *got.entry(id).or_default() += 1;
    }
    assert!(
        !got.contains_key(&busy),
        "{scheduler}: {busy} is busy, got {got:?}"
    );
    assert_eq!(got.len(), 3, "{scheduler}: idle backends all used: {got:?}");
    // Close before stopping, or shutdown waits out the drain timeout.
    drop(long);
    lb.stop().await;
}

#[tokio::test]
async fn lc_sends_new_connections_away_from_a_busy_backend() {
    short_connections_avoid_the_busy_backend("lc").await;
}

#[tokio::test]
async fn wlc_sends_new_connections_away_from_a_busy_backend() {
    short_connections_avoid_the_busy_backend("wlc").await;
}

#[tokio::test]
async fn p2c_sends_new_connections_away_from_a_busy_backend() {
    // Two *distinct* backends are sampled, so the only busy one always
    // loses against an idle one.
    short_connections_avoid_the_busy_backend("p2c").await;
}

#[tokio::test]
async fn wlc_holds_connections_in_proportion_to_weight() {
    let fakes = id_servers(2).await;
    let lb = start_lb(&tcp_config("wlc", &[(fakes[0].addr, 1), (fakes[1].addr, 4)], "")).await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(open(lb.addr("l")).await);
    }
    let on_a = held.iter().filter(|(_, id)| id == "a").count();
    assert_eq!(on_a, 2, "weights 1:4 over 10 connections");
    drop(held);
    lb.stop().await;
}

#[tokio::test]
async fn lc_breaks_ties_round_robin() {
    let fakes = id_servers(3).await;
    let lb = start_lb(&tcp_config("lc", &equal_weights(&fakes), "")).await;
    let l = lb.listener("l");
    let mut order = String::new();
    for _ in 0..6 {
        let (s, id) = open(lb.addr("l")).await;
        drop(s);
        settle(&l, 0).await;
        order.push_str(&id);
    }
    assert_eq!(order, "abcabc");
    lb.stop().await;
}

/// Which backend each client host (127.0.0.x) reaches through `lb`.
async fn map_clients(lb: SocketAddr, hosts: std::ops::Range<u8>) -> HashMap<u8, String> {
    let mut map = HashMap::new();
    for host in hosts {
        let mut s = connect_from(host, lb).await;
        map.insert(host, read_line(&mut s).await);
    }
    map
}

#[tokio::test]
async fn ip_hash_is_stable_per_client_and_moves_a_fifth_when_one_of_five_leaves() {
    let fakes = id_servers(5).await;
    let five = equal_weights(&fakes);
    let four: Vec<_> = five
        .iter()
        .copied()
        .filter(|(a, _)| *a != fakes[2].addr)
        .collect();
    let hosts = 2..255;
    let clients = hosts.len();
    let lb1 = start_lb(&tcp_config("ip_hash", &five, "")).await;
    let lb2 = start_lb(&tcp_config("ip_hash", &five, "")).await;
    let lb3 = start_lb(&tcp_config("ip_hash", &four, "")).await;
    let before = map_clients(lb1.addr("l"), hosts.clone()).await;
    // The same client again, and another instance with the same backends
    // (as after a restart): the same backend every time.
    assert_eq!(map_clients(lb1.addr("l"), hosts.clone()).await, before);
    assert_eq!(map_clients(lb2.addr("l"), hosts.clone()).await, before);
    // Every backend is used.
    assert_eq!(before.values().collect::<std::collections::HashSet<_>>().len(), 5);
    // Without "c": its clients move, (almost) nobody else does.
    let after = map_clients(lb3.addr("l"), hosts.clone()).await;
    let moved: Vec<u8> = hosts.filter(|h| before[h] != after[h]).collect();
    let on_c = before.values().filter(|id| *id == "c").count();
    let moved_off_others = moved.iter().filter(|h| before[*h] != "c").count();
    eprintln!(
        "ip_hash: {} of {clients} clients moved, {on_c} were on c",
        moved.len()
    );
    assert!(moved.len() >= on_c, "every client of c moved");
    // Maglev shuffles ~0.1% among the remaining backends (unit-tested).
    assert!(
        moved_off_others <= 4,
        "{moved_off_others} moved off a remaining backend"
    );
    // About a fifth; the ports (so the table) differ per run, hence slack.
    assert!(
        moved.len() * 10 < clients * 3,
        "moved {} of {clients}",
        moved.len()
    );
    for lb in [lb1, lb2, lb3] {
        lb.stop().await;
    }
}

/// The AI case: every fourth request is a long generation (held open), the
/// others are short and finish before the next arrives. Returns the
/// balancer's live connections per backend after 40 requests.
async fn uneven_hold_times(scheduler: &str) -> Vec<u64> {
    let fakes = id_servers(4).await;
    let lb = start_lb(&tcp_config(scheduler, &equal_weights(&fakes), "")).await;
    let l = lb.listener("l");
    let mut long = Vec::new();
    for i in 0..40 {
        let (s, _) = open(lb.addr("l")).await;
        if i % 4 == 0 {
            long.push(s);
        } else {
            drop(s);
        }
        settle(&l, long.len() as u64).await;
    }
    let spread = active(&l);
    drop(long);
    lb.stop().await;
    spread
}

#[tokio::test]
async fn ai_uneven_hold_times_lc_and_p2c_spread_where_rr_piles_up() {
    let rr = uneven_hold_times("rr").await;
    let lc = uneven_hold_times("lc").await;
    let p2c = uneven_hold_times("p2c").await;
    eprintln!("live connections per backend after 40 requests (10 long): rr {rr:?} lc {lc:?} p2c {p2c:?}");
    let max = |v: &[u64]| *v.iter().max().expect("four backends");
    // rr sends every long request to the same backend.
    assert_eq!(max(&rr), 10, "rr {rr:?}");
    // lc: perfectly even (10 over 4: 3,3,2,2).
    assert_eq!(max(&lc), 3, "lc {lc:?}");
    // p2c: the busiest backend only wins when tied with the other sample,
    // so it can never pull far ahead.
    // Simulated: max 3 in 93% of runs, 4 in 7%, 5 in 0.007%.
    assert!(max(&p2c) <= 5, "p2c {p2c:?}");
}
