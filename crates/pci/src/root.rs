//! The root complex: segment 0, bus 0, a host bridge at 00:00.0 and up to 31 single-function
//! devices. It owns the BAR mappings on the MMIO and PIO buses and keeps them in step with what
//! the guest programs (BAR addresses, memory/IO decode in the command register).
//!
//! Locking: the slot table is behind an `RwLock` held only to find a function. Each function has
//! a mapping lock, taken before the device lock on config writes; BAR accesses from the buses take
//! only the device lock, and devices never call back into the root, so there is no lock cycle.
//! Bus changes (`insert`/`remove`/`relocate`) are safe from inside a config access because
//! `sluice_bus::Bus` drops its range lock before calling a device.
//!
//! BAR policy: after every config write each BAR's mapping is brought to the programmed address
//! if its decode bit is on, and removed if it is off. A BAR holding the all-ones sizing probe is
//! left where it is. A target the bus refuses (overlap, outside the port space) is logged and the
//! old mapping kept; the move is retried on later config writes. A 64-bit BAR written one dword
//! at a time with decode on passes through the mixed address in between, as on hardware.

use std::sync::{Arc, Mutex, PoisonError, RwLock};

use sluice_bus::irq::{LevelIrqLine, LevelIrqRouter};
use sluice_bus::{Bus, BusDevice, SharedDevice};

use crate::bar::{BarAllocator, BarSpec};
use crate::config::{
    ConfigSpace, PciIds, COMMAND, COMMAND_IO_SPACE, COMMAND_MEMORY_SPACE, CONFIG_SPACE_SIZE,
    INTERRUPT_LINE, NUM_BARS,
};
use crate::device::{PciAddress, PciDevice, SharedPciDevice, DEVICES_PER_BUS};
use crate::intx::{IntxRouting, PciIntx};
use crate::PciError;

/// Host bridge identity: Red Hat's generic PCIe host bridge IDs, which Linux binds no driver to.
pub const HOST_BRIDGE_VENDOR_ID: u16 = 0x1b36;
pub const HOST_BRIDGE_DEVICE_ID: u16 = 0x0008;
/// Class 06 (bridge), subclass 00 (host bridge).
const HOST_BRIDGE_CLASS: u32 = 0x06_0000;
/// The only bus this root decodes.
const ROOT_BUS: u8 = 0;

/// The host bridge function at 00:00.0: identity only, no BARs.
struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    fn new() -> Self {
        let ids = PciIds {
            vendor_id: HOST_BRIDGE_VENDOR_ID,
            device_id: HOST_BRIDGE_DEVICE_ID,
            class_code: HOST_BRIDGE_CLASS,
            ..PciIds::default()
        };
        Self {
            config: ConfigSpace::new(&ids),
        }
    }
}

