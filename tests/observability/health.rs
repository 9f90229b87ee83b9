//! Health as /metrics and /status report it: `slb_backend_up`, the
//! unhealthy count, fail-open only when backends are confirmed down, and
//! each backend's pending/up/down.

use std::net::SocketAddr;

use crate::common::*;
use crate::prom::value;
use crate::{metrics, status};
use serde_json::Value;

/// [`tcp_config`] with health checks every 150ms (fall 2, rise 1) and the
/// extra `check` lines (`port: ...`) under `health_check`.
fn checked_config(backends: &[(SocketAddr, u32)], check: &str, extra: &str) -> String {
    let mut hc = String::from(
        "    health_check:\n      interval: 150ms\n      timeout: 100ms\n      healthy_threshold: 1\n      unhealthy_threshold: 2\n",
    );
    for line in check.lines() {
        hc.push_str(&format!("      {line}\n"));
    }
    tcp_config("rr", backends, extra).replace("    health_check:\n      enabled: false\n", &hc)
}

/// Poll `/status` until `cond` holds for its first listener; returns it.
async fn status_until(lb: &Lb, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let l = status(lb).await["listeners"][0].clone();
        if cond(&l) {
            return l;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}: {l}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// The health gauges of listener `l` and its backends `addrs`:
/// (`slb_listener_fail_open`, `slb_listener_backends_unhealthy`, each `slb_backend_up`).
async fn health_gauges(lb: &Lb, addrs: &[String]) -> (f64, f64, Vec<f64>) {
    let m = metrics(lb).await;
    let ll = [("listener", "l")];
    let up = addrs
        .iter()
        .map(|a| value(&m, "slb_backend_up", &[("listener", "l"), ("backend", a)]))
        .collect();
    (
        value(&m, "slb_listener_fail_open", &ll),
        value(&m, "slb_listener_backends_unhealthy", &ll),
        up,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_backends_show_up_0_and_all_dead_shows_fail_open_in_metrics_and_status() {
    let (a, b) = (echo().await, echo().await);
    let addrs = [a.addr.to_string(), b.addr.to_string()];
    let lb = start_lb(&checked_config(&[(a.addr, 10), (b.addr, 10)], "", "")).await;
    let healthy = |l: &Value, i: usize| l["backends"][i]["healthy"] == true;
    let l = status_until(&lb, "both backends up", |l| healthy(l, 0) && healthy(l, 1)).await;
    assert_eq!(
        (&l["fail_open"], &l["backends_unhealthy"]),
        (&false.into(), &0.into())
    );
    assert_eq!(health_gauges(&lb, &addrs).await, (0.0, 0.0, vec![1.0, 1.0]));

    b.task.abort();
    let l = status_until(&lb, "b down", |l| !healthy(l, 1)).await;
    assert!(healthy(&l, 0), "{l}");
    assert_eq!(
        (&l["fail_open"], &l["backends_unhealthy"]),
        (&false.into(), &1.into())
    );
    assert_eq!(health_gauges(&lb, &addrs).await, (0.0, 1.0, vec![1.0, 0.0]));

    a.task.abort();
    let l = status_until(&lb, "failing open", |l| l["fail_open"] == true).await;
    assert!(!healthy(&l, 0) && !healthy(&l, 1), "{l}");
    assert_eq!(l["backends_unhealthy"], 2, "{l}");
    assert_eq!(health_gauges(&lb, &addrs).await, (1.0, 2.0, vec![0.0, 0.0]));
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_dead_with_reject_shows_unhealthy_backends_but_not_fail_open() {
    let (a, b) = (echo().await, echo().await);
    let addrs = [a.addr.to_string(), b.addr.to_string()];
    let (dead, _held) = held_refused_addr();
    let check = format!("port: {}", dead.port());
    let yaml = checked_config(&[(a.addr, 10), (b.addr, 10)], &check, "on_all_unhealthy: reject");
    let lb = start_lb(&yaml).await;
    let snap = lb.listener("l").snapshot();
    eventually("both backends down", || {
        snap.backends
            .iter()
            .all(|b| b.state.health.status() == slb::health::Status::Down)
    })
    .await;
    let l = status(&lb).await["listeners"][0].clone();
    assert_eq!(
        (&l["fail_open"], &l["backends_unhealthy"]),
        (&false.into(), &2.into())
    );
    assert_eq!(health_gauges(&lb, &addrs).await, (0.0, 2.0, vec![0.0, 0.0]));
    lb.stop().await;
}

/// An address that refuses connections while the returned socket lives: it
/// is bound but never listens, so unlike [`refused_addr`] no other socket
/// of a concurrent test can take the port meanwhile.
fn held_refused_addr() -> (SocketAddr, socket2::Socket) {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .expect("bind");
    let addr = s.local_addr().unwrap().as_socket().expect("an IP address");
    (addr, s)
}

/// Health checks that leave a blackholed backend pending for 30s: one probe
/// a minute, a 30s timeout, rise 1, fall 1.
const SLOW_CHECK: &str = "interval: 60s\ntimeout: 30s\nhealthy_threshold: 1\nunhealthy_threshold: 1\n";

fn slow_checked_config(backends: &[(SocketAddr, u32)]) -> String {
    let mut hc = String::from("    health_check:\n");
    for line in SLOW_CHECK.lines() {
        hc.push_str(&format!("      {line}\n"));
    }
    tcp_config("rr", backends, "").replace("    health_check:\n      enabled: false\n", &hc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_whether_each_backend_is_pending_up_or_down() {
    let (up, hole, (dead, _held)) = (echo().await, blackhole(), held_refused_addr());
    let lb = start_lb(&slow_checked_config(&[
        (up.addr, 10),
        (hole.addr, 10),
        (dead, 10),
    ]))
    .await;
    let health = |l: &Value, i: usize| l["backends"][i]["health"].clone();
    let l = status_until(&lb, "the first and last backends checked", |l| {
        health(l, 0) == "up" && health(l, 2) == "down"
    })
    .await;
    assert_eq!(health(&l, 1), "pending", "its first probe is still waiting: {l}");
    for (i, healthy) in [true, false, false].into_iter().enumerate() {
        assert_eq!(l["backends"][i]["healthy"], healthy, "{l}");
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_pending_at_start_is_not_reported_as_fail_open() {
    let hole = blackhole();
    let lb = start_lb(&slow_checked_config(&[(hole.addr, 10)])).await;
    let l = status(&lb).await["listeners"][0].clone();
    assert_eq!(l["backends"][0]["health"], "pending", "{l}");
    assert_eq!(l["fail_open"], false, "{l}");
    let (fail_open, _, up) = health_gauges(&lb, &[hole.addr.to_string()]).await;
    assert_eq!((fail_open, up), (0.0, vec![0.0]));
    lb.stop().await;
}
