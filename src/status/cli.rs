//! `slb status`: fetch `/status` from a running slb and print it as a table
//! in the manner of `ipvsadm -ln --stats`, once or every second (`--watch`),
//! or the raw JSON (`--json`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{ListenerReport, Report};

/// Bound on connecting to and reading from the admin server.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `/status` body accepted.
const MAX_BODY: u64 = 64 << 20;

/// Run `slb status` against the admin server at `admin`.
pub fn run(admin: &str, watch: bool, json: bool) -> Result<()> {
    let addr = resolve(admin)?;
    if !watch {
        let body = fetch(addr)?;
        print!("{}", render(&body, json, addr)?);
        return Ok(());
    }
    loop {
        let screen = match fetch(addr).and_then(|b| render(&b, json, addr)) {
            Ok(s) => s,
            Err(e) => format!("slb status: {e:#} (retrying every second)\n"),
        };
        // Home the cursor and clear the screen, like `watch`.
        print!("\x1b[H\x1b[2J{screen}");
        std::io::stdout().flush().context("stdout")?;
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn render(body: &str, json: bool, addr: SocketAddr) -> Result<String> {
    if json {
        return Ok(format!("{}\n", body.trim_end()));
    }
    let report: Report =
        serde_json::from_str(body).with_context(|| format!("unexpected /status document from {addr}"))?;
    Ok(table(&report, addr))
}

/// Accept `HOST:PORT`, optionally with an `http://` prefix and a trailing `/`.
fn resolve(admin: &str) -> Result<SocketAddr> {
    let hostport = admin.trim_start_matches("http://").trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .with_context(|| format!("bad admin address {admin:?} (want HOST:PORT)"))?
        .next()
        .with_context(|| format!("admin address {admin:?} resolves to nothing"))
}

/// GET /status over HTTP/1.0 and return the body.
fn fetch(addr: SocketAddr) -> Result<String> {
    let at = || {
        format!("cannot query the admin server at {addr} (is slb running, and is admin.listen this address?)")
    };
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).with_context(at)?;
    s.set_read_timeout(Some(TIMEOUT)).with_context(at)?;
    s.set_write_timeout(Some(TIMEOUT)).with_context(at)?;
    s.write_all(b"GET /status HTTP/1.0\r\nAccept: application/json\r\n\r\n")
        .with_context(at)?;
    let mut raw = Vec::new();
    s.take(MAX_BODY).read_to_end(&mut raw).with_context(at)?;
    let text = String::from_utf8(raw).context("the admin server's answer is not UTF-8")?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("the admin server's answer is not HTTP")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split(' ').nth(1) != Some("200") {
        bail!("{addr}/status answered {status:?}");
    }
    Ok(body.to_owned())
}

/// The table: a header, then one row per listener and its backends under it.
pub fn table(r: &Report, addr: SocketAddr) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "slb {} (admin {addr}), up {}",
        r.version,
        uptime(r.uptime_seconds)
    );
    let _ = writeln!(
        s,
        "{:<4} {:<22} {:<14} {:<8} {:>8} {:>10} {:>9} {:>9} {:>8}",
        "Prot", "LocalAddress:Port", "Listener", "Sched", "Active", "Total", "RxBytes", "TxBytes", "Dropped"
    );
    let _ = writeln!(
        s,
        "  -> {:<22} {:>6} {:<9} {:>8} {:>10} {:>9} {:>9} {:>8}",
        "RemoteAddress:Port", "Weight", "Health", "Active", "Total", "RxBytes", "TxBytes", "Failures"
    );
    for l in &r.listeners {
        listener_rows(&mut s, l);
    }
    if r.listeners.is_empty() {
        s.push_str("(no listeners)\n");
    }
    s
}

