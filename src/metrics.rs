//! Every Prometheus metric slb exports: names, labels and help text in one
//! table ([`CATALOG`]), and the scrape-time rendering.
//!
//! The data path never touches this module. It only adds to the atomics of
//! [`crate::stats`] and [`crate::health`]; a scrape copies those atomics into
//! `metrics` handles registered on a [`PrometheusRecorder`] owned here (not
//! installed globally) and renders them. Handles are resolved once per
//! listener and per (listener, backend) and cached, so a scrape costs a few
//! loads and stores per series and no allocation for known series.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

use metrics::{Counter, Gauge, Key, Label, Metadata, Recorder};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use crate::backend::Backend;
use crate::config::Protocol;
use crate::health::CheckResult;
use crate::listener::Listener;
use crate::stats::{DropReason, Histogram};
use crate::State;

/// Counter, gauge or histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Rendered by [`render_histograms`], from [`crate::stats::Histogram`].
    Histogram,
}

/// One exported metric: its name, kind, labels and help text.
#[derive(Debug)]
pub struct MetricDef {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static str,
    pub help: &'static str,
}

const fn def(name: &'static str, kind: Kind, labels: &'static str, help: &'static str) -> MetricDef {
    MetricDef {
        name,
        kind,
        labels,
        help,
    }
}

use Kind::{Counter as C, Gauge as G, Histogram as H};

pub const LISTENER_ACTIVE: &str = "slb_listener_connections_active";
pub const LISTENER_TOTAL: &str = "slb_listener_connections_total";
pub const LISTENER_DROPPED: &str = "slb_listener_dropped_total";
pub const LISTENER_RX_BYTES: &str = "slb_listener_rx_bytes_total";
pub const LISTENER_TX_BYTES: &str = "slb_listener_tx_bytes_total";
pub const LISTENER_RX_DATAGRAMS: &str = "slb_listener_rx_datagrams_total";
pub const LISTENER_TX_DATAGRAMS: &str = "slb_listener_tx_datagrams_total";
pub const LISTENER_LIMIT_EVENTS: &str = "slb_listener_limit_events_total";
pub const LISTENER_UNHEALTHY: &str = "slb_listener_backends_unhealthy";
pub const LISTENER_FAIL_OPEN: &str = "slb_listener_fail_open";
pub const BACKEND_ACTIVE: &str = "slb_backend_connections_active";
pub const BACKEND_TOTAL: &str = "slb_backend_connections_total";
pub const BACKEND_FAILURES: &str = "slb_backend_connect_failures_total";
pub const BACKEND_UP: &str = "slb_backend_up";
pub const BACKEND_WEIGHT: &str = "slb_backend_weight";
pub const BACKEND_RX_BYTES: &str = "slb_backend_rx_bytes_total";
pub const BACKEND_TX_BYTES: &str = "slb_backend_tx_bytes_total";
pub const BACKEND_RX_DATAGRAMS: &str = "slb_backend_rx_datagrams_total";
pub const BACKEND_TX_DATAGRAMS: &str = "slb_backend_tx_datagrams_total";
pub const HEALTH_CHECKS: &str = "slb_health_checks_total";
pub const LISTENER_QUEUE_LENGTH: &str = "slb_listener_queue_length";
pub const LISTENER_QUEUE_WAIT: &str = "slb_listener_queue_wait_seconds";
pub const BACKEND_MAX_CONNECTIONS: &str = "slb_backend_max_connections";
pub const BACKEND_EFFECTIVE_WEIGHT: &str = "slb_backend_effective_weight";

