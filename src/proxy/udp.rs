//! UDP listeners: a flow table from client address to upstream socket.
//!
//! Not built yet: the UDP issue adds it. Binding a UDP listener fails.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Result};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::Listener;

pub fn bind(_addr: SocketAddr) -> Result<UdpSocket> {
    bail!("UDP listeners are not supported yet")
}

pub async fn run(
    _listener: Arc<Listener>,
    _socket: UdpSocket,
    shutdown: CancellationToken,
    _tracker: TaskTracker,
) {
    shutdown.cancelled().await
}
