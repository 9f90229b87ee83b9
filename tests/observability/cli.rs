//! `slb` as a separate process: `slb status` (table, --json, --watch) and
//! the access log of `slb run`.

use super::*;

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

/// Run `slb run` with `yaml` and extra arguments; stderr is piped.
fn spawn_slb(yaml: &str, args: &[&str], rust_log: &str) -> (tokio::process::Child, tempdir::Dir) {
    let dir = tempdir::Dir::new();
    let path = dir.0.join("slb.yaml");
    std::fs::write(&path, yaml).expect("write config");
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slb"))
        .args(args)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .env("RUST_LOG", rust_log)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn slb");
    (child, dir)
}

mod tempdir {
    /// A temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Dir {
        pub fn new() -> Dir {
            let n = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!("slb-obs-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&p).expect("temp dir");
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A one-connection run of the real binary: returns its stderr.
async fn one_connection_through_the_binary(
    backend: SocketAddr,
    args: &[&str],
    rust_log: &str,
) -> (String, SocketAddr) {
    // Free ports picked by the OS; another process could take one first, a
    // small race that loopback tests accept.
    let (listen, admin_addr) = (refused_addr(), refused_addr());
    let yaml = tcp_config("rr", &[(backend, 10)], "")
        .replace(
            "listen: 127.0.0.1:0\nlisteners",
            &format!("listen: {admin_addr}\nlisteners"),
        )
        .replace("    listen: 127.0.0.1:0", &format!("    listen: {listen}"));
    let (mut child, _dir) = spawn_slb(&yaml, args, rust_log);
    let mut s = loop {
        match TcpStream::connect(listen).await {
            Ok(s) => break s,
            Err(_) => {
                assert!(child.try_wait().unwrap().is_none(), "slb exited");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
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
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    child.start_kill().unwrap();
    let out = timeout(child.wait_with_output()).await.unwrap();
    (String::from_utf8_lossy(&out.stderr).into_owned(), listen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_is_one_json_line_per_connection_and_can_be_switched_off() {
    let backend = echo().await;
    let (stderr, _) =
        one_connection_through_the_binary(backend.addr, &["--log-format", "json"], "info").await;
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

    let (stderr, _) = one_connection_through_the_binary(backend.addr, &[], "info,slb::access=off").await;
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