impl PciDevice for HostBridge {
    fn name(&self) -> &str {
        "host-bridge"
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// Forwards bus accesses in one BAR's range to the device with the BAR index.
struct BarWindow {
    device: SharedPciDevice,
    bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        device.bar_read(self.bar, offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        device.bar_write(self.bar, offset, data);
    }
}

/// Where one BAR is mapped, and the bus entry that maps it.
struct BarMapping {
    spec: BarSpec,
    window: SharedDevice,
    mapped_at: Option<u64>,
    /// The address the allocator gave it at add time.
    assigned: u64,
    /// The last target the bus refused, so a guest retrying it does not flood the log.
    refused: Option<Option<u64>>,
}

/// A function on the root bus.
struct PciFunction {
    address: PciAddress,
    /// Exit counters on the buses are grouped under this name.
    name: String,
    device: SharedPciDevice,
    mappings: Mutex<[Option<BarMapping>; NUM_BARS]>,
}

/// A BAR whose mapping changed, to report to the device.
struct BarMove {
    bar: usize,
    old: Option<u64>,
    new: Option<u64>,
}

/// Segment 0, bus 0.
pub struct PciRoot {
    slots: RwLock<Vec<Option<Arc<PciFunction>>>>,
    allocator: Mutex<BarAllocator>,
    mmio_bus: Arc<Bus>,
    pio_bus: Arc<Bus>,
    /// Where INTx pins go (none: pins stay unconnected, interrupt line reads "unknown").
    intx: Mutex<Option<(Arc<dyn LevelIrqRouter>, IntxRouting)>>,
}

/// A device's INTx pin and the line the root connected for it (given to the pin once the
/// device's BARs are mapped).
type PendingIntx = Option<(Arc<PciIntx>, Arc<dyn LevelIrqLine>)>;

impl PciRoot {
    /// A root with the host bridge at 00:00.0; BARs are placed by `allocator` and mapped on
    /// `mmio_bus` / `pio_bus`.
    pub fn new(mmio_bus: Arc<Bus>, pio_bus: Arc<Bus>, allocator: BarAllocator) -> Self {
        let mut slots: Vec<Option<Arc<PciFunction>>> = vec![None; DEVICES_PER_BUS.into()];
        let bridge: SharedPciDevice = Arc::new(Mutex::new(HostBridge::new()));
        slots[0] = Some(Arc::new(PciFunction {
            address: PciAddress {
                bus: ROOT_BUS,
                device: 0,
                function: 0,
            },
            name: "00:00.0 host-bridge".into(),
            device: bridge,
            mappings: Mutex::new(Default::default()),
        }));
        Self {
            slots: RwLock::new(slots),
            allocator: Mutex::new(allocator),
            mmio_bus,
            pio_bus,
            intx: Mutex::new(None),
        }
    }

    /// Connects the INTx pins of devices added from now on through `router`, at the GSIs
    /// `routing` assigns.
    pub fn set_intx(&self, router: Arc<dyn LevelIrqRouter>, routing: IntxRouting) {
        *self.intx.lock().unwrap_or_else(|e| e.into_inner()) = Some((router, routing));
    }

    /// The INTx routing in use, if any (the DSDT's `_PRT` is built from the same value).
    pub fn intx_routing(&self) -> Option<IntxRouting> {
        let intx = self.intx.lock().unwrap_or_else(|e| e.into_inner());
        intx.as_ref().map(|(_, routing)| *routing)
    }

    /// Connects `device`'s INTx pin (if it has one and a router is set) and writes the GSI into
    /// its interrupt line register, as firmware would.
    fn route_intx(&self, slot: u8, device: &mut dyn PciDevice) -> Result<PendingIntx, PciError> {
        let Some(pin) = device.intx() else {
            return Ok(None);
        };
        let intx = self.intx.lock().unwrap_or_else(|e| e.into_inner());
        let Some((router, routing)) = intx.as_ref() else {
            return Ok(None);
        };
        let gsi = routing.gsi(slot, pin.pin());
        let line = router.connect(gsi).map_err(|e| PciError::IntxConnect {
            gsi,
            reason: e.to_string(),
        })?;
        // IntxRouting keeps GSIs below 255.
        device.config_mut().set_u8(INTERRUPT_LINE, gsi as u8);
        Ok(Some((pin, line)))
    }

    /// Places `device` at the next free slot (function 0), assigns its BAR addresses, enables
    /// decode for the BAR kinds it has (as firmware would) and maps the BARs. On error nothing is
    /// added, allocated or mapped.
    pub fn add_device(&self, device: SharedPciDevice) -> Result<PciAddress, PciError> {
        self.add_device_with(|_| Ok::<_, PciError>(device))
    }

    /// As [`Self::add_device`], for a device that needs its address to be built (its requester
    /// id picks its DMA space): `build` gets the address the device will have. Nothing is
    /// added if `build` fails.
    pub fn add_device_with<E, F>(&self, build: F) -> Result<PciAddress, E>
    where
        E: From<PciError>,
        F: FnOnce(PciAddress) -> Result<SharedPciDevice, E>,
    {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .iter()
            .position(Option::is_none)
            .ok_or(PciError::NoFreeSlot)?;
        let address = PciAddress::new(ROOT_BUS, slot as u8, 0)?;
        let device = build(address)?;
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        let mut trial = allocator.clone();
        let (name, mut mappings, intx) = {
            let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
            let name = format!("{address} {}", dev.name());
            let mappings = Self::assign_bars(&mut trial, &mut *dev, &device)?;
            let intx = self.route_intx(address.device, &mut *dev)?;
            (name, mappings, intx)
        };
        self.map_all(&name, &mut mappings)?;
        if let Some((pin, line)) = intx {
            pin.connect(line)?;
        }
        *allocator = trial;
        let moves: Vec<BarMove> = mappings
            .iter()
            .enumerate()
            .filter_map(|(bar, m)| {
                let new = m.as_ref()?.mapped_at;
                Some(BarMove {
                    bar,
                    old: None,
                    new,
                })
            })
            .collect();
        let function = Arc::new(PciFunction {
            address,
            name,
            device,
            mappings: Mutex::new(mappings),
        });
        Self::report_moves(&function, &moves);
        slots[slot] = Some(function);
        tracing::info!("pci: {address} added");
        Ok(address)
    }

    /// Gives every BAR an address from `allocator` and turns decode on; returns the (not yet
    /// mapped) bus windows.
    fn assign_bars(
        allocator: &mut BarAllocator,
        device: &mut dyn PciDevice,
        shared: &SharedPciDevice,
    ) -> Result<[Option<BarMapping>; NUM_BARS], PciError> {
        let mut mappings: [Option<BarMapping>; NUM_BARS] = Default::default();
        let config = device.config_mut();
        let bars: Vec<(usize, BarSpec)> = config.bars().collect();
        let mut command = config.command();
        for (bar, spec) in bars {
            let base = allocator.allocate(&spec)?;
            config.set_bar_address(bar, base)?;
            command |= if spec.is_io() {
                COMMAND_IO_SPACE
            } else {
                COMMAND_MEMORY_SPACE
            };
            let window: SharedDevice = Arc::new(Mutex::new(BarWindow {
                device: shared.clone(),
                bar,
            }));
            mappings[bar] = Some(BarMapping {
                spec,
                window,
                mapped_at: None,
                assigned: base,
                refused: None,
            });
        }
        config.set_u16(COMMAND, command);
        Ok(mappings)
    }

    /// Maps every BAR at its assigned address, undoing all of them if one fails.
    fn map_all(
        &self,
        name: &str,
        mappings: &mut [Option<BarMapping>; NUM_BARS],
    ) -> Result<(), PciError> {
        for index in 0..NUM_BARS {
            let Some(mapping) = mappings[index].as_mut() else {
                continue;
            };
            if let Err(e) = self.apply(name, mapping, Some(mapping.assigned)) {
                for mapping in mappings.iter_mut().flatten() {
                    if mapping.mapped_at.is_some() {
                        let _ = self.apply(name, mapping, None);
                        mapping.mapped_at = None;
                    }
                }
                return Err(e);
            }
            mapping.mapped_at = Some(mapping.assigned);
        }
        Ok(())
    }

    fn function(&self, address: PciAddress) -> Option<Arc<PciFunction>> {
        if address.bus != ROOT_BUS || address.function != 0 {
            return None;
        }
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.get(usize::from(address.device))?.clone()
    }

    /// The saved state of every function but the host bridge (see
    /// [`PciDevice::save_state`]), by address; fails naming the first that cannot save.
    pub fn save_states(&self) -> Result<Vec<(PciAddress, serde_json::Value)>, String> {
        let functions: Vec<Arc<PciFunction>> = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots.iter().flatten().skip(1).cloned().collect()
        };
        functions
            .iter()
            .map(|function| {
                let mut device = function.device.lock().unwrap_or_else(|e| e.into_inner());
                match device.save_state() {
                    Some(Ok(state)) => Ok((function.address, state)),
                    Some(Err(e)) => Err(format!("{}: {e}", function.name)),
                    None => Err(format!("{} cannot save its state", function.name)),
                }
            })
            .collect()
    }

    /// Every function takes up the work it stopped to save its state (the VM runs on here).
    pub fn resume_after_save(&self) {
        let functions: Vec<Arc<PciFunction>> = {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            slots.iter().flatten().skip(1).cloned().collect()
        };
        for function in functions {
            function
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .resume_after_save();
        }
    }

    /// Puts back saved states (from [`PciRoot::save_states`] of a bus built the same way) and
    /// maps the BARs where the saved registers place them.
    /// Refused before anything is restored when the functions here (host bridge aside) are not
    /// those `states` was saved from, address for address: the destination of a migration or
    /// a restore must have the source's devices as they are now (a device hot-unplugged at
    /// the source is not given, one hot-plugged there is).
    pub fn restore_states(&self, states: &[(PciAddress, serde_json::Value)]) -> Result<(), String> {
        self.check_same_functions(states)?;
        for (address, state) in states {
            let function = self
                .function(*address)
                .ok_or_else(|| format!("no function at {address} to restore"))?;
            let mut mappings = function.mappings.lock().unwrap_or_else(|e| e.into_inner());
            function
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(state)
                .map_err(|e| format!("{}: {e}", function.name))?;
            let moves = self.sync_mappings(&function, &mut mappings);
            Self::report_moves(&function, &moves);
        }
        Ok(())
    }

    /// The functions here, address for address, are those `states` holds.
    fn check_same_functions(
        &self,
        states: &[(PciAddress, serde_json::Value)],
    ) -> Result<(), String> {
        let here = self.functions();
        let missing: Vec<String> = states
            .iter()
            .filter(|(address, _)| !here.iter().any(|(a, _)| a == address))
            .map(|(address, _)| address.to_string())
            .collect();
        let extra: Vec<String> = here
            .iter()
            .filter(|(address, _)| !states.iter().any(|(a, _)| a == address))
            .map(|(address, name)| format!("{address} ({name})"))
            .collect();
        if missing.is_empty() && extra.is_empty() {
            return Ok(());
        }
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        Err(format!(
            "the PCI devices here are not those saved: saved but missing here: {}; here but not \
             saved (removed at the source?): {} — start with the source's current devices",
            list(&missing),
            list(&extra)
        ))
    }

    /// Takes the function at `address` off the bus (hot-unplug): config accesses to it read
    /// all ones from now on, its BARs are unmapped from the buses (the device hears
    /// `bar_moved(.., None)` and drops its ioeventfds and memory slots) and the root forgets it.
    /// The device is returned for the caller to drop (which stops its workers). The host
    /// bridge cannot be removed. BAR address space is not given back to the allocator: a
    /// later device gets fresh addresses (the windows are large; the guest may move them).
    pub fn remove_device(&self, address: PciAddress) -> Result<SharedPciDevice, PciError> {
        let function = {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let slot = usize::from(address.device);
            let removable = address.bus == ROOT_BUS && address.function == 0 && slot != 0;
            match slots.get_mut(slot).filter(|_| removable) {
                Some(entry) if entry.is_some() => entry.take(),
                _ => None,
            }
        }
        .ok_or(PciError::NoDevice(address))?;
        let mut mappings = function.mappings.lock().unwrap_or_else(|e| e.into_inner());
        let mut moves = Vec::new();
        for (bar, mapping) in mappings.iter_mut().enumerate() {
            let Some(mapping) = mapping else { continue };
            let old = mapping.mapped_at;
            if old.is_none() {
                continue;
            }
            if let Err(e) = self.apply(&function.name, mapping, None) {
                tracing::warn!("pci {address}: unmapping BAR {bar} at removal: {e}");
            }
            mapping.mapped_at = None;
            moves.push(BarMove {
                bar,
                old,
                new: None,
            });
        }
        drop(mappings);
        Self::report_moves(&function, &moves);
        tracing::info!("pci: {address} removed");
        Ok(function.device.clone())
    }

    /// Every function but the host bridge: address and device name.
    pub fn functions(&self) -> Vec<(PciAddress, String)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .flatten()
            .skip(1)
            .map(|f| {
                let device = f.device.lock().unwrap_or_else(|e| e.into_inner());
                (f.address, device.name().to_string())
            })
            .collect()
    }

