//! What slb logs about health, through the real binary with
//! `--log-format json`: each transition once (`warn` "backend down" with its
//! reason, `info` "backend up"), and each "every backend is unhealthy"
//! episode once, with its "healthy again" end.

use super::*;
use crate::slb_process::{matches, SlbProcess};

/// A listener section named `name` on group `g` with `health` (YAML lines)
/// as its health check and `extra` listener settings.
fn listener_yaml(name: &str, health: &str, extra: &str) -> String {
    let mut yaml = format!(
        "  - name: {name}\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n{extra}    health_check:\n"
    );
    for line in health.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str(&format!("      {line}\n"));
    }
    yaml
}

#[tokio::test]
async fn backend_down_and_up_are_each_logged_once_with_the_reason_refused() {
    let (a, b) = (echo().await, echo().await);
    let mut slb = SlbProcess::json(&config(&[(a.addr, 10), (b.addr, 10)], FAST, ""));
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    for addr in [&a_addr, &b_addr] {
        let up = slb.wait_for("backend up", &[("backend", addr)]).await;
        assert_eq!(up["level"], "INFO", "{up}");
        assert_eq!(up["fields"]["listener"], "l", "{up}");
        assert_eq!(
            up["fields"]["successes"], 1,
            "pending -> up on the first success: {up}"
        );
    }
    let addr = kill(b).await;
    let down = slb.wait_for("backend down", &[("backend", &b_addr)]).await;
    assert_eq!(down["level"], "WARN", "{down}");
    assert_eq!(down["fields"]["listener"], "l", "{down}");
    assert_eq!(down["fields"]["reason"], "refused", "{down}");
    assert_eq!(down["fields"]["failures"], 2, "unhealthy_threshold: {down}");
    let _b = fake_on(addr, |_s| async {}).await;
    let ups = slb.wait_for_all(2, "backend up", &[("backend", &b_addr)]).await;
    assert_eq!(ups[1]["fields"]["successes"], 2, "healthy_threshold: {}", ups[1]);
    let log = slb.stop().await;
    assert_eq!(slb.count("backend down", &[("backend", &b_addr)]), 1, "{log}");
    assert_eq!(slb.count("backend up", &[("backend", &b_addr)]), 2, "{log}");
    assert_eq!(slb.count("backend up", &[("backend", &a_addr)]), 1, "{log}");
    assert_eq!(slb.count("backend down", &[("backend", &a_addr)]), 0, "{log}");
    assert_eq!(slb.count("every backend is unhealthy", &[]), 0, "{log}");
}

#[tokio::test]
async fn blackholed_check_port_is_logged_down_once_with_the_reason_timeout() {
    let service = echo().await;
    let hole = blackhole();
    let health = format!("{FAST}port: {}\n", hole.addr.port());
    let yaml = config(&[(service.addr, 10)], &health, "");
    let mut slb = SlbProcess::spawn(&yaml, &["--log-format", "json"], "info,slb::health=debug");
    let service_addr = service.addr.to_string();
    let down = slb.wait_for("backend down", &[("backend", &service_addr)]).await;
    assert_eq!(down["level"], "WARN", "{down}");
    assert_eq!(down["fields"]["reason"], "timeout", "{down}");
    assert_eq!(down["fields"]["failures"], 2, "{down}");
    // Later timeouts agree with the state: nothing more is logged.
    slb.wait_for_all(5, "health probe", &[("result", "timeout")])
        .await;
    let log = slb.stop().await;
    assert_eq!(slb.count("backend down", &[]), 1, "{log}");
    assert_eq!(slb.count("backend up", &[]), 0, "{log}");
}

#[tokio::test]
async fn out_of_range_http_status_is_logged_down_once_with_the_reason_bad_status() {
    let status = Arc::new(AtomicU16::new(200));
    let server = http_server(status.clone(), Arc::default()).await;
    let health = format!("{FAST}type: http\n");
    let mut slb = SlbProcess::json(&config(&[(server.addr, 10)], &health, ""));
    let addr = server.addr.to_string();
    slb.wait_for("backend up", &[("backend", &addr)]).await;
    status.store(503, Relaxed);
    let down = slb.wait_for("backend down", &[("backend", &addr)]).await;
    assert_eq!(down["level"], "WARN", "{down}");
    assert_eq!(down["fields"]["reason"], "bad_status", "{down}");
    status.store(200, Relaxed);
    slb.wait_for_all(2, "backend up", &[("backend", &addr)]).await;
    let log = slb.stop().await;
    assert_eq!(slb.count("backend down", &[]), 1, "{log}");
    assert_eq!(slb.count("backend up", &[]), 2, "{log}");
}

#[tokio::test]
async fn every_backend_down_is_logged_once_per_listener_and_so_is_healthy_again() {
    // Two listeners (fail-open and reject) over the same two backends, all
    // checked on one check port: closing it takes every backend down.
    let (a, b) = (echo().await, echo().await);
    let check = check_port().await;
    let health = format!("{FAST}port: {}\n", check.addr.port());
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n{}{}backend_groups:\n  - name: g\n    backends:\n      - address: \"{}\"\n      - address: \"{}\"\n",
        listener_yaml("open", &health, ""),
        listener_yaml("reject", &health, "    on_all_unhealthy: reject\n"),
        a.addr,
        b.addr
    );
    let mut slb = SlbProcess::json(&yaml);
    slb.wait_for_all(4, "backend up", &[]).await;
    let check_addr = kill(check).await;
    let open = slb
        .wait_for(
            "every backend is unhealthy: failing open",
            &[("listener", "open")],
        )
        .await;
    assert_eq!(open["level"], "WARN", "{open}");
    let reject = slb
        .wait_for("every backend is unhealthy: rejecting", &[("listener", "reject")])
        .await;
    assert_eq!(reject["level"], "WARN", "{reject}");
    let _check = fake_on(check_addr, |_s| async {}).await;
    for listener in ["open", "reject"] {
        let again = slb
            .wait_for("a backend is healthy again", &[("listener", listener)])
            .await;
        assert_eq!(again["level"], "INFO", "{again}");
    }
    slb.wait_for_all(8, "backend up", &[]).await;
    let log = slb.stop().await;
    let events = slb.events();
    for listener in ["open", "reject"] {
        let l = [("listener", listener)];
        assert_eq!(slb.count("every backend is unhealthy", &l), 1, "{log}");
        assert_eq!(slb.count("a backend is healthy again", &l), 1, "{log}");
        assert_eq!(slb.count("backend down", &l), 2, "{log}");
        // Logged when the last backend went down, not while both were
        // pending at start.
        let at = |message: &str| events.iter().rposition(|e| matches(e, message, &l));
        assert!(at("every backend is unhealthy") > at("backend down"), "{log}");
    }
}
