//! Wiring of the platform devices and the PCI hierarchy onto the VM's buses, at the addresses
//! `layout` defines. Device models live in `sluice-devices` and `sluice-pci`; this module only
//! decides where they sit and how they interrupt.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use sluice_bus::{Bus, SharedDevice};
use sluice_devices::platform::acpi_pm::AcpiPmRegisters;
use sluice_devices::platform::i8042::I8042Registers;
use sluice_devices::platform::rtc::RtcRegisters;
use sluice_devices::platform::serial::SerialRegisters;
use sluice_devices::platform::{
    AcpiPmBlock, DebugExit, Rtc, Serial, SystemMonotonicClock, SystemWallClock, I8042,
};
use sluice_devices::tpm::{SavedTpm, TpmCrb};
use sluice_devices::ExitSink;
use sluice_pci::{
    AddressWindow, BarAllocator, IntxRouting, PciConfigIo, PciConfigMmio, PciRoot, PciTestDevice,
    DEFAULT_IO_WINDOW,
};

use crate::interrupts::{IrqfdLine, KvmIntxRouter, KvmMsi};
use crate::layout;
use crate::machine::{device_err, serial_output, VmConfig, VmError};
use crate::memory::GuestRam;
use crate::vcpu::ExitDispatch;

fn map(
    bus: &Bus,
    name: &'static str,
    dev: SharedDevice,
    base: u64,
    len: u64,
) -> Result<(), VmError> {
    bus.insert(name, dev, base, len)
        .map_err(|e| VmError::Device {
            what: name,
            reason: e.to_string(),
        })
}

fn irq_line(vm: &VmFd, gsi: u32, what: &'static str) -> Result<Arc<IrqfdLine>, VmError> {
    IrqfdLine::new(vm, gsi)
        .map(Arc::new)
        .map_err(|e| device_err(what, e))
}

/// The platform devices whose state a snapshot carries (the debug-exit port has none).
#[derive(Clone)]
pub struct PlatformDevices {
    com1: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
    pm: Arc<Mutex<AcpiPmBlock>>,
    /// The TPM (`--tpm`, crate::tpm), set once it is attached.
    pub(crate) tpm: Option<Arc<Mutex<TpmCrb>>>,
}

/// The platform devices' saved state (see crate::snapshot).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformState {
    pub com1: SerialRegisters,
    pub i8042: I8042Registers,
    pub rtc: RtcRegisters,
    pub pm: AcpiPmRegisters,
    /// The TPM's CRB registers and swtpm's state blobs (absent: the VM has no TPM).
    #[serde(default)]
    pub tpm: Option<SavedTpm>,
}

fn locked<T>(device: &Mutex<T>) -> MutexGuard<'_, T> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

impl PlatformDevices {
    /// Their state; the VM is paused. Fails only if the TPM's backend cannot hand its out.
    pub fn save(&self) -> Result<PlatformState, String> {
        let tpm = match &self.tpm {
            Some(tpm) => Some(locked(tpm).save_state()?),
            None => None,
        };
        Ok(PlatformState {
            com1: locked(&self.com1).save_registers(),
            i8042: locked(&self.i8042).save_registers(),
            rtc: locked(&self.rtc).save_registers(),
            pm: locked(&self.pm).save_registers(),
            tpm,
        })
    }

    /// Puts a saved state back into devices fresh from reset. A TPM in the state but not in
    /// the VM, or the other way round, is refused: the guest's ACPI tables (in the restored
    /// RAM) and its driver would disagree with the machine.
    pub fn restore(&self, state: &PlatformState) -> Result<(), String> {
        match (&self.tpm, &state.tpm) {
            (Some(tpm), Some(saved)) => locked(tpm).restore_state(saved)?,
            (None, None) => {}
            (Some(_), None) => {
                return Err("the saved VM had no TPM; restore it without --tpm".into())
            }
            (None, Some(_)) => return Err("the saved VM had a TPM; restore it with --tpm".into()),
        }
        locked(&self.com1).restore_registers(&state.com1)?;
        locked(&self.i8042).restore_registers(&state.i8042)?;
        locked(&self.rtc).restore_registers(&state.rtc)?;
        locked(&self.pm).restore_registers(&state.pm);
        Ok(())
    }
}

