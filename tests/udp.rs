//! UDP listeners through real sockets: flows spread by the scheduler and
//! stable per client address:port, datagrams of every size intact, replies
//! from the listener's address, idle expiry, the flow cap, moving off a
//! backend that refuses (or, if it is the only one, recovering when it
//! returns), shutdown.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use common::{eventually, start_lb, timeout, Lb};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// A one-listener UDP configuration on `listen` in front of `backends`.
fn udp_config(listen: &str, scheduler: &str, backends: &[SocketAddr], extra: &str) -> String {
    let mut yaml = format!(
        "runtime:\n  drain_timeout: 5s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: u\n    protocol: udp\n    listen: {listen}\n    backend_group: g\n    scheduler: {scheduler}\n    health_check:\n      enabled: false\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("    {line}\n"));
    }
    yaml.push_str("backend_groups:\n  - name: g\n    backends:");
    if backends.is_empty() {
        yaml.push_str(" []");
    }
    yaml.push('\n');
    for addr in backends {
        yaml.push_str(&format!("      - address: \"{addr}\"\n        weight: 10\n"));
    }
    yaml
}

/// A fake UDP backend: replies to every datagram with `id:` + the payload,
/// or with the bare payload when `id` is `None`. Abort `task` to make it
/// vanish (the kernel then answers with ICMP port unreachable).
struct UdpFake {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

async fn udp_backend(id: Option<&'static str>) -> UdpFake {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind fake udp backend");
    serve_udp(socket, id)
}

/// A fake UDP backend with a TCP health-check listener on the same port.
async fn udp_backend_with_check(id: &'static str) -> (UdpFake, std::net::TcpListener) {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind check port");
        // The same port number may be taken for UDP: try another.
        if let Ok(udp) = UdpSocket::bind(tcp.local_addr().unwrap()).await {
            return (serve_udp(udp, Some(id)), tcp);
        }
    }
    panic!("no port free for both TCP and UDP");
}

fn serve_udp(socket: UdpSocket, id: Option<&'static str>) -> UdpFake {
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        let prefix = id.map(|id| format!("{id}:")).unwrap_or_default();
        loop {
            let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                continue;
            };
            let mut reply = prefix.as_bytes().to_vec();
            reply.extend_from_slice(&buf[..n]);
            socket.send_to(&reply, peer).await.expect("fake udp reply");
        }
    });
    UdpFake { addr, task }
}

async fn client() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.expect("bind client")
}

/// Send `payload` to `to` and wait up to `wait` for one reply: (reply, source).
async fn try_ask(
    c: &UdpSocket,
    to: SocketAddr,
    payload: &[u8],
    wait: Duration,
) -> Option<(Vec<u8>, SocketAddr)> {
    c.send_to(payload, to).await.expect("client send");
    let mut buf = vec![0u8; 65_536];
    let (n, from) = tokio::time::timeout(wait, c.recv_from(&mut buf))
        .await
        .ok()?
        .expect("client recv");
    buf.truncate(n);
    Some((buf, from))
}

/// Send `payload` and return the reply, asserting it came from `to`.
async fn ask(c: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let (reply, from) = try_ask(c, to, payload, common::DEADLINE).await.expect("no reply");
    assert_eq!(from, to, "the reply must come from the listener's address");
    reply
}

/// The backend id in an `id:payload` reply.
fn id_of(reply: &[u8]) -> String {
    let s = String::from_utf8_lossy(reply);
    s.split(':').next().unwrap_or_default().to_string()
}

fn backend_stats(lb: &Lb, addr: SocketAddr) -> std::sync::Arc<slb::backend::Backend> {
    let snap = lb.listener("u").snapshot();
    snap.backends
        .iter()
        .find(|b| b.addr == addr)
        .expect("backend")
        .clone()
}

