//! The AI case as a small simulation on loopback: four backends, requests
//! arriving every 10 ms, each held open for a random time (80% short,
//! 20% long, like chat turns and long generations). For rr, lc and p2c it
//! prints how the balancer spread live connections over the backends.
//!
//! `cargo run --example ai_uneven`

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result};
use slb::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

const BACKENDS: usize = 4;
const REQUESTS: usize = 300;
const ARRIVAL: Duration = Duration::from_millis(10);
const SHORT: Duration = Duration::from_millis(100);
const LONG: Duration = Duration::from_millis(3000);

/// A backend that reads the hold time (ms, as 8 bytes) and keeps the
/// connection for that long, like a model streaming tokens.
async fn backend() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(ms) = s.read_u64().await else { return };
                tokio::time::sleep(Duration::from_millis(ms)).await;
                let _ = s.write_all(b"done").await;
            });
        }
    });
    Ok(addr)
}

fn config(scheduler: &str, backends: &[SocketAddr]) -> String {
    let mut y = format!(
        "admin:\n  listen: 127.0.0.1:0\nlisteners:\n  - name: ai\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    scheduler: {scheduler}\n    health_check:\n      enabled: false\nbackend_groups:\n  - name: g\n    backends:\n"
    );
    for b in backends {
        y.push_str(&format!("      - address: \"{b}\"\n"));
    }
    y
}

/// Run the workload through one scheduler; returns (mean of the busiest
/// backend's live connections, peak, mean spread busiest - idlest).
async fn run(scheduler: &str, backends: &[SocketAddr]) -> Result<(f64, u64, f64)> {
    let cfg = slb::config::parse(&config(scheduler, backends))?;
    let server = Server::bind(&cfg).await?;
    let state = server.state();
    let lb = server.local_addr("ai").context("listener")?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(server.run(shutdown.clone()));
    let listener = state.listener("ai").context("listener")?.listener.clone();
    let mut rng = fastrand::Rng::with_seed(42);
    let mut clients = Vec::new();
    let (mut sum_max, mut peak, mut sum_spread, mut samples) = (0u64, 0u64, 0u64, 0u64);
    for _ in 0..REQUESTS {
        let hold = if rng.u8(0..5) == 0 { LONG } else { SHORT };
        let hold = hold.mul_f64(0.5 + rng.f64());
        clients.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(lb).await?;
            s.write_u64(hold.as_millis() as u64).await?;
            let mut done = Vec::new();
            s.read_to_end(&mut done).await?;
            anyhow::Ok(())
        }));
        tokio::time::sleep(ARRIVAL).await;
        let active: Vec<u64> = listener
            .snapshot()
            .backends
            .iter()
            .map(|b| b.state.stats.active.load(Relaxed))
            .collect();
        let (max, min) = (
            active.iter().max().copied().unwrap_or(0),
            active.iter().min().copied().unwrap_or(0),
        );
        sum_max += max;
        sum_spread += max - min;
        peak = peak.max(max);
        samples += 1;
    }
    for c in clients {
        c.await??;
    }
    shutdown.cancel();
    task.await??;
    Ok((
        sum_max as f64 / samples as f64,
        peak,
        sum_spread as f64 / samples as f64,
    ))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut backends = Vec::new();
    for _ in 0..BACKENDS {
        backends.push(backend().await?);
    }
    println!(
        "{REQUESTS} requests every {ARRIVAL:?}, 20% held ~{LONG:?}, 80% ~{SHORT:?}, {BACKENDS} backends"
    );
    println!("scheduler  mean busiest  peak busiest  mean busiest-idlest");
    for scheduler in ["rr", "lc", "p2c"] {
        let (mean, peak, spread) = run(scheduler, &backends).await?;
        println!("{scheduler:<9}  {mean:>12.2}  {peak:>12}  {spread:>19.2}");
    }
    Ok(())
}
