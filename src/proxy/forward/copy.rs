//! The portable transfer: read into a buffer, write it out. Used where
//! splice(2) does not exist, and on Linux when no pipe can be had (for
//! example at the descriptor limit). Buffers come from a small per-thread
//! pool only for the duration of one round, so idle connections hold none.

use std::cell::RefCell;
use std::io;

use tokio::net::TcpStream;

use super::{Direction, Moved};

/// Bytes read per syscall.
const BUF_SIZE: usize = 16 * 1024;
/// Buffers kept per thread between rounds; more are freed.
const POOL_MAX: usize = 16;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Read what `src` has (it was just reported readable) and write all of it
/// to `dst`, counting bytes as they are written.
pub(super) async fn transfer(src: &TcpStream, dst: &TcpStream, dir: &Direction<'_>) -> io::Result<Moved> {
    let mut buf = POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE]);
    let r = round(src, dst, dir, &mut buf).await;
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(buf);
        }
    });
    r
}

async fn round(src: &TcpStream, dst: &TcpStream, dir: &Direction<'_>, buf: &mut [u8]) -> io::Result<Moved> {
    let n = match src.try_read(buf) {
        Ok(0) => return Ok(Moved::Eof),
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Moved::Nothing),
        Err(e) => return Err(e),
    };
    let mut done = 0;
    while done < n {
        dst.writable().await?;
        match dst.try_write(&buf[done..n]) {
            Ok(m) => {
                done += m;
                dir.count(m);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Moved::Bytes)
}
