//! A token bucket on an injected clock (nanoseconds), in integer arithmetic so the scheduler's
//! tests are exact.
//!
//! Debt model: a request may go whenever the bucket holds one unit and is charged in full, so
//! the level may go negative by at most one request. A large request therefore never waits
//! behind its own size (no head-of-line blocking of a 1 MiB write by a 4 KiB budget), and
//! over any long interval the bucket still passes `rate × time + burst + one request`.

use crate::Nanos;

const NANOS_PER_SEC: i128 = 1_000_000_000;

/// A sustained rate with the burst the bucket may save up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units (requests or bytes) per second; never 0 (no bucket then).
    pub per_sec: u64,
    /// Units the bucket holds when full.
    pub burst: u64,
}

impl Rate {
    /// `per_sec` with the default burst: a tenth of a second's worth, at least one unit.
    pub fn new(per_sec: u64) -> Option<Rate> {
        (per_sec > 0).then(|| Rate {
            per_sec,
            burst: (per_sec / 10).max(1),
        })
    }
}

/// One bucket: its level is kept in unit-nanoseconds (units × 10⁹).
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: Rate,
    level: i128,
    updated: Nanos,
}

impl TokenBucket {
    /// A full bucket at time `now`.
    pub fn new(rate: Rate, now: Nanos) -> Self {
        TokenBucket {
            rate,
            level: i128::from(rate.burst) * NANOS_PER_SEC,
            updated: now,
        }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    fn refill(&mut self, now: Nanos) {
        if now > self.updated {
            // Saturating: a rate near u64::MAX over centuries would pass i128 (the API lets a
            // client set any rate).
            let gained =
                i128::from(self.rate.per_sec).saturating_mul(i128::from(now - self.updated));
            let full = i128::from(self.rate.burst) * NANOS_PER_SEC;
            self.level = self.level.saturating_add(gained).min(full);
            self.updated = now;
        }
    }

    /// Whether a request may go at `now`.
    pub fn ready(&mut self, now: Nanos) -> bool {
        self.refill(now);
        self.level >= NANOS_PER_SEC
    }

    /// Takes `units` (after [`TokenBucket::ready`] said yes).
    pub fn charge(&mut self, units: u64) {
        self.level = self.level.saturating_sub(i128::from(units) * NANOS_PER_SEC);
    }

    /// The earliest time at or after `now` when [`TokenBucket::ready`] turns true.
    pub fn ready_at(&mut self, now: Nanos) -> Nanos {
        self.refill(now);
        if self.level >= NANOS_PER_SEC {
            return now;
        }
        let missing = NANOS_PER_SEC - self.level; // the level must reach one unit
        let rate = i128::from(self.rate.per_sec);
        let wait = (missing + rate - 1) / rate;
        now.saturating_add(u64::try_from(wait).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_near_u64_max_over_centuries_saturates() {
        let rate = Rate {
            per_sec: u64::MAX,
            burst: 1,
        };
        let mut bucket = TokenBucket::new(rate, 0);
        bucket.charge(1 << 20);
        assert!(bucket.ready(u64::MAX));
        bucket.charge(u64::MAX);
        assert!(!bucket.ready(u64::MAX));
    }

    const MS: Nanos = 1_000_000;

    #[test]
    fn a_full_bucket_passes_its_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 1000,
                burst: 10,
            },
            0,
        );
        let mut passed = 0;
        while bucket.ready(0) {
            bucket.charge(1);
            passed += 1;
        }
        assert_eq!(passed, 10);
        // One request per millisecond afterwards.
        assert_eq!(bucket.ready_at(0), MS);
        assert!(!bucket.ready(MS - 1));
        assert!(bucket.ready(MS));
    }

    #[test]
    fn a_large_request_goes_into_debt_and_the_next_waits_for_it() {
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 1000,
                burst: 1,
            },
            0,
        );
        assert!(bucket.ready(0));
        bucket.charge(100);
        assert!(!bucket.ready(99 * MS));
        assert_eq!(bucket.ready_at(99 * MS), 100 * MS);
    }

    #[test]
    fn an_idle_bucket_saves_at_most_its_burst() {
        let mut bucket = TokenBucket::new(
            Rate {
                per_sec: 1000,
                burst: 5,
            },
            0,
        );
        let mut passed = 0;
        while bucket.ready(3_600 * 1000 * MS) {
            bucket.charge(1);
            passed += 1;
        }
        assert_eq!(passed, 5);
    }

    #[test]
    fn the_default_burst_is_a_tenth_of_a_second() {
        assert_eq!(Rate::new(0), None);
        assert_eq!(Rate::new(5000).unwrap().burst, 500);
        assert_eq!(Rate::new(3).unwrap().burst, 1);
    }
}
