//! slb, a layer-4 load balancer.
//!
//! Data flows listener -> group -> scheduler -> backend. [`Server::bind`]
//! opens every listener's socket from a validated [`config::Config`];
//! [`Server::run`] starts one accept loop per TCP listener
//! ([`proxy::tcp`]) or one flow table per UDP listener ([`proxy::udp`]), the
//! health checks ([`health`]) and the admin server ([`admin`]). For each new
//! connection the [`listener::Listener`] asks its [`scheduler::Scheduler`]
//! for candidates among the eligible [`backend::Backend`]s; the data path
//! connects to the first that answers and forwards bytes both ways.
//! `main` and the integration tests call the same two functions.

pub mod admin;
pub mod backend;
pub mod config;
pub mod health;
pub mod listener;
pub mod metrics;
pub mod persistence;
pub mod proxy;
pub mod queue;
pub mod scheduler;
pub mod stats;
pub mod status;
pub mod sys;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use config::{Config, Protocol};
use listener::Listener;

/// A listener with its bound socket address.
#[derive(Debug)]
pub struct Running {
    pub listener: Arc<Listener>,
    /// The address actually bound (resolves port 0).
    pub local_addr: SocketAddr,
}

/// What the admin server and the tests can see of a running slb.
#[derive(Debug)]
pub struct State {
    /// Listeners in configuration order.
    pub listeners: Vec<Running>,
    /// Where the admin server listens, if it is up.
    pub admin_addr: Option<SocketAddr>,
}

impl State {
    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Running> {
        self.listeners.iter().find(|r| r.listener.name() == name)
    }
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A bound, not yet serving, slb.
pub struct Server {
    state: Arc<State>,
    sockets: Vec<Socket>,
    admin: Option<TcpListener>,
    drain_timeout: Duration,
}

impl Server {
    /// Bind every listener's socket and the admin server. Errors name the
    /// listener whose address could not be bound.
    pub async fn bind(config: &Config) -> Result<Server> {
        let mut sockets = Vec::with_capacity(config.listeners.len());
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for spec in &config.listeners {
            let at = || {
                format!(
                    "listener {:?} on {} ({:?})",
                    spec.name, spec.listen, spec.protocol
                )
            };
            let (socket, local_addr) = match spec.protocol {
                Protocol::Tcp => {
                    let s = proxy::tcp::bind(spec.listen).with_context(at)?;
                    let a = s.local_addr()?;
                    (Socket::Tcp(s), a)
                }
                Protocol::Udp => {
                    let s = proxy::udp::bind(spec.listen).with_context(at)?;
                    let a = s.local_addr()?;
                    (Socket::Udp(s), a)
                }
            };
            sockets.push(socket);
            listeners.push(Running {
                listener: Listener::new(spec.clone()),
                local_addr,
            });
        }
        let admin = admin::bind(&config.admin).await?;
        let admin_addr = admin.as_ref().map(|a| a.local_addr()).transpose()?;
        let state = Arc::new(State {
            listeners,
            admin_addr,
        });
        Ok(Server {
            state,
            sockets,
            admin,
            drain_timeout: config.runtime.drain_timeout,
        })
    }

    /// The shared view of this server.
    pub fn state(&self) -> Arc<State> {
        self.state.clone()
    }

    /// The bound address of listener `name`.
    pub fn local_addr(&self, name: &str) -> Option<SocketAddr> {
        self.state.listener(name).map(|r| r.local_addr)
    }

    /// Serve until `shutdown` is cancelled, then stop accepting at once and
    /// give live connections up to the drain timeout to finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let tracker = TaskTracker::new();
        let mut loops = Vec::new();
        for (running, socket) in self.state.listeners.iter().zip(self.sockets) {
            let l = running.listener.clone();
            let spec = l.snapshot().spec.clone();
            info!(
                listener = %l.name(), protocol = spec.protocol.as_str(), listen = %running.local_addr,
                scheduler = spec.scheduler.as_str(), backends = spec.backends.len(), "listener up"
            );
            if spec.backends.is_empty() {
                warn!(listener = %l.name(), group = %spec.backend_group, "backend group is empty: connections will be dropped");
            }
            if spec.queue.is_some() && spec.backends.iter().all(|b| b.max_connections.is_none()) {
                warn!(listener = %l.name(), group = %spec.backend_group, "queue is set but no backend has max_connections: no connection will ever wait");
            }
            loops.extend(health::spawn_checks(&l, &shutdown));
            loops.push(match socket {
                Socket::Tcp(s) => tokio::spawn(proxy::tcp::run(l, s, shutdown.clone(), tracker.clone())),
                Socket::Udp(s) => tokio::spawn(proxy::udp::run(l, s, shutdown.clone(), tracker.clone())),
            });
        }
        if let Some(admin) = self.admin {
            loops.push(admin::spawn(admin, self.state.clone(), shutdown.clone()));
        }
        loops.push(tokio::spawn(timer_sentinel(shutdown.clone())));
        shutdown.cancelled().await;
        for l in loops {
            let _ = l.await;
        }
        tracker.close();
        let live = tracker.len();
        if live > 0 {
            info!(connections = live, drain_timeout = ?self.drain_timeout, "stopped accepting; draining live connections");
        }
        if tokio::time::timeout(self.drain_timeout, tracker.wait())
            .await
            .is_err()
        {
            warn!(
                connections = tracker.len(),
                "drain timeout reached; closing remaining connections"
            );
        }
        info!("stopped");
        Ok(())
    }
}

/// How often [`timer_sentinel`] wakes.
const SENTINEL: Duration = Duration::from_secs(1);

/// Keep a timer pending that is never more than [`SENTINEL`] away, until
/// `shutdown`. Tokio wakes its I/O driver (an eventfd write and an extra
/// epoll turn) whenever a new timer is due earlier than every pending one:
/// without this, a new connection's connect timer did that whenever every
/// earlier connection had already connected (0.41 writes per connection
/// under the connect-rate load, `perf record -e syscalls:sys_enter_write`;
/// 0.008 with it). Timers longer than a second now never do; one wake-up a second
/// is the price.
async fn timer_sentinel(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SENTINEL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = async { loop { tick.tick().await; } } => {}
    }
}
