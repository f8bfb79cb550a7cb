//! `Global<T>`: a value set once during boot and read afterwards. The kernel runs on one CPU
//! and interrupt handlers never touch these, so no locking is needed.

use core::cell::UnsafeCell;

pub struct Global<T>(UnsafeCell<Option<T>>);

// SAFETY: single CPU; written once at boot before any reader exists, never from interrupts.
unsafe impl<T> Sync for Global<T> {}

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
