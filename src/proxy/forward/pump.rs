//! One direction of a forwarded connection, as a small poll-driven state
//! machine: wait until the source is readable, move what it has, and hold
//! something only while the destination cannot take it all yet.
//!
//! Small reads (requests, replies) go through a buffer on the stack with
//! read/write: for a few hundred bytes that is cheaper than splice. Once a
//! read fills the whole buffer the direction is moving bulk data and (on
//! Linux) switches to splice(2); it switches back when a round moves little.
//! Waiting uses the streams' poll functions, which keep no waiter in
//! the connection's state, so an idle direction is a few bytes; a short read
//! tells tokio the socket is drained, which saves a read that would block.

use std::cell::RefCell;
use std::io;
use std::mem::MaybeUninit;
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::splice::{self, Pipe};
use super::Tally;

/// Bytes read per copying round (on the stack).
const BUF_SIZE: usize = 16 * 1024;
/// Heap buffers kept per thread for bytes a destination did not take yet.
const POOL_MAX: usize = 16;

thread_local! {
    static BUFS: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// One direction's state.
pub(super) struct Pump<'a> {
    state: State,
    /// The last round moved a full buffer or more: use splice next.
    bulk: bool,
    tally: Tally<'a>,
}

enum State {
    /// Waiting for the source to have bytes (or EOF).
    Read,
    /// Bytes taken from the source, not yet all written.
    Write(Held),
    /// EOF passed on.
    Done,
}

/// Bytes in flight: the only thing a direction holds beyond its state.
pub(super) enum Held {
    /// `buf[off..end]` is still to be written. (Small fields: this enum is
    /// part of every connection's state.)
    Buf { buf: Box<[u8]>, off: u32, end: u32 },
    #[cfg(target_os = "linux")]
    Pipe { pipe: Pipe, left: usize },
}

/// What one read round did.
pub(super) enum Round {
    /// The source had nothing after all (splice rounds only).
    Nothing,
    /// The source sent FIN.
    Eof,
    /// `n` bytes taken from the source; what `dst` did not take yet, if any.
    Moved(usize, Option<Held>),
}

impl<'a> Pump<'a> {
    /// A direction whose bytes are added to both `meters`.
    pub(super) fn new(meters: [&'a AtomicU64; 2]) -> Pump<'a> {
        Pump {
            state: State::Read,
            bulk: false,
            tally: Tally {
                meters,
                total: 0,
                moved: false,
            },
        }
    }

    /// Bytes written to the destination so far.
    pub(super) fn total(&self) -> u64 {
        self.tally.total
    }

    /// Whether bytes moved since the last call.
    pub(super) fn take_moved(&mut self) -> bool {
        std::mem::take(&mut self.tally.moved)
    }

    /// Whether this direction has passed its EOF on.
    pub(super) fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Move bytes from `src` to `dst` until either blocks. Ready(Ok) once
    /// the source's EOF was passed on; Ready(Err) on an error (a reset) on
    /// either socket. When `other_done`, the connection is about to be
    /// closed, which sends the FIN: the write shutdown is skipped.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut TcpStream,
        dst: &mut TcpStream,
        other_done: bool,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Write(held) => {
                    ready!(held.flush(cx, dst, &mut self.tally))?;
                    if let State::Write(held) = std::mem::replace(&mut self.state, State::Read) {
                        held.release();
                    }
                }
                State::Read => match ready!(round(cx, self.bulk, src, dst, &mut self.tally))? {
                    Round::Nothing => {}
                    Round::Eof => {
                        if !other_done {
                            // The peer may already be gone; the other
                            // direction reports that.
                            let _ = socket2::SockRef::from(&*dst).shutdown(Shutdown::Write);
                        }
                        self.state = State::Done;
                    }
                    Round::Moved(n, held) => {
                        self.bulk = n >= BUF_SIZE;
                        if let Some(held) = held {
                            self.state = State::Write(held);
                        }
                    }
                },
            }
        }
    }
}

/// One read round: splice for bulk directions (when a pipe can be had),
/// copy otherwise.
fn round(
    cx: &mut Context<'_>,
    bulk: bool,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    tally: &mut Tally<'_>,
) -> Poll<io::Result<Round>> {
    #[cfg(target_os = "linux")]
    if bulk {
        ready!(src.poll_read_ready(cx))?;
        if let Some(r) = splice::round(src, dst, tally) {
            return Poll::Ready(r);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bulk;
    copy_round(cx, src, dst, tally)
}

/// Read what `src` has into an (uninitialised) stack buffer and write as
/// much as `dst` takes; only a remainder goes to a pooled heap buffer.
fn copy_round(
    cx: &mut Context<'_>,
    src: &mut TcpStream,
    dst: &mut TcpStream,
    tally: &mut Tally<'_>,
) -> Poll<io::Result<Round>> {
    let mut stack = [MaybeUninit::<u8>::uninit(); BUF_SIZE];
    let mut rb = ReadBuf::uninit(&mut stack);
    ready!(Pin::new(&mut *src).poll_read(cx, &mut rb))?;
    let bytes = rb.filled();
    let n = bytes.len();
    if n == 0 {
        return Poll::Ready(Ok(Round::Eof));
    }
    let off = write_some(cx, bytes, dst, tally)?;
    if off == n {
        return Poll::Ready(Ok(Round::Moved(n, None)));
    }
    let mut buf = BUFS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE].into_boxed_slice());
    buf[..n - off].copy_from_slice(&bytes[off..]);
    // At most BUF_SIZE: it fits a u32.
    let held = Held::Buf {
        buf,
        off: 0,
        end: (n - off) as u32,
    };
    Poll::Ready(Ok(Round::Moved(n, Some(held))))
}

/// Write `bytes` to `dst` until done or it would block (the task is then
/// woken when it can take more); how many went.
fn write_some(
    cx: &mut Context<'_>,
    bytes: &[u8],
    dst: &mut TcpStream,
    tally: &mut Tally<'_>,
) -> io::Result<usize> {
    let mut off = 0;
    while off < bytes.len() {
        match Pin::new(&mut *dst).poll_write(cx, &bytes[off..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(m)) => {
                off += m;
                tally.count(m);
            }
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(off)
}

impl Held {
    /// Write what is held into `dst`: Ready once all of it went.
    pub(super) fn flush(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut TcpStream,
        tally: &mut Tally<'_>,
    ) -> Poll<io::Result<()>> {
        match self {
            Held::Buf { buf, off, end } => {
                *off += write_some(cx, &buf[*off as usize..*end as usize], dst, tally)? as u32;
                if off == end {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                }
            }
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, left } => loop {
                if splice::drain(pipe, left, dst, tally)? {
                    return Poll::Ready(Ok(()));
                }
                ready!(dst.poll_write_ready(cx))?;
            },
        }
    }

    /// Return an emptied buffer or pipe to this thread's pool.
    pub(super) fn release(self) {
        match self {
            Held::Buf { buf, .. } => BUFS.with(|b| {
                let mut b = b.borrow_mut();
                if b.len() < POOL_MAX {
                    b.push(buf);
                }
            }),
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, .. } => pipe.give_back(),
        }
    }
}
