//! FADT (signature "FACP") and FACS: the fixed hardware of a PC-compatible sluice guest.
//!
//! sluice is not hardware-reduced: it has a PM1a event/control block, a PM timer and an SCI, all
//! in the PM block device at `layout::PM_BLOCK_PORT`. The guest is always in ACPI mode, so
//! SMI_CMD is 0 and the PM device must report SCI_EN set in PM1a_CNT. Built with
//! `acpi_tables::fadt::FADTBuilder`; its public fields cover what its setters do not.

use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};

use super::{OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// IAPC_BOOT_ARCH bits (ACPI 6.5, table 5.11).
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;

/// PM1 event block: 16-bit status + 16-bit enable.
pub const PM1_EVT_LEN: u8 = 4;
/// PM1 control block: one 16-bit register.
pub const PM1_CNT_LEN: u8 = 2;
/// PM timer: one 32-bit register.
pub const PM_TMR_LEN: u8 = 4;

/// Worst-case C2/C3 latencies above these limits tell the OS those states are unsupported.
const C2_UNSUPPORTED_LATENCY: u16 = 101;
const C3_UNSUPPORTED_LATENCY: u16 = 1001;

/// The FADT for a guest whose DSDT is at `dsdt_addr` and FACS at `facs_addr`.
pub fn build_fadt(dsdt_addr: u64, facs_addr: u32) -> FADT {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .firmware_ctrl_32(facs_addr)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        // No fixed-feature sleep button; the fixed power button stays (PWRBTN in PM1).
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    // Both pointers name the DSDT (old readers use DSDT); above 4 GiB only X_DSDT can.
    fadt.dsdt = u32::try_from(dsdt_addr).unwrap_or(0).into();
    fadt.x_dsdt = dsdt_addr.into();
    fadt.sci_int = u16::try_from(layout::SCI_IRQ).unwrap_or(0).into();
    fadt.smi_cmd = 0.into();
    set_pm_blocks(&mut fadt);
    fadt.p_lvl2_lat = C2_UNSUPPORTED_LATENCY.into();
    fadt.p_lvl3_lat = C3_UNSUPPORTED_LATENCY.into();
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).into();
    fadt.reset_reg = io_register(layout::ACPI_RESET_PORT, 8, AccessSize::ByteAccess);
    fadt.reset_value = layout::ACPI_RESET_VALUE;
    fadt.finalize()
}

/// The FACS: required by non-hardware-reduced platforms (global lock, waking vector).
pub fn build_facs() -> FACS {
    FACS::new()
}

/// The FACS must be 64-byte aligned.
pub const FACS_ALIGN: u64 = 64;

fn set_pm_blocks(fadt: &mut FADTBuilder) {
    fadt.pm1a_evt_blk = u32::from(layout::PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(layout::PM1A_CNT_PORT).into();
    fadt.pm_tmr_blk = u32::from(layout::PM_TMR_PORT).into();
    fadt.pm1_evt_len = PM1_EVT_LEN;
    fadt.pm1_cnt_len = PM1_CNT_LEN;
    fadt.pm_tmr_len = PM_TMR_LEN;
    fadt.x_pm1a_evt_blk = io_register(
        layout::PM1A_EVT_PORT,
        PM1_EVT_LEN * 8,
        AccessSize::WordAccess,
    );
    fadt.x_pm1a_cnt_blk = io_register(
        layout::PM1A_CNT_PORT,
        PM1_CNT_LEN * 8,
        AccessSize::WordAccess,
    );
    fadt.x_pm_tmr_blk = io_register(layout::PM_TMR_PORT, PM_TMR_LEN * 8, AccessSize::DwordAccess);
}

/// A generic address naming `bits` bits of system I/O space at `port`.
fn io_register(port: u16, bits: u8, access: AccessSize) -> GAS {
    GAS::new(AddressSpace::SystemIo, bits, 0, access, u64::from(port))
}
