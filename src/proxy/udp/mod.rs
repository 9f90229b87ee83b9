//! UDP listeners. One receive task per listener owns the flow table (client
//! address:port -> [`flow::Flow`]) and forwards each datagram to its flow's
//! connected upstream socket; each flow has a relay task that sends the
//! backend's replies to the client from the listener's own socket, so the
//! client sees the listener's address answer. See `docs/udp.md`.

mod batch;
mod flow;
mod table;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::listener::Listener;
use batch::RecvBatch;
use table::FlowTable;

/// Room for the largest datagram a socket can carry (65,507 bytes of IPv4
/// payload, 65,527 over IPv6 without jumbograms), so nothing is truncated.
const MAX_DATAGRAM: usize = 65_535;

/// Socket buffers asked for on the listener socket: bursts from many clients
/// queue here while the receive task is busy. The kernel caps the request at
/// `net.core.rmem_max` / `wmem_max`.
const LISTENER_BUFFER: usize = 4 << 20;

/// Bind a UDP listener socket. IPv6 sockets are v6-only (so `[::]:p` and
/// `0.0.0.0:p` can coexist). No SO_REUSEADDR: on UDP it would let a second
/// process bind the same port and silently steal datagrams.
pub fn bind(addr: SocketAddr) -> Result<UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("cannot bind UDP {addr}"))?;
    set_buffers_or_warn(&socket, addr);
    Ok(UdpSocket::from_std(socket.into())?)
}

fn set_buffers_or_warn(socket: &socket2::Socket, addr: SocketAddr) {
    if let Err(e) = socket.set_recv_buffer_size(LISTENER_BUFFER) {
        warn!(listen = %addr, error = %e, "cannot set UDP receive buffer size");
    }
    if let Err(e) = socket.set_send_buffer_size(LISTENER_BUFFER) {
        warn!(listen = %addr, error = %e, "cannot set UDP send buffer size");
    }
}

/// Receive datagrams until `shutdown`, forwarding each to its flow. Flows'
/// relay tasks are tracked by `tracker`; they end at `shutdown` too.
pub async fn run(
    listener: Arc<Listener>,
    socket: UdpSocket,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let socket = Arc::new(socket);
    let mut table = FlowTable::new(listener.clone(), socket.clone(), tracker);
    // Buffers for the life of the listener: no allocation per datagram.
    let mut batch = RecvBatch::new();
    // Polling `cancelled()` takes the token's lock, shared by every listener:
    // it is polled last, so only when the socket has nothing to read, and an
    // atomic check each turn makes sure a flood cannot hide a shutdown.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut backoff = Duration::ZERO;
    while !shutdown.is_cancelled() {
        tokio::select! {
            biased;
            ended = table.next_ended() => table.remove_ended(ended),
            r = socket.readable() => {
                if r.is_err() {
                    // Only when the runtime's I/O driver is gone.
                    break;
                }
                match batch.recv(&socket, true) {
                    Ok((n, _)) => {
                        backoff = Duration::ZERO;
                        for i in 0..n {
                            if let (data, Some(client)) = batch.get(i) {
                                table.forward(client, data).await;
                            }
                        }
                    }
                    Err(e) if is_transient(&e) => debug!(listener = %listener.name(), error = %e, "udp receive"),
                    Err(e) => {
                        // ENOMEM, ENOBUFS...: back off, never spin, never give up.
                        backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                        warn!(listener = %listener.name(), error = %e, backoff = ?backoff, "udp receive failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = &mut cancelled => break,
                        }
                    }
                }
            }
            _ = &mut cancelled => break,
        }
    }
    // Dropping the table ends every flow with end=shutdown.
}

/// Errors that concern one datagram or one peer, not the socket.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}
