//! Observability end to end: exact counters in `/metrics` and `/status`
//! after known traffic, valid Prometheus text, gauges back to 0, the admin
//! server under a full listener, health (`slb_backend_up`, fail-open) as
//! backends die, and `slb status` and the access log through the real
//! binary.

#[path = "observability/cli.rs"]
mod cli;
mod common;
#[path = "observability/health.rs"]
mod health;
#[path = "observability/prom.rs"]
mod prom;
#[path = "health/slb_process.rs"]
mod slb_process;
#[path = "observability/udp.rs"]
mod udp;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::*;
use prom::{parse_prometheus, value, Series};
use serde_json::Value;
use slb::metrics::{Kind, CATALOG};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// GET `path` from the admin server over HTTP/1.0: (status code, body).
async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    request(admin, &format!("GET {path} HTTP/1.0\r\n\r\n")).await
}

async fn request(admin: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = timeout(TcpStream::connect(admin)).await.expect("connect admin");
    timeout(s.write_all(raw.as_bytes())).await.expect("write");
    let mut out = String::new();
    timeout(s.read_to_string(&mut out)).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("http head");
    let code = head
        .split(' ')
        .nth(1)
        .expect("status code")
        .parse()
        .expect("numeric status");
    (code, body.to_owned())
}

fn admin(lb: &Lb) -> SocketAddr {
    lb.state.admin_addr.expect("admin server bound")
}

async fn status(lb: &Lb) -> Value {
    let (code, body) = get(admin(lb), "/status").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("status is JSON")
}

async fn metrics(lb: &Lb) -> HashMap<Series, f64> {
    let (code, body) = get(admin(lb), "/metrics").await;
    assert_eq!(code, 200);
    parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("{e}\n{body}"))
        .0
}

/// Send `n` bytes through a fresh connection, read the echo, close.
async fn echo_round(addr: SocketAddr, n: usize) {
    let mut s = timeout(TcpStream::connect(addr)).await.expect("connect");
    let data = vec![7u8; n];
    timeout(s.write_all(&data)).await.expect("write");
    s.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    timeout(s.read_to_end(&mut back)).await.expect("read");
    assert_eq!(back.len(), n);
}

