//! Shared test harness: start slb from a YAML string on 127.0.0.1:0, and
//! in-process fake backends (echo, id, hang, refuse, blackhole).
//! Every wait is bounded by a deadline; nothing sleeps for readiness.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use slb::{Server, State};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous bound on any single wait in a test.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// A running slb.
pub struct Lb {
    pub state: Arc<State>,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Lb {
    /// The bound address of listener `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.state
            .listener(name)
            .unwrap_or_else(|| panic!("no listener {name}"))
            .local_addr
    }

    pub fn listener(&self, name: &str) -> Arc<slb::listener::Listener> {
        self.state.listener(name).expect("listener").listener.clone()
    }

    /// Stop and wait for a clean exit.
    pub async fn stop(self) {
        self.shutdown.cancel();
        timeout(self.task)
            .await
            .expect("server task")
            .expect("server run");
    }
}

/// Start slb from a YAML configuration.
pub async fn start_lb(yaml: &str) -> Lb {
    // Tests open thousands of sockets; a 1024 soft limit is common.
    slb::sys::raise_fd_limit();
    let mut config = slb::config::parse(yaml).unwrap_or_else(|e| panic!("config: {e:#}\n{yaml}"));
    // Never the fixed default admin port: tests run in parallel.
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    let server = Server::bind(&config).await.expect("bind");
    let state = server.state();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    Lb {
        state,
        shutdown,
        task,
    }
}

/// A one-listener TCP configuration in front of `backends` (address, weight).
pub fn tcp_config(scheduler: &str, backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let mut yaml = format!(
        "runtime:\n  drain_timeout: 5s\nadmin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: l\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    scheduler: {scheduler}\n    health_check:\n      enabled: false\n"
    );
    for line in extra.lines().filter(|l| !l.trim().is_empty()) {
        yaml.push_str("    ");
        yaml.push_str(line);
        yaml.push('\n');
    }
    yaml.push_str("backend_groups:\n  - name: g\n    backends:\n");
    for (addr, w) in backends {
        yaml.push_str(&format!("      - address: \"{addr}\"\n        weight: {w}\n"));
    }
    if backends.is_empty() {
        yaml = yaml.replace("    backends:\n", "    backends: []\n");
    }
    yaml
}

/// Await `f`, failing the test after [`DEADLINE`].
pub async fn timeout<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(DEADLINE, f).await.expect("timed out")
}

/// Poll `cond` until it holds, failing after [`DEADLINE`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A fake backend: its address, how many connections it accepted, and its
/// task (abort it to make the backend vanish).
pub struct Fake {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub task: JoinHandle<()>,
}

impl Fake {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }
}

/// Serve each accepted connection with `serve` on 127.0.0.1:0.
pub async fn fake<F, Fut>(serve: F) -> Fake
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    fake_on("127.0.0.1:0".parse().unwrap(), serve).await
}

pub async fn fake_on<F, Fut>(addr: SocketAddr, serve: F) -> Fake
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind(addr).await.expect("bind fake backend");
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                continue;
            };
            count.fetch_add(1, Relaxed);
            tokio::spawn(serve(s));
        }
    });
    Fake { addr, accepted, task }
}

/// Echo everything back; on EOF, shut down the write side.
pub async fn echo() -> Fake {
    fake(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Write `id` and a newline, then echo.
pub async fn id_server(id: &'static str) -> Fake {
    fake(move |mut s| async move {
        if s.write_all(format!("{id}\n").as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// Accept and hold the connection open until the peer closes it.
pub async fn hang() -> Fake {
    fake(|mut s| async move {
        let mut buf = [0u8; 1024];
        while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
}

/// An address on which nothing listens: connecting is refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// An address that never answers a SYN: a listening socket with a backlog
/// of 0 whose accept queue is already full, so the kernel drops new SYNs.
/// Keep the returned value alive for as long as the address must blackhole.
pub struct Blackhole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<std::net::TcpStream>,
}

pub fn blackhole() -> Blackhole {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    // Fill the accept queue; later SYNs are dropped.
    for _ in 0..2 {
        let f = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        f.set_nonblocking(true).unwrap();
        let _ = f.connect(&addr.into());
        fillers.push(f.into());
    }
    Blackhole {
        addr,
        _listener: s,
        _fillers: fillers,
    }
}

/// Connect through slb and read the backend's id line.
pub async fn read_id(addr: SocketAddr) -> String {
    let mut s = timeout(TcpStream::connect(addr)).await.expect("connect");
    read_line(&mut s).await
}

/// Read one `\n`-terminated line (without the newline).
pub async fn read_line(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    loop {
        let n = timeout(s.read(&mut b)).await.expect("read");
        if n == 0 || b[0] == b'\n' {
            break;
        }
        out.push(b[0]);
    }
    String::from_utf8(out).expect("utf8")
}
