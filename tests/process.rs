//! The `slb` binary as an operator runs it: logs that say where listeners
//! are, SIGTERM draining to exit 0 (and the drain timeout closing what is
//! left), and EMFILE on accept backing off without spinning or ending the
//! listener.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A running `slb run` child process and its bound listener address.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// The lines logged up to and including `listener up`.
    early: Vec<String>,
    lines: mpsc::Receiver<String>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `slb run` on `yaml` under `sh -c "<prefix> exec slb ..."`, and wait
/// (bounded) for its "listener up" log line to learn the bound address.
fn spawn_slb(yaml: &str, shell_prefix: &str) -> Proc {
    let dir = std::env::temp_dir().join(format!("slb-test-{}-{}", std::process::id(), fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("slb.yaml");
    std::fs::File::create(&path)
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let cmd = format!(
        "{shell_prefix} exec '{}' run -c '{}'",
        env!("CARGO_BIN_EXE_slb"),
        path.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn slb");
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + DEADLINE;
    let mut early = Vec::new();
    let addr = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines.recv_timeout(left).expect("slb never logged `listener up`");
        early.push(line);
        if let Some(addr) = logged_listen(&early, "listener up") {
            break addr.parse().unwrap();
        }
    };
    Proc {
        child,
        addr,
        early,
        lines,
        _dir: TempDir(dir),
    }
}

/// The `listen=` address of the first of `lines` that contains `what`.
fn logged_listen(lines: &[String], what: &str) -> Option<String> {
    let line = lines.iter().find(|l| l.contains(what))?;
    let at = line.find("listen=").expect("listen= field") + "listen=".len();
    Some(line[at..].split_whitespace().next().unwrap().to_string())
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "slb did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

async fn round_trip(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut b)).await??;
    assert_eq!(&b, b"ping");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_live_connections_then_exits_zero() {
    let backend = echo().await;
    let mut p = spawn_slb(&tcp_config("rr", &[(backend.addr, 10)], ""), "");
    let mut live = timeout(TcpStream::connect(p.addr)).await.unwrap();
    live.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    timeout(live.read_exact(&mut b)).await.unwrap();

    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    // New connections are refused once it stops accepting...
    let mut refused = false;
    for _ in 0..500 {
        if TcpStream::connect(p.addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "still accepting after SIGTERM");
    // ...the live one keeps working until it closes, then slb exits 0.
    live.write_all(b"b").await.unwrap();
    timeout(live.read_exact(&mut b)).await.unwrap();
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "exited before the live connection ended"
    );
    drop(live);
    let status = tokio::task::block_in_place(|| wait_exit(&mut p.child));
    assert!(status.success(), "{status:?}");
}

/// A one-listener config in front of `backend` with `worker_threads: 1`.
fn one_worker(backend: &Fake) -> String {
    tcp_config("rr", &[(backend.addr, 10)], "").replace("runtime:\n", "runtime:\n  worker_threads: 1\n")
}

/// Reads one HTTP/1.0 response body from the admin server at `addr`.
async fn http_get(addr: &str, path: &str) -> String {
    let mut s = timeout(TcpStream::connect(addr)).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    timeout(s.read_to_string(&mut body)).await.unwrap();
    body
}

/// `worker_threads: 1` runs slb on tokio's current-thread scheduler: the
/// data path, the admin server (whose handlers use the blocking pool) and
/// SIGTERM draining must all work there as on the multi-thread one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_thread_forwards_serves_admin_and_drains() {
    let backend = echo().await;
    let mut p = spawn_slb(&one_worker(&backend), "");
    // The admin server logs its address around the time the listener does.
    let deadline = Instant::now() + DEADLINE;
    let admin = loop {
        if let Some(addr) = logged_listen(&p.early, "admin server up") {
            break addr;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let line =
            tokio::task::block_in_place(|| p.lines.recv_timeout(left)).expect("no `admin server up` log");
        p.early.push(line);
    };
    for _ in 0..20 {
        round_trip(p.addr).await.unwrap();
    }
    let status = http_get(&admin, "/status").await;
    assert!(status.contains("200 OK"), "{status}");
    assert!(
        status.contains("\"total\": 20"),
        "20 connections not in /status: {status}"
    );
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let exit = tokio::task::block_in_place(|| wait_exit(&mut p.child));
    assert!(exit.success(), "{exit:?}");
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" that ends the command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_without_spinning_or_dying() {
    let backend = echo().await;
    // A hard limit of 64 descriptors: a couple of dozen connections exhaust it.
    let p = spawn_slb(&one_worker(&backend), "ulimit -n 64 &&");
    let mut held = Vec::new();
    for _ in 0..60 {
        // Handshakes complete in the kernel backlog even when slb cannot accept.
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(p.addr)).await {
            held.push(s);
        }
    }
    // Wait until slb has hit EMFILE (it logs it).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = p
            .lines
            .recv_timeout(left)
            .expect("no `accept failed` log under EMFILE");
        if line.contains("accept failed") {
            break;
        }
    }
    // While starved it must not spin: well under half a core over a second.
    let before = cpu_seconds(p.child.id());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = cpu_seconds(p.child.id()) - before;
    assert!(
        used < 0.5,
        "slb used {used:.2} CPU seconds in 1 s while out of descriptors"
    );
    // Free the descriptors: the listener is still alive and serves again.
    drop(held);
    let deadline = Instant::now() + DEADLINE;
    while round_trip(p.addr).await.is_err() {
        assert!(Instant::now() < deadline, "listener never recovered after EMFILE");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_closes_a_held_connection_and_exits_zero() {
    let backend = hang().await;
    let yaml =
        tcp_config("rr", &[(backend.addr, 10)], "").replace("drain_timeout: 5s", "drain_timeout: 300ms");
    let mut p = spawn_slb(&yaml, "");
    let mut held = timeout(TcpStream::connect(p.addr)).await.unwrap();
    held.write_all(b"x").await.unwrap();
    eventually("backend accepted the held connection", || backend.accepted() == 1).await;
    assert!(p.child.try_wait().unwrap().is_none(), "exited before SIGTERM");

    let t = Instant::now();
    unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::block_in_place(|| wait_exit(&mut p.child));
    let took = t.elapsed();
    assert!(status.success(), "{status:?}");
    // The connection never ends by itself: only the drain timeout ends it.
    assert!(
        took < Duration::from_secs(10),
        "took {took:?} with a 300ms drain timeout"
    );
    // Every line slb wrote: the channel closes with its stderr.
    let logged: Vec<String> =
        tokio::task::block_in_place(|| std::iter::from_fn(|| p.lines.recv_timeout(DEADLINE).ok()).collect());
    assert!(
        logged.iter().any(|l| l.contains("drain timeout reached")),
        "no `drain timeout reached` log:\n{}",
        logged.join("\n")
    );
    let mut b = [0u8; 1];
    let r = timeout(held.read(&mut b)).await;
    assert!(matches!(r, Ok(0) | Err(_)), "held connection still open: {r:?}");
}
