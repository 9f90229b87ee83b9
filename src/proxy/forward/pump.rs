//! One direction of a forwarded connection, as a small poll-driven state
//! machine: wait until the source is readable, move what it has, and hold
//! something only while the destination cannot take it all yet.
//!
//! Small reads (requests, replies) go through a buffer on the stack with
//! read/write: for a few hundred bytes that is cheaper than splice. Once a
//! read fills the whole buffer the direction is moving bulk data and (on
//! Linux) switches to splice(2); it switches back when a round moves little.
//! Waiting uses the streams' `poll_*_ready`, which keep no waiter in the
//! connection's state, so an idle direction is a few bytes.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::AtomicU64;
use std::task::{ready, Context, Poll};

use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use super::splice::{self, Pipe};
use super::Tally;

/// Bytes read per copying round (on the stack).
const BUF_SIZE: usize = 16 * 1024;
/// Heap buffers kept per thread for bytes a destination did not take yet.
const POOL_MAX: usize = 16;

thread_local! {
    static BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
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
    Buf {
        buf: Vec<u8>,
        off: usize,
        end: usize,
    },
    #[cfg(target_os = "linux")]
    Pipe {
        pipe: Pipe,
        left: usize,
    },
}

/// What one read round did.
pub(super) enum Round {
    /// The source had nothing after all.
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

    /// Move bytes from `src` to `dst` until either blocks. Ready(Ok) once
    /// the source's EOF was passed on as a write shutdown; Ready(Err) on an
    /// error (a reset) on either socket.
    pub(super) fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(Ok(())),
                State::Write(held) => {
                    if held.flush(dst, &mut self.tally)? {
                        if let State::Write(held) = std::mem::replace(&mut self.state, State::Read) {
                            held.release();
                        }
                    } else {
                        ready!(dst.poll_write_ready(cx))?;
                    }
                }
                State::Read => {
                    ready!(src.poll_read_ready(cx))?;
                    match round(self.bulk, src, dst, &mut self.tally)? {
                        Round::Nothing => {}
                        Round::Eof => {
                            // The peer may already be gone; the other
                            // direction reports that.
                            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                            self.state = State::Done;
                        }
                        Round::Moved(n, held) => {
                            self.bulk = n >= BUF_SIZE;
                            if let Some(held) = held {
                                self.state = State::Write(held);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One read round: splice for bulk directions (when a pipe can be had),
/// copy otherwise.
fn round(bulk: bool, src: &TcpStream, dst: &TcpStream, tally: &mut Tally<'_>) -> io::Result<Round> {
    #[cfg(target_os = "linux")]
    if bulk {
        if let Some(r) = splice::round(src, dst, tally) {
            return r;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = bulk;
    copy_round(src, dst, tally)
}

/// Read what `src` has into a stack buffer and write as much as `dst`
/// takes; only a remainder goes to a (pooled) heap buffer.
fn copy_round(src: &TcpStream, dst: &TcpStream, tally: &mut Tally<'_>) -> io::Result<Round> {
    let mut stack = [0u8; BUF_SIZE];
    let n = match src.try_read(&mut stack) {
        Ok(0) => return Ok(Round::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Round::Nothing),
        Err(e) => return Err(e),
    };
    let off = write_some(&stack[..n], dst, tally)?;
    if off == n {
        return Ok(Round::Moved(n, None));
    }
    let mut buf = BUFS
        .with(|b| b.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE]);
    buf[..n - off].copy_from_slice(&stack[off..n]);
    Ok(Round::Moved(
        n,
        Some(Held::Buf {
            buf,
            off: 0,
            end: n - off,
        }),
    ))
}

/// Write `bytes` to `dst` until done or it would block; how many went.
fn write_some(bytes: &[u8], dst: &TcpStream, tally: &mut Tally<'_>) -> io::Result<usize> {
    let mut off = 0;
    while off < bytes.len() {
        match dst.try_write(&bytes[off..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(m) => {
                off += m;
                tally.count(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(off)
}

impl Held {
    /// Write what is held into `dst`: true when all of it went, false when
    /// `dst` would block.
    pub(super) fn flush(&mut self, dst: &TcpStream, tally: &mut Tally<'_>) -> io::Result<bool> {
        match self {
            Held::Buf { buf, off, end } => {
                *off += write_some(&buf[*off..*end], dst, tally)?;
                Ok(off == end)
            }
            #[cfg(target_os = "linux")]
            Held::Pipe { pipe, left } => splice::drain(pipe, left, dst, tally),
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
