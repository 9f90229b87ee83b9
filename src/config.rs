//! The configuration file: raw serde structs, validation, and the resolved
//! [`Config`] the rest of slb runs on. This is the only module that touches
//! YAML, so swapping the (deprecated upstream) `serde_yaml` is a one-file change.
//!
//! Range checks on single values happen while deserialising (see [`Bounded`]),
//! so `serde_yaml` reports them with the field path, line and column.
//! Cross-field checks happen in [`validate`] and name the listener or backend.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::{self, Deserializer};
use serde::Deserialize;

/// The resolved configuration: every default applied, every reference
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub address: SocketAddr,
    /// 0-100; 0 = no new connections.
    pub weight: u32,
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
    let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(yaml_error)?;
    validate(raw)
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
// Ranges. Each is (min, max) inclusive; they are documented in
// docs/configuration.md and chosen at least as wide as Tencent CLB's.

const MS: u64 = 1;
const SEC: u64 = 1000 * MS;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// A value that must fall in `MIN..=MAX`, checked while deserialising so the
/// error carries the line and column. Durations are in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounded<T, const LO: u64, const HI: u64>(T);

impl<'de, const LO: u64, const HI: u64> Deserialize<'de> for Bounded<u64, LO, HI> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u64::deserialize(d)?;
        if !(LO..=HI).contains(&v) {
            return Err(de::Error::custom(format!(
                "{v} is out of range: allowed {LO}..={HI}"
            )));
        }
        Ok(Bounded(v))
    }
}

impl<'de, const LO: u64, const HI: u64> Deserialize<'de> for Bounded<Duration, LO, HI> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(DurationVisitor::<LO, HI>(PhantomData))
    }
}

struct DurationVisitor<const LO: u64, const HI: u64>(PhantomData<()>);

impl<const LO: u64, const HI: u64> de::Visitor<'_> for DurationVisitor<LO, HI> {
    type Value = Bounded<Duration, LO, HI>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a duration such as 500ms, 5s or 15m")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        let d = humantime::parse_duration(s.trim())
            .map_err(|e| E::custom(format!("invalid duration {s:?}: {e} (examples: 500ms, 5s, 15m)")))?;
        let (lo, hi) = (Duration::from_millis(LO), Duration::from_millis(HI));
        if d < lo || d > hi {
            return Err(E::custom(format!(
                "duration {s} is out of range: allowed {} to {}",
                humantime::format_duration(lo),
                humantime::format_duration(hi)
            )));
        }
        Ok(Bounded(d))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "duration {v} has no unit: write it as {v}s or {v}ms"
        )))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "duration {v} has no unit: write it as {v}s or {v}ms"
        )))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Err(E::custom(format!(
            "duration {v} has no unit: write it as e.g. 500ms"
        )))
    }
}

// ---------------------------------------------------------------------------
// Raw file structs.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    admin: RawAdmin,
    listeners: Vec<RawListener>,
    #[serde(default)]
    backend_groups: Vec<RawGroup>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<Bounded<u64, 1, 1024>>,
    drain_timeout: Option<Bounded<Duration, 0, DAY>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    protocol: Protocol,
    listen: SocketAddr,
    backend_group: String,
    #[serde(default)]
    scheduler: SchedulerKind,
    #[serde(default)]
    health_check: RawHealthCheck,
    #[serde(default)]
    session_persistence: RawPersistence,
    #[serde(default)]
    on_all_unhealthy: AllUnhealthy,
    connect_timeout: Option<Bounded<Duration, MS, { 10 * MIN }>>,
    idle_timeout: Option<Bounded<Duration, { 100 * MS }, { 7 * DAY }>>,
    max_connections: Option<Bounded<u64, 1, 10_000_000>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealthCheck {
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default, rename = "type")]
    kind: CheckType,
    port: Option<Bounded<u64, 1, 65535>>,
    interval: Option<Bounded<Duration, { 100 * MS }, { 300 * SEC }>>,
    timeout: Option<Bounded<Duration, { 10 * MS }, { 60 * SEC }>>,
    healthy_threshold: Option<Bounded<u64, 1, 10>>,
    unhealthy_threshold: Option<Bounded<u64, 1, 10>>,
    path: Option<String>,
    expected_status: Option<String>,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        // Enabled by default, as in the Tencent console.
        serde_yaml::from_str("{}").expect("an empty health_check map is valid")
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPersistence {
    #[serde(default)]
    enabled: bool,
    timeout: Option<Bounded<Duration, { 30 * SEC }, { 3600 * SEC }>>,
    max_entries: Option<Bounded<u64, 1, 100_000_000>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    name: String,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: SocketAddr,
    weight: Option<Bounded<u64, 0, 100>>,
}

