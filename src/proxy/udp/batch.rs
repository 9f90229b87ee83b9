//! Receiving several datagrams per system call (`recvmmsg` on Linux), and
//! knowing from a short batch that the socket is drained, which saves the
//! extra `recv` that would only return EAGAIN. Elsewhere: one datagram per
//! call, never reported as drained.

use std::io;
use std::net::SocketAddr;

use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::MAX_DATAGRAM;

/// Datagrams per batch. Eight 64 KiB slots: 512 KiB per listener and per
/// worker thread (for the relay tasks), none per flow.
pub(super) const SLOTS: usize = 8;

/// Buffers for one batch of datagrams and their senders.
pub(super) struct RecvBatch {
    buf: Box<[u8]>,
    len: [usize; SLOTS],
    from: [Option<SocketAddr>; SLOTS],
}

impl RecvBatch {
    pub(super) fn new() -> RecvBatch {
        RecvBatch {
            buf: vec![0u8; SLOTS * MAX_DATAGRAM].into_boxed_slice(),
            len: [0; SLOTS],
            from: [None; SLOTS],
        }
    }

    /// Datagram `i` of the last batch, and its sender when asked for.
    pub(super) fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        let start = i * MAX_DATAGRAM;
        (&self.buf[start..start + self.len[i]], self.from[i])
    }

    /// Receive what is queued on `socket`, up to [`SLOTS`] datagrams, without
    /// waiting. Returns how many, and whether the queue is known to be empty
    /// (a short batch), in which case the socket's readiness was cleared as
    /// if the next receive had returned EAGAIN. `Err(WouldBlock)` when
    /// nothing was queued.
    pub(super) fn recv(&mut self, socket: &UdpSocket, with_addr: bool) -> io::Result<(usize, bool)> {
        let mut got = 0;
        // Reporting a short batch as WouldBlock from inside `try_io` makes
        // tokio clear the readiness it saw before the call: a datagram that
        // arrived meanwhile raised a newer event, which stays set.
        let r = socket.try_io(Interest::READABLE, || {
            got = self.recv_now(socket, with_addr)?;
            if cfg!(target_os = "linux") && got < SLOTS {
                Err(io::ErrorKind::WouldBlock.into())
            } else {
                Ok(got)
            }
        });
        match r {
            Ok(n) => Ok((n, false)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok((got, true)),
            Err(e) => Err(e),
        }
    }

    #[cfg(target_os = "linux")]
    fn recv_now(&mut self, socket: &UdpSocket, with_addr: bool) -> io::Result<usize> {
        use std::mem::{size_of, zeroed};
        use std::os::fd::AsRawFd;
        // SAFETY: plain C structs for which all-zero bytes are valid values.
        let mut names: [libc::sockaddr_storage; SLOTS] = unsafe { zeroed() };
        let mut iovs: [libc::iovec; SLOTS] = unsafe { zeroed() };
        let mut hdrs: [libc::mmsghdr; SLOTS] = unsafe { zeroed() };
        for (i, chunk) in self.buf.chunks_exact_mut(MAX_DATAGRAM).enumerate() {
            iovs[i].iov_base = chunk.as_mut_ptr().cast();
            iovs[i].iov_len = MAX_DATAGRAM;
            let h = &mut hdrs[i].msg_hdr;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            if with_addr {
                h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
                h.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            }
        }
        // SAFETY: every header points at a live iovec, buffer and address
        // slot of the sizes given, all outliving the call.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                hdrs.as_mut_ptr(),
                SLOTS as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        for i in 0..n {
            self.len[i] = (hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
            self.from[i] = if with_addr {
                to_socket_addr(&names[i])
            } else {
                None
            };
        }
        Ok(n)
    }

    #[cfg(not(target_os = "linux"))]
    fn recv_now(&mut self, socket: &UdpSocket, _with_addr: bool) -> io::Result<usize> {
        let s = socket2::SockRef::from(socket);
        let mut iov = [io::IoSliceMut::new(&mut self.buf[..MAX_DATAGRAM])];
        let (n, _, from) = s.recv_from_vectored(&mut iov)?;
        self.len[0] = n;
        self.from[0] = from.as_socket();
        Ok(1)
    }
}

#[cfg(target_os = "linux")]
fn to_socket_addr(s: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddrV6};
    match s.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for AF_INET; storage is
            // large and aligned enough for it.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let a = unsafe { &*(s as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let port = u16::from_be(a.sin6_port);
            Some(SocketAddrV6::new(ip, port, a.sin6_flowinfo, a.sin6_scope_id).into())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(addr: &str) -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind(addr).await.expect("bind receiver");
        let tx = UdpSocket::bind(addr).await.expect("bind sender");
        (rx, tx)
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn batches_keep_boundaries_and_senders_and_report_drained() {
        let (rx, tx) = pair("127.0.0.1:0").await;
        let to = rx.local_addr().unwrap();
        for i in 0..SLOTS + 2 {
            // Loopback delivers within send: all are queued when it returns.
            tx.send_to(&vec![i as u8; i * 100], to).await.unwrap();
        }
        rx.readable().await.unwrap();
        let mut batch = RecvBatch::new();
        assert_eq!(
            batch.recv(&rx, true).unwrap(),
            (SLOTS, false),
            "a full batch proves nothing"
        );
        for i in 0..SLOTS {
            let (data, from) = batch.get(i);
            assert_eq!(data, &vec![i as u8; i * 100][..]);
            assert_eq!(from, Some(tx.local_addr().unwrap()));
        }
        assert_eq!(
            batch.recv(&rx, true).unwrap(),
            (2, true),
            "a short batch drains the queue"
        );
        assert_eq!(batch.get(1).0.len(), (SLOTS + 1) * 100);
        let err = batch.recv(&rx, true).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::WouldBlock,
            "readiness cleared, no system call"
        );
    }

    #[tokio::test]
    async fn ipv6_senders_are_decoded() {
        let Ok(rx) = UdpSocket::bind("[::1]:0").await else {
            return; // no IPv6 loopback on this machine
        };
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        tx.send_to(b"six", rx.local_addr().unwrap()).await.unwrap();
        rx.readable().await.unwrap();
        let mut batch = RecvBatch::new();
        batch.recv(&rx, true).unwrap();
        assert_eq!(batch.get(0), (&b"six"[..], Some(tx.local_addr().unwrap())));
    }

    #[tokio::test]
    async fn largest_datagram_is_not_truncated() {
        let (rx, tx) = pair("127.0.0.1:0").await;
        let big = vec![7u8; 65_507];
        tx.send_to(&big, rx.local_addr().unwrap()).await.unwrap();
        rx.readable().await.unwrap();
        let mut batch = RecvBatch::new();
        assert_eq!(batch.recv(&rx, false).unwrap().0, 1);
        assert_eq!(batch.get(0), (&big[..], None));
    }
}
