//! `Global<T>`: a value set once during boot and read afterwards; `SpinLock<T>`: a value that
//! more than one CPU may reach.

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, Ordering};

pub struct Global<T>(UnsafeCell<Option<T>>);

// SAFETY: written once by the BSP at boot, before any reader exists and before any AP starts
// (APs are started by workloads, long after boot); never from interrupts. Afterwards the value
// is only read, which any number of CPUs may do at once.
unsafe impl<T: Sync> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new() -> Self {
        Self(UnsafeCell::new(None))
    }

    /// Stores the value (boot code only, before any `get`).
    pub fn set(&self, value: T) {
        // SAFETY: see the type's Sync impl: no reference from `get` is alive during boot set-up.
        unsafe { *self.0.get() = Some(value) }
    }

    pub fn get(&self) -> Option<&T> {
        // SAFETY: after `set`, the value is only read.
        unsafe { (*self.0.get()).as_ref() }
    }
}

/// A test-and-set lock. Used where each CPU owns one entry (so it is never contended) and to
/// hand data between CPUs; never taken in interrupt handlers.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock gives one CPU at a time access to `value`, so it may be shared whenever the
// value may be sent between CPUs.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    pub const fn new(value: T) -> Self {
        Self {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    pub fn lock(&self) -> SpinGuard<'_, T> {
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            crate::arch::pause();
        }
        SpinGuard { lock: self }
    }

    pub fn into_inner(self) -> T {
        self.value.into_inner()
    }
}

pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while this CPU holds the lock.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as `deref`; `&mut self` makes this the only reference through the guard.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}
