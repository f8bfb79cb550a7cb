//! How the guest reaches devices and how devices reach the guest.
//!
//! * [`Bus`] maps guest address ranges (port I/O or MMIO) to [`BusDevice`]s and counts the
//!   userspace exits each device causes, so every device's exit cost is measured.
//! * [`irq`] holds the traits devices use to interrupt the guest (pin lines and MSI), so device
//!   models never depend on KVM directly.
//!
//! Written by hand: rust-vmm's `vm-device` is dormant and has no per-device counters.

pub mod irq;

mod ioevent;
pub use ioevent::IoEventRegistrar;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// A device reachable through guest port I/O or MMIO.
///
/// `base` is the start of the range the access hit (a device may own several ranges, e.g. PCI
/// BARs) and `offset` is relative to it. Accesses are at most 8 bytes wide.
pub trait BusDevice: Send {
    /// Fills `data` with the value read. Unimplemented registers read as all ones.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Applies a guest write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from changing a bus's address map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("range {base:#x}+{len:#x} overlaps an existing device range")]
    Overlap { base: u64, len: u64 },
    #[error("range {base:#x}+{len:#x} is empty or wraps the address space")]
    InvalidRange { base: u64, len: u64 },
    #[error("no device range starts at {0:#x}")]
    NotFound(u64),
}

/// Per-device access counters, updated on every dispatched access.
#[derive(Default, Debug)]
pub struct ExitCounters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
}