#[tokio::test]
async fn flows_spread_by_round_robin_and_stay_on_their_backend() {
    let (a, b) = (udp_backend(Some("A")).await, udp_backend(Some("B")).await);
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[a.addr, b.addr], "")).await;
    let vip = lb.addr("u");
    let clients = [client().await, client().await, client().await, client().await];
    let mut ids = Vec::new();
    for c in &clients {
        ids.push(id_of(&ask(c, vip, b"hello").await));
    }
    // Round robin over new flows (wherever its cursor starts).
    assert!(
        ids[0] != ids[1] && ids[0] == ids[2] && ids[1] == ids[3],
        "{ids:?}"
    );
    for _ in 0..2 {
        for (c, id) in clients.iter().zip(&ids) {
            assert_eq!(
                &id_of(&ask(c, vip, b"again").await),
                id,
                "a flow stays on its backend"
            );
        }
    }
    let l = lb.listener("u");
    assert_eq!(l.stats.total.load(Relaxed), 4);
    assert_eq!(l.stats.active.load(Relaxed), 4);
    assert_eq!(l.stats.rx_datagrams.load(Relaxed), 12);
    assert_eq!(l.stats.tx_datagrams.load(Relaxed), 12);
    assert_eq!(l.stats.rx_bytes.load(Relaxed), 4 * 5 + 8 * 5);
    assert_eq!(l.stats.tx_bytes.load(Relaxed), 4 * 7 + 8 * 7);
    for fake in [&a, &b] {
        let s = &backend_stats(&lb, fake.addr).state.stats;
        assert_eq!(s.active.load(Relaxed), 2);
        assert_eq!(s.total.load(Relaxed), 2);
        assert_eq!(s.tx_datagrams.load(Relaxed), 6);
        assert_eq!(s.rx_datagrams.load(Relaxed), 6);
        assert_eq!(s.tx_bytes.load(Relaxed), 2 * 5 + 4 * 5);
        assert_eq!(s.rx_bytes.load(Relaxed), 2 * 7 + 4 * 7);
    }
    lb.stop().await;
}

#[tokio::test]
async fn datagrams_of_every_size_arrive_intact() {
    let echo = udp_backend(None).await;
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[echo.addr], "")).await;
    let vip = lb.addr("u");
    let c = client().await;
    for size in [0usize, 1, 1472, 8972, 65_507] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        let reply = ask(&c, vip, &payload).await;
        assert_eq!(reply.len(), size, "datagram of {size} bytes");
        assert!(reply == payload, "datagram of {size} bytes altered");
    }
    lb.stop().await;
}

#[tokio::test]
async fn replies_come_from_a_specific_listener_address() {
    let echo = udp_backend(Some("A")).await;
    let lb = start_lb(&udp_config("127.0.0.2:0", "rr", &[echo.addr], "")).await;
    let vip = lb.addr("u");
    assert_eq!(vip.ip().to_string(), "127.0.0.2");
    let c = client().await;
    let (reply, from) = try_ask(&c, vip, b"x", common::DEADLINE).await.expect("reply");
    assert_eq!(reply, b"A:x");
    assert_eq!(
        from, vip,
        "the client must see the listener's own address:port answer"
    );
    lb.stop().await;
}

#[tokio::test]
async fn idle_flow_expires_and_gauges_return_to_zero() {
    let echo = udp_backend(Some("A")).await;
    let lb = start_lb(&udp_config(
        "127.0.0.1:0",
        "rr",
        &[echo.addr],
        "idle_timeout: 300ms",
    ))
    .await;
    let vip = lb.addr("u");
    let l = lb.listener("u");
    let b = backend_stats(&lb, echo.addr);
    let c = client().await;
    ask(&c, vip, b"one").await;
    eventually("flow expired", || l.stats.active.load(Relaxed) == 0).await;
    assert_eq!(b.state.stats.active.load(Relaxed), 0);
    // The next datagram from the same client:port opens a new flow.
    assert_eq!(ask(&c, vip, b"two").await, b"A:two");
    assert_eq!(l.stats.total.load(Relaxed), 2);
    assert_eq!(b.state.stats.total.load(Relaxed), 2);
    lb.stop().await;
}

