//! The rise/fall state machine: a pure function of the results it is fed,
//! no I/O and no clock, so every threshold can be unit-tested exactly.
//!
//! A backend starts [`Status::Pending`] (never checked) and becomes
//! [`Status::Up`] on its first success. After that it takes `fall`
//! consecutive failures to go down and `rise` consecutive successes to come
//! back up; any result that agrees with the current state resets the count,
//! so alternating results never flip it.

/// Where a backend stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Not yet checked successfully: not eligible. Leaves on the first
    /// success (up) or after `fall` failures (down).
    Pending,
    Up,
    Down,
}

impl Status {
    /// Label for logs and status pages.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Up => "up",
            Status::Down => "down",
        }
    }
}

/// Hysteresis over a stream of ok/failed observations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    status: Status,
    /// Consecutive results that disagree with `status` (failures while
    /// pending or up, successes while down).
    streak: u32,
}

impl RiseFall {
    /// A machine in `status` with thresholds `rise` and `fall` (each at
    /// least 1; 0 is treated as 1).
    pub fn new(rise: u32, fall: u32, status: Status) -> Self {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            status,
            streak: 0,
        }
    }

    /// Change the thresholds, keeping the status and the current streak.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise.max(1);
        self.fall = fall.max(1);
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// The length of the current streak of results against the status.
    pub fn streak(&self) -> u32 {
        self.streak
    }

    /// Feed one result; returns the new status if this result changed it.
    pub fn observe(&mut self, ok: bool) -> Option<Status> {
        match (self.status, ok) {
            // The first success of a never-checked backend is enough.
            (Status::Pending, true) => self.flip(Status::Up),
            (Status::Pending | Status::Up, false) => self.count(self.fall, Status::Down),
            (Status::Down, true) => self.count(self.rise, Status::Up),
            (Status::Up, true) | (Status::Down, false) => {
                self.streak = 0;
                None
            }
        }
    }

    /// Forget a streak of failures (a data-path success while pending or
    /// up). A down backend is left alone: only probes bring it back.
    pub fn clear_failures(&mut self) {
        if self.status != Status::Down {
            self.streak = 0;
        }
    }

    fn count(&mut self, threshold: u32, to: Status) -> Option<Status> {
        self.streak += 1;
        if self.streak >= threshold {
            return self.flip(to);
        }
        None
    }

    fn flip(&mut self, to: Status) -> Option<Status> {
        self.status = to;
        self.streak = 0;
        Some(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut RiseFall, results: &[bool]) -> Vec<Option<Status>> {
        results.iter().map(|&ok| m.observe(ok)).collect()
    }

    #[test]
    fn pending_goes_up_on_the_first_success() {
        let mut m = RiseFall::new(3, 3, Status::Pending);
        assert_eq!(m.observe(true), Some(Status::Up));
        assert_eq!(m.status(), Status::Up);
    }

    #[test]
    fn pending_goes_down_after_fall_failures_then_needs_rise_successes() {
        let mut m = RiseFall::new(3, 2, Status::Pending);
        assert_eq!(feed(&mut m, &[false, false]), [None, Some(Status::Down)]);
        assert_eq!(feed(&mut m, &[true, true, true]), [None, None, Some(Status::Up)]);
    }

    #[test]
    fn up_goes_down_after_exactly_fall_consecutive_failures() {
        for fall in 1..=10 {
            let mut m = RiseFall::new(2, fall, Status::Up);
            for i in 1..fall {
                assert_eq!(m.observe(false), None, "fall {fall}, failure {i}");
            }
            assert_eq!(m.observe(false), Some(Status::Down), "fall {fall}");
        }
    }

    #[test]
    fn down_comes_up_after_exactly_rise_consecutive_successes() {
        for rise in 1..=10 {
            let mut m = RiseFall::new(rise, 2, Status::Down);
            for i in 1..rise {
                assert_eq!(m.observe(true), None, "rise {rise}, success {i}");
            }
            assert_eq!(m.observe(true), Some(Status::Up), "rise {rise}");
        }
    }

    #[test]
    fn alternating_results_never_flip_either_state() {
        for (status, first) in [(Status::Up, false), (Status::Down, true)] {
            for threshold in 2..=10 {
                let mut m = RiseFall::new(threshold, threshold, status);
                let mut ok = first;
                for _ in 0..1000 {
                    assert_eq!(m.observe(ok), None);
                    ok = !ok;
                }
                assert_eq!(m.status(), status);
            }
        }
    }

    #[test]
    fn an_agreeing_result_resets_the_streak() {
        let mut m = RiseFall::new(3, 3, Status::Up);
        assert_eq!(feed(&mut m, &[false, false, true, false, false, true]), [None; 6]);
        assert_eq!(
            feed(&mut m, &[false, false, false]),
            [None, None, Some(Status::Down)]
        );
        assert_eq!(feed(&mut m, &[true, true, false, true, true]), [None; 5]);
        assert_eq!(m.observe(true), Some(Status::Up));
    }

    #[test]
    fn clearing_failures_keeps_an_up_backend_up_but_never_raises_a_down_one() {
        let mut m = RiseFall::new(2, 2, Status::Up);
        assert_eq!(m.observe(false), None);
        m.clear_failures();
        assert_eq!(m.observe(false), None);
        assert_eq!(m.observe(false), Some(Status::Down));
        assert_eq!(m.observe(true), None);
        m.clear_failures();
        assert_eq!(m.streak(), 1);
        assert_eq!(m.observe(true), Some(Status::Up));
    }

    #[test]
    fn thresholds_change_without_losing_the_status() {
        let mut m = RiseFall::new(3, 3, Status::Up);
        m.observe(false);
        m.set_thresholds(3, 2);
        assert_eq!(m.observe(false), Some(Status::Down));
        assert_eq!(RiseFall::new(0, 0, Status::Up).observe(false), Some(Status::Down));
    }
}
