//! One UDP flow: a client address:port tied to a backend through a connected
//! upstream socket (so the kernel drops datagrams from anyone but the
//! backend), and the relay task that sends the backend's replies to the
//! client from the listener's socket until the flow idles out, is moved off
//! its backend, or slb shuts down.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::batch::RecvBatch;
use crate::backend::{Backend, Slot};
use crate::listener::Listener;

/// Replies relayed per wake-up before the relay task yields to others.
const BATCH: usize = 64;

thread_local! {
    /// The relay tasks' receive buffers, one set per worker thread: an idle
    /// flow holds no buffer, and no datagram allocates.
    static REPLIES: RefCell<RecvBatch> = RefCell::new(RecvBatch::new());
}

/// Why a flow ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    /// No datagram in either direction for `idle_timeout`.
    IdleTimeout,
    /// Its backend became ineligible (unhealthy, weight 0): re-scheduled.
    BackendUnhealthy,
    /// Its backend answered with ICMP port unreachable: re-scheduled.
    BackendRefused,
    /// slb is shutting down.
    Shutdown,
}

impl End {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            End::IdleTimeout => "idle_timeout",
            End::BackendUnhealthy => "backend_unhealthy",
            End::BackendRefused => "backend_refused",
            End::Shutdown => "shutdown",
        }
    }
}

/// What every relay task of one listener shares.
pub(super) struct RelayCtx {
    pub listener: Arc<Listener>,
    /// The listener socket: replies leave from its address.
    pub socket: Arc<UdpSocket>,
    /// A relay task that ends sends its flow here, for the table to remove.
    pub ended: mpsc::UnboundedSender<Arc<Flow>>,
    /// Relay tasks are tracked so that shutdown waits for their access logs.
    pub tracker: TaskTracker,
    pub idle: Duration,
}

#[derive(Default)]
struct Counts {
    bytes: AtomicU64,
    datagrams: AtomicU64,
}

impl Counts {
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n as u64, Relaxed);
        self.datagrams.fetch_add(1, Relaxed);
    }
}

/// A live flow, shared by the flow table and its relay task.
pub(super) struct Flow {
    pub client: SocketAddr,
    pub backend: Arc<Backend>,
    upstream: UdpSocket,
    start: Instant,
    /// When a datagram last moved either way, in ms since `start`.
    last_ms: AtomicU64,
    /// The backend refused a datagram (ICMP port unreachable).
    refused: AtomicBool,
    /// The relay task has ended; the entry only awaits removal.
    ended: AtomicBool,
    to_backend: Counts,
    to_client: Counts,
}

impl Flow {
    /// Open an upstream socket to `backend` and start relaying its replies to
    /// `client`. Counts the flow in the listener's and backend's gauges.
    /// The flow ends when a reason is sent on the returned [`Stop`], or with
    /// `end=shutdown` when it is dropped (the listener's table is gone).
    pub(super) fn open(ctx: &Arc<RelayCtx>, client: SocketAddr, slot: Slot) -> io::Result<(Arc<Flow>, Stop)> {
        let backend = slot.backend().clone();
        let upstream = connect(backend.addr)?;
        let flow = Arc::new(Flow {
            client,
            backend,
            upstream,
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            to_backend: Counts::default(),
            to_client: Counts::default(),
        });
        let live = Live::new(ctx.listener.clone(), slot);
        let (stop, stopped) = oneshot::channel();
        ctx.tracker.spawn(relay(flow.clone(), live, stopped, ctx.clone()));
        Ok((flow, Stop(stop)))
    }

    /// Send one client datagram to the backend.
    pub(super) async fn send(&self, data: &[u8]) -> io::Result<()> {
        self.upstream.send(data).await?;
        let stats = &self.backend.state.stats;
        stats.tx_bytes.fetch_add(data.len() as u64, Relaxed);
        stats.tx_datagrams.fetch_add(1, Relaxed);
        self.to_backend.add(data.len());
        self.touch();
        Ok(())
    }