/// COM1, i8042, CMOS RTC, ACPI PM block and the debug-exit port, on the PIO bus.
pub fn attach_platform_devices(
    vm: &VmFd,
    dispatch: &ExitDispatch,
    config: &VmConfig,
    ram: &GuestRam,
) -> Result<PlatformDevices, VmError> {
    let exit: Arc<dyn ExitSink> = dispatch.control.clone();
    let pio = &dispatch.pio;

    let com1_irq = irq_line(vm, layout::COM1_IRQ, "com1 irq")?;
    let com1 = Arc::new(Mutex::new(Serial::new(
        serial_output(&config.serial)?,
        com1_irq,
    )));
    map(
        pio,
        "com1",
        com1.clone(),
        layout::COM1_PORT.into(),
        layout::SERIAL_PORT_LEN.into(),
    )?;

    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone(), None)));
    map(
        pio,
        "i8042",
        i8042.clone(),
        layout::I8042_DATA_PORT.into(),
        layout::I8042_PORT_LEN.into(),
    )?;

    let mut rtc = Rtc::new(Box::new(SystemWallClock));
    let below_4g = ram.size.min(layout::RAM_32BIT_END);
    rtc.set_memory_size(below_4g, ram.size - below_4g);
    let rtc = Arc::new(Mutex::new(rtc));
    map(
        pio,
        "rtc",
        rtc.clone(),
        layout::RTC_PORT.into(),
        layout::RTC_PORT_LEN.into(),
    )?;

    let pm = Arc::new(Mutex::new(AcpiPmBlock::new(
        exit.clone(),
        Some(irq_line(vm, layout::SCI_IRQ, "sci")?),
        Box::new(SystemMonotonicClock::new()),
    )));
    map(
        pio,
        "acpi-pm",
        pm.clone(),
        layout::PM_BLOCK_PORT.into(),
        layout::PM_BLOCK_LEN.into(),
    )?;

    let debug_exit = DebugExit::new(exit);
    map(
        pio,
        "debug-exit",
        Arc::new(Mutex::new(debug_exit)),
        layout::DEBUG_EXIT_PORT.into(),
        layout::DEBUG_EXIT_LEN.into(),
    )?;
    Ok(PlatformDevices {
        com1,
        i8042,
        rtc,
        pm,
        tpm: None,
    })
}

/// The PCI root complex: host bridge, config access through CF8/CFC and ECAM, and devices.
pub fn attach_pci(
    vm: &Arc<VmFd>,
    dispatch: &ExitDispatch,
    config: &VmConfig,
) -> Result<Arc<PciRoot>, VmError> {
    let root = Arc::new(PciRoot::new(
        dispatch.mmio.clone(),
        dispatch.pio.clone(),
        bar_allocator(config.memory)?,
    ));
    root.set_intx(Arc::new(KvmIntxRouter::new(vm.clone())), intx_routing()?);
    let config_io = PciConfigIo::new(root.clone());
    map(
        &dispatch.pio,
        "pci-config-io",
        Arc::new(Mutex::new(config_io)),
        layout::PCI_CONFIG_ADDRESS_PORT.into(),
        layout::PCI_CONFIG_PORT_LEN.into(),
    )?;
    let ecam = PciConfigMmio::new(root.clone(), u16::from(layout::PCI_ECAM_LAST_BUS) + 1);
    let ecam_len = ecam.window_len();
    map(
        &dispatch.mmio,
        "pci-ecam",
        Arc::new(Mutex::new(ecam)),
        layout::PCI_ECAM_START,
        ecam_len,
    )?;
    if config.test_device {
        let msi = Arc::new(KvmMsi::new(vm.clone()));
        let dev = PciTestDevice::new(msi).map_err(|e| device_err("pci-test", e))?;
        let address = root
            .add_device(Arc::new(Mutex::new(dev)))
            .map_err(|e| device_err("pci-test", e))?;
        tracing::info!("PCI test device at {address:?}");
    }
    Ok(root)
}

/// The ACPI GED's interrupt: hot-plug events (crate::hotplug).
pub(crate) fn hotplug_irq(vm: &VmFd) -> Result<Arc<dyn sluice_bus::irq::IrqLine>, VmError> {
    Ok(irq_line(vm, layout::HOTPLUG_GED_IRQ, "hotplug ged")?)
}

/// The PCI hot-plug register block on the PIO bus.
pub(crate) fn attach_hotplug_port(
    dispatch: &ExitDispatch,
    hotplug: &Arc<crate::hotplug::Hotplug>,
) -> Result<(), VmError> {
    map(
        &dispatch.pio,
        "pci-hotplug",
        Arc::new(Mutex::new(hotplug.port())),
        layout::HOTPLUG_PORT.into(),
        layout::HOTPLUG_LEN,
    )
}

/// INTx pins on the IOAPIC inputs the layout reserves for PCI (the DSDT's `_PRT` agrees).
pub fn intx_routing() -> Result<IntxRouting, VmError> {
    IntxRouting::new(layout::PCI_INTX_FIRST_GSI, layout::PCI_INTX_GSIS)
        .map_err(|e| device_err("pci intx", e))
}

fn bar_allocator(ram_size: u64) -> Result<BarAllocator, VmError> {
    let window =
        |start, size| AddressWindow::new(start, size).map_err(|e| device_err("pci windows", e));
    BarAllocator::new(
        window(layout::MMIO32_START, layout::MMIO32_SIZE)?,
        window(layout::mmio64_start(ram_size), layout::MMIO64_SIZE)?,
        window(DEFAULT_IO_WINDOW.0, DEFAULT_IO_WINDOW.1)?,
    )
    .map_err(|e| device_err("pci windows", e))
}