fn yes() -> bool {
    true
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

// ---------------------------------------------------------------------------
// Cross-field validation.

fn validate(raw: RawConfig) -> Result<Config> {
    let groups = resolve_groups(&raw.backend_groups)?;
    if raw.listeners.is_empty() {
        bail!("listeners: at least one listener is required");
    }
    let mut names = HashSet::new();
    let mut listeners = Vec::with_capacity(raw.listeners.len());
    for (i, l) in raw.listeners.into_iter().enumerate() {
        let at = format!("listeners[{i}] (name {:?})", l.name);
        if l.name.trim().is_empty() {
            bail!("listeners[{i}].name: must not be empty");
        }
        if !names.insert(l.name.clone()) {
            bail!("{at}.name: duplicate listener name {:?}", l.name);
        }
        let spec = resolve_listener(l, &groups).with_context(|| at.clone())?;
        if let Some(other) = listeners.iter().find(|o| same_socket(o, &spec)) {
            let other: &ListenerSpec = other;
            bail!(
                "{at}.listen: {} conflicts with listener {:?} on {} (both {})",
                spec.listen,
                other.name,
                other.listen,
                spec.protocol.as_str()
            );
        }
        listeners.push(spec);
    }
    let used: HashSet<&str> = listeners.iter().map(|l| l.backend_group.as_str()).collect();
    let empty_groups = groups
        .iter()
        .filter(|(name, b)| b.is_empty() && used.contains(name.as_str()))
        .map(|(name, _)| name.clone())
        .collect();
    Ok(Config {
        runtime: Runtime {
            worker_threads: raw.runtime.worker_threads.map(|b| b.0 as usize),
            drain_timeout: raw.runtime.drain_timeout.map_or(DEFAULT_DRAIN, |b| b.0),
        },
        admin: Admin {
            listen: raw
                .admin
                .listen
                .unwrap_or_else(|| DEFAULT_ADMIN.parse().expect("valid default")),
        },
        listeners,
        empty_groups,
    })
}

fn resolve_groups(raw: &[RawGroup]) -> Result<HashMap<String, Vec<BackendSpec>>> {
    let mut groups = HashMap::new();
    for (i, g) in raw.iter().enumerate() {
        let at = format!("backend_groups[{i}] (name {:?})", g.name);
        if g.name.trim().is_empty() {
            bail!("backend_groups[{i}].name: must not be empty");
        }
        let mut seen = HashSet::new();
        let mut backends = Vec::with_capacity(g.backends.len());
        for (j, b) in g.backends.iter().enumerate() {
            if !seen.insert(b.address) {
                bail!("{at}.backends[{j}].address: duplicate backend {}", b.address);
            }
            if b.address.port() == 0 {
                bail!("{at}.backends[{j}].address: port 0 is not a valid backend port");
            }
            let weight = b.weight.map_or(DEFAULT_WEIGHT, |w| w.0 as u32);
            backends.push(BackendSpec {
                address: b.address,
                weight,
            });
        }
        if groups.insert(g.name.clone(), backends).is_some() {
            bail!("{at}.name: duplicate backend group name {:?}", g.name);
        }
    }
    Ok(groups)
}

fn resolve_listener(l: RawListener, groups: &HashMap<String, Vec<BackendSpec>>) -> Result<ListenerSpec> {
    let Some(backends) = groups.get(&l.backend_group) else {
        let mut known: Vec<&str> = groups.keys().map(String::as_str).collect();
        known.sort_unstable();
        bail!(
            "backend_group: no backend group named {:?} (defined: {})",
            l.backend_group,
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let idle_default = match l.protocol {
        Protocol::Tcp => DEFAULT_TCP_IDLE,
        Protocol::Udp => DEFAULT_UDP_IDLE,
    };
    Ok(ListenerSpec {
        health_check: resolve_health(l.health_check).context("health_check")?,
        session_persistence: resolve_persistence(l.session_persistence),
        name: l.name,
        protocol: l.protocol,
        listen: l.listen,
        backend_group: l.backend_group,
        backends: backends.clone(),
        scheduler: l.scheduler,
        on_all_unhealthy: l.on_all_unhealthy,
        connect_timeout: l.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |b| b.0),
        idle_timeout: l.idle_timeout.map_or(idle_default, |b| b.0),
        max_connections: l
            .max_connections
            .map_or(DEFAULT_MAX_CONNECTIONS, |b| b.0 as usize),
    })
}

fn resolve_health(h: RawHealthCheck) -> Result<Option<HealthCheck>> {
    if !h.enabled {
        return Ok(None);
    }
    let interval = h.interval.map_or(Duration::from_secs(5), |b| b.0);
    let timeout = h
        .timeout
        .map_or(Duration::from_secs(2).min(interval / 2), |b| b.0);
    if timeout >= interval {
        bail!(
            "timeout ({}) must be less than interval ({})",
            humantime::format_duration(timeout),
            humantime::format_duration(interval)
        );
    }
    if h.kind == CheckType::Tcp && (h.path.is_some() || h.expected_status.is_some()) {
        bail!("path and expected_status apply only to type: http");
    }
    let path = h.path.unwrap_or_else(|| "/health".to_string());
    if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("path {path:?}: must start with '/' and contain no spaces or control characters");
    }
    let expected_status = match h.expected_status {
        Some(s) => parse_status_range(&s).context("expected_status")?,
        None => (200, 399),
    };
    Ok(Some(HealthCheck {
        kind: h.kind,
        port: h.port.map(|p| p.0 as u16),
        interval,
        timeout,
        healthy_threshold: h.healthy_threshold.map_or(3, |b| b.0 as u32),
        unhealthy_threshold: h.unhealthy_threshold.map_or(3, |b| b.0 as u32),
        path,
        expected_status,
    }))
}

/// `"200"` or `"200-399"`, within 100-599.
fn parse_status_range(s: &str) -> Result<(u16, u16)> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    };
    let parse = |v: &str| -> Result<u16> {
        let n: u16 = v
            .parse()
            .with_context(|| format!("{s:?}: expected e.g. 200-399"))?;
        if !(100..=599).contains(&n) {
            bail!("{s:?}: status codes are 100-599");
        }
        Ok(n)
    };
    let (lo, hi) = (parse(lo)?, parse(hi)?);
    if lo > hi {
        bail!("{s:?}: the range is empty");
    }
    Ok((lo, hi))
}

