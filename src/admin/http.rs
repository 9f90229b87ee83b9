//! Just enough HTTP/1.x for the admin server: read one request head, write
//! one response, close. Browsers, curl and Prometheus all accept this; no
//! keep-alive, no request bodies.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest request head we read; anything longer is refused.
const MAX_HEAD: usize = 8 * 1024;
/// A client that has not sent its request head by then is dropped.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed request line.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
}

/// A response to write.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, "text/plain; charset=utf-8", format!("{body}\n"))
    }
}

/// Read a request head (up to the blank line). `None` on EOF, timeout,
/// oversize or garbage: the caller answers 400 or just closes.
pub async fn read_request<R: AsyncRead + Unpin>(r: &mut R) -> Option<Request> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = async {
        loop {
            let n = r.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_HEAD {
                return None;
            }
            if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
                return Some(());
            }
        }
    };
    tokio::time::timeout(READ_TIMEOUT, head).await.ok()??;
    parse_request_line(&buf)
}

fn parse_request_line(head: &[u8]) -> Option<Request> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || !version.starts_with("HTTP/1.") {
        return None;
    }
    let path = target.split(['?', '#']).next().unwrap_or("/");
    Some(Request {
        method: method.to_owned(),
        path: path.to_owned(),
    })
}

/// Write `resp` (headers only for HEAD) and close the write side.
pub async fn write_response<W: AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
    head_only: bool,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    w.write_all(head.as_bytes()).await?;
    if !head_only {
        w.write_all(&resp.body).await?;
    }
    w.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line_is_parsed_and_the_query_dropped() {
        let r = parse_request_line(b"GET /status?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/status"));
        assert_eq!(parse_request_line(b"GET / HTTP/1.0\n\n").unwrap().path, "/");
    }

    #[test]
    fn garbage_is_refused() {
        for bad in [
            &b""[..],
            b"GET\r\n\r\n",
            b"GET / SPDY/3\r\n\r\n",
            b"\xff\xfe / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1 x\r\n\r\n",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_head_cut_short_or_too_long_is_refused() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        drop(client);
        assert_eq!(read_request(&mut server).await, None);
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        client.write_all(long.as_bytes()).await.unwrap();
        assert_eq!(read_request(&mut server).await, None);
    }
}