async fn wait_idle(lb: &Lb) {
    let l = lb.listener("l");
    eventually("listener idle", || {
        l.stats.active.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_are_exact_and_metrics_agree_with_status() {
    let (a, b) = (echo().await, echo().await);
    let lb = start_lb(&tcp_config("rr", &[(a.addr, 10), (b.addr, 3)], "")).await;
    let sizes: Vec<usize> = (1..=10).map(|i| i * 1000 + i).collect();
    for &n in &sizes {
        echo_round(lb.addr("l"), n).await;
    }
    wait_idle(&lb).await;
    let bytes: usize = sizes.iter().sum();
    let m = metrics(&lb).await;
    let st = status(&lb).await;
    let l = &st["listeners"][0];
    let ll = [("listener", "l")];
    assert_eq!(l["name"], "l");
    assert_eq!(l["address"], lb.addr("l").to_string());
    assert_eq!(l["protocol"], "tcp");
    assert_eq!(l["scheduler"], "rr");
    assert_eq!(l["total"], 10);
    assert_eq!(l["rx_bytes"], bytes);
    assert_eq!(l["tx_bytes"], bytes);
    assert_eq!(l["active"], 0);
    assert_eq!(value(&m, "slb_listener_connections_total", &ll), 10.0);
    assert_eq!(value(&m, "slb_listener_rx_bytes_total", &ll), bytes as f64);
    assert_eq!(value(&m, "slb_listener_tx_bytes_total", &ll), bytes as f64);
    assert_eq!(value(&m, "slb_listener_connections_active", &ll), 0.0);
    let mut backend_total = 0.0;
    for (i, (fake, weight)) in [(&a, 10), (&b, 3)].into_iter().enumerate() {
        let js = &l["backends"][i];
        let addr = fake.addr.to_string();
        let bl = [("listener", "l"), ("backend", addr.as_str())];
        assert_eq!(js["address"], addr);
        assert_eq!(js["weight"], weight);
        assert_eq!(js["healthy"], true);
        // Round robin alternates: five connections each.
        assert_eq!(js["total"], 5);
        assert_eq!(js["total"], fake.accepted());
        assert_eq!(value(&m, "slb_backend_connections_total", &bl), 5.0);
        assert_eq!(value(&m, "slb_backend_weight", &bl), f64::from(weight));
        assert_eq!(value(&m, "slb_backend_up", &bl), 1.0);
        assert_eq!(value(&m, "slb_backend_connections_active", &bl), 0.0);
        assert_eq!(value(&m, "slb_backend_connect_failures_total", &bl), 0.0);
        for field in ["rx_bytes", "tx_bytes"] {
            let name = format!("slb_backend_{field}_total");
            assert_eq!(js[field].as_f64().unwrap(), value(&m, &name, &bl));
        }
        for result in ["ok", "refused", "timeout", "bad_status"] {
            let mut labels = bl.to_vec();
            labels.push(("result", result));
            assert_eq!(
                js["checks"][result].as_f64().unwrap(),
                value(&m, "slb_health_checks_total", &labels)
            );
        }
        backend_total += value(&m, "slb_backend_rx_bytes_total", &bl);
    }
    assert_eq!(
        backend_total, bytes as f64,
        "bytes from the backends = bytes to the client"
    );
    for reason in ["no_backend", "connect_failed", "limit"] {
        let labels = [("listener", "l"), ("reason", reason)];
        assert_eq!(value(&m, "slb_listener_dropped_total", &labels), 0.0);
        assert_eq!(l["dropped"][reason], 0);
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_with_every_catalog_entry() {
    let backend = echo().await;
    // A wait queue and a backend with slots: their series exist only then.
    let yaml = tcp_config("wrr", &[(backend.addr, 10)], "queue:\n  size: 10").replace(
        "        weight: 10\n",
        "        weight: 10\n        max_connections: 5\n",
    );
    let lb = start_lb(&yaml).await;
    echo_round(lb.addr("l"), 10).await;
    let (code, body) = get(admin(&lb), "/metrics").await;
    assert_eq!(code, 200);
    let (samples, types) = parse_prometheus(&body).unwrap_or_else(|e| panic!("{e}\n{body}"));
    let addr = backend.addr.to_string();
    let bl = [("listener", "l"), ("backend", addr.as_str())];
    assert_eq!(value(&samples, "slb_backend_max_connections", &bl), 5.0);
    let waited = [("listener", "l"), ("le", "+Inf")];
    assert_eq!(
        value(&samples, "slb_listener_queue_wait_seconds_bucket", &waited),
        0.0
    );
    for m in CATALOG.iter().filter(|m| !m.name.contains("datagrams")) {
        let want = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert_eq!(types.get(m.name).map(String::as_str), Some(want), "{}", m.name);
        assert!(
            body.contains(&format!("# HELP {} {}", m.name, m.help)),
            "{}",
            m.name
        );
    }
    // A TCP listener has no datagram series.
    assert!(!body.contains("datagrams_total{"), "{body}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_and_gauges_move_while_a_connection_is_open_and_gauges_return_to_zero() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    timeout(s.write_all(&[1u8; 1500])).await.unwrap();
    let mut buf = [0u8; 1500];
    timeout(s.read_exact(&mut buf)).await.unwrap();
    let bl = [("listener", "l"), ("backend", &*backend.addr.to_string())].map(|(k, v)| (k, v.to_owned()));
    let bl: Vec<(&str, &str)> = bl.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The proxy counts a chunk just after writing it: poll briefly.
    let end = tokio::time::Instant::now() + DEADLINE;
    let m = loop {
        let m = metrics(&lb).await;
        if value(&m, "slb_listener_tx_bytes_total", &[("listener", "l")]) == 1500.0 {
            break m;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "tx bytes never reached 1500 while open"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(
        value(&m, "slb_listener_connections_active", &[("listener", "l")]),
        1.0
    );
    assert_eq!(
        value(&m, "slb_listener_rx_bytes_total", &[("listener", "l")]),
        1500.0
    );
    assert_eq!(
        value(&m, "slb_listener_tx_bytes_total", &[("listener", "l")]),
        1500.0
    );
    assert_eq!(value(&m, "slb_backend_connections_active", &bl), 1.0);
    assert_eq!(status(&lb).await["listeners"][0]["backends"][0]["active"], 1);
    drop(s);
    wait_idle(&lb).await;
    let l = lb.listener("l");
    let bstats = &l.snapshot().backends[0].state.stats;
    eventually("backend idle", || {
        bstats.active.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    let m = metrics(&lb).await;
    assert_eq!(
        value(&m, "slb_listener_connections_active", &[("listener", "l")]),
        0.0
    );
    assert_eq!(value(&m, "slb_backend_connections_active", &bl), 0.0);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connects_and_drops_are_counted_by_reason() {
    let dead = refused_addr();
    let lb = start_lb(&tcp_config("rr", &[(dead, 10)], "")).await;
    for _ in 0..3 {
        // slb resets the client once every candidate has failed, at times
        // before connect() has even returned.
        if let Ok(mut s) = timeout(TcpStream::connect(lb.addr("l"))).await {
            let _ = timeout(s.read(&mut [0u8; 1])).await;
        }
    }
    let l = lb.listener("l");
    eventually("drops counted", || {
        l.stats.dropped(slb::stats::DropReason::ConnectFailed) == 3
    })
    .await;
    let m = metrics(&lb).await;
    let d = dead.to_string();
    let reason = [("listener", "l"), ("reason", "connect_failed")];
    assert_eq!(value(&m, "slb_listener_dropped_total", &reason), 3.0);
    let bl = [("listener", "l"), ("backend", d.as_str())];
    assert_eq!(value(&m, "slb_backend_connect_failures_total", &bl), 3.0);
    let st = status(&lb).await;
    assert_eq!(st["listeners"][0]["dropped"]["connect_failed"], 3);
    assert_eq!(st["listeners"][0]["backends"][0]["failures"], 3);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_page_and_errors() {
    let lb = start_lb(&tcp_config("rr", &[], "")).await;
    assert_eq!(get(admin(&lb), "/healthz").await, (200, "ok\n".to_owned()));
    let (code, page) = get(admin(&lb), "/").await;
    assert_eq!(code, 200);
    assert!(page.contains("/status"), "the page polls /status");
    // Self-contained: no external scripts, styles or fonts.
    for external in ["http://", "https://", "src=\"//"] {
        assert!(!page.contains(external), "page references {external}");
    }
    assert_eq!(get(admin(&lb), "/nope").await.0, 404);
    assert_eq!(request(admin(&lb), "POST /status HTTP/1.0\r\n\r\n").await.0, 405);
    assert_eq!(request(admin(&lb), "garbage\r\n\r\n").await.0, 400);
    let (code, body) = request(admin(&lb), "HEAD /status HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, ""));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_answers_while_a_listener_is_at_max_connections() {
    let backend = hang().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "max_connections: 2")).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(timeout(TcpStream::connect(lb.addr("l"))).await.unwrap());
    }
    let l = lb.listener("l");
    let limited = || l.stats.limit_events.load(std::sync::atomic::Ordering::Relaxed) >= 1;
    eventually("listener paused at max_connections", limited).await;
    assert_eq!(get(admin(&lb), "/healthz").await.0, 200);
    let st = status(&lb).await;
    assert_eq!(st["listeners"][0]["active"], 2);
    assert!(st["listeners"][0]["limit_events"].as_u64().unwrap() >= 1);
    let m = metrics(&lb).await;
    assert!(value(&m, "slb_listener_limit_events_total", &[("listener", "l")]) >= 1.0);
    drop(held);
    lb.stop().await;
}

#[test]
fn the_docs_name_every_metric_and_status_field() {
    let docs = include_str!("../docs/observability.md");
    for m in CATALOG {
        assert!(
            docs.contains(&format!("| `{}` |", m.name)),
            "docs/observability.md misses {}",
            m.name
        );
    }
    // The example document parses as a Report and each of its fields is
    // in the field table.
    let start = docs.find("```json\n{\n  \"version\"").expect("a /status example") + 8;
    let json = &docs[start..start + docs[start..].find("```").unwrap()];
    let report: slb::status::Report = serde_json::from_str(json).expect("the /status example parses");
    let value = serde_json::to_value(&report).unwrap();
    let objects = [
        &value,
        &value["listeners"][0],
        &value["listeners"][0]["backends"][0],
    ];
    for field in objects.iter().flat_map(|o| o.as_object().unwrap().keys()) {
        assert!(
            docs.contains(&format!("`{field}")) || docs.contains(&format!(".{field}")),
            "docs/observability.md misses /status field {field}"
        );
    }
}
