//! An open-loop load generator for AI services (`examples/mock_ai.rs`, or
//! anything that streams `data:` events and a final `data: [DONE]`).
//!
//! ```sh
//! cargo run --release --example ai_load -- --addr 127.0.0.1:8999 --load 0.9 --slots 12 --token-time 2ms --secs 20
//! cargo run --release --example ai_load -- --addr 127.0.0.1:8999 --rate 30 --secs 20
//! ```
//!
//! Requests arrive as a Poisson process (exponential gaps) at `--rate` per
//! second for `--secs`, each on a new TCP connection (`GET
//! /v1/completions?tokens=N`, `Connection: close`), whether or not earlier
//! ones have finished: the load does not back off when the service slows,
//! as real users do not. Token counts come from `--mix`, by default
//! `0.8:16-64,0.2:400-800`: 80% of requests ask for 16–64 tokens and 20% for
//! 400–800 (uniform within each range; mean 152). Arrival gaps and token
//! counts come from `--seed`, so two runs with the same seed send the same
//! requests at the same times. With `--exact-load` the time axis is scaled
//! (by a few percent) so that the drawn requests offer exactly `--load`:
//! without it, one 20 s draw at `--load 0.9` may offer 0.87 and the next
//! 0.94, and near capacity waits depend steeply on that.
//!
//! `--load L --slots S --token-time T` picks the rate itself: a backend slot
//! serves a request of m tokens in m·T, so S slots serve at most
//! S / (m·T) requests per second (m the mix's mean), and the rate is L times
//! that. `--rate` overrides it.
//!
//! Measured per request, from its scheduled arrival (the start of its
//! connect): time to first token (TTFT, the first `data:` event) and
//! completion (`data: [DONE]`). A request is an error when its connect
//! fails, the status is not 200, the stream ends before `[DONE]` or with
//! fewer tokens than asked, or it takes longer than `--timeout`. Requests
//! arriving in the first `--warmup` seconds are sent but not counted. At the
//! end, one JSON line on stdout: counts, p50/p99/max TTFT and p50/p99
//! completion in ms, requests per server (the events' `server` field),
//! `offered_load` (the load this run's draws really offered: Poisson counts
//! and the long tail put it a few percent off `--load`, differently per
//! seed), and `lag_max_ms` / `late_5ms`, how late the generator itself
//! started requests (large values mean the generator, not the service, was
//! the bottleneck).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};

