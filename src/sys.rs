//! Process-level setup that is not about any one listener.

/// Raise the soft open-file limit to the hard limit (each proxied TCP
/// connection takes two descriptors) and return the resulting soft limit.
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    lim.rlim_cur
}

/// Whether the peer of `socket` has closed or reset it (FIN or RST seen),
/// asked with a zero-timeout `poll(2)` so the socket's readiness in the
/// runtime is left alone, and bytes it holds stay unread.
pub fn peer_closed(socket: &impl std::os::fd::AsRawFd) -> bool {
    #[cfg(target_os = "linux")]
    const HANGUP: libc::c_short = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
    #[cfg(not(target_os = "linux"))]
    const HANGUP: libc::c_short = libc::POLLHUP | libc::POLLERR;
    let mut fd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: HANGUP,
        revents: 0,
    };
    // SAFETY: poll reads and writes only the one pollfd we pass.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents & (HANGUP | libc::POLLNVAL) != 0
}