impl ExitCounters {
    pub fn total(&self) -> u64 {
        self.reads.load(Ordering::Relaxed) + self.writes.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct Entry {
    len: u64,
    name: Arc<str>,
    device: SharedDevice,
    counters: Arc<ExitCounters>,
}

/// A snapshot of one device's exit counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceExits {
    pub name: String,
    pub reads: u64,
    pub writes: u64,
}

/// An address space (PIO or MMIO) dispatching accesses to devices by range.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
    /// Counters by device name, so a device owning several ranges reports one total.
    counters: Mutex<BTreeMap<Arc<str>, Arc<ExitCounters>>>,
    unhandled: ExitCounters,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        let mut list = f.debug_list();
        for (base, e) in ranges.iter() {
            list.entry(&format_args!("{}@{:#x}+{:#x}", e.name, base, e.len));
        }
        list.finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `[base, base+len)` to `device`; `name` groups exit counters.
    pub fn insert(
        &self,
        name: &str,
        device: SharedDevice,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::InvalidRange { base, len });
        }
        let mut ranges = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        if Self::overlaps(&ranges, base, len) {
            return Err(BusError::Overlap { base, len });
        }
        let name: Arc<str> = Arc::from(name);
        let counters = self
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.clone())
            .or_default()
            .clone();
        ranges.insert(
            base,
            Entry {
                len,
                name,
                device,
                counters,
            },
        );
        Ok(())
    }

    /// Unmaps the range starting at `base`, returning the device that was there.
    pub fn remove(&self, base: u64) -> Result<SharedDevice, BusError> {
        self.ranges
            .write()
            .unwrap()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Moves the range at `old_base` to `new_base` (a guest reprogramming a BAR).
    pub fn relocate(&self, old_base: u64, new_base: u64) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(PoisonError::into_inner);
        let entry = ranges
            .remove(&old_base)
            .ok_or(BusError::NotFound(old_base))?;
        let len = entry.len;
        let fits = new_base.checked_add(len - 1).is_some();
        if !fits || Self::overlaps(&ranges, new_base, len) {
            ranges.insert(old_base, entry);
            return Err(BusError::Overlap {
                base: new_base,
                len,
            });
        }
        ranges.insert(new_base, entry);
        Ok(())
    }

    fn overlaps(ranges: &BTreeMap<u64, Entry>, base: u64, len: u64) -> bool {
        let end = base + (len - 1);
        if let Some((b, e)) = ranges.range(..=end).next_back() {
            return *b + (e.len - 1) >= base;
        }
        false
    }

    fn find(&self, addr: u64) -> Option<(u64, Entry)> {
        let ranges = self.ranges.read().unwrap_or_else(PoisonError::into_inner);
        let (base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (*base, entry.clone()))
    }

    /// Dispatches a read. Returns false (and fills all ones) when no device claims `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((base, entry)) => {
                entry.counters.reads.fetch_add(1, Ordering::Relaxed);
                entry
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(base, addr - base, data);
                true
            }
            None => {
                self.unhandled.reads.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write. Returns false when no device claims `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((base, entry)) => {
                entry.counters.writes.fetch_add(1, Ordering::Relaxed);
                entry
                    .device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(base, addr - base, data);
                true
            }
            None => {
                self.unhandled.writes.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Exit counts per device name, plus `"<unhandled>"` for accesses no device claimed.
    pub fn exit_counts(&self) -> Vec<DeviceExits> {
        let counters = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<DeviceExits> = counters
            .iter()
            .map(|(name, c)| DeviceExits {
                name: name.to_string(),
                reads: c.reads.load(Ordering::Relaxed),
                writes: c.writes.load(Ordering::Relaxed),
            })
            .collect();
        out.push(DeviceExits {
            name: "<unhandled>".into(),
            reads: self.unhandled.reads.load(Ordering::Relaxed),
            writes: self.unhandled.writes.load(Ordering::Relaxed),
        });
        out
    }
}

/// Little-endian helpers for register models: read a value into an access of any width.
pub fn write_le(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&bytes[..n]);
}

/// Reads an access of 1..=8 bytes as a little-endian value.
pub fn read_le(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch {
        last: Option<(u64, u64, u64)>,
    }

    impl BusDevice for Scratch {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            write_le(data, base + offset);
        }
        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.last = Some((base, offset, read_le(data)));
        }
    }

    fn scratch() -> Arc<Mutex<Scratch>> {
        Arc::new(Mutex::new(Scratch { last: None }))
    }

    #[test]
    fn dispatches_by_range_with_relative_offset() {
        let bus = Bus::new();
        let dev = scratch();
        bus.insert("scratch", dev.clone(), 0x1000, 0x10).unwrap();

        let handled = bus.write(0x1004, &[0x34, 0x12]);

        assert!(handled);
        assert_eq!(dev.lock().unwrap().last, Some((0x1000, 4, 0x1234)));
    }

    #[test]
    fn unclaimed_reads_return_all_ones_and_are_counted() {
        let bus = Bus::new();
        bus.insert("scratch", scratch(), 0x1000, 0x10).unwrap();
        let mut data = [0u8; 4];

        let handled = bus.read(0x1010, &mut data);

        assert!(!handled);
        assert_eq!(data, [0xff; 4]);
        let unhandled = bus.exit_counts().pop().unwrap();
        assert_eq!(unhandled.reads, 1);
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let bus = Bus::new();
        bus.insert("a", scratch(), 0x1000, 0x10).unwrap();

        assert!(matches!(
            bus.insert("b", scratch(), 0xff8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("b", scratch(), 0x100f, 1),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert("b", scratch(), 0, 0),
            Err(BusError::InvalidRange { .. })
        ));
        assert!(matches!(
            bus.insert("b", scratch(), u64::MAX, 2),
            Err(BusError::InvalidRange { .. })
        ));
        bus.insert("b", scratch(), 0x1010, 0x10).unwrap();
    }

    #[test]
    fn relocate_moves_range_and_refuses_overlap() {
        let bus = Bus::new();
        bus.insert("a", scratch(), 0x1000, 0x10).unwrap();
        bus.insert("b", scratch(), 0x2000, 0x10).unwrap();

        assert!(bus.relocate(0x1000, 0x2008).is_err());
        bus.relocate(0x1000, 0x3000).unwrap();

        let mut data = [0u8; 8];
        assert!(!bus.read(0x1000, &mut data));
        assert!(bus.read(0x3008, &mut data));
        assert_eq!(read_le(&data), 0x3008);
    }

    #[test]
    fn counts_exits_per_device_name_across_ranges() {
        let bus = Bus::new();
        let dev = scratch();
        bus.insert("dev", dev.clone(), 0x1000, 0x10).unwrap();
        bus.insert("dev", dev, 0x2000, 0x10).unwrap();
        let mut data = [0u8; 1];

        bus.read(0x1000, &mut data);
        bus.write(0x2000, &data);
        bus.write(0x2001, &data);

        let counts = bus.exit_counts();
        let dev = counts.iter().find(|c| c.name == "dev").unwrap();
        assert_eq!((dev.reads, dev.writes), (1, 2));
    }
}