    /// Whether the relay task has ended (idle timeout or shutdown).
    pub(super) fn has_ended(&self) -> bool {
        self.ended.load(Relaxed)
    }

    /// Whether the backend refused a datagram since the flow opened.
    pub(super) fn was_refused(&self) -> bool {
        self.refused.load(Relaxed)
    }

    /// Forget a refusal: the flow stays on its backend (there is no other).
    pub(super) fn clear_refused(&self) {
        self.refused.store(false, Relaxed);
    }

    /// A datagram to or from the backend failed (ICMP port unreachable comes
    /// back as ECONNREFUSED on a connected socket). The flow survives; the
    /// table moves it on its next datagram.
    pub(super) fn backend_failed(&self, listener: &Listener, e: &io::Error) {
        self.refused.store(true, Relaxed);
        self.backend.state.stats.connect_failures.fetch_add(1, Relaxed);
        debug!(listener = %listener.name(), client = %self.client, backend = %self.backend.addr, error = %e, "udp backend error");
        if self.backend.state.health.observe_data_path_failure() {
            listener.rebuild();
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }
}

/// The table's handle to end a flow. A oneshot rather than a `Notify` or a
/// `CancellationToken`: polling those takes a mutex each time the relay task
/// goes to sleep, that is once per datagram.
pub(super) struct Stop(oneshot::Sender<End>);

impl Stop {
    /// End the flow: its relay task stops and closes the upstream socket.
    pub(super) fn stop(self, why: End) {
        let _ = self.0.send(why);
    }
}

/// A connected UDP socket to `addr` from an ephemeral port.
fn connect(addr: SocketAddr) -> io::Result<UdpSocket> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = std::net::UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A flow counted in the listener's `active` gauge, and holding its slot of
/// the backend (the backend's `active` gauge), for as long as its relay task
/// lives.
struct Live {
    listener: Arc<Listener>,
    _slot: Slot,
}

impl Live {
    fn new(listener: Arc<Listener>, slot: Slot) -> Live {
        listener.stats.active.fetch_add(1, Relaxed);
        listener.stats.total.fetch_add(1, Relaxed);
        slot.backend().state.stats.total.fetch_add(1, Relaxed);
        Live {
            listener,
            _slot: slot,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.listener.stats.active.fetch_sub(1, Relaxed);
    }
}

/// Relay the backend's replies until the flow ends, then hand the flow back
/// to the table for removal and write its access log line.
async fn relay(flow: Arc<Flow>, live: Live, mut stopped: oneshot::Receiver<End>, ctx: Arc<RelayCtx>) {
    let idle = tokio::time::sleep_until(flow.start + ctx.idle);
    tokio::pin!(idle);
    let mut answered = false;
    let end = loop {
        // An atomic check, so that a flood of replies cannot hide a stop.
        match stopped.try_recv() {
            Ok(why) => break why,
            Err(oneshot::error::TryRecvError::Closed) => break End::Shutdown,
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        // Replies first: while one is ready, nothing else is polled.
        tokio::select! {
            biased;
            // ERROR too: an ICMP error arrives as EPOLLERR alone, not readable.
            r = flow.upstream.ready(Interest::READABLE | Interest::ERROR) => match r {
                Ok(ready) => {
                    if ready.is_error() {
                        take_error(&flow, &ctx);
                    }
                    if ready.is_readable() {
                        relay_ready(&flow, &ctx, &mut answered).await;
                    }
                }
                // Only when the runtime's I/O driver is gone.
                Err(_) => break End::Shutdown,
            },
            why = &mut stopped => break why.unwrap_or(End::Shutdown),
            _ = &mut idle => {
                let next = flow.last_activity() + ctx.idle;
                if next <= Instant::now() {
                    break End::IdleTimeout;
                }
                idle.as_mut().reset(next);
            }
        }
    };
    flow.ended.store(true, Relaxed);
    drop(live);
    let _ = ctx.ended.send(flow.clone());
    info!(
        target: "slb::access",
        listener = %ctx.listener.name(), client = %flow.client, backend = %flow.backend.addr,
        duration_ms = flow.start.elapsed().as_millis() as u64,
        rx_bytes = flow.to_backend.bytes.load(Relaxed), rx_datagrams = flow.to_backend.datagrams.load(Relaxed),
        tx_bytes = flow.to_client.bytes.load(Relaxed), tx_datagrams = flow.to_client.datagrams.load(Relaxed),
        end = end.as_str(), "udp flow"
    );
}

/// Consume the socket error behind an error readiness event (ICMP port
/// unreachable: ECONNREFUSED). Clear the readiness first, so that an error
/// arriving meanwhile raises a fresh event instead of being lost.
fn take_error(flow: &Flow, ctx: &RelayCtx) {
    let _ = flow
        .upstream
        .try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
    if let Ok(Some(e)) = flow.upstream.take_error() {
        flow.backend_failed(&ctx.listener, &e);
    }
}

/// What one batch of replies came to.
enum Batch {
    /// Replies received (`drained`: the socket is now empty). Those the
    /// listener socket could not take at once (send buffer full) wait in
    /// `blocked`, copied, in order.
    Received {
        drained: bool,
        blocked: Vec<Vec<u8>>,
    },
    Empty,
    Failed(io::Error),
}

/// Relay the replies waiting on the upstream socket, up to [`BATCH`].
async fn relay_ready(flow: &Flow, ctx: &RelayCtx, answered: &mut bool) {
    let mut relayed = 0;
    while relayed < BATCH {
        let batch = REPLIES.with_borrow_mut(|replies| match replies.recv(&flow.upstream, false) {
            Ok((n, drained)) => {
                relayed += n;
                let mut blocked = Vec::new();
                for i in 0..n {
                    let (data, _) = replies.get(i);
                    count_from_backend(flow, data.len(), answered);
                    if !blocked.is_empty() {
                        blocked.push(data.to_vec());
                        continue;
                    }
                    match ctx.socket.try_send_to(data, flow.client) {
                        Ok(_) => count_to_client(flow, ctx, data.len()),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => blocked.push(data.to_vec()),
                        Err(e) => {
                            debug!(listener = %ctx.listener.name(), client = %flow.client, error = %e, "udp reply dropped")
                        }
                    }
                }
                Batch::Received { drained, blocked }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Batch::Empty,
            Err(e) => Batch::Failed(e),
        });
        match batch {
            Batch::Received { drained, blocked } => {
                for data in blocked {
                    match ctx.socket.send_to(&data, flow.client).await {
                        Ok(_) => count_to_client(flow, ctx, data.len()),
                        Err(e) => {
                            debug!(listener = %ctx.listener.name(), client = %flow.client, error = %e, "udp reply dropped")
                        }
                    }
                }
                if drained {
                    return;
                }
            }
            Batch::Empty => return,
            Batch::Failed(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Batch::Failed(e) => {
                relayed += 1;
                flow.backend_failed(&ctx.listener, &e);
            }
        }
    }
}

fn count_from_backend(flow: &Flow, n: usize, answered: &mut bool) {
    let b = &flow.backend.state.stats;
    b.rx_bytes.fetch_add(n as u64, Relaxed);
    b.rx_datagrams.fetch_add(1, Relaxed);
    flow.touch();
    if !*answered {
        // Once per flow: the backend is alive on the data path.
        *answered = true;
        flow.backend.state.health.observe_data_path_success();
    }
}

fn count_to_client(flow: &Flow, ctx: &RelayCtx, n: usize) {
    let l = &ctx.listener.stats;
    l.tx_bytes.fetch_add(n as u64, Relaxed);
    l.tx_datagrams.fetch_add(1, Relaxed);
    flow.to_client.add(n);
}
