//! The load generator and echo backend behind `scripts/bench-compare`.
//!
//! Run with `cargo run --release --example loadgen -- MODE [options]`. Each
//! measuring mode prints one JSON line on stdout; `serve` is the backend.
//! It is an example (not a `[[bin]]`) so that it never ships with slb, builds
//! only when asked for, and may use the dev-dependencies.
//!
//! Modes:
//! - `serve --tcp A --udp A`: TCP echo and UDP echo on the given addresses.
//! - `rr --addr A --conns N --size S --secs T`: N persistent connections,
//!   each sending S bytes and waiting for the S-byte echo; requests/s, p50, p99.
//! - `connrate --addr A --conns N --size S --secs T`: N loops of connect,
//!   S bytes each way, close; connections/s and failures.
//! - `idle --addr A --conns N`: open N connections (one byte echoed on each so
//!   a proxy has its backend side up), print a line, hold until stdin closes.
//! - `udp --addr A --conns N --size S --secs T`: N flows (one socket each)
//!   of S-byte datagram ping-pong; round trips/s, p50, p99, losses.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Measurements start after this warm-up, so connection setup is not timed.
const WARMUP: Duration = Duration::from_millis(500);
/// A UDP reply not back in this long counts as lost and the flow resends.
const UDP_LOSS_TIMEOUT: Duration = Duration::from_millis(200);

struct Args {
    mode: String,
    addr: Option<SocketAddr>,
    tcp: Option<SocketAddr>,
    udp: Option<SocketAddr>,
    conns: usize,
    size: usize,
    secs: f64,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .ok_or("usage: loadgen MODE [--addr A] [--conns N] [--size S] [--secs T]")?;
    let mut a = Args {
        mode,
        addr: None,
        tcp: None,
        udp: None,
        conns: 1,
        size: 64,
        secs: 5.0,
    };
    while let Some(flag) = it.next() {
        let v = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {v}: {e}");
        match flag.as_str() {
            "--addr" => a.addr = Some(v.parse().map_err(|e| bad(&e))?),
            "--tcp" => a.tcp = Some(v.parse().map_err(|e| bad(&e))?),
            "--udp" => a.udp = Some(v.parse().map_err(|e| bad(&e))?),
            "--conns" => a.conns = v.parse().map_err(|e| bad(&e))?,
            "--size" => a.size = v.parse().map_err(|e| bad(&e))?,
            "--secs" => a.secs = v.parse().map_err(|e| bad(&e))?,
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(2);
        }
    };
    // One thread: the generator shares its core with the backend, and a
    // single-threaded runtime spends the least CPU per operation.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let out = rt.block_on(run(args));
    match out {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}

async fn run(a: Args) -> Result<String, String> {
    let need = |o: Option<SocketAddr>| o.ok_or("--addr is required");
    let dur = Duration::from_secs_f64(a.secs);
    match a.mode.as_str() {
        "serve" => serve(a.tcp, a.udp).await.map(|_| String::new()),
        "rr" => Ok(rr(need(a.addr)?, a.conns, a.size, dur).await),
        "connrate" => Ok(connrate(need(a.addr)?, a.conns, a.size, dur).await),
        "idle" => Ok(idle(need(a.addr)?, a.conns).await),
        "udp" => Ok(udp(need(a.addr)?, a.conns, a.size, dur).await),
        m => Err(format!("unknown mode {m}")),
    }
}

// ---------------------------------------------------------------------------
// The backend.

async fn serve(tcp: Option<SocketAddr>, udp: Option<SocketAddr>) -> Result<(), String> {
    let mut tasks = Vec::new();
    if let Some(addr) = tcp {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        tasks.push(tokio::spawn(async move {
            loop {
                if let Ok((s, _)) = l.accept().await {
                    tokio::spawn(echo_tcp(s));
                }
            }
        }));
    }
    if let Some(addr) = udp {
        let s = UdpSocket::bind(addr)
            .await
            .map_err(|e| format!("bind {addr}: {e}"))?;
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                if let Ok((n, peer)) = s.recv_from(&mut buf).await {
                    let _ = s.send_to(&buf[..n], peer).await;
                }
            }
        }));
    }
    eprintln!("loadgen: serving");
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn echo_tcp(mut s: TcpStream) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TCP request/response.

async fn rr(addr: SocketAddr, conns: usize, size: usize, dur: Duration) -> String {
    let start = Instant::now() + WARMUP;
    let end = start + dur;
    let (errors, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let (errors, total) = (errors.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            if rr_conn(addr, size, (start, end), &mut lat, &total).await.is_err() {
                errors.fetch_add(1, Relaxed);
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let rate = all.len() as f64 / dur.as_secs_f64();
    format!(
        "{{\"rate\":{rate:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{},\"total\":{}}}",
        pct(&mut all, 0.50),
        pct(&mut all, 0.99),
        errors.load(Relaxed),
        total.load(Relaxed)
    )
}

/// One connection's request loop; latencies are kept inside `window`,
/// every completed request is added to `total`.
async fn rr_conn(
    addr: SocketAddr,
    size: usize,
    (start, end): (Instant, Instant),
    lat: &mut Vec<u32>,
    total: &AtomicU64,
) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    let req = vec![b'x'; size];
    let mut resp = vec![0u8; size];
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return Ok(());
        }
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        total.fetch_add(1, Relaxed);
        if t0 >= start {
            lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
        }
    }
}

