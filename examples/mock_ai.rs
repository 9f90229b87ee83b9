//! A mock AI inference service: an HTTP/1.1 server with a fixed number of
//! slots (like an LLM server's batch slots) that streams a completion token
//! by token, one server-sent event per token at a set token time.
//!
//! ```sh
//! cargo run --release --example mock_ai -- --listen 127.0.0.1:9999 --slots 4 --token-time 20ms --id a
//! curl -N 'http://127.0.0.1:9999/v1/completions?tokens=5'
//! curl -N -d '{"max_tokens":5}' http://127.0.0.1:9999/v1/completions
//! curl http://127.0.0.1:9999/stats      # {"server":"a","slots":4,"in_use":1,"waiting":0,...}
//! curl http://127.0.0.1:9999/health     # 200 ok, for HTTP health checks
//! ```
//!
//! - `GET /v1/completions?tokens=N` (or `POST /v1/completions` with a JSON
//!   body `{"max_tokens": N}`) answers `200`, `Content-Type:
//!   text/event-stream`, then N events `data: {"id":"cmpl-7","token":i,"server":"a"}`
//!   one token time apart (the first one token time after the request gets a
//!   slot), then `data: [DONE]`, then closes (`Connection: close`, so the
//!   body ends at the close). Without a count, 16 tokens.
//! - At most `--slots` requests stream at once. The others wait inside the
//!   server in arrival order (FIFO), as in a real LLM server's batch queue,
//!   so their time to first token includes that wait. A client that goes
//!   away while waiting leaves the queue.
//! - `GET /health` answers `200 ok`; `GET /stats` answers the load as JSON.
//!
//! Several instances can run side by side on different ports or loopback
//! addresses (127.0.0.2, ...). Bad requests get a 4xx answer, never a panic.
//! `scripts/bench-ai` runs three of these behind each balancer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

/// A request head (request line and headers) may be at most this long.
const MAX_HEAD: usize = 16 * 1024;
/// A POST body may be at most this long.
const MAX_BODY: usize = 64 * 1024;
/// The whole request must arrive within this time.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Tokens when the request names no count.
const DEFAULT_TOKENS: u64 = 16;

#[derive(Parser)]
#[command(about = "A mock AI inference service streaming tokens over HTTP/1.1 (server-sent events)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: SocketAddr,
    /// Requests served at once; the rest wait in a FIFO inside the server.
    #[arg(long, default_value_t = 4)]
    slots: usize,
    /// Time per token (e.g. 20ms, 2ms, 500us).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    token_time: Duration,
    /// Name reported in every event and in /stats (default: the listen address).
    #[arg(long)]
    id: Option<String>,
    /// Largest token count a request may ask for.
    #[arg(long, default_value_t = 100_000)]
    max_tokens: u64,
}

/// The server's shared state.
struct Mock {
    id: String,
    /// `id` as a JSON string (quoted and escaped), spliced into every event.
    id_json: String,
    slots: usize,
    token_time: Duration,
    max_tokens: u64,
    /// Fair (FIFO) semaphore: its waiters are the server's queue.
    sem: Semaphore,
    in_use: AtomicUsize,
    waiting: AtomicUsize,
    next_id: AtomicU64,
    served: AtomicU64,
    tokens: AtomicU64,
    aborted: AtomicU64,
}

