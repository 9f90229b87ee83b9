//! Forwarding bytes between a client and a backend TCP stream, both ways at
//! once, until both directions are done.
//!
//! - A FIN from one side becomes a shutdown of the write side of the other;
//!   the other direction keeps flowing (correct half-close).
//! - An error (a reset) on either side resets both.
//! - No traffic in either direction for `idle` closes both.
//! - Byte counters advance as data moves, not when the connection ends.

use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Bytes read per syscall, per direction.
const BUF_SIZE: usize = 16 * 1024;

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
    let start = Instant::now();
    let activity = Activity {
        start,
        last_ms: AtomicU64::new(0),
    };
    let first_eof = AtomicU8::new(NONE_CLOSED);
    let (up_total, down_total) = (AtomicU64::new(0), AtomicU64::new(0));
    let end = {
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let up = pipe(
            &mut cr,
            &mut bw,
            meters.upstream,
            &up_total,
            &activity,
            &first_eof,
            CLIENT_FIRST,
        );
        let down = pipe(
            &mut br,
            &mut cw,
            meters.downstream,
            &down_total,
            &activity,
            &first_eof,
            BACKEND_FIRST,
        );
        tokio::select! {
            r = async { tokio::try_join!(up, down) } => match r {
                Ok(_) if first_eof.load(Relaxed) == BACKEND_FIRST => End::BackendClose,
                Ok(_) => End::ClientClose,
                Err(_) => End::Reset,
            },
            _ = activity.idle_for(idle) => End::IdleTimeout,
        }
    };
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

/// Make the next close of `stream` send RST instead of FIN. (A zero linger
/// never blocks on close, unlike the non-zero lingers tokio warns about.)
pub fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Copy one direction until EOF, then pass the EOF on as a write shutdown.
async fn pipe<R, W>(
    r: &mut R,
    w: &mut W,
    meters: [&AtomicU64; 2],
    total: &AtomicU64,
    activity: &Activity,
    first_eof: &AtomicU8,
    me: u8,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        count(meters, total, activity, n);
    }
    let _ = first_eof.compare_exchange(NONE_CLOSED, me, Relaxed, Relaxed);
    // The peer may already be gone; the other direction reports that.
    let _ = w.shutdown().await;
    Ok(())
}

fn count(meters: [&AtomicU64; 2], total: &AtomicU64, activity: &Activity, n: usize) {
    let n = n as u64;
    meters[0].fetch_add(n, Relaxed);
    meters[1].fetch_add(n, Relaxed);
    total.fetch_add(n, Relaxed);
    activity.touch();
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