/// The `q` quantile of nanosecond samples, in microseconds.
fn pct(v: &mut [u32], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 * q) as usize).min(v.len() - 1);
    v[i] as f64 / 1000.0
}

// ---------------------------------------------------------------------------
// TCP connection rate.

async fn connrate(addr: SocketAddr, conns: usize, size: usize, dur: Duration) -> String {
    let start = Instant::now() + WARMUP;
    let end = start + dur;
    let counters: Arc<[AtomicU64; 3]> = Arc::new(Default::default());
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let counters = counters.clone();
        tasks.push(tokio::spawn(async move {
            let (mut buf, msg) = (vec![0u8; size], vec![b'c'; size]);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return;
                }
                // [ok in the window, errors, ok in all]
                match one_connection(addr, &msg, &mut buf).await {
                    Ok(()) => {
                        counters[2].fetch_add(1, Relaxed);
                        if t0 >= start {
                            counters[0].fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) => {
                        counters[1].fetch_add(1, Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let [ok, errors, total] = &*counters;
    let rate = ok.load(Relaxed) as f64 / dur.as_secs_f64();
    format!(
        "{{\"rate\":{rate:.1},\"errors\":{},\"total\":{}}}",
        errors.load(Relaxed),
        total.load(Relaxed)
    )
}

async fn one_connection(addr: SocketAddr, msg: &[u8], buf: &mut [u8]) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(msg).await?;
    s.read_exact(buf).await?;
    // Close cleanly and wait for the other side's FIN, so the proxy has
    // finished with the connection before the next one is counted.
    s.shutdown().await?;
    let n = s.read(buf).await?;
    if n != 0 {
        return Err(std::io::Error::other("unexpected bytes after echo"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Idle connections.

async fn idle(addr: SocketAddr, conns: usize) -> String {
    // Open in waves so the listener's backlog never overflows.
    let gate = Arc::new(Semaphore::new(256));
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.ok()?;
            let mut s = TcpStream::connect(addr).await.ok()?;
            let mut b = [b'i'];
            s.write_all(&b).await.ok()?;
            s.read_exact(&mut b).await.ok()?;
            Some(s)
        }));
    }
    let mut held = Vec::with_capacity(conns);
    for t in tasks {
        if let Ok(Some(s)) = t.await {
            held.push(s);
        }
    }
    println!("{{\"open\":{},\"errors\":{}}}", held.len(), conns - held.len());
    // Hold until the script closes our stdin.
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {}
    })
    .await;
    drop(held);
    String::new()
}

// ---------------------------------------------------------------------------
// UDP ping-pong.

async fn udp(addr: SocketAddr, flows: usize, size: usize, dur: Duration) -> String {
    let start = Instant::now() + WARMUP;
    let end = start + dur;
    let (lost, total) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..flows {
        let (lost, total) = (lost.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(100_000);
            let _ = udp_flow(addr, size, (start, end), &mut lat, (&lost, &total)).await;
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let rate = all.len() as f64 / dur.as_secs_f64();
    format!(
        "{{\"rate\":{rate:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"errors\":{},\"total\":{}}}",
        pct(&mut all, 0.50),
        pct(&mut all, 0.99),
        lost.load(Relaxed),
        total.load(Relaxed)
    )
}

/// One flow's ping-pong; every answered round trip, warm-up included (as
/// the proxy's CPU is measured over the whole run), is added to `total`.
async fn udp_flow(
    addr: SocketAddr,
    size: usize,
    (start, end): (Instant, Instant),
    lat: &mut Vec<u32>,
    (lost, total): (&AtomicU64, &AtomicU64),
) -> std::io::Result<()> {
    let bind: SocketAddr = if addr.is_ipv4() { "127.0.0.1:0" } else { "[::1]:0" }
        .parse()
        .expect("a literal address");
    let s = UdpSocket::bind(bind).await?;
    s.connect(addr).await?;
    let req = vec![b'u'; size];
    let mut resp = vec![0u8; size + 1];
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            return Ok(());
        }
        s.send(&req).await?;
        let answer = tokio::time::timeout(UDP_LOSS_TIMEOUT, s.recv(&mut resp)).await;
        if matches!(answer, Ok(Ok(_))) {
            total.fetch_add(1, Relaxed);
        }
        match answer {
            Ok(Ok(_)) if t0 >= start => lat.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32),
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => {
                lost.fetch_add(1, Relaxed);
            }
        }
    }
}
