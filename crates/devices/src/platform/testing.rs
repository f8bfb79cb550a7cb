//! Test doubles shared by the platform device tests: recording exit sink and IRQ line, and a
//! random-access fuzz loop driven by a xorshift generator (no dependency, reproducible).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sluice_bus::irq::IrqLine;
use sluice_bus::BusDevice;

use crate::{ExitSink, GuestExit};

/// Records every exit request.
#[derive(Default)]
pub struct RecordingExitSink {
    exits: Mutex<Vec<GuestExit>>,
}

impl RecordingExitSink {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn exits(&self) -> Vec<GuestExit> {
        self.exits.lock().unwrap().clone()
    }
}

impl ExitSink for RecordingExitSink {
    fn request_exit(&self, why: GuestExit) {
        self.exits.lock().unwrap().push(why);
    }
}

/// Counts triggers.
#[derive(Default)]
pub struct RecordingIrq {
    count: AtomicUsize,
}

impl RecordingIrq {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl IrqLine for RecordingIrq {
    fn trigger(&self) -> io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Marsaglia's xorshift64: enough randomness for access fuzzing, reproducible from the seed.
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Issues `rounds` random reads and writes of width 1..=8 at random offsets in `0..len` (and a
/// little beyond, as a buggy bus might) to `device`. Passing means no panic.
pub fn fuzz_device(device: &mut dyn BusDevice, base: u64, len: u64, rounds: usize) {
    let mut rng = XorShift::new(0x5eed_0f51_u64 ^ len);
    for _ in 0..rounds {
        let word = rng.next();
        let offset = word % (len + 2);
        let width = (word >> 8) as usize % 8 + 1;
        let value = rng.next().to_le_bytes();
        if (word >> 16) & 1 == 0 {
            let mut data = [0u8; 8];
            device.read(base, offset, &mut data[..width]);
        } else {
            device.write(base, offset, &value[..width]);
        }
    }
}
