//! Recording stand-ins for the interrupt traits, for tests of MSI-X devices (this crate's and
//! the device crates' through the `test-utils` feature): they keep what a device sent so a
//! test can assert on it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use sluice_bus::irq::{MsiMessage, MsiRoute, MsiRouter, MsiSink};

/// An `MsiSink` that records every message (the slow path, `KVM_SIGNAL_MSI` in a VM).
#[derive(Debug, Default)]
pub struct RecordingSink {
    messages: Mutex<Vec<MsiMessage>>,
}

impl MsiSink for RecordingSink {
    fn send(&self, msg: MsiMessage) -> io::Result<()> {
        self.messages.lock().unwrap().push(msg);
        Ok(())
    }
}

impl RecordingSink {
    /// The messages sent so far, oldest first.
    pub fn sent(&self) -> Vec<MsiMessage> {
        self.messages.lock().unwrap().clone()
    }
}

/// An `MsiRoute` (an irqfd route in a VM) that records its updates and triggers; its updates
/// can be made to fail (a full GSI table).
#[derive(Debug, Default)]
pub struct RecordingRoute {
    pub updates: Mutex<Vec<MsiMessage>>,
    pub triggers: AtomicU32,
    pub fail_updates: AtomicBool,
}

impl MsiRoute for RecordingRoute {
    fn update(&self, msg: MsiMessage) -> io::Result<()> {
        if self.fail_updates.load(Ordering::Relaxed) {
            return Err(io::Error::other("GSI table full"));
        }
        self.updates.lock().unwrap().push(msg);
        Ok(())
    }

    fn trigger(&self) -> io::Result<()> {
        self.triggers.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl RecordingRoute {
    /// How many times the route fired.
    pub fn trigger_count(&self) -> u32 {
        self.triggers.load(Ordering::SeqCst)
    }

    /// The messages the route was pointed at, oldest first.
    pub fn update_list(&self) -> Vec<MsiMessage> {
        self.updates.lock().unwrap().clone()
    }
}

/// An `MsiRouter` handing out [`RecordingRoute`]s, in allocation order.
#[derive(Debug, Default)]
pub struct RecordingRouter {
    routes: Mutex<Vec<Arc<RecordingRoute>>>,
}

impl MsiRouter for RecordingRouter {
    fn allocate(&self) -> io::Result<Arc<dyn MsiRoute>> {
        let route = Arc::new(RecordingRoute::default());
        self.routes.lock().unwrap().push(route.clone());
        Ok(route)
    }
}

impl RecordingRouter {
    /// The route allocated `n`-th (vector `n` for a device that allocates in vector order).
    pub fn route(&self, n: usize) -> Arc<RecordingRoute> {
        self.routes.lock().unwrap()[n].clone()
    }

    /// How many routes were allocated.
    pub fn allocated(&self) -> usize {
        self.routes.lock().unwrap().len()
    }
}
