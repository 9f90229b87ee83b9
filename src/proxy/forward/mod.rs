//! Forwarding bytes between a client and a backend TCP stream, both ways at
//! once, until both directions are done.
//!
//! - A FIN from one side becomes a shutdown of the write side of the other;
//!   the other direction keeps flowing (correct half-close).
//! - An error (a reset) on either side resets both.
//! - No traffic in either direction for `idle` closes both.
//! - Byte counters advance as data moves, not when the connection ends.
//!
//! Each direction ([`pump`]) waits for readiness first and only then moves
//! bytes: small ones through a stack buffer, bulk ones on Linux through a
//! pipe borrowed from a per-thread pool with splice(2) ([`splice`]), so
//! payload never enters user space. Nothing is held by an idle connection.

mod pump;
#[cfg(target_os = "linux")]
mod splice;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use pump::Pump;

/// How a forwarded connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client closed first (then the backend).
    ClientClose,
    /// The backend closed first (then the client).
    BackendClose,
    /// One side reset or failed; both were reset.
    Reset,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
}

impl End {
    pub fn as_str(self) -> &'static str {
        match self {
            End::ClientClose => "client_close",
            End::BackendClose => "backend_close",
            End::Reset => "reset",
            End::IdleTimeout => "idle_timeout",
        }
    }
}

/// Where each direction's bytes are counted.
#[derive(Debug, Clone, Copy)]
pub struct Meters<'a> {
    /// Client -> backend bytes are added to each of these.
    pub upstream: [&'a AtomicU64; 2],
    /// Backend -> client bytes are added to each of these.
    pub downstream: [&'a AtomicU64; 2],
}

/// The result of [`forward`].
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub to_backend: u64,
    pub to_client: u64,
    pub end: End,
}

/// Forward between `client` and `backend` until both directions end, one
/// side resets, or the connection is idle for `idle`.
pub async fn forward(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    idle: Duration,
    meters: Meters<'_>,
) -> Outcome {
    // One hand-written poll drives
    // both directions and the idle timer, which keeps the connection's state
    // to a few hundred bytes (no per-direction futures or waiters).
    let mut up = Pump::new(meters.upstream);
    let mut down = Pump::new(meters.downstream);
    let mut first = None;
    let mut last = Instant::now();
    let sleep = tokio::time::sleep(idle);
    tokio::pin!(sleep);
    let (mut cr, mut cw) = client.split();
    let (mut br, mut bw) = backend.split();
    let end = poll_fn(|cx| {
        let halves = (&mut cr, &mut cw, &mut br, &mut bw);
        let r = step(cx, halves, (&mut up, &mut down), &mut first);
        if up.take_moved() | down.take_moved() {
            last = Instant::now();
        }
        match r {
            Poll::Ready(end) => Poll::Ready(end),
            Poll::Pending => idle_check(cx, sleep.as_mut(), last, idle),
        }
    })
    .await;
    if matches!(end, End::Reset | End::IdleTimeout) {
        reset(client);
        reset(backend);
    }
    Outcome {
        to_backend: up.total(),
        to_client: down.total(),
        end,
    }
}

/// Client read and write halves, then the backend's.
type Halves<'a, 'b> = (
    &'a mut ReadHalf<'b>,
    &'a mut WriteHalf<'b>,
    &'a mut ReadHalf<'b>,
    &'a mut WriteHalf<'b>,
);

/// Poll both directions; `first` remembers which side closed first.
fn step(
    cx: &mut Context<'_>,
    (cr, cw, br, bw): Halves<'_, '_>,
    (up, down): (&mut Pump<'_>, &mut Pump<'_>),
    first: &mut Option<End>,
) -> Poll<End> {
    let Poll::Ready(u) = up.poll(cx, cr, bw, down.is_done()).map(|r| r.is_ok()) else {
        return match down.poll(cx, br, cw, false) {
            Poll::Ready(Err(_)) => Poll::Ready(End::Reset),
            Poll::Ready(Ok(())) => {
                first.get_or_insert(End::BackendClose);
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        };
    };
    if !u {
        return Poll::Ready(End::Reset);
    }
    first.get_or_insert(End::ClientClose);
    match down.poll(cx, br, cw, true) {
        Poll::Ready(Err(_)) => Poll::Ready(End::Reset),
        Poll::Ready(Ok(())) => Poll::Ready(first.unwrap_or(End::ClientClose)),
        Poll::Pending => Poll::Pending,
    }
}

/// Ready(IdleTimeout) once nothing has moved for `idle` since `last`. The
/// timer is only re-armed when it fires, not on every byte.
fn idle_check(cx: &mut Context<'_>, mut sleep: Pin<&mut Sleep>, last: Instant, idle: Duration) -> Poll<End> {
    while sleep.as_mut().poll(cx).is_ready() {
        let next = last + idle;
        if next <= Instant::now() {
            return Poll::Ready(End::IdleTimeout);
        }
        sleep.as_mut().reset(next);
    }
    Poll::Pending
}

/// Make the next close of `stream` send RST instead of FIN. (A zero linger
/// never blocks on close, unlike the non-zero lingers tokio warns about.)
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// One direction's byte count: the shared meters, its own total, and
/// whether anything moved since the idle clock last looked.
struct Tally<'a> {
    meters: [&'a AtomicU64; 2],
    total: u64,
    moved: bool,
}

impl Tally<'_> {
    fn count(&mut self, n: usize) {
        let n = n as u64;
        self.meters[0].fetch_add(n, Relaxed);
        self.meters[1].fetch_add(n, Relaxed);
        self.total += n;
        self.moved = true;
    }
}
