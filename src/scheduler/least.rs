//! Load-aware picks: least connections (`lc`), weighted least connections
//! (`wlc`) and power of two choices (`p2c`). They read each backend's live
//! `active` counter (a relaxed atomic load); nothing is locked.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use crate::backend::Backend;

fn active(b: &Backend) -> u64 {
    b.state.stats.active.load(Relaxed)
}

/// Whether `a` is strictly less loaded than `b` relative to weight: compares
/// `(active + 1) / weight`, the load each would have after taking this
/// connection, by cross-multiplication (exact, no division). With `+ 1`,
/// idle backends are not all tied at 0: the heavier one is preferred, and
/// the steady state stays proportional to the weights.
pub(super) fn lighter_weighted(a: &Backend, b: &Backend) -> bool {
    // Weights are at most 100, so this saturates only past 10^17 connections.
    let la = (active(a) + 1).saturating_mul(u64::from(b.weight));
    let lb = (active(b) + 1).saturating_mul(u64::from(a.weight));
    la < lb
}

/// Fewer active connections; a backend in slow start counts as if its
/// connections were scaled up by its ramp (`(active + 1) / ramp`), so that
/// its share climbs with the ramp instead of taking every new connection.
/// Outside slow start (ramp 100 everywhere) this is `active(a) < active(b)`.
fn lighter_unweighted(a: &Backend, b: &Backend) -> bool {
    if a.ramp == b.ramp {
        return active(a) < active(b);
    }
    (active(a) + 1).saturating_mul(u64::from(b.ramp)) < (active(b) + 1).saturating_mul(u64::from(a.ramp))
}

/// The least-loaded backend, scanning from `start` round the ring; the first
/// one seen wins a tie, so a rotating `start` breaks ties round-robin.
pub(super) fn least_loaded(backends: &[Arc<Backend>], start: usize, weighted: bool) -> usize {
    let n = backends.len();
    let lighter = if weighted {
        lighter_weighted
    } else {
        lighter_unweighted
    };
    let start = start % n;
    let mut best = start;
    for i in (start + 1..n).chain(0..start) {
        if lighter(&backends[i], &backends[best]) {
            best = i;
        }
    }
    best
}

/// Power of two choices: the running sums of the weights, so that a
/// weighted sample is a random number and a binary search.
#[derive(Debug)]
pub struct P2c {
    /// `cumulative[i]` = sum of the weights of backends `0..=i`.
    cumulative: Box<[u64]>,
}

impl P2c {
    pub(super) fn new(backends: &[Arc<Backend>]) -> Self {
        let cumulative = backends
            .iter()
            .scan(0u64, |sum, b| {
                *sum += u64::from(b.weight.max(1));
                Some(*sum)
            })
            .collect();
        P2c { cumulative }
    }

    /// Sample two distinct backends, each with probability proportional to
    /// its weight, and take the one with fewer active connections relative to
    /// its weight (the first sampled on a tie).
    pub(super) fn pick(&self, backends: &[Arc<Backend>]) -> usize {
        let n = self.cumulative.len().min(backends.len());
        if n <= 1 {
            return 0;
        }
        let (a, b) = self.sample_two(n);
        if lighter_weighted(&backends[b], &backends[a]) {
            b
        } else {
            a
        }
    }

    /// Two distinct indices below `n` (>= 2), each drawn with probability
    /// proportional to its weight.
    fn sample_two(&self, n: usize) -> (usize, usize) {
        let total = self.cumulative[n - 1];
        let a = self.index_of(fastrand::u64(0..total));
        // Sample the second among the others: draw from the total without
        // a's share, then skip over a's interval.
        let a_start = if a == 0 { 0 } else { self.cumulative[a - 1] };
        let a_weight = self.cumulative[a] - a_start;
        let mut r = fastrand::u64(0..total - a_weight);
        if r >= a_start {
            r += a_weight;
        }
        (a, self.index_of(r))
    }

    /// The backend whose interval of the cumulative weights contains `r`.
    fn index_of(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendState;

    fn backends(weights: &[u32], active: &[u64]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .zip(active)
            .enumerate()
            .map(|(i, (&w, &a))| {
                let state = Arc::new(BackendState::default());
                state.stats.active.store(a, Relaxed);
                let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                Arc::new(Backend::new(addr, w, state))
            })
            .collect()
    }

    #[test]
    fn lc_ties_rotate_with_the_start() {
        let b = backends(&[1, 1, 1, 1], &[2, 0, 5, 0]);
        let picks: Vec<usize> = (0..4).map(|s| least_loaded(&b, s, false)).collect();
        assert_eq!(picks, [1, 1, 3, 3]);
    }

    #[test]
    fn lc_gives_a_ramping_backend_a_share_that_grows_with_the_ramp() {
        // Others hold 9 connections each; the revived backend at 10% of its
        // ramp is "full" at (a+1)/10 >= 10/100, i.e. once it holds 0.
        let ramped = |ramp: u32, active: u64| {
            let mut b = backends(&[10, 10], &[9, active]);
            b[1] = Arc::new(Backend::new(b[1].addr, 10, b[1].state.clone()).ramped(ramp));
            least_loaded(&b, 0, false)
        };
        assert_eq!(
            ramped(10, 0),
            0,
            "at 10%: (0+1)*100 vs (9+1)*10, a tie, first wins"
        );
        assert_eq!(ramped(50, 3), 1, "at 50%: (3+1)*100 < (9+1)*50");
        assert_eq!(ramped(50, 5), 0, "at 50%: (5+1)*100 > (9+1)*50");
        assert_eq!(ramped(100, 8), 1, "at full share plain lc");
    }

    #[test]
    fn wlc_compares_load_after_the_new_connection() {
        // (0+1)/1 = 1 vs (1+1)/4 = 0.5: the weight-4 backend with one
        // connection is lighter than an idle weight-1 backend.
        let b = backends(&[1, 4], &[0, 1]);
        assert_eq!(least_loaded(&b, 0, true), 1);
        // (0+1)/1 = 1 vs (4+1)/4 = 1.25.
        let b = backends(&[1, 4], &[0, 4]);
        assert_eq!(least_loaded(&b, 1, true), 0);
    }

    #[test]
    fn p2c_samples_two_distinct_backends_by_weight() {
        // With two backends, distinct sampling means both are always
        // compared, so the idle one always wins.
        let b = backends(&[10, 10], &[0, 3]);
        let p = P2c::new(&b);
        assert!((0..1000).all(|_| p.pick(&b) == 0));
        let b = backends(&[1, 3, 1, 4], &[0, 0, 0, 0]);
        let p = P2c::new(&b);
        let mut count = [0usize; 4];
        for _ in 0..80_000 {
            let (x, y) = p.sample_two(4);
            assert_ne!(x, y);
            count[x] += 1;
        }
        let share: Vec<f64> = count.iter().map(|&c| c as f64 / 80_000.0).collect();
        assert!((share[0] - 1.0 / 9.0).abs() < 0.02, "{share:?}");
        assert!((share[1] - 3.0 / 9.0).abs() < 0.02, "{share:?}");
        assert!((share[3] - 4.0 / 9.0).abs() < 0.02, "{share:?}");
    }
}