#[tokio::test]
async fn flow_cap_drops_and_counts_datagrams_of_new_flows() {
    let echo = udp_backend(Some("A")).await;
    let extra = "max_connections: 2\nidle_timeout: 3s";
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[echo.addr], extra)).await;
    let vip = lb.addr("u");
    let l = lb.listener("u");
    let (c1, c2, c3) = (client().await, client().await, client().await);
    ask(&c1, vip, b"1").await;
    ask(&c2, vip, b"2").await;
    c3.send_to(b"3", vip).await.unwrap();
    eventually("a datagram dropped at the cap", || {
        l.stats.dropped(slb::stats::DropReason::Limit) == 1
    })
    .await;
    assert_eq!(l.stats.active.load(Relaxed), 2);
    // Live flows keep working at the cap.
    assert_eq!(ask(&c1, vip, b"1").await, b"A:1");
    // Once the flows idle out, the third client gets in.
    eventually("flows expired", || l.stats.active.load(Relaxed) == 0).await;
    assert_eq!(ask(&c3, vip, b"3").await, b"A:3");
    let mut stray = [0u8; 16];
    assert!(
        c3.try_recv(&mut stray).is_err(),
        "the dropped datagram was never delivered"
    );
    lb.stop().await;
}

#[tokio::test]
async fn flow_moves_off_a_backend_that_refuses() {
    let (a, b) = (udp_backend(Some("A")).await, udp_backend(Some("B")).await);
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[a.addr, b.addr], "")).await;
    let vip = lb.addr("u");
    let c = client().await;
    let first = id_of(&ask(&c, vip, b"x").await);
    let (gone, other) = if first == "A" { (a, "B") } else { (b, "A") };
    let (l, sa) = (lb.listener("u"), backend_stats(&lb, gone.addr));
    // The flow's backend vanishes: its port answers with ICMP port
    // unreachable, which the flow's relay task sees as ECONNREFUSED and survives.
    gone.task.abort();
    let _ = gone.task.await;
    c.send_to(b"lost", vip).await.unwrap();
    eventually("the refusal counted", || {
        sa.state.stats.connect_failures.load(Relaxed) == 1
    })
    .await;
    // The next datagram moves the flow to the other backend.
    assert_eq!(id_of(&ask(&c, vip, b"y").await), other);
    for _ in 0..3 {
        assert_eq!(
            id_of(&ask(&c, vip, b"z").await),
            other,
            "the moved flow stays there"
        );
    }
    eventually("the old flow's gauge released", || {
        sa.state.stats.active.load(Relaxed) == 0
    })
    .await;
    assert_eq!(l.stats.active.load(Relaxed), 1);
    assert_eq!(l.stats.total.load(Relaxed), 2);
    lb.stop().await;
}

#[tokio::test]
async fn flow_whose_only_backend_refused_recovers_when_it_returns() {
    let a = udp_backend(Some("A")).await;
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[a.addr], "")).await;
    let vip = lb.addr("u");
    let c = client().await;
    assert_eq!(ask(&c, vip, b"x").await, b"A:x");
    let sa = backend_stats(&lb, a.addr);
    // The only backend goes away: ICMP port unreachable, counted once.
    a.task.abort();
    let _ = a.task.await;
    c.send_to(b"lost", vip).await.unwrap();
    eventually("the refusal counted", || {
        sa.state.stats.connect_failures.load(Relaxed) >= 1
    })
    .await;
    // It comes back on the same port; the flow must not stay wedged.
    let socket = UdpSocket::bind(a.addr).await.expect("rebind the backend's port");
    let back = serve_udp(socket, Some("A2"));
    let end = tokio::time::Instant::now() + common::DEADLINE;
    let reply = loop {
        if let Some((reply, from)) = try_ask(&c, vip, b"y", Duration::from_millis(200)).await {
            assert_eq!(from, vip);
            break reply;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "the flow never recovered after its backend returned"
        );
    };
    assert_eq!(reply, b"A2:y");
    assert_eq!(ask(&c, vip, b"z").await, b"A2:z", "and it keeps working");
    assert_eq!(lb.listener("u").stats.active.load(Relaxed), 1);
    back.task.abort();
    lb.stop().await;
}

