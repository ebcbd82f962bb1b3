//! The data plane's clock, measured: the program reads the kernel's
//! `jiffies` (`bpf_jiffies64`, which the verifier turns into a plain load,
//! where a clock helper was a call of ~15 ns on every packet) and turns
//! them into CLOCK_MONOTONIC_COARSE, the agent's clock, with two numbers
//! the agent writes into `FLOW_CONF` (`lb_common::flow::clock_ns`): the
//! length of a jiffy (from the kernel's HZ) and an epoch.
//!
//! Neither is exposed by the kernel as such (HZ is a build option;
//! `/proc/config.gz` is optional, and USER_HZ in /proc is always 100), so
//! they are measured, once per process: `/proc/timer_list` prints
//! `jiffies`, and two readings of it with CLOCK_MONOTONIC_COARSE around
//! each, some 25 jiffies apart, give HZ (the nearest of the values Linux
//! offers on x86-64 and arm64: 100, 250, 300, 1000) and the epoch. Jiffies
//! and the coarse clock are both moved by the timer tick, so the pair
//! stays in step; the epoch leaves the data plane's clock up to a jiffy or
//! two ahead of the agent's, never behind, so the sweep sees an entry as
//! no older than it is.

use std::{sync::OnceLock, time::Duration};

/// HZ values the kernel can be built with on x86-64 and arm64.
const KNOWN_HZ: [u32; 4] = [100, 250, 300, 1000];
/// How far a measured HZ may be from a known one (they are ≥ 18 % apart).
const HZ_TOLERANCE: f64 = 0.08;
/// Jiffies between the two readings: ±1 jiffy of error each side is 8 %
/// at most.
const MIN_JIFFIES: u64 = 25;

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("reading /proc/timer_list: {0}")]
    Read(#[from] std::io::Error),
    #[error("/proc/timer_list has no `jiffies:` line")]
    NoJiffies,
    #[error("the kernel's jiffies did not advance in step with CLOCK_MONOTONIC_COARSE")]
    Unsteady,
    #[error(
        "the kernel's HZ measures {measured:.0}, none of {KNOWN_HZ:?} (jiffies {jiffies} in {ns} ns)"
    )]
    UnknownHz {
        measured: f64,
        jiffies: u64,
        ns: u64,
    },
}

/// One reading: the kernel's jiffies and CLOCK_MONOTONIC_COARSE, read in
/// the same tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub coarse_ns: u64,
    pub jiffies: u64,
}

/// What the data plane needs to read the agent's clock from jiffies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JiffyClock {
    /// The kernel's HZ.
    pub hz: u32,
    /// Nanoseconds per jiffy, as the kernel rounds it (`TICK_NSEC`).
    pub jiffy_ns: u32,
    /// `jiffies × jiffy_ns − epoch_ns` is CLOCK_MONOTONIC_COARSE, a little
    /// ahead.
    pub epoch_ns: u64,
}

impl JiffyClock {
    /// The clock two samples show (`first` taken before `last`).
    pub fn from_samples(first: Sample, last: Sample) -> Result<Self, ClockError> {
        let jiffies = last.jiffies.saturating_sub(first.jiffies);
        let ns = last.coarse_ns.saturating_sub(first.coarse_ns);
        if jiffies == 0 || ns == 0 {
            return Err(ClockError::Unsteady);
        }
        let measured = jiffies as f64 * 1e9 / ns as f64;
        let hz = KNOWN_HZ
            .into_iter()
            .find(|&hz| (measured / f64::from(hz) - 1.0).abs() < HZ_TOLERANCE)
            .ok_or(ClockError::UnknownHz {
                measured,
                jiffies,
                ns,
            })?;
        let jiffy_ns = (1_000_000_000 + hz / 2) / hz;
        // Jiffies step on tick boundaries and the coarse clock just after:
        // one jiffy of margin puts the data plane's clock ahead, not behind.
        let epoch_ns = last
            .jiffies
            .wrapping_mul(u64::from(jiffy_ns))
            .wrapping_sub(last.coarse_ns)
            .wrapping_sub(u64::from(jiffy_ns));
        Ok(Self {
            hz,
            jiffy_ns,
            epoch_ns,
        })
    }