/// Every metric, in the order of `docs/observability.md`.
pub const CATALOG: &[MetricDef] = &[
    def(LISTENER_ACTIVE, G, "listener", "Open client connections (TCP) or live flows (UDP)."),
    def(LISTENER_TOTAL, C, "listener", "Accepted client connections (TCP) or new flows (UDP)."),
    def(LISTENER_DROPPED, C, "listener, reason", "Client connections or flows closed without a backend, by reason (no_backend, connect_failed, limit)."),
    def(LISTENER_RX_BYTES, C, "listener", "Bytes received from clients."),
    def(LISTENER_TX_BYTES, C, "listener", "Bytes sent to clients."),
    def(LISTENER_RX_DATAGRAMS, C, "listener", "Datagrams received from clients (UDP listeners only)."),
    def(LISTENER_TX_DATAGRAMS, C, "listener", "Datagrams sent to clients (UDP listeners only)."),
    def(LISTENER_LIMIT_EVENTS, C, "listener", "Times the listener reached max_connections and paused accepting."),
    def(LISTENER_UNHEALTHY, G, "listener", "Configured backends currently marked unhealthy."),
    def(LISTENER_FAIL_OPEN, G, "listener", "1 while every backend is unhealthy and the listener fails open, else 0."),
    def(BACKEND_ACTIVE, G, "listener, backend", "Open connections or live flows to the backend."),
    def(BACKEND_TOTAL, C, "listener, backend", "Connections or flows scheduled to the backend."),
    def(BACKEND_FAILURES, C, "listener, backend", "Failed connects to the backend on the data path."),
    def(BACKEND_UP, G, "listener, backend", "1 if the backend is healthy, 0 if not."),
    def(BACKEND_WEIGHT, G, "listener, backend", "Configured weight of the backend (0 = no new connections)."),
    def(BACKEND_RX_BYTES, C, "listener, backend", "Bytes received from the backend."),
    def(BACKEND_TX_BYTES, C, "listener, backend", "Bytes sent to the backend."),
    def(BACKEND_RX_DATAGRAMS, C, "listener, backend", "Datagrams received from the backend (UDP listeners only)."),
    def(BACKEND_TX_DATAGRAMS, C, "listener, backend", "Datagrams sent to the backend (UDP listeners only)."),
    def(HEALTH_CHECKS, C, "listener, backend, result", "Health probes by result (ok, refused, timeout, bad_status)."),
    def(LISTENER_QUEUE_LENGTH, G, "listener", "Connections waiting in the listener's queue for a backend slot (listeners with a queue only)."),
    def(LISTENER_QUEUE_WAIT, H, "listener", "How long connections waited in the queue before getting a backend slot (listeners with a queue only)."),
    def(BACKEND_MAX_CONNECTIONS, G, "listener, backend", "The backend's slots (max_connections); only for backends that have a limit."),
    def(BACKEND_EFFECTIVE_WEIGHT, G, "listener, backend", "The weight the scheduler uses now: below the configured weight during slow start."),
];

/// The recorder, its render handle, and the cached handles of every series.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Handles by listener name. Locked by scrapes only, never by the data path.
    cache: Mutex<HashMap<String, ListenerHandles>>,
}

struct ListenerHandles {
    active: Gauge,
    total: Counter,
    dropped: Vec<Counter>,
    rx_bytes: Counter,
    tx_bytes: Counter,
    /// UDP listeners only.
    datagrams: Option<[Counter; 2]>,
    limit_events: Counter,
    unhealthy: Gauge,
    fail_open: Gauge,
    /// Listeners with a queue only.
    queue_length: Option<Gauge>,
    backends: HashMap<SocketAddr, BackendHandles>,
}