#[tokio::test]
async fn flow_moves_off_a_backend_that_goes_unhealthy() {
    // Each backend answers UDP and TCP health checks on the same port; A's
    // TCP side goes away while its UDP side keeps answering.
    let ((a, a_check), (b, b_check)) = (
        udp_backend_with_check("A").await,
        udp_backend_with_check("B").await,
    );
    let extra = "health_check:\n  enabled: true\n  interval: 100ms\n  timeout: 50ms\n  healthy_threshold: 1\n  unhealthy_threshold: 1";
    let yaml = udp_config("127.0.0.1:0", "rr", &[a.addr, b.addr], "")
        .replace("    health_check:\n      enabled: false\n", "")
        .replace(
            "    scheduler: rr\n",
            &format!("    scheduler: rr\n{}\n", indent(extra)),
        );
    let lb = start_lb(&yaml).await;
    let vip = lb.addr("u");
    let (sa, sb) = (backend_stats(&lb, a.addr), backend_stats(&lb, b.addr));
    eventually("both healthy", || sa.is_eligible() && sb.is_eligible()).await;
    let c = client().await;
    let first = id_of(&ask(&c, vip, b"x").await);
    let (stays, gone) = if first == "A" { (&sb, &sa) } else { (&sa, &sb) };
    assert!(first == "A" || first == "B");
    if first == "A" {
        drop(a_check);
    } else {
        drop(b_check);
    }
    eventually("the flow's backend unhealthy", || !gone.is_eligible()).await;
    let moved = id_of(&ask(&c, vip, b"y").await);
    assert_ne!(moved, first, "the flow must leave its unhealthy backend");
    assert_eq!(stays.state.stats.total.load(Relaxed), 1);
    lb.stop().await;
}

fn indent(lines: &str) -> String {
    lines
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn persistence_keeps_a_client_ip_on_one_backend_across_source_ports() {
    let (a, b) = (udp_backend(Some("A")).await, udp_backend(Some("B")).await);
    let extra = "session_persistence:\n  enabled: true\n  timeout: 60s";
    let lb = start_lb(&udp_config("127.0.0.1:0", "wrr", &[a.addr, b.addr], extra)).await;
    let vip = lb.addr("u");
    let mut ids = Vec::new();
    for _ in 0..4 {
        // A new source port each time: a new flow, the same client IP.
        ids.push(id_of(&ask(&client().await, vip, b"p").await));
    }
    assert!(
        ids.iter().all(|id| id == &ids[0]),
        "one client IP, one backend: {ids:?}"
    );
    assert_eq!(lb.listener("u").stats.total.load(Relaxed), 4);
    lb.stop().await;
}

#[tokio::test]
async fn no_backend_drops_and_counts() {
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[], "")).await;
    let vip = lb.addr("u");
    let l = lb.listener("u");
    client().await.send_to(b"x", vip).await.unwrap();
    eventually("dropped for lack of a backend", || {
        l.stats.dropped(slb::stats::DropReason::NoBackend) == 1
    })
    .await;
    assert_eq!(l.stats.total.load(Relaxed), 0);
    lb.stop().await;
}

#[tokio::test]
async fn shutdown_ends_every_flow() {
    let echo = udp_backend(Some("A")).await;
    let lb = start_lb(&udp_config("127.0.0.1:0", "rr", &[echo.addr], "")).await;
    let vip = lb.addr("u");
    let (c1, c2) = (client().await, client().await);
    ask(&c1, vip, b"1").await;
    ask(&c2, vip, b"2").await;
    let l = lb.listener("u");
    assert_eq!(l.stats.active.load(Relaxed), 2);
    timeout(lb.stop()).await;
    assert_eq!(l.stats.active.load(Relaxed), 0, "flows end at shutdown");
}

#[test]
fn udp_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/conf/udp.yaml");
    let config = slb::config::load(std::path::Path::new(path)).expect("conf/udp.yaml");
    let l = &config.listeners[0];
    assert_eq!(l.protocol, slb::config::Protocol::Udp);
    assert!(
        l.health_check.is_some(),
        "the example checks the backends over TCP"
    );
}
