//! Smooth weighted round robin (nginx's algorithm), precomputed as one full
//! cycle so that a pick is one atomic increment and an index.

/// One full cycle of nginx's smooth weighted round robin: each step adds every
/// weight to its running total, picks the largest, and subtracts the sum from
/// it. Weights 1:2 give B A B; the cycle length is sum(weights)/gcd.
pub(super) fn smooth_wrr_cycle(weights: impl Iterator<Item = u32>) -> Box<[u32]> {
    let weights: Vec<i64> = weights.map(i64::from).collect();
    let g = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let weights: Vec<i64> = weights.iter().map(|w| w / g).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut cycle = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += w;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        cycle.push(best as u32);
    }
    if cycle.is_empty() {
        cycle.extend(0..weights.len() as u32);
    }
    cycle.into_boxed_slice()
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_wrr_interleaves_one_to_two() {
        assert_eq!(&*smooth_wrr_cycle([1, 2].into_iter()), &[1, 0, 1]);
    }

    #[test]
    fn smooth_wrr_cycle_respects_weights_exactly() {
        let cycle = smooth_wrr_cycle([5, 1, 1].into_iter());
        assert_eq!(&*cycle, &[0, 0, 1, 0, 2, 0, 0]);
        let cycle = smooth_wrr_cycle([100, 30, 70].into_iter());
        assert_eq!(cycle.len(), 20);
        assert_eq!(cycle.iter().filter(|&&i| i == 0).count(), 10);
    }
}