struct BackendHandles {
    active: Gauge,
    total: Counter,
    failures: Counter,
    up: Gauge,
    weight: Gauge,
    effective_weight: Gauge,
    /// Backends with a slot limit only.
    max_connections: Option<Gauge>,
    rx_bytes: Counter,
    tx_bytes: Counter,
    datagrams: Option<[Counter; 2]>,
    checks: Vec<Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh recorder with every metric described.
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new().build_recorder();
        for m in CATALOG {
            let (name, help) = (m.name.into(), m.help.into());
            match m.kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => {}
            }
        }
        let handle = recorder.handle();
        Metrics {
            recorder,
            handle,
            cache: Mutex::default(),
        }
    }

    /// Copy the live counters of every listener and backend into their
    /// series and render the Prometheus text format.
    pub fn render(&self, state: &State) -> String {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            for running in &state.listeners {
                self.update_listener(&mut cache, &running.listener);
            }
        }
        let mut out = self.handle.render();
        render_histograms(&mut out, state);
        out
    }

    fn update_listener(&self, cache: &mut HashMap<String, ListenerHandles>, l: &Listener) {
        let snap = l.snapshot();
        let udp = snap.spec.protocol == Protocol::Udp;
        // Look up by &str first so that a known listener costs no allocation.
        if !cache.contains_key(l.name()) {
            let h = self.listener_handles(l.name(), udp, l.queue().is_some());
            cache.insert(l.name().to_owned(), h);
        }
        let h = cache.get_mut(l.name()).expect("inserted above");
        let s = &l.stats;
        h.active.set(s.active.load(Relaxed) as f64);
        h.total.absolute(s.total.load(Relaxed));
        for (c, reason) in h.dropped.iter().zip(DropReason::ALL) {
            c.absolute(s.dropped(reason));
        }
        h.rx_bytes.absolute(s.rx_bytes.load(Relaxed));
        h.tx_bytes.absolute(s.tx_bytes.load(Relaxed));
        if let Some([rx, tx]) = &h.datagrams {
            rx.absolute(s.rx_datagrams.load(Relaxed));
            tx.absolute(s.tx_datagrams.load(Relaxed));
        }
        h.limit_events.absolute(s.limit_events.load(Relaxed));
        let unhealthy = snap.backends.iter().filter(|b| !b.state.health.is_up()).count();
        h.unhealthy.set(unhealthy as f64);
        h.fail_open.set(if snap.all_down { 1.0 } else { 0.0 });
        if let (Some(g), Some(q)) = (&h.queue_length, l.queue()) {
            g.set(q.len() as f64);
        }
        for b in &snap.backends {
            let bh = h
                .backends
                .entry(b.addr)
                .or_insert_with(|| self.backend_handles(l.name(), b, udp));
            update_backend(bh, b);
        }
    }

    fn listener_handles(&self, listener: &str, udp: bool, queue: bool) -> ListenerHandles {
        let labels = || vec![Label::new("listener", listener.to_owned())];
        let counter = |name: &'static str| self.counter(name, labels());
        let gauge = |name: &'static str| self.gauge(name, labels());
        ListenerHandles {
            active: gauge(LISTENER_ACTIVE),
            total: counter(LISTENER_TOTAL),
            dropped: DropReason::ALL
                .iter()
                .map(|r| {
                    let mut l = labels();
                    l.push(Label::new("reason", r.as_str()));
                    self.counter(LISTENER_DROPPED, l)
                })
                .collect(),
            rx_bytes: counter(LISTENER_RX_BYTES),
            tx_bytes: counter(LISTENER_TX_BYTES),
            datagrams: udp.then(|| [counter(LISTENER_RX_DATAGRAMS), counter(LISTENER_TX_DATAGRAMS)]),
            limit_events: counter(LISTENER_LIMIT_EVENTS),
            unhealthy: gauge(LISTENER_UNHEALTHY),
            fail_open: gauge(LISTENER_FAIL_OPEN),
            queue_length: queue.then(|| gauge(LISTENER_QUEUE_LENGTH)),
            backends: HashMap::new(),
        }
    }

    fn backend_handles(&self, listener: &str, b: &Backend, udp: bool) -> BackendHandles {
        let backend = b.addr;
        let labels = || {
            vec![
                Label::new("listener", listener.to_owned()),
                Label::new("backend", backend.to_string()),
            ]
        };
        let counter = |name: &'static str| self.counter(name, labels());
        let gauge = |name: &'static str| self.gauge(name, labels());
        BackendHandles {
            active: gauge(BACKEND_ACTIVE),
            total: counter(BACKEND_TOTAL),
            failures: counter(BACKEND_FAILURES),
            up: gauge(BACKEND_UP),
            weight: gauge(BACKEND_WEIGHT),
            effective_weight: gauge(BACKEND_EFFECTIVE_WEIGHT),
            max_connections: b.max_connections.map(|_| gauge(BACKEND_MAX_CONNECTIONS)),
            rx_bytes: counter(BACKEND_RX_BYTES),
            tx_bytes: counter(BACKEND_TX_BYTES),
            datagrams: udp.then(|| [counter(BACKEND_RX_DATAGRAMS), counter(BACKEND_TX_DATAGRAMS)]),
            checks: CheckResult::ALL
                .iter()
                .map(|r| {
                    let mut l = labels();
                    l.push(Label::new("result", r.as_str()));
                    self.counter(HEALTH_CHECKS, l)
                })
                .collect(),
        }
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        let key = Key::from_parts(name, labels);
        self.recorder.register_counter(&key, &metadata())
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> Gauge {
        let key = Key::from_parts(name, labels);
        self.recorder.register_gauge(&key, &metadata())
    }
}

