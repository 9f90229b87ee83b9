//! Cross-field validation: raw structs -> the resolved [`Config`]. Errors
//! name the listener or backend at fault.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::raw::{RawConfig, RawGroup, RawHealthCheck, RawListener, RawPersistence, RawQueue};
use super::*;

// ---------------------------------------------------------------------------
// Cross-field validation.

pub(super) fn validate(raw: RawConfig) -> Result<Config> {
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
                max_connections: b.max_connections.map(|m| m.0),
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
    let queue = resolve_queue(&l.queue, l.protocol).context("queue")?;
    Ok(ListenerSpec {
        queue,
        slow_start: l.slow_start.map(|b| b.0),
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

fn resolve_queue(q: &RawQueue, protocol: Protocol) -> Result<Option<Queue>> {
    let size = q.size.map_or(0, |b| b.0 as usize);
    if size == 0 {
        if q.timeout.is_some() {
            bail!("timeout: set size as well (size 0, the default, means no queue)");
        }
        return Ok(None);
    }
    if protocol == Protocol::Udp {
        bail!("size: UDP flows are never queued (a new flow finding every backend full is dropped); remove queue");
    }
    Ok(Some(Queue {
        size,
        timeout: q.timeout.map_or(DEFAULT_QUEUE_TIMEOUT, |b| b.0),
    }))
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