fn main() {
    let args = Args::parse();
    // One thread is plenty for a mock and keeps several instances cheap.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mock_ai: tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(serve(args)) {
        eprintln!("mock_ai: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(args: Args) -> Result<()> {
    if args.slots == 0 || args.slots > Semaphore::MAX_PERMITS {
        bail!("--slots must be at least 1");
    }
    if args.token_time > Duration::from_secs(60) {
        bail!("--token-time must be at most 60s");
    }
    if args.max_tokens == 0 || args.max_tokens > 10_000_000 {
        bail!("--max-tokens must be 1..=10000000");
    }
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("bind {}", args.listen))?;
    let local = listener.local_addr()?;
    let id = args.id.unwrap_or_else(|| local.to_string());
    let mock = Arc::new(Mock {
        id_json: serde_json::to_string(&id)?,
        id,
        slots: args.slots,
        token_time: args.token_time,
        max_tokens: args.max_tokens,
        sem: Semaphore::new(args.slots),
        in_use: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        served: AtomicU64::new(0),
        tokens: AtomicU64::new(0),
        aborted: AtomicU64::new(0),
    });
    eprintln!(
        "mock_ai {}: listening on {local}, {} slots, token time {:?}",
        mock.id, mock.slots, mock.token_time
    );
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let mock = mock.clone();
                tokio::spawn(async move {
                    // Errors here are the client's doing (reset, bad request
                    // already answered); nothing to report.
                    let _ = connection(&mock, stream).await;
                });
            }
            Err(e) => {
                // Out of descriptors, usually: back off instead of spinning.
                eprintln!("mock_ai {}: accept: {e}", mock.id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// A parsed request: what the routes need of it.
struct Request {
    method: String,
    path: String,
    query: String,
    body: Vec<u8>,
}

/// Serve one connection: one request, one response, close.
async fn connection(mock: &Mock, mut stream: TcpStream) -> Result<()> {
    stream.set_nodelay(true)?;
    let req = match timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(req)) => req,
        Ok(Err(msg)) => return reply(&mut stream, 400, "Bad Request", &error_json(&msg)).await,
        Err(_) => return reply(&mut stream, 408, "Request Timeout", &error_json("timeout")).await,
    };
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/health") => reply_text(&mut stream, 200, "OK", "ok\n").await,
        ("GET", "/stats") => reply(&mut stream, 200, "OK", &stats(mock)).await,
        ("GET" | "POST", "/v1/completions") => match token_count(&req, mock.max_tokens) {
            Ok(n) => complete(mock, stream, n).await,
            Err(msg) => reply(&mut stream, 400, "Bad Request", &error_json(&msg)).await,
        },
        (_, "/health" | "/stats" | "/v1/completions") => {
            reply(
                &mut stream,
                405,
                "Method Not Allowed",
                &error_json("method not allowed"),
            )
            .await
        }
        _ => reply(&mut stream, 404, "Not Found", &error_json("not found")).await,
    }
}

/// Read the request line, the headers and (with Content-Length) the body.
async fn read_request(stream: &mut TcpStream) -> Result<Request, String> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err("request head too large".into());
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the end of the request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("malformed request line".into());
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("unsupported version {version:?}"));
    }
    let mut content_length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err("malformed header line".into());
        };
        if name.trim().eq_ignore_ascii_case("content-length") {
            content_length = value.trim().parse().map_err(|_| "bad Content-Length")?;
        } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked request bodies are not supported; send Content-Length".into());
        }
    }
    if content_length > MAX_BODY {
        return Err("request body too large".into());
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < content_length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the end of the body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(content_length);
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        body,
    })
}

/// The token count: `?tokens=N` (also `max_tokens=N`), else the JSON body's
/// `max_tokens`, else [`DEFAULT_TOKENS`].
fn token_count(req: &Request, max: u64) -> Result<u64, String> {
    let from_query = req.query.split('&').find_map(|kv| match kv.split_once('=') {
        Some(("tokens" | "max_tokens", v)) => Some(v),
        _ => None,
    });
    let n = if let Some(v) = from_query {
        v.parse::<u64>()
            .map_err(|_| format!("tokens={v:?} is not a count"))?
    } else if req.method == "POST" && !req.body.is_empty() {
        let body: serde_json::Value =
            serde_json::from_slice(&req.body).map_err(|e| format!("body is not JSON: {e}"))?;
        match body.get("max_tokens") {
            None => DEFAULT_TOKENS,
            Some(v) => v.as_u64().ok_or("max_tokens must be a non-negative integer")?,
        }
    } else {
        DEFAULT_TOKENS
    };
    if n == 0 || n > max {
        return Err(format!("token count {n} is out of range: allowed 1..={max}"));
    }
    Ok(n)
}

