//! Clock sources for the time-keeping devices, abstracted so tests can inject fixed time.
//!
//! * [`WallClock`]: UTC time since the Unix epoch (the RTC).
//! * [`MonotonicClock`]: time since an arbitrary fixed origin that never goes back (the ACPI PM
//!   timer).
//!
//! [`ManualClock`] implements both and is shared by clones, so a test keeps one handle to move
//! time while the device owns another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// UTC wall-clock time.
pub trait WallClock: Send {
    /// Time since 1970-01-01 00:00:00 UTC.
    fn since_epoch(&self) -> Duration;
}

/// A clock that never goes backwards.
pub trait MonotonicClock: Send {
    /// Time since this clock's (arbitrary, fixed) origin.
    fn elapsed(&self) -> Duration;
}

/// The host's real-time clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemWallClock;

impl WallClock for SystemWallClock {
    fn since_epoch(&self) -> Duration {
        // A host clock set before 1970 is reported as the epoch rather than failing the guest.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }
}

/// The host's monotonic clock, with its origin at construction.
#[derive(Debug, Clone, Copy)]
pub struct SystemMonotonicClock {
    origin: Instant,
}

impl SystemMonotonicClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for SystemMonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl MonotonicClock for SystemMonotonicClock {
    fn elapsed(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    nanos: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `now` (since the epoch for [`WallClock`], since origin for
    /// [`MonotonicClock`]).
    pub fn new(now: Duration) -> Self {
        let clock = Self::default();
        clock.set(now);
        clock
    }

    /// Sets the time, saturating at about 584 years.
    pub fn set(&self, now: Duration) {
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.store(nanos, Ordering::Relaxed);
    }

    /// Moves time forward by `by`, saturating.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_nanos()).unwrap_or(u64::MAX);
        // fetch_update cannot fail with a closure that always returns Some.
        let _ = self
            .nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(by))
            });
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

impl WallClock for ManualClock {
    fn since_epoch(&self) -> Duration {
        self.now()
    }
}

impl MonotonicClock for ManualClock {
    fn elapsed(&self) -> Duration {
        self.now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_clones_share_time() {
        let clock = ManualClock::new(Duration::from_secs(10));
        let handle = clock.clone();

        handle.advance(Duration::from_millis(1500));

        assert_eq!(clock.since_epoch(), Duration::from_millis(11_500));
        assert_eq!(clock.elapsed(), Duration::from_millis(11_500));
    }

    #[test]
    fn manual_clock_saturates_instead_of_wrapping() {
        let clock = ManualClock::new(Duration::from_secs(1));

        clock.advance(Duration::MAX);

        assert_eq!(clock.elapsed(), Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn system_clocks_read_plausible_values() {
        let wall = SystemWallClock.since_epoch();
        let mono = SystemMonotonicClock::new();
        let first = mono.elapsed();

        let second = mono.elapsed();

        // 2020-01-01 as a floor: the host clock is set.
        assert!(wall > Duration::from_secs(1_577_836_800));
        assert!(second >= first);
    }
}