fn resolve_persistence(p: RawPersistence) -> Option<Persistence> {
    p.enabled.then(|| Persistence {
        timeout: p.timeout.map_or(DEFAULT_PERSISTENCE_TIMEOUT, |b| b.0),
        max_entries: p
            .max_entries
            .map_or(DEFAULT_PERSISTENCE_ENTRIES, |b| b.0 as usize),
    })
}

/// Whether two listeners would fight over one socket: same protocol and port,
/// and the same IP or one of them a wildcard of the same family. Port 0
/// (an ephemeral port, as in tests) never conflicts.
fn same_socket(a: &ListenerSpec, b: &ListenerSpec) -> bool {
    let (x, y) = (a.listen, b.listen);
    if a.protocol != b.protocol || x.port() != y.port() || x.port() == 0 {
        return false;
    }
    x.ip() == y.ip() || (x.is_ipv4() == y.is_ipv4() && (x.ip().is_unspecified() || y.ip().is_unspecified()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "
listeners:
  - name: a
    protocol: tcp
    listen: 127.0.0.1:8999
    backend_group: g
backend_groups:
  - name: g
    backends:
      - address: 127.0.0.1:9999
";

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        let l = &c.listeners[0];
        assert_eq!(l.scheduler, SchedulerKind::Wrr);
        assert_eq!(l.connect_timeout, Duration::from_secs(3));
        assert_eq!(l.idle_timeout, Duration::from_secs(900));
        assert_eq!(l.max_connections, 50_000);
        assert_eq!(l.backends[0].weight, 10);
        let h = l.health_check.as_ref().unwrap();
        assert_eq!(
            (h.interval, h.timeout),
            (Duration::from_secs(5), Duration::from_secs(2))
        );
        assert_eq!((h.healthy_threshold, h.unhealthy_threshold), (3, 3));
        assert!(l.session_persistence.is_none());
        assert_eq!(c.admin.listen, DEFAULT_ADMIN.parse().unwrap());
        assert_eq!(c.runtime.drain_timeout, DEFAULT_DRAIN);
    }

    #[test]
    fn out_of_range_weight_names_line_and_range() {
        let text = MINIMAL.replace("9999\n", "9999\n        weight: 101\n");
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(
            e.contains("backends[0].weight: 101") && e.contains("0..=100") && e.contains("line 10"),
            "{e}"
        );
    }

    #[test]
    fn huge_duration_is_an_error_not_a_panic() {
        let text = MINIMAL.replace(
            "backend_group: g\n",
            "backend_group: g\n    connect_timeout: 99999999999999999999999s\n",
        );
        assert!(parse(&text).is_err());
    }

    #[test]
    fn wildcard_and_specific_address_on_one_port_conflict() {
        let text = MINIMAL.replace(
            "backend_groups:",
            "  - name: b\n    protocol: tcp\n    listen: 0.0.0.0:8999\n    backend_group: g\nbackend_groups:",
        );
        let e = format!("{:#}", parse(&text).unwrap_err());
        assert!(e.contains("conflicts with listener \"a\""), "{e}");
    }

    #[test]
    fn status_ranges_parse() {
        assert_eq!(parse_status_range("200-399").unwrap(), (200, 399));
        assert_eq!(parse_status_range("204").unwrap(), (204, 204));
        assert!(parse_status_range("399-200").is_err());
        assert!(parse_status_range("99").is_err());
    }
}
