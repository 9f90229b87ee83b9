//! A UDP listener in `/metrics` and `/status`: flows, datagrams and bytes
//! each way are exact per listener and per backend, the live-flow gauges
//! return to 0 when the flows idle out, and the flow cap's drops show as
//! `reason="limit"`.

use super::*;
use tokio::net::UdpSocket;

/// A UDP echo backend; the task ends with the test's runtime.
async fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind udp echo");
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], peer).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flows_datagrams_and_bytes_are_exact_in_metrics_and_status() {
    let (a, b) = (udp_echo().await, udp_echo().await);
    let yaml =
        tcp_config("rr", &[(a, 10), (b, 10)], "idle_timeout: 2s").replace("protocol: tcp", "protocol: udp");
    let lb = start_lb(&yaml).await;
    let vip = lb.addr("l");
    // Four flows (four client sockets), each sending three datagrams of
    // 10, 20 and 30 bytes and reading every echo.
    let (flows, per_flow, sizes) = (4u64, 3u64, [10usize, 20, 30]);
    for _ in 0..flows {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        let mut buf = [0u8; 64];
        for n in sizes {
            timeout(c.send_to(&vec![1u8; n], vip)).await.expect("send");
            let (got, from) = timeout(c.recv_from(&mut buf)).await.expect("echo");
            assert_eq!((got, from), (n, vip));
        }
    }
    let bytes = flows * sizes.iter().sum::<usize>() as u64;
    let m = metrics(&lb).await;
    let st = status(&lb).await;
    let l = &st["listeners"][0];
    let ll = [("listener", "l")];
    assert_eq!(l["protocol"], "udp");
    assert_eq!(l["total"], flows);
    assert_eq!(l["active"], flows, "flows live until idle_timeout");
    assert_eq!(value(&m, "slb_listener_connections_total", &ll), flows as f64);
    for (field, metric, want) in [
        (
            "rx_datagrams",
            "slb_listener_rx_datagrams_total",
            flows * per_flow,
        ),
        (
            "tx_datagrams",
            "slb_listener_tx_datagrams_total",
            flows * per_flow,
        ),
        ("rx_bytes", "slb_listener_rx_bytes_total", bytes),
        ("tx_bytes", "slb_listener_tx_bytes_total", bytes),
    ] {
        assert_eq!(l[field], want, "{field}");
        assert_eq!(value(&m, metric, &ll), want as f64, "{metric}");
    }
    for (i, addr) in [a, b].iter().enumerate() {
        let addr = addr.to_string();
        let bl = [("listener", "l"), ("backend", addr.as_str())];
        let js = &l["backends"][i];
        assert_eq!(js["address"], addr);
        // Round robin: two flows on each backend.
        assert_eq!(js["total"], 2);
        assert_eq!(value(&m, "slb_backend_connections_total", &bl), 2.0);
        for (field, metric, want) in [
            ("tx_datagrams", "slb_backend_tx_datagrams_total", 2 * per_flow),
            ("rx_datagrams", "slb_backend_rx_datagrams_total", 2 * per_flow),
            ("tx_bytes", "slb_backend_tx_bytes_total", bytes / 2),
            ("rx_bytes", "slb_backend_rx_bytes_total", bytes / 2),
        ] {
            assert_eq!(js[field], want, "{addr} {field}");
            assert_eq!(value(&m, metric, &bl), want as f64, "{addr} {metric}");
        }
    }
    let listener = lb.listener("l");
    eventually("every flow idled out", || {
        listener.stats.active.load(std::sync::atomic::Ordering::Relaxed) == 0
    })
    .await;
    let m = metrics(&lb).await;
    assert_eq!(value(&m, "slb_listener_connections_active", &ll), 0.0);
    for addr in [a, b] {
        let addr = addr.to_string();
        let bl = [("listener", "l"), ("backend", addr.as_str())];
        assert_eq!(value(&m, "slb_backend_connections_active", &bl), 0.0);
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_flow_cap_drops_show_as_limit_in_metrics_and_status() {
    let a = udp_echo().await;
    let yaml = tcp_config("rr", &[(a, 10)], "max_connections: 1\nidle_timeout: 30s")
        .replace("protocol: tcp", "protocol: udp");
    let lb = start_lb(&yaml).await;
    let vip = lb.addr("l");
    let mut buf = [0u8; 16];
    let first = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
    timeout(first.send_to(b"in", vip)).await.expect("send");
    timeout(first.recv_from(&mut buf)).await.expect("echo");
    // Two more clients, one datagram each: new flows over the cap of 1.
    for _ in 0..2 {
        let c = UdpSocket::bind("127.0.0.1:0").await.expect("bind client");
        timeout(c.send_to(b"over", vip)).await.expect("send");
    }
    let listener = lb.listener("l");
    eventually("two datagrams dropped at the cap", || {
        listener.stats.dropped(slb::stats::DropReason::Limit) == 2
    })
    .await;
    let m = metrics(&lb).await;
    let st = status(&lb).await;
    let l = &st["listeners"][0];
    for (reason, want) in [("limit", 2), ("no_backend", 0), ("connect_failed", 0)] {
        let labels = [("listener", "l"), ("reason", reason)];
        assert_eq!(
            value(&m, "slb_listener_dropped_total", &labels),
            want as f64,
            "{reason}"
        );
        assert_eq!(l["dropped"][reason], want, "{reason}");
    }
    assert_eq!(l["total"], 1, "only the first client got a flow");
    lb.stop().await;
}
