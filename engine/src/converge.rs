//! When to stop iterating: the convergence policy of the pre-copy loop.
//!
//! Expected downtime is what is still dirty divided by the bandwidth measured in the last
//! round. The downtime limit is a ceiling, not a target: while rounds keep shrinking the dirty
//! set by a good factor, another round is cheap and lowers the downtime further, so the loop
//! goes on; once under the limit and no longer shrinking, it switches over. Above the limit
//! and not shrinking, it asks the embedder to throttle the guest (auto-converge) and, past the
//! round limit, fails or forces the switchover as configured.

use std::time::Duration;

/// What to do when the round limit is reached above the downtime limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoConvergence {
    /// Give up with a clear reason; the source carries on.
    Fail,
    /// Switch over anyway, accepting a longer downtime.
    ForceSwitchover,
}

/// The policy's knobs.
#[derive(Debug, Clone, Copy)]
pub struct ConvergePolicy {
    /// Ceiling for the downtime.
    pub downtime_limit: Duration,
    /// Most pre-copy rounds (round 0 included).
    pub max_rounds: u32,
    /// What happens at `max_rounds` above the limit.
    pub on_no_convergence: NoConvergence,
    /// Whether to ask the embedder to throttle when rounds stop shrinking.
    pub auto_converge: bool,
    /// First throttle percentage.
    pub throttle_initial: u8,
    /// Added on each further stall.
    pub throttle_increment: u8,
    /// When to switch to post-copy instead of throttling or failing (off by default).
    pub postcopy: Postcopy,
}

/// When a migration switches to post-copy: the guest moves to the destination early and the
/// pages it still lacks follow (on demand when it touches them, in the background otherwise).
/// It bounds the migration's length whatever the guest's dirty rate, at the risk described in
/// the user guide: from the switch on, the guest depends on both hosts and the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Postcopy {
    /// Pre-copy only.
    #[default]
    Off,
    /// Switch when pre-copy does not converge: where the policy would throttle the guest
    /// (two stalled rounds in a row) or give up at the round limit.
    WhenStalled,
    /// As `WhenStalled`, and at the latest after this many rounds (round 0 included).
    AfterRounds(u32),
}

impl Postcopy {
    /// Whether post-copy may be used at all.
    pub fn is_on(self) -> bool {
        self != Postcopy::Off
    }
}

impl Default for ConvergePolicy {
    fn default() -> Self {
        ConvergePolicy {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
            on_no_convergence: NoConvergence::Fail,
            auto_converge: true,
            throttle_initial: 20,
            throttle_increment: 10,
            postcopy: Postcopy::Off,
        }
    }
}

/// The policy's verdict after a round.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run another round.
    Iterate,
    /// Run another round, with the guest throttled to this percentage.
    Throttle(u8),
    /// Pause the guest and copy the rest.
    Switchover,
    /// Stop: the migration cannot meet the limit.
    Fail(String),
    /// Pause the guest, hand it over at once and send the rest after it (post-copy).
    Postcopy,
}

/// A dirty set that shrank to at most this fraction of the previous round is "shrinking well".
const GOOD_SHRINK: f64 = 0.5;
/// A dirty set above this fraction of what the round sent counts as a stall (QEMU's
/// auto-converge uses the same 50 % test, twice in a row, before it throttles).
const STALL: f64 = 0.5;
/// Rounds that are this cheap (expected downtime) switch over at once.
const NEGLIGIBLE: Duration = Duration::from_millis(1);

/// Convergence state across rounds.
#[derive(Debug, Clone)]
pub struct Converge {
    policy: ConvergePolicy,
    stalls: u32,
    throttle: u8,
}

impl Converge {
    /// A fresh state.
    pub fn new(policy: ConvergePolicy) -> Self {
        Converge {
            policy,
            stalls: 0,
            throttle: 0,
        }
    }

    /// The throttle percentage asked for so far.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Changes the downtime limit for the decisions to come.
    pub fn set_downtime_limit(&mut self, limit: Duration) {
        self.policy.downtime_limit = limit;
    }

    /// Expected downtime for `remaining` bytes at `bandwidth` bytes/s.
    pub fn expected_downtime(remaining: u64, bandwidth: f64) -> Duration {
        if remaining == 0 {
            return Duration::ZERO;
        }
        if bandwidth <= 0.0 {
            return Duration::MAX;
        }
        Duration::from_secs_f64((remaining as f64 / bandwidth).min(1e9))
    }