fn update_backend(h: &BackendHandles, b: &Backend) {
    let s = &b.state.stats;
    h.active.set(s.active.load(Relaxed) as f64);
    h.total.absolute(s.total.load(Relaxed));
    h.failures.absolute(s.connect_failures.load(Relaxed));
    h.up.set(if b.state.health.is_up() { 1.0 } else { 0.0 });
    h.weight.set(f64::from(b.configured_weight));
    h.effective_weight.set(f64::from(b.weight));
    if let (Some(g), Some(max)) = (&h.max_connections, b.max_connections) {
        g.set(max as f64);
    }
    h.rx_bytes.absolute(s.rx_bytes.load(Relaxed));
    h.tx_bytes.absolute(s.tx_bytes.load(Relaxed));
    if let Some([rx, tx]) = &h.datagrams {
        rx.absolute(s.rx_datagrams.load(Relaxed));
        tx.absolute(s.tx_datagrams.load(Relaxed));
    }
    for (c, result) in h.checks.iter().zip(CheckResult::ALL) {
        c.absolute(b.state.health.checks(result));
    }
}

/// Append the histograms (`metrics` cannot be fed pre-bucketed counts):
/// the queue wait of every listener with a queue.
fn render_histograms(out: &mut String, state: &State) {
    use std::fmt::Write;
    let queues: Vec<_> = state
        .listeners
        .iter()
        .filter_map(|r| Some((r.listener.name(), r.listener.queue()?)))
        .collect();
    if queues.is_empty() {
        return;
    }
    let def = CATALOG
        .iter()
        .find(|m| m.name == LISTENER_QUEUE_WAIT)
        .expect("in the catalog");
    let name = def.name;
    let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} histogram", def.help);
    for (listener, q) in queues {
        let l = escape_label(listener);
        let (cumulative, count) = q.wait.cumulative();
        for (bound, n) in Histogram::BOUNDS.iter().zip(cumulative) {
            let _ = writeln!(out, "{name}_bucket{{listener=\"{l}\",le=\"{bound}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{listener=\"{l}\",le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum{{listener=\"{l}\"}} {}", q.wait.sum_seconds());
        let _ = writeln!(out, "{name}_count{{listener=\"{l}\"}} {count}");
    }
    out.push('\n');
}

/// A label value in the Prometheus text format.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_conventions_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for m in CATALOG {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(m.name.starts_with("slb_"), "{}", m.name);
            assert_eq!(m.kind == Kind::Counter, m.name.ends_with("_total"), "{}", m.name);
            assert!(!m.help.is_empty() && !m.labels.contains("client"));
        }
    }
}
