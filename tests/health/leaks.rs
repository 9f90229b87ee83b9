//! Thousands of probes leave no descriptor behind.

use super::*;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count()
}

#[tokio::test]
async fn thousands_of_probes_leak_no_descriptors() {
    let status = Arc::new(AtomicU16::new(200));
    let tcp = check_port().await;
    let http = http_server(status, Arc::default()).await;
    let refused = refused_addr();
    let hole = blackhole();
    let check = |kind, timeout| HealthCheck {
        kind,
        port: None,
        interval: Duration::from_secs(10),
        timeout,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
        path: "/".into(),
        expected_status: (200, 399),
    };
    // Generous timeouts where the answer must be Ok on a loaded machine; a
    // short one for the blackhole, whose answer is always a timeout.
    let t = check(CheckType::Tcp, Duration::from_secs(5));
    let h = check(CheckType::Http, Duration::from_secs(5));
    let short = check(CheckType::Tcp, Duration::from_millis(20));
    let run = |n: usize| {
        let (t, h, short) = (t.clone(), h.clone(), short.clone());
        async move {
            for i in 0..n {
                assert_eq!(probe::check(tcp.addr, &t).await, CheckResult::Ok, "tcp probe {i}");
                if i % 3 == 0 {
                    assert_eq!(
                        probe::check(http.addr, &h).await,
                        CheckResult::Ok,
                        "http probe {i}"
                    );
                    assert_eq!(probe::check(refused, &t).await, CheckResult::Refused);
                }
                if i % 100 == 0 {
                    assert_eq!(probe::check(hole.addr, &short).await, CheckResult::Timeout);
                }
            }
        }
    };
    run(50).await;
    let before = open_fds();
    tokio::time::timeout(Duration::from_secs(120), run(3000))
        .await
        .expect("3000 probes in time");
    // A leak would be thousands of descriptors (or EMFILE, failing a probe
    // above); the slack only absorbs the other tests of this binary.
    eventually("descriptors back to the baseline", || open_fds() <= before + 200).await;
}
