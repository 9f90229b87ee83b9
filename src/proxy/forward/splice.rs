//! Zero-copy rounds on Linux: socket -> pipe -> socket with splice(2), so
//! payload bytes never enter user space. A pipe is borrowed from a small
//! per-thread pool for one round and returned empty; a connection holds one
//! only while its bytes are in flight, never while idle.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::pump::{Held, Round};
use super::Tally;

/// Pipe capacity asked for with F_SETPIPE_SZ (the default is 64 KiB); a
/// larger pipe moves more per syscall on bulk transfers and costs memory
/// only while it holds data.
const PIPE_SIZE: libc::c_int = 256 * 1024;
/// Most bytes moved by one splice call.
const CHUNK: usize = PIPE_SIZE as usize;
/// Empty pipes kept per thread between rounds; more are closed.
const POOL_MAX: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

/// A non-blocking pipe. Only ever pooled when empty.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    /// An empty pipe from this thread's pool, or a new one; `None` if the
    /// kernel refuses (descriptor limit): the caller then copies instead.
    fn take() -> Option<Pipe> {
        POOL.with(|p| p.borrow_mut().pop()).or_else(Pipe::new)
    }

    fn new() -> Option<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass; we own
        // them from here on.
        let (read, write) = unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return None;
            }
            (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
        };
        // Best effort: a smaller pipe only means more syscalls.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Some(Pipe { read, write })
    }

    /// Give an empty pipe back to this thread's pool.
    pub(super) fn give_back(self) {
        POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(self);
            }
        });
    }
}

/// Splice what `src` has into a pipe and as much as `dst` takes out of it.
/// `None` when no pipe could be had (the caller copies instead).
pub(super) fn round(src: &TcpStream, dst: &TcpStream, tally: &mut Tally<'_>) -> Option<io::Result<Round>> {
    let pipe = Pipe::take()?;
    let filled = src.try_io(Interest::READABLE, || {
        splice(src.as_raw_fd(), pipe.write.as_raw_fd(), CHUNK)
    });
    let n = match filled {
        Ok(0) => {
            pipe.give_back();
            return Some(Ok(Round::Eof));
        }
        Ok(n) => n,
        Err(e) => {
            // Nothing entered the pipe: it is still empty.
            pipe.give_back();
            return Some(match e.kind() {
                io::ErrorKind::WouldBlock => Ok(Round::Nothing),
                _ => Err(e),
            });
        }
    };
    let mut left = n;
    Some(match drain(&pipe, &mut left, dst, tally) {
        Ok(true) => {
            pipe.give_back();
            Ok(Round::Moved(n, None))
        }
        Ok(false) => Ok(Round::Moved(n, Some(Held::Pipe { pipe, left }))),
        // The pipe still holds bytes: it is dropped (closed), not pooled.
        Err(e) => Err(e),
    })
}

/// Splice the pipe's `left` bytes into `dst` until done (true) or `dst` is
/// full (false).
pub(super) fn drain(
    pipe: &Pipe,
    left: &mut usize,
    dst: &TcpStream,
    tally: &mut Tally<'_>,
) -> io::Result<bool> {
    while *left > 0 {
        let r = dst.try_io(Interest::WRITABLE, || {
            splice(pipe.read.as_raw_fd(), dst.as_raw_fd(), *left)
        });
        match r {
            Ok(m) => {
                *left -= m;
                tally.count(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// One non-blocking splice(2) of up to `len` bytes from `from` to `to`.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    // SAFETY: plain syscall on descriptors that outlive the call; null
    // offsets are required for sockets and pipes.
    let n = unsafe { libc::splice(from, std::ptr::null_mut(), to, std::ptr::null_mut(), len, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
