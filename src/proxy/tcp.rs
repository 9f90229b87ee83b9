//! TCP listeners: the accept loop, and per connection: pick a backend,
//! connect (bounded by `connect_timeout`, next candidate on failure), then
//! forward both ways.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backend::{Backend, Slot};
use crate::listener::{Acquired, Listener};
use crate::proxy::forward::{self, forward, Meters};
use crate::stats::{ActiveGuard, DropReason};

/// Listen backlog; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 65_535;

/// Bind a TCP listening socket: SO_REUSEADDR, IPv6 sockets v6-only (so
/// `[::]:p` and `0.0.0.0:p` can coexist), a large backlog, and TCP_NODELAY,
/// which Linux copies to every accepted socket (one setsockopt per
/// connection saved).
pub fn bind(addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    if let Err(e) = socket.set_nodelay(true) {
        warn!(listen = %addr, error = %e, "cannot set TCP_NODELAY on the listening socket");
    }
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind TCP {addr}"))?;
    socket.listen(BACKLOG)?;
    Ok(TcpListener::from_std(socket.into())?)
}

/// Accept connections until `shutdown`, each handled in a task tracked by
/// `tracker` so that shutdown can wait for them to drain.
pub async fn run(
    listener: Arc<Listener>,
    socket: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = Arc::new(Semaphore::new(listener.snapshot().spec.max_connections));
    let mut backoff = Duration::ZERO;
    loop {
        let permit = match limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // At max_connections: stop accepting (the kernel backlog holds
                // new clients) until a connection ends.
                listener.stats.limit_events.fetch_add(1, Relaxed);
                warn!(listener = %listener.name(), "max_connections reached: pausing accept");
                tokio::select! {
                    p = limit.clone().acquire_owned() => p.expect("semaphore is never closed"),
                    _ = shutdown.cancelled() => return,
                }
            }
        };
        let accepted = tokio::select! {
            r = socket.accept() => r,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                tracker.spawn(handle(listener.clone(), stream, peer, permit));
            }
            Err(e) if is_per_connection(&e) => debug!(listener = %listener.name(), error = %e, "accept"),
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: back off, never spin, never give up.
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                warn!(listener = %listener.name(), error = %e, backoff = ?backoff, "accept failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

/// Errors that concern one connection only and say nothing about the listener.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::Interrupted
    )
}

async fn handle(
    listener: Arc<Listener>,
    mut client: TcpStream,
    peer: SocketAddr,
    _permit: OwnedSemaphorePermit,
) {
    let stats = &listener.stats;
    stats.total.fetch_add(1, Relaxed);
    let _active = ActiveGuard::new(&stats.active);
    // Linux: inherited from the listening socket (see `bind`).
    #[cfg(not(target_os = "linux"))]
    set_nodelay_or_warn(&client);
    let start = Instant::now();
    let spec = listener.snapshot().spec.clone();
    // Boxed: picking, queueing and connecting keep a few hundred bytes of
    // state that is freed once the backend answers, instead of staying in
    // the task (most of an idle connection's memory) for its whole life.
    // Likewise `forwarding` is pinned in place, not moved into an await.
    let (slot, mut upstream) = match Box::pin(establish(&listener, &client, peer, spec.connect_timeout)).await
    {
        Ok(up) => up,
        Err((reason, tried)) => {
            stats.drop_one(reason);
            forward::reset(&client);
            info!(
                target: "slb::access",
                listener = %listener.name(), client = %peer, tried,
                duration_ms = start.elapsed().as_millis() as u64,
                end = reason.as_str(), "tcp connection dropped"
            );
            return;
        }
    };
    let backend = slot.backend();
    let bstats = &backend.state.stats;
    let meters = Meters {
        upstream: [&stats.rx_bytes, &bstats.tx_bytes],
        downstream: [&bstats.rx_bytes, &stats.tx_bytes],
    };
    let forwarding = forward(&mut client, &mut upstream, spec.idle_timeout, meters);
    tokio::pin!(forwarding);
    let out = forwarding.await;
    info!(
        target: "slb::access",
        listener = %listener.name(), client = %peer, backend = %backend.addr,
        duration_ms = start.elapsed().as_millis() as u64,
        rx_bytes = out.to_backend, tx_bytes = out.to_client, end = out.end.as_str(),
        "tcp connection"
    );
}