/// Counts a request in a gauge for as long as the guard lives.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn new(g: &'a AtomicUsize) -> Self {
        g.fetch_add(1, Relaxed);
        Gauge(g)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Wait for a slot (FIFO), then stream `n` tokens.
async fn complete(mock: &Mock, mut stream: TcpStream, n: u64) -> Result<()> {
    let permit = {
        let _waiting = Gauge::new(&mock.waiting);
        tokio::select! {
            permit = mock.sem.acquire() => permit?,
            _ = client_gone(&mut stream) => {
                mock.aborted.fetch_add(1, Relaxed);
                return Ok(());
            }
        }
    };
    let _in_use = Gauge::new(&mock.in_use);
    let id = mock.next_id.fetch_add(1, Relaxed);
    let result = stream_tokens(mock, &mut stream, id, n).await;
    drop(permit);
    match result {
        Ok(()) => {
            mock.served.fetch_add(1, Relaxed);
            Ok(())
        }
        Err(e) => {
            mock.aborted.fetch_add(1, Relaxed);
            Err(e)
        }
    }
}

async fn stream_tokens(mock: &Mock, stream: &mut TcpStream, id: u64, n: u64) -> Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\
              Connection: close\r\n\r\n",
        )
        .await?;
    // Deadlines on a fixed schedule from the start, so timer rounding does
    // not accumulate: n tokens take n token times.
    let start = Instant::now();
    let mut event = String::with_capacity(96);
    for i in 0..n {
        tokio::time::sleep_until(start + mock.token_time.saturating_mul((i + 1) as u32)).await;
        event.clear();
        event.push_str("data: {\"id\":\"cmpl-");
        event.push_str(&id.to_string());
        event.push_str("\",\"token\":");
        event.push_str(&i.to_string());
        event.push_str(",\"server\":");
        event.push_str(&mock.id_json);
        event.push_str("}\n\n");
        stream.write_all(event.as_bytes()).await?;
        mock.tokens.fetch_add(1, Relaxed);
    }
    stream.write_all(b"data: [DONE]\n\n").await?;
    stream.shutdown().await?;
    Ok(())
}

/// Resolves when the client closes or resets its side (anything it sends
/// after the request is ignored).
async fn client_gone(stream: &mut TcpStream) {
    let mut buf = [0u8; 512];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

fn stats(mock: &Mock) -> String {
    serde_json::json!({
        "server": mock.id,
        "slots": mock.slots,
        "in_use": mock.in_use.load(Relaxed),
        "waiting": mock.waiting.load(Relaxed),
        "served": mock.served.load(Relaxed),
        "aborted": mock.aborted.load(Relaxed),
        "tokens": mock.tokens.load(Relaxed),
        "token_time_ms": mock.token_time.as_secs_f64() * 1e3,
    })
    .to_string()
}

fn error_json(msg: &str) -> String {
    serde_json::json!({ "error": msg }).to_string()
}

async fn reply(stream: &mut TcpStream, code: u16, reason: &str, json: &str) -> Result<()> {
    respond(stream, code, reason, "application/json", &format!("{json}\n")).await
}

async fn reply_text(stream: &mut TcpStream, code: u16, reason: &str, text: &str) -> Result<()> {
    respond(stream, code, reason, "text/plain", text).await
}

async fn respond(stream: &mut TcpStream, code: u16, reason: &str, ctype: &str, body: &str) -> Result<()> {
    let mut msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if code == 405 {
        msg.push_str("Allow: GET, POST\r\n");
    }
    msg.push_str("\r\n");
    msg.push_str(body);
    stream.write_all(msg.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
