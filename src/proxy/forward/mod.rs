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
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

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

const NONE_CLOSED: u8 = 0;
const CLIENT_FIRST: u8 = 1;
const BACKEND_FIRST: u8 = 2;

/// Forward between `client` and `backend` until both directions end, one
/// side resets, or the connection is idle for `idle`.
pub async fn forward(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    idle: Duration,
    meters: Meters<'_>,
) -> Outcome {
    let activity = Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
    };
    let first_eof = AtomicU8::new(NONE_CLOSED);
    let (up_total, down_total) = (AtomicU64::new(0), AtomicU64::new(0));
    let up = Direction {
        meters: meters.upstream,
        total: &up_total,
        activity: &activity,
        first_eof: &first_eof,
        me: CLIENT_FIRST,
    };
    let down = Direction {
        meters: meters.downstream,
        total: &down_total,
        activity: &activity,
        first_eof: &first_eof,
        me: BACKEND_FIRST,
    };
    // Both directions only need shared references: readiness and the
    // non-blocking syscalls take `&TcpStream`. One hand-written poll for
    // both keeps the connection's state small (no per-direction futures).
    let (c, b) = (&*client, &*backend);
    let (mut up_pump, mut down_pump) = (pump::Pump::new(), pump::Pump::new());
    let both = poll_fn(|cx| {
        let u = up_pump.poll(cx, c, b, &up)?;
        let d = down_pump.poll(cx, b, c, &down)?;
        if u.is_ready() && d.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    });
    let end = until_idle(both, &activity, idle, &first_eof).await;
    if matches!(end, End::Reset | End::IdleTimeout) {
        reset(client);
        reset(backend);
    }
    Outcome {
        to_backend: up_total.load(Relaxed),
        to_client: down_total.load(Relaxed),
        end,
    }
}

/// Run `both` directions to completion unless nothing moves for `idle`.
async fn until_idle(
    both: impl Future<Output = io::Result<()>>,
    activity: &Activity,
    idle: Duration,
    first_eof: &AtomicU8,
) -> End {
    tokio::select! {
        r = both => match r {
            Ok(()) if first_eof.load(Relaxed) == BACKEND_FIRST => End::BackendClose,
            Ok(()) => End::ClientClose,
            Err(_) => End::Reset,
        },
        _ = activity.idle_for(idle) => End::IdleTimeout,
    }
}

/// Make the next close of `stream` send RST instead of FIN. (A zero linger
/// never blocks on close, unlike the non-zero lingers tokio warns about.)
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// One direction's accounting: where its bytes are counted, and which end
/// of the connection its EOF stands for.
struct Direction<'a> {
    meters: [&'a AtomicU64; 2],
    total: &'a AtomicU64,
    activity: &'a Activity,
    first_eof: &'a AtomicU8,
    me: u8,
}

impl Direction<'_> {
    fn count(&self, n: usize) {
        let n = n as u64;
        self.meters[0].fetch_add(n, Relaxed);
        self.meters[1].fetch_add(n, Relaxed);
        self.total.fetch_add(n, Relaxed);
        self.activity.touch();
    }
}

/// When data last moved, in milliseconds since the connection started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Relaxed);
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        let mut deadline = self.start + idle;
        loop {
            tokio::time::sleep_until(deadline).await;
            let next = self.start + Duration::from_millis(self.last_ms.load(Relaxed)) + idle;
            if next <= Instant::now() {
                return;
            }
            deadline = next;
        }
    }
}