/// Pick a backend (waiting in the queue if every one is full) and connect
/// to it, each candidate tried once; the slot and the upstream stream, or
/// why the connection is dropped and how many backends were tried.
async fn establish(
    listener: &Listener,
    client: &TcpStream,
    peer: SocketAddr,
    connect_timeout: Duration,
) -> Result<(Slot, TcpStream), (DropReason, usize)> {
    // Backends whose connect failed for this connection: each is tried once.
    let mut failed: Vec<SocketAddr> = Vec::new();
    let mut queued = false;
    loop {
        // While others wait in the queue, a newcomer joins them rather than
        // taking a slot freed for the head.
        let waiting = !queued && listener.queue().is_some_and(|q| !q.is_empty());
        let acquired = if waiting {
            Acquired::Full
        } else {
            listener.acquire(peer.ip(), &failed)
        };
        let slot = match acquired {
            Acquired::Slot(slot) => slot,
            Acquired::Full if !queued && listener.queue().is_some() => {
                queued = true;
                // Boxed: only queued connections pay for the wait's state.
                match Box::pin(wait_in_queue(listener, client, peer)).await {
                    Ok(slot) => slot,
                    Err(reason) => return Err((reason, failed.len())),
                }
            }
            Acquired::Full if failed.is_empty() => return Err((DropReason::Full, 0)),
            Acquired::NoBackend if failed.is_empty() => return Err((DropReason::NoBackend, 0)),
            _ => return Err((DropReason::ConnectFailed, failed.len())),
        };
        let backend = slot.backend();
        let bstats = &backend.state.stats;
        match connect(backend, connect_timeout).await {
            Ok(upstream) => {
                bstats.total.fetch_add(1, Relaxed);
                backend.state.health.observe_data_path_success();
                listener.record(peer.ip(), backend);
                return Ok((slot, upstream));
            }
            Err(e) => {
                bstats.connect_failures.fetch_add(1, Relaxed);
                debug!(listener = %listener.name(), backend = %backend.addr, error = %e, "connect failed; trying next candidate");
                failed.push(backend.addr);
                let flipped = backend.state.health.observe_data_path_failure();
                drop(slot);
                if flipped {
                    listener.rebuild();
                }
            }
        }
    }
}

/// Wait in the listener's queue for a slot, for at most `queue.timeout`,
/// leaving the queue if the client goes away meanwhile.
async fn wait_in_queue(
    listener: &Listener,
    client: &TcpStream,
    peer: SocketAddr,
) -> Result<Slot, DropReason> {
    let queue = listener.queue().expect("called only with a queue");
    let Ok(mut ticket) = queue.join(peer.ip(), |ip| listener.slot_for(ip)) else {
        return Err(DropReason::QueueFull);
    };
    debug!(listener = %listener.name(), client = %peer, waiting = queue.len(), "every backend full: queued");
    tokio::select! {
        slot = ticket.slot() => Ok(slot),
        _ = tokio::time::sleep(queue.timeout()) => Err(DropReason::QueueTimeout),
        _ = client_gone(client) => Err(DropReason::QueueAbandoned),
    }
}

/// Resolves when the client closes or resets its connection. A half-close
/// (FIN) counts as gone: a queued client cannot be told from one that left.
///
/// Until the client sends something its readiness says when it closes. Once
/// bytes wait in the socket (a request sent before a slot came) that
/// readiness must stay set for the forwarder (epoll is edge-triggered: a
/// cleared edge would never come back), so from then on the socket is
/// polled for a hang-up without touching it, backing off from 20 ms to 1 s.
async fn client_gone(client: &TcpStream) {
    match client.ready(Interest::READABLE).await {
        Ok(r) if !r.is_read_closed() && !r.is_error() => {}
        _ => return,
    }
    let mut every = Duration::from_millis(20);
    loop {
        tokio::time::sleep(every).await;
        if crate::sys::peer_closed(client) {
            return;
        }
        every = (every * 2).min(Duration::from_secs(1));
    }
}

/// Connect to a backend with TCP_NODELAY, bounded by `timeout`.
async fn connect(backend: &Backend, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, start_connect(backend.addr)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// On Linux a connecting socket polls writable only once the handshake is
/// over, and a failed one polls with EPOLLERR/EPOLLHUP as well: so the
/// readiness event alone tells success from failure, and the getsockopt
/// (SO_ERROR) that tokio's `connect` makes after it is only needed on
/// failure, to learn the error. One system call per connection saved.
#[cfg(target_os = "linux")]
async fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    socket.set_nodelay(true)?;
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if ready.is_error() || ready.is_write_closed() {
        return Err(stream.take_error()?.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "connection closed while connecting",
            )
        }));
    }
    Ok(stream)
}

#[cfg(not(target_os = "linux"))]
async fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    use tokio::net::TcpSocket;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_nodelay(true)?;
    socket.connect(addr).await
}

#[cfg(not(target_os = "linux"))]
fn set_nodelay_or_warn(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        warn!(error = %e, "cannot set TCP_NODELAY");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept path relies on this instead of a setsockopt per connection.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_from_the_listener() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = bind(addr.parse().unwrap()).unwrap();
            let local = listener.local_addr().unwrap();
            let _client = TcpStream::connect(local).await.unwrap();
            let (accepted, _) = listener.accept().await.unwrap();
            assert!(accepted.nodelay().unwrap(), "{addr}");
        }
    }

    /// Success and refusal are told apart by the readiness event alone.
    #[tokio::test]
    async fn connect_tells_success_from_refusal() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let listener = TcpListener::bind(addr).await.unwrap();
            let up = listener.local_addr().unwrap();
            let stream = start_connect(up).await.unwrap();
            assert_eq!(stream.peer_addr().unwrap(), up);
            assert!(stream.nodelay().unwrap());
            drop(listener);
            let e = start_connect(up).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{addr}: {e}");
        }
    }
}
