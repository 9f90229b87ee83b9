//! UDP round-trip load generator and echo backend, for measuring a UDP
//! listener against a direct path or another proxy (not part of `cargo test`).
//!
//! ```text
//! udp_pingpong echo 127.0.0.1:9999
//! udp_pingpong load 127.0.0.1:8999 [flows=64] [size=512] [secs=5]
//! ```
//! `load` runs `flows` client sockets, each with one datagram in flight
//! (send, wait for the echo, repeat), and prints round trips per second and
//! the p50/p99 round-trip time.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::net::UdpSocket;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match args.first().map(String::as_str) {
        Some("echo") => echo(parse_addr(args.get(1))?),
        Some("load") => {
            let n = |i: usize, d: u64| args.get(i).map_or(Ok(d), |s| s.parse().context("number"));
            let (flows, size, secs) = (n(2, 64)? as usize, n(3, 512)? as usize, n(4, 5)?);
            rt.block_on(load(
                parse_addr(args.get(1))?,
                flows,
                size,
                Duration::from_secs(secs),
            ))
        }
        _ => bail!("usage: udp_pingpong echo ADDR | load ADDR [flows] [size] [secs]"),
    }
}

fn parse_addr(s: Option<&String>) -> Result<SocketAddr> {
    s.context("address missing")?.parse().context("address")
}

/// A blocking echo server on one thread: the cheapest possible backend.
fn echo(addr: SocketAddr) -> Result<()> {
    let socket = std::net::UdpSocket::bind(addr).with_context(|| format!("bind {addr}"))?;
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let _ = socket.send_to(&buf[..n], peer);
    }
}

async fn load(target: SocketAddr, flows: usize, size: usize, run: Duration) -> Result<()> {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(flows);
    for _ in 0..flows {
        let socket = UdpSocket::bind("127.0.0.1:0").await?;
        socket.connect(target).await?;
        tasks.push(tokio::spawn(flow(socket, size, start + run)));
    }
    let mut rtts: Vec<u32> = Vec::new();
    let mut lost = 0;
    for t in tasks {
        let (r, l) = t.await??;
        rtts.extend(r);
        lost += l;
    }
    let secs = start.elapsed().as_secs_f64();
    rtts.sort_unstable();
    let pct = |p: f64| rtts.get(((rtts.len() as f64 * p) as usize).min(rtts.len().saturating_sub(1)));
    println!(
        "target={target} flows={flows} size={size} round_trips/s={:.0} p50_us={} p99_us={} lost={lost}",
        rtts.len() as f64 / secs,
        pct(0.50).copied().unwrap_or(0),
        pct(0.99).copied().unwrap_or(0),
    );
    Ok(())
}

/// One flow: ping-pong until `until`; returns the round-trip times in µs
/// and the number of datagrams that got no answer within 200 ms.
async fn flow(socket: UdpSocket, size: usize, until: Instant) -> Result<(Vec<u32>, u64)> {
    let payload = vec![0x5a; size];
    let mut buf = vec![0u8; 65_535];
    let (mut rtts, mut lost) = (Vec::with_capacity(1 << 16), 0);
    while Instant::now() < until {
        let t = Instant::now();
        socket.send(&payload).await?;
        match tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await {
            Ok(r) => {
                r?;
                rtts.push(t.elapsed().as_micros() as u32);
            }
            Err(_) => lost += 1,
        }
    }
    Ok((rtts, lost))
}
