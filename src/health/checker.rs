//! The probe loop of one (listener, backend): probe at once, then about
//! every `interval`, feed each result to the backend's [`HealthState`] and
//! rebuild the listener's snapshot when the status flips.
//!
//! Spreading: every loop probes at start (so backends become eligible
//! quickly), then waits a random 50-100% of the interval before its second
//! probe, then `interval` ±10% between probes. Loops of many backends thus
//! drift apart instead of probing in lockstep.
//!
//! [`HealthState`]: super::HealthState

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::CheckResult;
use crate::backend::Backend;
use crate::listener::Listener;

/// Probe `backend` with `probe` (which bounds itself by the check timeout)
/// until `shutdown`.
pub(super) async fn run<P, F>(
    listener: Arc<Listener>,
    backend: Arc<Backend>,
    interval: Duration,
    mut probe: P,
    shutdown: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = CheckResult>,
{
    let health = &backend.state.health;
    let mut gap = interval.mul_f64(0.5 + 0.5 * fastrand::f64());
    loop {
        let start = Instant::now();
        let result = tokio::select! {
            r = probe() => r,
            _ = shutdown.cancelled() => return,
        };
        debug!(listener = %listener.name(), backend = %backend.addr, result = result.as_str(), "health probe");
        if health.observe_probe(result) {
            listener.rebuild();
        }
        tokio::select! {
            _ = sleep_until(start + gap) => {}
            _ = shutdown.cancelled() => return,
        }
        gap = interval.mul_f64(0.9 + 0.2 * fastrand::f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Status;
    use std::sync::Mutex;

    const INTERVAL: Duration = Duration::from_secs(2);

    fn listener(rise: u32, fall: u32) -> Arc<Listener> {
        let yaml = format!(
            "listeners:\n  - name: l\n    protocol: tcp\n    listen: 127.0.0.1:0\n    backend_group: g\n    health_check:\n      interval: 2s\n      timeout: 1s\n      healthy_threshold: {rise}\n      unhealthy_threshold: {fall}\nbackend_groups:\n  - name: g\n    backends:\n      - address: 127.0.0.1:1\n"
        );
        Listener::new(crate::config::parse(&yaml).expect("valid").listeners.remove(0))
    }

    /// What the loop saw: for each probe, when it ran and the status and
    /// eligibility just before it.
    #[derive(Debug, Clone, PartialEq)]
    struct Seen {
        at: Duration,
        status: Status,
        eligible: usize,
    }

    /// Run the loop over `script` (true = ok) with paused time; returns
    /// what each probe saw, plus the final status.
    async fn drive(rise: u32, fall: u32, script: Vec<bool>) -> (Vec<Seen>, Status) {
        let l = listener(rise, fall);
        let backend = l.snapshot().backends[0].clone();
        let shutdown = CancellationToken::new();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let (l2, b2, s2, stop) = (l.clone(), backend.clone(), seen.clone(), shutdown.clone());
        let mut i = 0;
        let probe = move || {
            let snap = l2.snapshot();
            s2.lock().unwrap().push(Seen {
                at: t0.elapsed(),
                status: b2.state.health.status(),
                // Healthy eligible backends (fail-open ones do not count).
                eligible: if snap.fail_open { 0 } else { snap.eligible.len() },
            });
            let r = match script.get(i) {
                Some(&ok) => ok,
                None => {
                    stop.cancel();
                    true
                }
            };
            i += 1;
            async move {
                if r {
                    CheckResult::Ok
                } else {
                    CheckResult::Refused
                }
            }
        };
        run(l.clone(), backend.clone(), INTERVAL, probe, shutdown).await;
        let seen = seen.lock().unwrap().clone();
        (seen, backend.state.health.status())
    }

    #[tokio::test(start_paused = true)]
    async fn first_probe_is_immediate_and_later_ones_are_jittered_around_the_interval() {
        let (seen, _) = drive(2, 2, vec![true; 50]).await;
        assert_eq!(seen[0].at, Duration::ZERO);
        let second = seen[1].at;
        assert!(second >= INTERVAL / 2 && second <= INTERVAL, "{second:?}");
        let mut distinct = std::collections::HashSet::new();
        for w in seen[1..].windows(2) {
            let gap = w[1].at - w[0].at;
            assert!(
                gap >= INTERVAL.mul_f64(0.89) && gap <= INTERVAL.mul_f64(1.11),
                "{gap:?}"
            );
            distinct.insert(gap);
        }
        assert!(distinct.len() > 10, "gaps are jittered: {distinct:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_backend_is_ineligible_until_its_first_success() {
        let (seen, status) = drive(3, 3, vec![false, true]).await;
        assert_eq!((seen[0].status, seen[0].eligible), (Status::Pending, 0));
        assert_eq!((seen[1].status, seen[1].eligible), (Status::Pending, 0));
        assert_eq!((seen[2].status, seen[2].eligible), (Status::Up, 1));
        assert_eq!(status, Status::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn down_after_exactly_fall_failures_up_after_exactly_rise_successes() {
        // ok, then 3 failures (down after the 3rd), then 2 ok (up after the 2nd).
        let script = vec![true, false, false, false, true, true];
        let (seen, status) = drive(2, 3, script).await;
        let statuses: Vec<Status> = seen.iter().map(|s| s.status).collect();
        use Status::*;
        assert_eq!(statuses, [Pending, Up, Up, Up, Down, Down, Up]);
        let eligible: Vec<usize> = seen.iter().map(|s| s.eligible).collect();
        assert_eq!(eligible, [0, 1, 1, 1, 0, 0, 1]);
        assert_eq!(status, Up);
        // Down after about fall intervals: the 3 failures span 2 gaps.
        let down_after = seen[4].at - seen[1].at;
        assert!(down_after <= INTERVAL.mul_f64(3.0 * 1.1), "{down_after:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn alternating_results_never_flip() {
        let mut script = vec![true];
        script.extend((0..200).map(|i| i % 2 == 0).map(|ok| !ok));
        let (seen, status) = drive(2, 2, script).await;
        assert!(seen[1..].iter().all(|s| s.status == Status::Up));
        assert_eq!(status, Status::Up);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_ends_the_loop_while_a_probe_hangs() {
        let l = listener(1, 1);
        let backend = l.snapshot().backends[0].clone();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            l,
            backend,
            INTERVAL,
            std::future::pending::<CheckResult>,
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(60)).await;
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("loop ended")
            .expect("no panic");
    }
}