fn listener_rows(s: &mut String, l: &ListenerReport) {
    let dropped: u64 = l.dropped.values().sum();
    let mut flags = String::new();
    if l.fail_open {
        flags.push_str("  FAIL-OPEN (every backend unhealthy)");
    }
    if let Some(q) = &l.queue {
        let _ = write!(flags, "  queue {}/{}", q.length, q.size);
    }
    let _ = writeln!(
        s,
        "{:<4} {:<22} {:<14} {:<8} {:>8} {:>10} {:>9} {:>9} {:>8}{flags}",
        l.protocol.to_uppercase(),
        l.address,
        l.name,
        l.scheduler,
        l.active,
        l.total,
        bytes(l.rx_bytes),
        bytes(l.tx_bytes),
        dropped,
    );
    for b in &l.backends {
        let health = match (l.health_check.is_some(), b.healthy) {
            (_, false) if b.health == "pending" => "pending",
            (_, false) => "DOWN",
            (true, true) if b.effective_weight < b.weight => "ramping",
            (true, true) => "up",
            (false, true) => "unchecked",
        };
        // Slots in use / slots, for backends with max_connections.
        let active = match b.max_connections {
            Some(max) => format!("{}/{max}", b.active),
            None => b.active.to_string(),
        };
        // Backend bytes are counted from the backend's side: rx = received
        // from it, tx = sent to it.
        let _ = writeln!(
            s,
            "  -> {:<22} {:>6} {:<9} {:>8} {:>10} {:>9} {:>9} {:>8}",
            b.address,
            b.weight,
            health,
            active,
            b.total,
            bytes(b.rx_bytes),
            bytes(b.tx_bytes),
            b.failures,
        );
    }
    if l.backends.is_empty() {
        s.push_str("  -> (no backends)\n");
    }
}

/// Bytes in the largest binary unit that keeps the number >= 1.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["K", "M", "G", "T", "P"];
    if n < 1024 {
        return n.to_string();
    }
    let mut v = n as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1}{unit}")
}

fn uptime(secs: f64) -> String {
    let secs = secs as u64;
    humantime::format_duration(Duration::from_secs(secs)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_short() {
        assert_eq!(bytes(0), "0");
        assert_eq!(bytes(1023), "1023");
        assert_eq!(bytes(1536), "1.5K");
        assert_eq!(bytes(3 << 30), "3.0G");
    }

    #[test]
    fn table_shows_slots_in_use_the_queue_and_pending_backends() {
        let backend = |health: &str, max: Option<u64>| {
            serde_json::json!({"address": "127.0.0.1:1", "weight": 10, "effective_weight": 10,
                "healthy": health == "up", "health": health, "max_connections": max, "active": 3,
                "total": 9, "failures": 0, "rx_bytes": 0, "tx_bytes": 0, "rx_datagrams": 0,
                "tx_datagrams": 0, "checks": {}})
        };
        let report = serde_json::json!({"version": "0", "uptime_seconds": 1.0, "listeners": [{
            "name": "ai", "protocol": "tcp", "address": "127.0.0.1:8999", "backend_group": "g",
            "scheduler": "lc", "max_connections": 100, "connect_timeout_seconds": 3.0,
            "idle_timeout_seconds": 900.0, "health_check": null, "session_persistence": null,
            "on_all_unhealthy": "fail_open", "fail_open": false,
            "queue": {"size": 10, "timeout_seconds": 30.0, "length": 7, "dispatched": 0, "wait_seconds_sum": 0.0},
            "slow_start_seconds": null, "backends_unhealthy": 1, "active": 6, "total": 18,
            "rx_bytes": 0, "tx_bytes": 0, "rx_datagrams": 0, "tx_datagrams": 0, "limit_events": 0,
            "dropped": {}, "backends": [backend("up", Some(4)), backend("pending", None)]}]});
        let r: Report = serde_json::from_value(report).unwrap();
        let t = table(&r, "127.0.0.1:9100".parse().unwrap());
        assert!(t.contains("queue 7/10"), "{t}");
        assert!(t.contains(" 3/4 "), "{t}");
        assert!(t.contains("pending"), "{t}");
    }

    #[test]
    fn admin_address_forms() {
        let want: SocketAddr = "127.0.0.1:9100".parse().unwrap();
        for a in ["127.0.0.1:9100", "http://127.0.0.1:9100/"] {
            assert_eq!(resolve(a).unwrap(), want);
        }
        assert!(resolve("nonsense").is_err());
    }
}
