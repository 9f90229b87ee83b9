//! One health probe: a TCP connect (and for `http`, a GET and its status
//! line), bounded by the check's `timeout`, closed at once.
//!
//! Probe sockets use SO_LINGER 0: closing sends a RST instead of a FIN, so
//! thousands of probes leave no TIME_WAIT sockets (and no ephemeral-port
//! pressure) on the balancer, as HAProxy does for its checks. Probes are
//! plain sockets of their own: they take nothing from the data path's
//! connection limit.

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::CheckResult;
use crate::config::{CheckType, HealthCheck};

/// Longest status line we read before giving up on it.
const MAX_STATUS_LINE: usize = 256;

/// Probe `target` once as `check` says; never takes longer than
/// `check.timeout` (a blackholed port is a [`CheckResult::Timeout`]).
pub async fn check(target: SocketAddr, check: &HealthCheck) -> CheckResult {
    tokio::time::timeout(check.timeout, unbounded(target, check))
        .await
        .unwrap_or(CheckResult::Timeout)
}

async fn unbounded(target: SocketAddr, check: &HealthCheck) -> CheckResult {
    let Ok(stream) = connect(target).await else {
        return CheckResult::Refused;
    };
    match check.kind {
        // Dropping the stream closes it with a RST (zero linger).
        CheckType::Tcp => CheckResult::Ok,
        CheckType::Http => http(stream, target, check).await,
    }
}

async fn connect(target: SocketAddr) -> io::Result<TcpStream> {
    let socket = if target.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_zero_linger()?;
    socket.connect(target).await
}

/// Send `GET path HTTP/1.0` and judge the status line.
async fn http(mut stream: TcpStream, target: SocketAddr, check: &HealthCheck) -> CheckResult {
    // HTTP/1.0 with Connection: close: the simplest request every server
    // answers; the Host header is the probed address (brackets for IPv6).
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: slb-health-check\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        check.path
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return CheckResult::BadStatus;
    }
    let mut buf = [0u8; MAX_STATUS_LINE];
    let mut n = 0;
    while n < buf.len() && !buf[..n].contains(&b'\n') {
        match stream.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    let (lo, hi) = check.expected_status;
    match status_code(&buf[..n]) {
        Some(code) if (lo..=hi).contains(&code) => CheckResult::Ok,
        _ => CheckResult::BadStatus,
    }
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`), if
/// `head` starts with one.
fn status_code(head: &[u8]) -> Option<u16> {
    let rest = head.strip_prefix(b"HTTP/")?;
    let space = rest.iter().position(|&c| c == b' ')?;
    let code = rest.get(space + 1..space + 4)?;
    let after = rest.get(space + 4).copied();
    if !code.iter().all(u8::is_ascii_digit) || !matches!(after, None | Some(b' ' | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_parse() {
        assert_eq!(status_code(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(status_code(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(status_code(b"HTTP/1.1 204\r\n"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 204"), Some(204));
    }

    #[test]
    fn garbage_is_not_a_status() {
        for head in [
            &b""[..],
            b"HTTP/1.1",
            b"HTTP/1.1 20",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 abc OK",
            b"SSH-2.0-OpenSSH\r\n",
            b"\xff\xfe HTTP/1.1 200",
        ] {
            assert_eq!(status_code(head), None, "{head:?}");
        }
    }
}
