//! The rise/fall state machine of one checked backend, without any I/O.

use super::Health;

/// The rise/fall state machine of one backend, without any I/O.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    health: Health,
    /// Outcome of the latest probe.
    last_ok: Option<bool>,
    /// Length of the current run of `last_ok` outcomes.
    consecutive: u32,
}

impl Default for Counter {
    fn default() -> Self {
        Self::new()
    }
}

impl Counter {
    /// Starts up, with no probe recorded.
    pub fn new() -> Self {
        Self::starting(Health::Up)
    }

    /// Starts in `health`, with no probe recorded.
    pub fn starting(health: Health) -> Self {
        Self {
            health,
            last_ok: None,
            consecutive: 0,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    pub fn up(&self) -> bool {
        self.health.serving()
    }

    /// How many probes in a row had the latest outcome.
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Records one probe outcome. Returns the new state if it changed: down
    /// on the `fall`th consecutive failure while up or pending, up on the
    /// `rise`th consecutive success while down or pending. (A `rise` or
    /// `fall` of 0 acts as 1.)
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<Health> {
        if self.last_ok == Some(ok) {
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.last_ok = Some(ok);
            self.consecutive = 1;
        }
        let (needed, next) = if ok {
            (rise, Health::Up)
        } else {
            (fall, Health::Down)
        };
        if self.health != next && self.consecutive >= needed {
            self.health = next;
            Some(next)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_on_the_fall_th_consecutive_failure() {
        let mut c = Counter::new();
        assert!(c.up());
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        // A success in between resets the run.
        assert_eq!(c.record(true, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert_eq!(c.record(false, 2, 3), None);
        assert!(c.up());
        assert_eq!(c.record(false, 2, 3), Some(Health::Down));
        assert!(!c.up());
        assert_eq!(c.consecutive(), 3);
        // No repeat while it stays down.
        for _ in 0..5 {
            assert_eq!(c.record(false, 2, 3), None);
        }
        assert_eq!(c.consecutive(), 8);
    }

    #[test]
    fn rises_on_the_rise_th_consecutive_success() {
        let mut c = Counter::new();
        assert_eq!(c.record(false, 2, 1), Some(Health::Down));
        assert_eq!(c.record(true, 2, 1), None);
        // A failure in between resets the run (and does not repeat "down").
        assert_eq!(c.record(false, 2, 1), None);
        assert_eq!(c.record(true, 2, 1), None);
        assert!(!c.up());
        assert_eq!(c.record(true, 2, 1), Some(Health::Up));
        assert!(c.up());
        assert_eq!(c.consecutive(), 2);
        for _ in 0..5 {
            assert_eq!(c.record(true, 2, 1), None);
        }
        // Starting up, successes never produce a transition.
        let mut fresh = Counter::new();
        for _ in 0..5 {
            assert_eq!(fresh.record(true, 1, 1), None);
        }
    }

    #[test]
    fn a_pending_backend_needs_rise_passes_and_falls_after_fall_failures() {
        let mut c = Counter::starting(Health::Pending);
        assert!(!c.up());
        assert_eq!(c.record(true, 3, 2), None);
        assert_eq!(c.record(true, 3, 2), None);
        assert_eq!(c.health(), Health::Pending);
        assert_eq!(c.record(true, 3, 2), Some(Health::Up));
        let mut c = Counter::starting(Health::Pending);
        assert_eq!(c.record(false, 3, 2), None);
        assert_eq!(c.health(), Health::Pending);
        assert_eq!(c.record(false, 3, 2), Some(Health::Down));
        assert_eq!(c.record(true, 3, 2), None);
    }
}
