//! The admin HTTP server (`/metrics`, `/status`, the status page).
//!
//! Not built yet: the observability issue adds it. Until then nothing binds.

use std::sync::Arc;

use anyhow::Result;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Admin;
use crate::State;

/// Bind the admin socket; `None` while there is no admin server.
pub async fn bind(_admin: &Admin) -> Result<Option<TcpListener>> {
    Ok(None)
}

/// Serve admin requests until `shutdown`.
pub fn spawn(_socket: TcpListener, _state: Arc<State>, shutdown: CancellationToken) -> JoinHandle<()> {
    tokio::spawn(async move { shutdown.cancelled().await })
}
