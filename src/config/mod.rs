//! The configuration file: raw serde structs ([`raw`]), validation
//! ([`validate`]), and the resolved [`Config`] the rest of slb runs on. This
//! module is the only one that touches YAML, so swapping the (deprecated
//! upstream) `serde_yaml` is a change inside this folder.
//!
//! Range checks on single values happen while deserialising (see
//! [`raw::Bounded`]), so the error carries the field path, line and column.
//! Cross-field checks happen in [`validate`] and name the listener or backend.

mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;

/// resolved, nothing left to unwrap later.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub runtime: Runtime,
    pub admin: Admin,
    pub listeners: Vec<ListenerSpec>,
    /// Group names with no backends, kept so `slb check` can warn about them.
    pub empty_groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Runtime {
    /// Tokio worker threads; `None` = one per CPU.
    pub worker_threads: Option<usize>,
    /// How long live connections may take to finish after SIGINT/SIGTERM.
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Admin {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Scheduling algorithm of a listener; see `docs/scheduling.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerKind {
    /// Round robin, weights ignored.
    Rr,
    /// Smooth weighted round robin.
    #[default]
    Wrr,
    /// Fewest active connections.
    Lc,
    /// Fewest active connections relative to weight.
    Wlc,
    /// Consistent hash of the client IP.
    IpHash,
    /// Power of two (weighted) random choices, fewer active connections wins.
    P2c,
}

impl SchedulerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Rr => "rr",
            SchedulerKind::Wrr => "wrr",
            SchedulerKind::Lc => "lc",
            SchedulerKind::Wlc => "wlc",
            SchedulerKind::IpHash => "ip_hash",
            SchedulerKind::P2c => "p2c",
        }
    }
}

/// What a listener does when every backend is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AllUnhealthy {
    /// "All dead = all alive": schedule across every backend with weight > 0.
    #[default]
    FailOpen,
    /// Close new connections at once.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CheckType {
    #[default]
    Tcp,
    Http,
}

/// A listener, resolved: its backend group is copied in.
#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSpec {
    pub name: String,
    pub protocol: Protocol,
    pub listen: SocketAddr,
    pub backend_group: String,
    pub backends: Vec<BackendSpec>,
    pub scheduler: SchedulerKind,
    /// `None` when health checks are disabled.
    pub health_check: Option<HealthCheck>,
    /// `None` when session persistence is disabled.
    pub session_persistence: Option<Persistence>,
    pub on_all_unhealthy: AllUnhealthy,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// `None` when there is no queue (`queue.size` 0): a connection finding
    /// every eligible backend at its `max_connections` is refused.
    pub queue: Option<Queue>,
    /// Ramp time of a backend's weight after it recovers; `None` = off.
    pub slow_start: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: SocketAddr,
    /// 0-100; 0 = no new connections.
    pub weight: u32,
    /// The backend's slots: connections (or UDP flows) it takes at once;
    /// `None` = unlimited.
    pub max_connections: Option<u64>,
}

/// The listener's wait queue for connections that find every backend full.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Most connections waiting at once (at least 1).
    pub size: usize,
    /// How long a connection may wait for a slot.
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: CheckType,
    /// Check port; `None` = each backend's own port.
    pub port: Option<u16>,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
    /// HTTP only: request path.
    pub path: String,
    /// HTTP only: accepted status codes, inclusive.
    pub expected_status: (u16, u16),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Persistence {
    pub timeout: Duration,
    pub max_entries: usize,
}

/// Read, parse and validate a configuration file.
pub fn load(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    parse(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Parse and validate configuration text.
pub fn parse(text: &str) -> Result<Config> {
    let de = serde_yaml::Deserializer::from_str(text);
    let raw: raw::RawConfig = serde_path_to_error::deserialize(de).map_err(yaml_error)?;
    validate::validate(raw)
}

/// "listeners[0].health_check.interval: <what is wrong> (line 7, column 9)":
/// the exact field path from serde_path_to_error, the position from
/// serde_yaml (which points at the field or at its enclosing map).
fn yaml_error(e: serde_path_to_error::Error<serde_yaml::Error>) -> anyhow::Error {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let mut msg = inner.to_string();
    if let Some(i) = msg.rfind(" at line ") {
        msg.truncate(i);
    }
    // serde_yaml prefixes its own (coarser) path: drop it.
    if let Some((head, rest)) = msg.split_once(": ") {
        if !head.contains(' ') {
            msg = rest.to_string();
        }
    }
    let at = inner
        .location()
        .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
        .unwrap_or_default();
    // Syntax errors carry no meaningful path ("listeners[0].?").
    if path == "." || path.is_empty() || path.contains('?') {
        anyhow::anyhow!("{msg}{at}")
    } else {
        anyhow::anyhow!("{path}: {msg}{at}")
    }
}

// ---------------------------------------------------------------------------
// Defaults.

/// Default admin address: loopback only.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9100";
pub const DEFAULT_WEIGHT: u32 = 10;
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
pub const DEFAULT_TCP_IDLE: Duration = Duration::from_secs(900);
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_CONNECTIONS: usize = 50_000;
pub const DEFAULT_PERSISTENCE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_PERSISTENCE_ENTRIES: usize = 1_000_000;
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