    /// This kernel's clock, measured once per process (about 100 ms at
    /// HZ = 250).
    pub fn get() -> Result<Self, ClockError> {
        static CLOCK: OnceLock<JiffyClock> = OnceLock::new();
        if let Some(clock) = CLOCK.get() {
            return Ok(*clock);
        }
        let clock = measure()?;
        Ok(*CLOCK.get_or_init(|| clock))
    }
}

fn measure() -> Result<JiffyClock, ClockError> {
    let first = sample()?;
    let mut last = first;
    for _ in 0..400 {
        std::thread::sleep(Duration::from_millis(10));
        last = sample()?;
        if last.jiffies >= first.jiffies + MIN_JIFFIES {
            break;
        }
    }
    JiffyClock::from_samples(first, last)
}

/// Jiffies with the coarse clock read before and after, retried until
/// both fell in the same tick.
fn sample() -> Result<Sample, ClockError> {
    for _ in 0..100 {
        let before = super::sweep::coarse_ns();
        let jiffies = jiffies_of(&std::fs::read_to_string("/proc/timer_list")?)?;
        if super::sweep::coarse_ns() == before {
            return Ok(Sample {
                coarse_ns: before,
                jiffies,
            });
        }
    }
    Err(ClockError::Unsteady)
}

/// The first `jiffies: N` line of `/proc/timer_list`.
fn jiffies_of(timer_list: &str) -> Result<u64, ClockError> {
    timer_list
        .lines()
        .find_map(|l| l.strip_prefix("jiffies: ")?.trim().parse().ok())
        .ok_or(ClockError::NoJiffies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::flow::clock_ns;

    #[test]
    fn hz_is_the_known_value_the_samples_show_and_the_clock_runs_a_jiffy_ahead() {
        // HZ = 250 (4 ms), jiffies near 2^32 as the kernel starts them; the
        // coarse clock read 1.5 ms after the tick each time.
        let at = |jiffies: u64| Sample {
            coarse_ns: (jiffies - 4_294_892_296) * 4_000_000 + 1_500_000,
            jiffies,
        };
        let (first, last) = (at(4_294_971_945), at(4_294_971_970));
        let clock = JiffyClock::from_samples(first, last).expect("clock");
        assert_eq!((clock.hz, clock.jiffy_ns), (250, 4_000_000));
        let program = clock_ns(last.jiffies, clock.jiffy_ns, clock.epoch_ns);
        assert_eq!(program, last.coarse_ns + 4_000_000);
        // A second later, still the same distance.
        let later = at(last.jiffies + 250);
        assert_eq!(
            clock_ns(later.jiffies, clock.jiffy_ns, clock.epoch_ns),
            later.coarse_ns + 4_000_000
        );
        // A late tick in a sample (a jiffy's error) still finds 250.
        let late = Sample {
            coarse_ns: last.coarse_ns + 4_000_000,
            ..last
        };
        assert_eq!(
            JiffyClock::from_samples(first, late).expect("clock").hz,
            250
        );
        // 300 and 1000 and 100.
        for (hz, tick) in [(300, 3_333_333u64), (1000, 1_000_000), (100, 10_000_000)] {
            let s = |j: u64| Sample {
                coarse_ns: j * tick,
                jiffies: j,
            };
            let clock = JiffyClock::from_samples(s(1000), s(1000 + u64::from(hz))).expect("hz");
            assert_eq!(clock.hz, hz);
            assert_eq!(u64::from(clock.jiffy_ns), tick);
        }
    }

    #[test]
    fn samples_that_show_no_known_hz_or_no_time_are_refused() {
        let s = |coarse_ns, jiffies| Sample { coarse_ns, jiffies };
        assert!(matches!(
            JiffyClock::from_samples(s(0, 10), s(1_000_000_000, 10)),
            Err(ClockError::Unsteady)
        ));
        assert!(matches!(
            JiffyClock::from_samples(s(0, 10), s(1_000_000_000, 10 + 500)),
            Err(ClockError::UnknownHz { .. })
        ));
        assert_eq!(
            jiffies_of("now at 1 nsecs\n  .last_jiffies   : 7\njiffies: 4294982874\n").expect("j"),
            4_294_982_874
        );
        assert!(matches!(jiffies_of("nothing"), Err(ClockError::NoJiffies)));
    }
}