    /// Decides after round `round` (0-based) that sent `sent` bytes, leaving `remaining`
    /// dirty bytes, at a measured `bandwidth` in bytes/s.
    pub fn after_round(
        &mut self,
        round: u32,
        sent: u64,
        remaining: u64,
        bandwidth: f64,
    ) -> Decision {
        let expected = Self::expected_downtime(remaining, bandwidth);
        let ratio = if sent == 0 {
            1.0
        } else {
            remaining as f64 / sent as f64
        };
        let last_round = round + 1 >= self.policy.max_rounds;
        let postcopy = self.policy.postcopy;
        if expected <= self.policy.downtime_limit {
            if expected <= NEGLIGIBLE || ratio > GOOD_SHRINK || last_round {
                return Decision::Switchover;
            }
            return Decision::Iterate;
        }
        if let Postcopy::AfterRounds(n) = postcopy {
            if round + 1 >= n {
                return Decision::Postcopy;
            }
        }
        if last_round {
            if postcopy.is_on() {
                return Decision::Postcopy;
            }
            return match self.policy.on_no_convergence {
                NoConvergence::ForceSwitchover => Decision::Switchover,
                NoConvergence::Fail => Decision::Fail(format!(
                    "after {} rounds the expected downtime is {} ms, above the limit of {} ms",
                    round + 1,
                    expected.as_millis(),
                    self.policy.downtime_limit.as_millis()
                )),
            };
        }
        if ratio > STALL && round > 0 {
            self.stalls += 1;
            if postcopy.is_on() && self.stalls >= 2 {
                return Decision::Postcopy;
            }
            if self.policy.auto_converge && self.stalls >= 2 && self.throttle < 99 {
                self.throttle = if self.throttle == 0 {
                    self.policy.throttle_initial
                } else {
                    self.throttle.saturating_add(self.policy.throttle_increment)
                }
                .min(99);
                self.stalls = 0;
                return Decision::Throttle(self.throttle);
            }
        } else {
            self.stalls = 0;
        }
        Decision::Iterate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    #[test]
    fn iterates_while_shrinking_then_switches() {
        let mut c = Converge::new(ConvergePolicy::default());
        // 100 MB left at 1 GB/s = 100 ms (under 300 ms) but shrank 20x: go on.
        assert_eq!(
            c.after_round(0, 2_000_000_000, 100_000_000, GB),
            Decision::Iterate
        );
        // Shrank only to 0.9: switch over.
        assert_eq!(
            c.after_round(1, 100_000_000, 90_000_000, GB),
            Decision::Switchover
        );
        // Almost nothing left: switch over.
        assert_eq!(c.after_round(2, 1_000_000, 100, GB), Decision::Switchover);
    }

    #[test]
    fn throttles_when_stalled_and_fails_at_the_round_limit() {
        let p = ConvergePolicy {
            max_rounds: 6,
            ..Default::default()
        };
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(0, 4 << 30, 2 << 30, GB), Decision::Iterate);
        assert_eq!(c.after_round(1, 2 << 30, 2 << 30, GB), Decision::Iterate);
        assert_eq!(
            c.after_round(2, 2 << 30, 2 << 30, GB),
            Decision::Throttle(20)
        );
        assert_eq!(c.after_round(3, 2 << 30, 2 << 30, GB), Decision::Iterate);
        assert_eq!(
            c.after_round(4, 2 << 30, 2 << 30, GB),
            Decision::Throttle(30)
        );
        assert!(matches!(
            c.after_round(5, 2 << 30, 2 << 30, GB),
            Decision::Fail(_)
        ));
        let mut f = Converge::new(ConvergePolicy {
            max_rounds: 1,
            on_no_convergence: NoConvergence::ForceSwitchover,
            ..Default::default()
        });
        assert_eq!(f.after_round(0, 1 << 30, 1 << 30, GB), Decision::Switchover);
    }

    fn above_the_limit() -> Converge {
        Converge::new(ConvergePolicy {
            max_rounds: 100,
            ..Default::default()
        })
    }

    #[test]
    fn a_dirty_set_halved_exactly_is_still_shrinking_well() {
        let mut c = Converge::new(ConvergePolicy::default());
        // 100 MB at 1 GB/s = 100 ms, under 300 ms; exactly half of what was sent: go on.
        assert_eq!(
            c.after_round(0, 200_000_000, 100_000_000, GB),
            Decision::Iterate
        );
        // Just above half: not shrinking well any more, switch over.
        assert_eq!(
            c.after_round(1, 100_000_000, 50_000_001, GB),
            Decision::Switchover
        );
    }