#[derive(Parser)]
#[command(about = "Open-loop (Poisson) load for streaming AI services; prints one JSON line")]
struct Args {
    /// The service (or balancer) to load.
    #[arg(long)]
    addr: SocketAddr,
    /// Arrivals per second (overrides --load).
    #[arg(long)]
    rate: Option<f64>,
    /// Target load as a fraction of the slots' capacity (needs --slots and --token-time).
    #[arg(long)]
    load: Option<f64>,
    /// Total slots behind --addr (for --load).
    #[arg(long)]
    slots: Option<u32>,
    /// The service's time per token (for --load), e.g. 2ms.
    #[arg(long, value_parser = humantime::parse_duration)]
    token_time: Option<Duration>,
    /// Seconds of arrivals.
    #[arg(long, default_value_t = 20.0)]
    secs: f64,
    /// Arrivals in the first this many seconds are sent but not counted.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Token-count mix: comma list of WEIGHT:LO-HI (uniform in LO..=HI).
    #[arg(long, default_value = "0.8:16-64,0.2:400-800")]
    mix: String,
    /// Scale the arrival times so that the requests drawn offer exactly
    /// --load (the run lasts --secs times drawn load / --load).
    #[arg(long)]
    exact_load: bool,
    /// Seed of the arrival gaps and the token counts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A request not complete after this long is an error.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

/// One class of the token-count mix.
struct Class {
    weight: f64,
    lo: u32,
    hi: u32,
}

fn parse_mix(s: &str) -> Result<Vec<Class>> {
    let mut mix = Vec::new();
    for part in s.split(',') {
        let (w, range) = part.split_once(':').context("mix: expected WEIGHT:LO-HI")?;
        let (lo, hi) = range.split_once('-').context("mix: expected LO-HI")?;
        let c = Class {
            weight: w.trim().parse().context("mix: bad weight")?,
            lo: lo.trim().parse().context("mix: bad LO")?,
            hi: hi.trim().parse().context("mix: bad HI")?,
        };
        if !(c.weight.is_finite() && c.weight > 0.0) || c.lo == 0 || c.lo > c.hi {
            bail!("mix: {part:?}: need weight > 0 and 1 <= LO <= HI");
        }
        mix.push(c);
    }
    Ok(mix)
}

/// Mean tokens per request of the mix.
fn mean_tokens(mix: &[Class]) -> f64 {
    let total: f64 = mix.iter().map(|c| c.weight).sum();
    mix.iter()
        .map(|c| c.weight / total * (c.lo as f64 + c.hi as f64) / 2.0)
        .sum()
}

fn draw_tokens(mix: &[Class], rng: &mut fastrand::Rng) -> u32 {
    let total: f64 = mix.iter().map(|c| c.weight).sum();
    let mut x = rng.f64() * total;
    for c in mix {
        if x < c.weight {
            return rng.u32(c.lo..=c.hi);
        }
        x -= c.weight;
    }
    let last = &mix[mix.len() - 1];
    rng.u32(last.lo..=last.hi)
}

/// How one request went.
enum Outcome {
    Ok {
        ttft: Duration,
        done: Duration,
        server: String,
    },
    Err(&'static str),
}

fn main() {
    let args = Args::parse();
    // One thread: the generator shares a core with the services it loads.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ai_load: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(line) => println!("{line}"),
        Err(e) => {
            eprintln!("ai_load: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(a: Args) -> Result<String> {
    let mix = parse_mix(&a.mix)?;
    let mean = mean_tokens(&mix);
    let capacity = match (a.slots, a.token_time) {
        (Some(s), Some(t)) if s > 0 && !t.is_zero() => Some(s as f64 / (mean * t.as_secs_f64())),
        (Some(_), Some(_)) => bail!("--slots and --token-time must be positive"),
        _ => None,
    };
    let rate = match (a.rate, a.load, capacity) {
        (Some(r), _, _) => r,
        (None, Some(l), Some(c)) => l * c,
        (None, Some(_), None) => bail!("--load needs --slots and --token-time"),
        (None, None, _) => bail!("give --rate, or --load with --slots and --token-time"),
    };
    if !(rate.is_finite() && rate > 0.0) {
        bail!("the rate must be positive (got {rate})");
    }
    let secs_ok = a.secs.is_finite() && a.secs > 0.0 && a.secs < 1e6;
    if !(secs_ok && a.warmup >= 0.0 && a.warmup < a.secs) {
        bail!("need 0 < --secs < 1e6 and 0 <= --warmup < --secs");
    }
    if rate * a.secs > 10_000_000.0 {
        bail!("--rate x --secs must be at most 10,000,000 requests");
    }

    // The whole schedule first: (arrival time in seconds, tokens).
    let mut gaps = fastrand::Rng::with_seed(a.seed);
    let mut sizes = fastrand::Rng::with_seed(a.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut schedule = Vec::new();
    let mut at = 0.0;
    loop {
        // Exponential gap: -ln(U) / rate, U in (0, 1].
        at += -(1.0 - gaps.f64()).ln() / rate;
        if at >= a.secs {
            break;
        }
        schedule.push((at, draw_tokens(&mix, &mut sizes)));
    }
    let tokens_total: u64 = schedule.iter().map(|&(_, n)| n as u64).sum();
    // --exact-load: stretch or squeeze the time axis so that these draws
    // offer exactly --load (the run then lasts a few percent more or less
    // than --secs).
    let drawn_load = capacity.map(|c| tokens_total as f64 / mean / (c * a.secs));
    let stretch = match (a.exact_load, drawn_load, a.rate, a.load) {
        (false, ..) => 1.0,
        (true, Some(d), None, Some(l)) if d > 0.0 => d / l,
        (true, ..) => bail!("--exact-load needs --load, --slots and --token-time (and no --rate)"),
    };
    let (secs, warmup) = (a.secs * stretch, a.warmup * stretch);

    let mut tasks = JoinSet::new();
    let mut lag_max = Duration::ZERO;
    let mut late = 0u64; // requests started more than 5 ms late
    let mut s = Stats::default();
    let start = Instant::now();
    for &(at, tokens) in &schedule {
        let at = at * stretch;
        let when = start + Duration::from_secs_f64(at);
        tokio::time::sleep_until(when).await;
        let lag = when.elapsed();
        lag_max = lag_max.max(lag);
        if lag > Duration::from_millis(5) {
            late += 1;
        }
        let counted = at >= warmup;
        let (addr, limit) = (a.addr, a.timeout);
        tasks.spawn(async move {
            let out = match timeout(limit, request(addr, tokens, when)).await {
                Ok(out) => out,
                Err(_) => Outcome::Err("timeout"),
            };
            (counted, out)
        });
        // Reap finished requests as we go so the set stays small.
        while let Some(done) = tasks.try_join_next() {
            s.collect(done);
        }
    }
    while let Some(done) = tasks.join_next().await {
        s.collect(done);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (mut ttft, mut done) = (s.ttft, s.done);
    ttft.sort_by(f64::total_cmp);
    done.sort_by(f64::total_cmp);
    let ms = |v: Option<f64>| v.map(|x| (x * 1000.0).round() / 1000.0);
    Ok(serde_json::json!({
        "addr": a.addr.to_string(),
        "rate": rate / stretch,
        "load": capacity.map(|c| rate / c),
        // The load the requests sent really offered (their tokens over what
        // the slots serve in the run's length): without --exact-load,
        // Poisson counts and the long tail put it a few percent off --load.
        "offered_load": drawn_load.map(|d| d / stretch),
        "secs": secs,
        "warmup": warmup,
        "seed": a.seed,
        "mix": a.mix,
        "mean_tokens": mean,
        "sent": schedule.len(),
        "count": ttft.len(),
        "errors": s.errors.values().sum::<u64>(),
        "error_kinds": s.errors,
        "ttft_p50_ms": ms(pct(&ttft, 0.50)),
        "ttft_p99_ms": ms(pct(&ttft, 0.99)),
        "ttft_max_ms": ms(ttft.last().copied()),
        "done_p50_ms": ms(pct(&done, 0.50)),
        "done_p99_ms": ms(pct(&done, 0.99)),
        "servers": s.servers,
        "lag_max_ms": ms(Some(lag_max.as_secs_f64() * 1000.0)),
        "late_5ms": late,
        "elapsed_s": (elapsed * 1000.0).round() / 1000.0,
    })
    .to_string())
}

/// Results of the counted requests (TTFT and completion in ms).
#[derive(Default)]
struct Stats {
    ttft: Vec<f64>,
    done: Vec<f64>,
    errors: BTreeMap<&'static str, u64>,
    servers: BTreeMap<String, u64>,
}

impl Stats {
    fn collect(&mut self, joined: Result<(bool, Outcome), tokio::task::JoinError>) {
        match joined {
            Ok((false, _)) => {}
            Ok((true, Outcome::Ok { ttft, done, server })) => {
                self.ttft.push(ttft.as_secs_f64() * 1000.0);
                self.done.push(done.as_secs_f64() * 1000.0);
                *self.servers.entry(server).or_default() += 1;
            }
            Ok((true, Outcome::Err(kind))) => *self.errors.entry(kind).or_default() += 1,
            Err(_) => *self.errors.entry("task").or_default() += 1,
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// One request on a new connection; times are from `start`.
async fn request(addr: SocketAddr, tokens: u32, start: Instant) -> Outcome {
    let Ok(mut s) = TcpStream::connect(addr).await else {
        return Outcome::Err("connect");
    };
    let _ = s.set_nodelay(true);
    let req = format!(
        "GET /v1/completions?tokens={tokens} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Connection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return Outcome::Err("write");
    }
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut pos = 0; // start of the unparsed part of buf
    let mut head_done = false;
    let mut ttft = None;
    let mut server = String::new();
    let mut got = 0u32;
    loop {
        // Parse everything complete in the buffer.
        if !head_done {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                if !buf.starts_with(b"HTTP/1.1 200") && !buf.starts_with(b"HTTP/1.0 200") {
                    return Outcome::Err("status");
                }
                head_done = true;
                pos = i + 4;
            }
        }
        if head_done {
            while let Some(i) = find(&buf[pos..], b"\n\n") {
                let event = &buf[pos..pos + i];
                pos += i + 2;
                let Some(data) = event.strip_prefix(b"data: ") else {
                    continue;
                };
                if data == b"[DONE]" {
                    if got < tokens {
                        return Outcome::Err("short");
                    }
                    let ttft = ttft.unwrap_or_else(|| start.elapsed());
                    return Outcome::Ok {
                        ttft,
                        done: start.elapsed(),
                        server,
                    };
                }
                if ttft.is_none() {
                    ttft = Some(start.elapsed());
                    server = serde_json::from_slice::<serde_json::Value>(data)
                        .ok()
                        .and_then(|v| v.get("server")?.as_str().map(str::to_string))
                        .unwrap_or_else(|| "?".into());
                }
                got += 1;
            }
            buf.drain(..pos);
            pos = 0;
        }
        if buf.len() > 1 << 20 {
            return Outcome::Err("oversized");
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) => return Outcome::Err(if ttft.is_some() { "eof" } else { "closed" }),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => return Outcome::Err("reset"),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
