//! Passive ejection, every backend down (fail-open, reject), disabled
//! checks, and health state per listener.

use super::*;

#[tokio::test]
async fn every_backend_down_fails_open_across_all_of_them() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let health = format!("{FAST}port: {}\n", refused_addr().port());
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], &health, "")).await;
    let (x, y) = (backend(&lb, 0), backend(&lb, 1));
    let l = lb.listener("l");
    eventually("both down", || {
        x.state.health.status() == Status::Down && y.state.health.status() == Status::Down
    })
    .await;
    assert!(l.snapshot().fail_open);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..10 {
        ids.insert(read_id(lb.addr("l")).await);
    }
    assert_eq!(ids.len(), 2, "fail-open schedules across every backend: {ids:?}");
    // Data-path successes do not raise a down backend; only probes do.
    assert_eq!(x.state.health.status(), Status::Down);
    assert_eq!(l.stats.dropped(DropReason::NoBackend), 0);
    lb.stop().await;
}

#[tokio::test]
async fn every_backend_down_with_reject_closes_new_connections_at_once() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    let health = format!("{FAST}port: {}\n", refused_addr().port());
    let lb = start_lb(&config(
        &[(a.addr, 10), (b.addr, 10)],
        &health,
        "on_all_unhealthy: reject",
    ))
    .await;
    let (x, y) = (backend(&lb, 0), backend(&lb, 1));
    let l = lb.listener("l");
    eventually("both down", || {
        x.state.health.status() == Status::Down && y.state.health.status() == Status::Down
    })
    .await;
    assert!(!l.snapshot().fail_open);
    let dropped = l.stats.dropped(DropReason::NoBackend);
    let start = Instant::now();
    let mut s = timeout(TcpStream::connect(lb.addr("l"))).await.unwrap();
    let mut buf = [0u8; 16];
    let read = timeout(s.read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "closed without data: {read:?}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "closed after {:?}",
        start.elapsed()
    );
    eventually("drop counted", || {
        l.stats.dropped(DropReason::NoBackend) == dropped + 1
    })
    .await;
    assert_eq!(a.accepted() + b.accepted(), 0, "no connection reached a backend");
    lb.stop().await;
}

#[tokio::test]
async fn passive_ejection_marks_a_dead_backend_down_before_the_next_probe() {
    let (a, b) = (id_server("a").await, id_server("b").await);
    // One probe at start, the next one 30-60s later: anything that happens
    // within the test is the data path's doing.
    let health = "interval: 60s\ntimeout: 1s\nhealthy_threshold: 1\nunhealthy_threshold: 2\n";
    let lb = start_lb(&config(&[(a.addr, 10), (b.addr, 10)], health, "")).await;
    both_up(&lb).await;
    let dead = backend(&lb, 1);
    kill(b).await;
    let mut connections = 0;
    while dead.state.health.status() != Status::Down {
        assert_eq!(read_id(lb.addr("l")).await, "a", "the client never notices");
        connections += 1;
        assert!(connections < 50, "not ejected after {connections} connections");
    }
    assert_eq!(probes(&dead), 1, "only the start-up probe ran");
    assert_eq!(
        dead.state.stats.connect_failures.load(Relaxed),
        2,
        "unhealthy_threshold failures"
    );
    for _ in 0..10 {
        assert_eq!(read_id(lb.addr("l")).await, "a");
    }
    assert_eq!(
        dead.state.stats.connect_failures.load(Relaxed),
        2,
        "an ejected backend is not tried"
    );
    lb.stop().await;
}

#[tokio::test]
async fn disabled_checks_keep_every_backend_eligible() {
    let a = id_server("a").await;
    let lb = start_lb(&tcp_config("rr", &[(a.addr, 10), (refused_addr(), 10)], "")).await;
    for _ in 0..10 {
        assert_eq!(read_id(lb.addr("l")).await, "a");
    }
    let dead = backend(&lb, 1);
    assert!(dead.state.stats.connect_failures.load(Relaxed) >= 5);
    assert!(
        dead.state.health.is_up(),
        "no passive ejection without health checks"
    );
    assert_eq!(probes(&dead), 0);
    lb.stop().await;
}

#[tokio::test]
async fn two_listeners_sharing_a_group_keep_separate_health() {
    let service = id_server("a").await;
    let check = check_port().await;
    let listener = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    health_check:\n      interval: 150ms\n      timeout: 100ms\n      unhealthy_threshold: 1\n      port: {port}\n"
        )
    };
    let yaml = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n{}{}backend_groups:\n  - name: g\n    backends:\n      - address: \"{}\"\n",
        listener("good", check.addr.port()),
        listener("bad", refused_addr().port()),
        service.addr
    );
    let lb = start_lb(&yaml).await;
    let good = lb.listener("good").snapshot().backends[0].clone();
    let bad = lb.listener("bad").snapshot().backends[0].clone();
    eventually("checked on both listeners", || {
        good.state.health.is_up() && bad.state.health.status() == Status::Down
    })
    .await;
    assert!(!Arc::ptr_eq(&good.state, &bad.state));
    lb.stop().await;
}