    /// A limit changed mid-migration (QEMU's `downtime-limit`, `rmig_set_downtime_limit`)
    /// decides the next round: a dirty set that could not stop under the old limit stops
    /// under the raised one, and one that could no longer does under a lowered one.
    #[test]
    fn a_changed_downtime_limit_decides_the_next_round() {
        let mut c = above_the_limit();
        // 500 MB left of 800 MB sent, at 1 GB/s: 500 ms, above the default 300 ms, and no
        // longer shrinking well (so under a limit it meets, it stops).
        let (sent, left) = (800_000_000, 500_000_000);
        assert_eq!(c.after_round(0, sent, left, GB), Decision::Iterate);
        c.set_downtime_limit(Duration::from_secs(1));
        assert_eq!(c.after_round(1, sent, left, GB), Decision::Switchover);
        c.set_downtime_limit(Duration::from_millis(100));
        assert_eq!(c.after_round(2, sent, left, GB), Decision::Iterate);
    }

    #[test]
    fn a_stall_in_round_0_does_not_count() {
        let mut c = above_the_limit();
        // 1.8 GB left of 2 sent, at 1 GB/s: 1.8 s, far above the limit, and stalling.
        let (sent, left) = (2_000_000_000, 1_800_000_000);
        assert_eq!(c.after_round(0, sent, left, GB), Decision::Iterate);
        assert_eq!(c.after_round(1, sent, left, GB), Decision::Iterate);
        assert_eq!(c.after_round(2, sent, left, GB), Decision::Throttle(20));
        assert_eq!(c.throttle(), 20);
    }

    #[test]
    fn rounds_that_shrink_by_half_or_better_never_throttle() {
        let mut c = above_the_limit();
        let mut left: u64 = 64_000_000_000;
        for round in 0..8 {
            // Exactly half each time: still above the limit, but not a stall.
            assert_eq!(c.after_round(round, left, left / 2, GB), Decision::Iterate);
            left /= 2;
        }
        let mut c = above_the_limit();
        for round in 0..8 {
            // Shrinking well (to 40 %) is not a stall either.
            assert_eq!(
                c.after_round(round, 10_000_000_000, 4_000_000_000, GB),
                Decision::Iterate
            );
        }
        assert_eq!(c.throttle(), 0);
    }

    #[test]
    fn the_throttle_stops_at_99() {
        let mut c = Converge::new(ConvergePolicy {
            max_rounds: 100,
            throttle_initial: 90,
            throttle_increment: 5,
            ..Default::default()
        });
        let (sent, left) = (2_000_000_000, 1_800_000_000);
        let decisions: Vec<Decision> = (0..9).map(|r| c.after_round(r, sent, left, GB)).collect();
        use Decision::{Iterate as I, Throttle as T};
        assert_eq!(
            decisions,
            vec![I, I, T(90), I, T(95), I, T(99), I, I],
            "no throttle past 99 %, and none repeated at 99"
        );
        assert_eq!(c.throttle(), 99);
    }

    #[test]
    fn postcopy_replaces_the_throttle_and_the_failure() {
        let p = ConvergePolicy {
            max_rounds: 4,
            postcopy: Postcopy::WhenStalled,
            ..Default::default()
        };
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(0, 4 << 30, 2 << 30, GB), Decision::Iterate);
        assert_eq!(c.after_round(1, 2 << 30, 2 << 30, GB), Decision::Iterate);
        // Second stall: where auto-converge would throttle, post-copy takes over.
        assert_eq!(c.after_round(2, 2 << 30, 2 << 30, GB), Decision::Postcopy);
        assert_eq!(c.throttle(), 0);
        // At the round limit, above the downtime limit: post-copy rather than failing.
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(3, 4 << 30, 1 << 30, GB), Decision::Postcopy);
        // A migration that converges never switches to post-copy.
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(3, 4 << 30, 1 << 20, GB), Decision::Switchover);
    }

    #[test]
    fn postcopy_after_n_rounds_unless_converged() {
        let p = ConvergePolicy {
            postcopy: Postcopy::AfterRounds(2),
            ..Default::default()
        };
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(0, 4 << 30, 3 << 30, GB), Decision::Iterate);
        assert_eq!(c.after_round(1, 3 << 30, 1 << 30, GB), Decision::Postcopy);
        let mut c = Converge::new(p);
        assert_eq!(c.after_round(1, 3 << 30, 100, GB), Decision::Switchover);
        assert!(p.postcopy.is_on());
        assert!(!Postcopy::Off.is_on());
    }
}
