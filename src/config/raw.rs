//! The file as written: serde structs with `deny_unknown_fields`, and
//! [`Bounded`] values whose range is checked while deserialising.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::{AllUnhealthy, CheckType, Protocol, SchedulerKind};

// ---------------------------------------------------------------------------
// Ranges. Each is (min, max) inclusive; they are documented in
// docs/configuration.md and chosen at least as wide as Tencent CLB's.

pub(super) const MS: u64 = 1;
const SEC: u64 = 1000 * MS;
const MIN: u64 = 60 * SEC;
const HOUR: u64 = 60 * MIN;
const DAY: u64 = 24 * HOUR;

/// A value that must fall in `MIN..=MAX`, checked while deserialising so the
/// error carries the line and column. Durations are in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Bounded<T, const LO: u64, const HI: u64>(pub(super) T);

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
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) listeners: Vec<RawListener>,
    #[serde(default)]
    pub(super) backend_groups: Vec<RawGroup>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<Bounded<u64, 1, 1024>>,
    pub(super) drain_timeout: Option<Bounded<Duration, 0, DAY>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) name: String,
    pub(super) protocol: Protocol,
    pub(super) listen: SocketAddr,
    pub(super) backend_group: String,
    #[serde(default)]
    pub(super) scheduler: SchedulerKind,
    #[serde(default)]
    pub(super) health_check: RawHealthCheck,
    #[serde(default)]
    pub(super) session_persistence: RawPersistence,
    #[serde(default)]
    pub(super) on_all_unhealthy: AllUnhealthy,
    pub(super) connect_timeout: Option<Bounded<Duration, MS, { 10 * MIN }>>,
    pub(super) idle_timeout: Option<Bounded<Duration, { 100 * MS }, { 7 * DAY }>>,
    pub(super) max_connections: Option<Bounded<u64, 1, 10_000_000>>,
    #[serde(default)]
    pub(super) queue: RawQueue,
    pub(super) slow_start: Option<Bounded<Duration, { 100 * MS }, { HOUR }>>,
}

/// `listeners[].queue`: where connections wait when every backend is full.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub(super) size: Option<Bounded<u64, 0, 10_000_000>>,
    pub(super) timeout: Option<Bounded<Duration, MS, DAY>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealthCheck {
    #[serde(default = "yes")]
    pub(super) enabled: bool,
    #[serde(default, rename = "type")]
    pub(super) kind: CheckType,
    pub(super) port: Option<Bounded<u64, 1, 65535>>,
    pub(super) interval: Option<Bounded<Duration, { 100 * MS }, { 300 * SEC }>>,
    pub(super) timeout: Option<Bounded<Duration, { 10 * MS }, { 60 * SEC }>>,
    pub(super) healthy_threshold: Option<Bounded<u64, 1, 10>>,
    pub(super) unhealthy_threshold: Option<Bounded<u64, 1, 10>>,
    pub(super) path: Option<String>,
    pub(super) expected_status: Option<String>,
}

impl Default for RawHealthCheck {
    fn default() -> Self {
        // Enabled by default, as in the Tencent console.
        serde_yaml::from_str("{}").expect("an empty health_check map is valid")
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPersistence {
    #[serde(default)]
    pub(super) enabled: bool,
    pub(super) timeout: Option<Bounded<Duration, { 30 * SEC }, { 3600 * SEC }>>,
    pub(super) max_entries: Option<Bounded<u64, 1, 100_000_000>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGroup {
    pub(super) name: String,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) address: SocketAddr,
    pub(super) weight: Option<Bounded<u64, 0, 100>>,
    pub(super) max_connections: Option<Bounded<u64, 1, 10_000_000>>,
}

fn yes() -> bool {
    true
}
