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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{ready, Context, Poll};
use std::time::Duration;

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
/// side resets (both are then reset), or the connection is idle for `idle`
/// (both reset too). The caller pins the returned future where it is
/// (`tokio::pin!`) rather than moving it into an `.await`: it is most of an
/// idle connection's memory and should exist once.
pub fn forward<'a>(
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    idle: Duration,
    meters: Meters<'a>,
) -> Forward<'a> {
    Forward {
        conn: Conn {
            client,
            backend,
            up: Pump::new(meters.upstream),
            down: Pump::new(meters.downstream),
            first: None,
            last: Instant::now(),
        },
        sleep: tokio::time::sleep(idle),
        idle,
    }
}

pin_project_lite::pin_project! {
    /// A connection being forwarded, as a future: one hand-written poll
    /// drives both directions and the idle timer, and all of its state is
    /// this struct (no per-direction futures, waiters or buffers).
    pub struct Forward<'a> {
        conn: Conn<'a>,
        #[pin]
        sleep: Sleep,
        idle: Duration,
    }
}

impl Future for Forward<'_> {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        let this = self.project();
        let conn = this.conn;
        let end = ready!(conn.poll(cx, this.sleep, *this.idle));
        if matches!(end, End::Reset | End::IdleTimeout) {
            reset(conn.client);
            reset(conn.backend);
        }
        Poll::Ready(Outcome {
            to_backend: conn.up.total(),
            to_client: conn.down.total(),
            end,
        })
    }
}

/// Both streams and both directions of a forwarded connection.
struct Conn<'a> {
    client: &'a mut TcpStream,
    backend: &'a mut TcpStream,
    /// Client -> backend, and backend -> client.
    up: Pump<'a>,
    down: Pump<'a>,
    /// Which side closed first, once one has.
    first: Option<End>,
    /// When bytes last moved.
    last: Instant,
}

impl Conn<'_> {
    fn poll(&mut self, cx: &mut Context<'_>, sleep: Pin<&mut Sleep>, idle: Duration) -> Poll<End> {
        let r = self.step(cx);
        if self.up.take_moved() | self.down.take_moved() {
            self.last = Instant::now();
        }
        match r {
            Poll::Ready(end) => Poll::Ready(end),
            Poll::Pending => idle_check(cx, sleep, self.last, idle),
        }
    }

    /// Poll both directions.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<End> {
        let (client, backend) = (&mut *self.client, &mut *self.backend);
        let (up, down) = (&mut self.up, &mut self.down);
        let Poll::Ready(u) = up.poll(cx, client, backend, down.is_done()).map(|r| r.is_ok()) else {
            return match down.poll(cx, backend, client, false) {
                Poll::Ready(Err(_)) => Poll::Ready(End::Reset),
                Poll::Ready(Ok(())) => {
                    self.first.get_or_insert(End::BackendClose);
                    Poll::Pending
                }
                Poll::Pending => Poll::Pending,
            };
        };
        if !u {
            return Poll::Ready(End::Reset);
        }
        let first = *self.first.get_or_insert(End::ClientClose);
        match down.poll(cx, backend, client, true) {
            Poll::Ready(Err(_)) => Poll::Ready(End::Reset),
            Poll::Ready(Ok(())) => Poll::Ready(first),
            Poll::Pending => Poll::Pending,
        }
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