    /// Addresses of all functions on the bus (host bridge first).
    pub fn devices(&self) -> Vec<PciAddress> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().flatten().map(|f| f.address).collect()
    }

    /// Where BAR `bar` of the function at `address` is mapped right now, if anywhere.
    pub fn bar_mapping(&self, address: PciAddress, bar: usize) -> Option<u64> {
        let function = self.function(address)?;
        let mappings = function.mappings.lock().unwrap_or_else(|e| e.into_inner());
        mappings.get(bar)?.as_ref()?.mapped_at
    }

    /// Guest config read; missing functions and out-of-range registers read as all ones.
    pub fn config_read(&self, address: PciAddress, register: usize, data: &mut [u8]) {
        let in_range = register
            .checked_add(data.len())
            .is_some_and(|end| end <= CONFIG_SPACE_SIZE);
        match self.function(address) {
            Some(function) if in_range => {
                let mut device = function.device.lock().unwrap_or_else(|e| e.into_inner());
                device.config_read(register, data);
            }
            _ => data.fill(0xff),
        }
    }

    /// Guest config write; then moves any BAR whose programmed address or decode changed.
    pub fn config_write(&self, address: PciAddress, register: usize, data: &[u8]) {
        let in_range = register
            .checked_add(data.len())
            .is_some_and(|end| end <= CONFIG_SPACE_SIZE);
        let Some(function) = self.function(address).filter(|_| in_range) else {
            return;
        };
        let mut mappings = function.mappings.lock().unwrap_or_else(|e| e.into_inner());
        function
            .device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .config_write(register, data);
        let moves = self.sync_mappings(&function, &mut mappings);
        Self::report_moves(&function, &moves);
    }

    /// Brings the bus mappings in line with the device's BAR registers and command register.
    /// A mapping that cannot be applied (overlap, bad address) is logged and left as it was.
    fn sync_mappings(
        &self,
        function: &PciFunction,
        mappings: &mut [Option<BarMapping>; NUM_BARS],
    ) -> Vec<BarMove> {
        let wanted = {
            let device = function.device.lock().unwrap_or_else(|e| e.into_inner());
            Self::wanted_addresses(device.config(), mappings)
        };
        let mut moves = Vec::new();
        for (bar, mapping) in mappings.iter_mut().enumerate() {
            let Some(mapping) = mapping else { continue };
            let Some(new) = wanted[bar] else { continue };
            let old = mapping.mapped_at;
            if new == old {
                continue;
            }
            match self.apply(&function.name, mapping, new) {
                Ok(()) => {
                    mapping.mapped_at = new;
                    mapping.refused = None;
                    moves.push(BarMove { bar, old, new });
                }
                Err(e) => {
                    if mapping.refused != Some(new) {
                        tracing::warn!(
                            "pci {}: BAR {bar} cannot move from {old:x?} to {new:x?}: {e}; kept",
                            function.address
                        );
                    }
                    mapping.refused = Some(new);
                }
            }
        }
        moves
    }

    /// Per BAR: `None` to leave the mapping alone (being sized), `Some(target)` otherwise.
    fn wanted_addresses(
        config: &ConfigSpace,
        mappings: &[Option<BarMapping>; NUM_BARS],
    ) -> [Option<Option<u64>>; NUM_BARS] {
        let mut wanted = [None; NUM_BARS];
        for (bar, mapping) in mappings.iter().enumerate() {
            let Some(mapping) = mapping else { continue };
            if config.bar_is_probing(bar) {
                continue;
            }
            let target = config
                .bar_address(bar)
                .filter(|_| config.decodes(&mapping.spec));
            wanted[bar] = Some(target);
        }
        wanted
    }

    fn apply(&self, name: &str, mapping: &BarMapping, new: Option<u64>) -> Result<(), PciError> {
        let bus = if mapping.spec.is_io() {
            &self.pio_bus
        } else {
            &self.mmio_bus
        };
        if let Some(base) = new {
            if !mapping.spec.can_decode_at(base) {
                return Err(PciError::MisalignedBarAddress {
                    address: base,
                    size: mapping.spec.size,
                });
            }
        }
        match (mapping.mapped_at, new) {
            (Some(old), Some(new)) => bus.relocate(old, new)?,
            (Some(old), None) => {
                bus.remove(old)?;
            }
            (None, Some(new)) => {
                bus.insert(name, mapping.window.clone(), new, mapping.spec.size)?
            }
            (None, None) => {}
        }
        Ok(())
    }

    fn report_moves(function: &PciFunction, moves: &[BarMove]) {
        if moves.is_empty() {
            return;
        }
        let mut device = function.device.lock().unwrap_or_else(|e| e.into_inner());
        for m in moves {
            tracing::debug!(
                "pci {}: BAR {} {:x?} -> {:x?}",
                function.address,
                m.bar,
                m.old,
                m.new
            );
            device.bar_moved(m.bar, m.old, m.new);
        }
    }
}
