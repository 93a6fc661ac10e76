//! Bounds on what a guest can make us write: a guest that reboots in a
//! loop (or a DHCP client that never settles) gets a few events a minute
//! into the log and the daemon log, then one saying the rest are not
//! logged, then a count of what was left out when the next window opens.

use std::time::{Duration, Instant};

/// Events of one kind from one VM.
#[derive(Clone, Debug)]
pub struct Limiter {
    max: u32,
    window: Duration,
    started: Option<Instant>,
    admitted: u32,
    suppressed: u32,
}

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `left_out` events before it were not.
    Log { left_out: u32 },
    /// Log that further ones are left out for now (this one included).
    LogLimitReached,
    /// Leave it out.
    Drop,
}

impl Limiter {
    /// At most `max` events per `window`.
    pub fn new(max: u32, window: Duration) -> Self {
        Limiter {
            max,
            window,
            started: None,
            admitted: 0,
            suppressed: 0,
        }
    }

    /// Whether its window has passed: it would start afresh.
    pub fn is_idle(&self, now: Instant) -> bool {
        self.started
            .is_none_or(|started| now.duration_since(started) >= self.window)
    }

    pub fn admit(&mut self, now: Instant) -> Verdict {
        if self.is_idle(now) {
            let left_out = self.suppressed;
            self.started = Some(now);
            self.admitted = 1;
            self.suppressed = 0;
            return Verdict::Log { left_out };
        }
        if self.admitted < self.max {
            self.admitted += 1;
            return Verdict::Log { left_out: 0 };
        }
        self.suppressed += 1;
        if self.suppressed == 1 {
            Verdict::LogLimitReached
        } else {
            Verdict::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_a_few_then_says_it_stops_then_drops() {
        let mut limiter = Limiter::new(3, Duration::from_secs(60));
        let now = Instant::now();

        let verdicts: Vec<Verdict> = (0..6).map(|_| limiter.admit(now)).collect();

        assert_eq!(
            verdicts,
            [
                Verdict::Log { left_out: 0 },
                Verdict::Log { left_out: 0 },
                Verdict::Log { left_out: 0 },
                Verdict::LogLimitReached,
                Verdict::Drop,
                Verdict::Drop,
            ]
        );
    }

    #[test]
    fn the_next_window_counts_what_was_left_out() {
        let mut limiter = Limiter::new(1, Duration::from_secs(60));
        let start = Instant::now();
        for _ in 0..4 {
            limiter.admit(start);
        }

        let later = limiter.admit(start + Duration::from_secs(61));

        assert_eq!(later, Verdict::Log { left_out: 3 });
        assert_eq!(
            limiter.admit(start + Duration::from_secs(62)),
            Verdict::LogLimitReached
        );
    }
}
