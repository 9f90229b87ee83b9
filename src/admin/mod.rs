//! The admin HTTP server on `admin.listen`: `/metrics` (Prometheus text),
//! `/status` (JSON, see [`crate::status`]), `/` (the live status page) and
//! `/healthz`.
//!
//! It has its own socket, accept loop and connection cap, so it keeps
//! answering while a listener is at `max_connections`. Every response reads
//! the data path's atomics at request time; nothing is computed in between.

mod http;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Admin;
use crate::metrics::Metrics;
use crate::status::Report;
use crate::State;
use http::{Request, Response};

/// The status page: one self-contained file, no external resources.
const PAGE: &str = include_str!("page.html");
/// Admin connections served at once; more wait in the kernel backlog.
const MAX_CONNECTIONS: usize = 64;
/// A response that cannot be written in this time is abandoned.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bind the admin socket on `admin.listen`.
pub async fn bind(admin: &Admin) -> Result<Option<TcpListener>> {
    let socket = TcpListener::bind(admin.listen)
        .await
        .with_context(|| format!("cannot bind the admin server on {}", admin.listen))?;
    Ok(Some(socket))
}

/// What every admin request reads.
struct Ctx {
    state: Arc<State>,
    metrics: Metrics,
    started: Instant,
}

/// Serve admin requests until `shutdown`.
pub fn spawn(socket: TcpListener, state: Arc<State>, shutdown: CancellationToken) -> JoinHandle<()> {
    let ctx = Arc::new(Ctx {
        state,
        metrics: Metrics::new(),
        started: Instant::now(),
    });
    tokio::spawn(run(socket, ctx, shutdown))
}

async fn run(socket: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    if let Ok(addr) = socket.local_addr() {
        info!(listen = %addr, "admin server up: /metrics /status /healthz and the status page at /");
    }
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => return,
        };
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    serve(stream, ctx).await;
                    drop(permit);
                });
            }
            Err(e) => {
                // Out of descriptors and the like: back off, never give up.
                warn!(error = %e, "admin accept failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

async fn serve(mut stream: TcpStream, ctx: Arc<Ctx>) {
    let (mut r, mut w) = stream.split();
    let (resp, head_only) = match http::read_request(&mut r).await {
        Some(req) => {
            let head_only = req.method == "HEAD";
            // Rendering walks every listener and backend (milliseconds for
            // thousands of series): keep it off the data path's workers.
            let resp = tokio::task::spawn_blocking(move || route(&req, &ctx))
                .await
                .unwrap_or_else(|_| Response::text(500, "internal error"));
            (resp, head_only)
        }
        None => (Response::text(400, "bad request"), false),
    };
    match tokio::time::timeout(WRITE_TIMEOUT, http::write_response(&mut w, &resp, head_only)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "admin response not written"),
        Err(_) => debug!("admin response timed out"),
    }
}

fn route(req: &Request, ctx: &Ctx) -> Response {
    if req.method != "GET" && req.method != "HEAD" {
        return Response::text(405, "only GET and HEAD");
    }
    match req.path.as_str() {
        "/" | "/index.html" => Response::new(200, "text/html; charset=utf-8", PAGE),
        "/healthz" => Response::text(200, "ok"),
        "/metrics" => Response::new(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            ctx.metrics.render(&ctx.state),
        ),
        "/status" => {
            let report = Report::collect(&ctx.state, ctx.started.elapsed().as_secs_f64());
            match serde_json::to_vec_pretty(&report) {
                Ok(body) => Response::new(200, "application/json", body),
                Err(e) => Response::text(500, &format!("cannot encode status: {e}")),
            }
        }
        _ => Response::text(404, "not found: try /, /status, /metrics or /healthz"),
    }
}
