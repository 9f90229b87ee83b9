//! `slb` as a separate process: `slb status` (table, --json, --watch) and
//! the access log of `slb run`: one line per connection or UDP flow, with
//! every way it can end.

use std::future::Future;
use std::time::Duration;

use super::*;
use crate::slb_process::SlbProcess;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slb_status_prints_the_listener_and_its_backends() {
    let (a, b) = (echo().await, echo().await);
    let lb = start_lb(&tcp_config("wrr", &[(a.addr, 7), (b.addr, 0)], "")).await;
    echo_round(lb.addr("l"), 100).await;
    wait_idle(&lb).await;
    let out = slb_cli(&["status", "--admin", &admin(&lb).to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).unwrap();
    let listener_row = table
        .lines()
        .find(|l| l.starts_with("TCP "))
        .unwrap_or_else(|| panic!("no listener row:\n{table}"));
    let cols: Vec<&str> = listener_row.split_whitespace().collect();
    assert_eq!(
        cols[..6],
        ["TCP", &lb.addr("l").to_string(), "l", "wrr", "0", "1"],
        "{table}"
    );
    let row_a = table
        .lines()
        .find(|l| l.contains(&a.addr.to_string()))
        .expect("backend a row");
    let cols: Vec<&str> = row_a.split_whitespace().collect();
    assert_eq!(
        cols[..6],
        ["->", &a.addr.to_string(), "7", "unchecked", "0", "1"],
        "{table}"
    );
    assert!(table.contains(&format!("-> {}", b.addr)), "{table}");

    let out = slb_cli(&["status", "--json", "--admin", &admin(&lb).to_string()]).await;
    assert!(out.status.success(), "{out:?}");
    let js: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(js["listeners"][0]["backends"][1]["weight"], 0);
    lb.stop().await;

    let out = slb_cli(&["status", "--admin", &refused_addr().to_string()]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot query the admin server"),
        "{out:?}"
    );
}

async fn slb_cli(args: &[&str]) -> std::process::Output {
    let cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_slb"))
        .args(args)
        .kill_on_drop(true)
        .output();
    timeout(cmd).await.expect("run slb")
}

/// A one-connection run of the real binary: returns its stderr.
async fn one_connection_through_the_binary(backend: SocketAddr, args: &[&str], rust_log: &str) -> String {
    // Free ports picked by the OS; another process could take one first, a
    // small race that loopback tests accept. (The text log's "listener up"
    // line is not parsed for the bound address.)
    let (listen, admin_addr) = (refused_addr(), refused_addr());
    let yaml = tcp_config("rr", &[(backend, 10)], "")
        .replace(
            "listen: 127.0.0.1:0\nlisteners",
            &format!("listen: {admin_addr}\nlisteners"),
        )
        .replace("    listen: 127.0.0.1:0", &format!("    listen: {listen}"));
    let mut slb = SlbProcess::spawn(&yaml, args, rust_log);
    let mut s = loop {
        match TcpStream::connect(listen).await {
            Ok(s) => break s,
            Err(_) => {
                assert!(!slb.has_exited(), "slb exited:\n{}", slb.stderr());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    timeout(s.write_all(b"hello")).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    timeout(s.read_to_end(&mut back)).await.unwrap();
    assert_eq!(back, b"hello");
    // The access line is written before the connection stops counting as active.
    let end = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (_, body) = get(admin_addr, "/status").await;
        let st: Value = serde_json::from_str(&body).unwrap();
        if st["listeners"][0]["active"] == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < end, "connection never finished");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    slb.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_one_json_line_per_connection_and_can_be_switched_off() {
    let backend = echo().await;
    let stderr = one_connection_through_the_binary(backend.addr, &["--log-format", "json"], "info").await;
    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v: &Value| v["target"] == "slb::access")
        .collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let f = &lines[0]["fields"];
    assert_eq!(f["listener"], "l");
    assert_eq!(f["backend"], backend.addr.to_string());
    assert!(f["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert_eq!(
        (f["rx_bytes"].as_u64(), f["tx_bytes"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(f["end"], "client_close");
    assert!(f["duration_ms"].is_u64());

    let stderr = one_connection_through_the_binary(backend.addr, &[], "info,slb::access=off").await;
    assert!(stderr.contains("listener up"), "{stderr}");
    assert!(!stderr.contains("slb::access"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "no colours when stderr is not a terminal: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slb_status_watch_refreshes_every_second() {
    let backend = echo().await;
    let lb = start_lb(&tcp_config("rr", &[(backend.addr, 10)], "")).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slb"))
        .args(["status", "--watch", "--admin", &admin(&lb).to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn slb status --watch");
    let mut stdout = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    // A first screen, then a later one showing a connection made after the
    // first was printed.
    timeout(async {
        while !seen.contains("\x1b[2J") || !seen.contains("TCP ") {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "slb status --watch exited: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    echo_round(lb.addr("l"), 10).await;
    let row = format!(
        "{:<4} {:<22} {:<14} {:<8} {:>8} {:>10}",
        "TCP",
        lb.addr("l"),
        "l",
        "rr",
        0,
        1
    );
    timeout(async {
        while !seen.rsplit("\x1b[2J").next().unwrap().contains(&row) {
            let n = stdout.read(&mut buf).await.unwrap();
            assert!(n > 0, "slb status --watch exited: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await;
    child.start_kill().unwrap();
    let _ = child.wait().await;
    lb.stop().await;
}

/// Run slb with `yaml` (`--log-format json`), let `client` use listener `l`
/// once (it returns its own address), and return the fields of the one
/// access-log line slb writes for it.
async fn the_access_line<F, Fut>(yaml: &str, client: F) -> Value
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: Future<Output = SocketAddr>,
{
    let mut slb = SlbProcess::json(yaml);
    let vip = slb.listen_addr("l").await;
    let me = client(vip).await.to_string();
    slb.wait_for("", &[("client", &me)]).await;
    let log = slb.stop().await;
    let access: Vec<Value> = slb
        .events()
        .into_iter()
        .filter(|e| e["target"] == "slb::access")
        .collect();
    assert_eq!(access.len(), 1, "one access line:\n{log}");
    assert_eq!(access[0]["level"], "INFO", "{log}");
    let fields = access[0]["fields"].clone();
    assert_eq!(fields["listener"], "l", "{log}");
    assert_eq!(fields["client"], me, "{log}");
    assert!(fields["duration_ms"].is_u64(), "{log}");
    fields
}

/// Connect to `vip` from a known address, send `data` and read until EOF
/// or an error: (the client's address, what it read). slb may reset a
/// connection it drops before `connect` returns; that reads as nothing.
async fn send_and_read_to_end(vip: SocketAddr, data: &[u8]) -> (SocketAddr, Vec<u8>) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind client");
    let me = socket.local_addr().unwrap();
    let mut back = Vec::new();
    if let Ok(mut s) = timeout(socket.connect(vip)).await {
        if timeout(s.write_all(data)).await.is_ok() {
            let _ = timeout(s.read_to_end(&mut back)).await;
        }
    }
    (me, back)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_backend_close_when_the_backend_closes_first() {
    let backend = fake(|mut s| async move {
        let _ = s.write_all(b"bye").await;
    })
    .await;
    let yaml = tcp_config("rr", &[(backend.addr, 10)], "");
    let f = the_access_line(&yaml, |vip| async move {
        let (me, back) = send_and_read_to_end(vip, b"").await;
        assert_eq!(back, b"bye");
        me
    })
    .await;
    assert_eq!(f["message"], "tcp connection");
    assert_eq!(f["end"], "backend_close");
    assert_eq!(f["backend"], backend.addr.to_string());
    assert_eq!(
        (f["rx_bytes"].as_u64(), f["tx_bytes"].as_u64()),
        (Some(0), Some(3))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_reset_when_the_backend_resets() {
    let backend = fake(|mut s| async move {
        let mut buf = [0u8; 5];
        let _ = s.read_exact(&mut buf).await;
        // Zero linger: the close sends RST.
        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    })
    .await;
    let yaml = tcp_config("rr", &[(backend.addr, 10)], "");
    let f = the_access_line(&yaml, |vip| async move {
        let (me, back) = send_and_read_to_end(vip, b"hello").await;
        assert!(back.is_empty());
        me
    })
    .await;
    assert_eq!(f["end"], "reset");
    assert_eq!(f["backend"], backend.addr.to_string());
    assert_eq!(
        (f["rx_bytes"].as_u64(), f["tx_bytes"].as_u64()),
        (Some(5), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_idle_timeout_when_nothing_moves_for_idle_timeout() {
    let backend = hang().await;
    let yaml = tcp_config("rr", &[(backend.addr, 10)], "idle_timeout: 300ms");
    let f = the_access_line(
        &yaml,
        |vip| async move { send_and_read_to_end(vip, b"hi").await.0 },
    )
    .await;
    assert_eq!(f["end"], "idle_timeout");
    assert_eq!(f["backend"], backend.addr.to_string());
    assert_eq!(
        (f["rx_bytes"].as_u64(), f["tx_bytes"].as_u64()),
        (Some(2), Some(0))
    );
    assert!(f["duration_ms"].as_u64().unwrap() >= 300, "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_connect_failed_and_how_many_were_tried_when_every_connect_fails() {
    let yaml = tcp_config("rr", &[(refused_addr(), 10), (refused_addr(), 10)], "");
    let f = the_access_line(&yaml, |vip| async move { send_and_read_to_end(vip, b"").await.0 }).await;
    assert_eq!(f["message"], "tcp connection dropped");
    assert_eq!(f["end"], "connect_failed");
    assert_eq!(f["tried"], 2);
    for absent in ["backend", "rx_bytes", "tx_bytes"] {
        assert!(f[absent].is_null(), "no {absent}: {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_says_no_backend_when_none_is_eligible() {
    // Weight 0: drained, never scheduled.
    let backend = echo().await;
    let yaml = tcp_config("rr", &[(backend.addr, 0)], "");
    let f = the_access_line(&yaml, |vip| async move { send_and_read_to_end(vip, b"").await.0 }).await;
    assert_eq!(f["message"], "tcp connection dropped");
    assert_eq!(f["end"], "no_backend");
    assert_eq!(f["tried"], 0);
    assert!(f["backend"].is_null(), "{f}");
    assert_eq!(backend.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_udp_flow_line_with_datagrams_each_way_when_the_flow_idles_out() {
    let backend = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        while let Ok((n, peer)) = backend.recv_from(&mut buf).await {
            let _ = backend.send_to(&buf[..n], peer).await;
        }
    });
    let yaml = tcp_config("rr", &[(backend_addr, 10)], "idle_timeout: 300ms")
        .replace("protocol: tcp", "protocol: udp");
    let f = the_access_line(&yaml, |vip| async move {
        let c = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = [0u8; 64];
        for n in [10, 20] {
            timeout(c.send_to(&vec![1u8; n], vip)).await.expect("send");
            let (got, from) = timeout(c.recv_from(&mut buf)).await.expect("echo");
            assert_eq!((got, from), (n, vip));
        }
        c.local_addr().unwrap()
    })
    .await;
    echo.abort();
    assert_eq!(f["message"], "udp flow");
    assert_eq!(f["end"], "idle_timeout");
    assert_eq!(f["backend"], backend_addr.to_string());
    for (field, want) in [
        ("rx_bytes", 30),
        ("rx_datagrams", 2),
        ("tx_bytes", 30),
        ("tx_datagrams", 2),
    ] {
        assert_eq!(f[field], want, "{field}: {f}");
    }
    assert!(f["duration_ms"].as_u64().unwrap() >= 300, "{f}");
}
