//! `PciTestDevice`: a small PCI function for proving enumeration, BAR decode and MSI-X delivery
//! end to end (the guest kit's boot tests drive it).
//!
//! Identity: vendor 0x1234, device 0x5c1e, class 0xff0000 (unassigned), revision 1, INTA.
//!
//! BAR0, 4 KiB 32-bit memory, registers (little endian, 32-bit accesses; 1/2/8-byte accesses
//! work on the scratch register, other registers need an aligned 4-byte access):
//!
//! | offset | name     | access | meaning                                                        |
//! |--------|----------|--------|----------------------------------------------------------------|
//! | 0x00   | SCRATCH  | rw     | any value; reads back what was written                         |
//! | 0x04   | DOORBELL | wo     | write a vector number: MSI-X vector is triggered (reads 0)     |
//! | 0x08   | COUNT    | ro     | doorbell writes that named a valid vector                      |
//! | 0x0c   | RESULT   | ro     | outcome of the last doorbell: 0 sent, 1 pending (masked),      |
//! |        |          |        | 2 MSI-X disabled, 3 bad vector, 4 delivery error               |
//! | 0x10   | INTX     | wo     | write nonzero cause bits: they are raised on INTA (level)      |
//! | 0x14   | INTX_ISR | ro     | pending INTx causes; the read clears them and deasserts INTA   |
//!
//! Everything else in BAR0 reads 0xffffffff and ignores writes.
//!
//! BAR1, 4 KiB 32-bit memory: MSI-X table (4 vectors) at 0x000, PBA at 0x800.
//! The MSI-X capability is the only capability (at 0x40).

use std::sync::Arc;

use sluice_bus::irq::MsiSink;
use sluice_bus::{read_le, write_le};

use crate::bar::BarSpec;
use crate::config::{ConfigSpace, PciIds};
use crate::device::PciDevice;
use crate::intx::{InterruptPin, PciIntx};
use crate::msix::{MsixCapability, MsixDelivery, MsixTable};
use crate::PciError;

pub const TEST_DEVICE_VENDOR_ID: u16 = 0x1234;
pub const TEST_DEVICE_DEVICE_ID: u16 = 0x5c1e;
const TEST_DEVICE_CLASS: u32 = 0xff_0000;

const REGISTER_BAR: usize = 0;
const MSIX_BAR: usize = 1;
const BAR_SIZE: u64 = 0x1000;
const MSIX_VECTORS: u16 = 4;
const MSIX_TABLE_OFFSET: u32 = 0;
const MSIX_PBA_OFFSET: u32 = 0x800;

const SCRATCH: u64 = 0x00;
const DOORBELL: u64 = 0x04;
const COUNT: u64 = 0x08;
const RESULT: u64 = 0x0c;
const INTX: u64 = 0x10;
const INTX_ISR: u64 = 0x14;

const RESULT_SENT: u32 = 0;
const RESULT_PENDING: u32 = 1;
const RESULT_DISABLED: u32 = 2;
const RESULT_BAD_VECTOR: u32 = 3;
const RESULT_DELIVERY_ERROR: u32 = 4;

/// The test device model; see the module documentation for its register map.
pub struct PciTestDevice {
    config: ConfigSpace,
    msix_capability: usize,
    msix: MsixTable,
    intx: Arc<PciIntx>,
    scratch: u64,
    triggers: u32,
    last_result: u32,
}

impl PciTestDevice {
    /// A test device signalling through `sink`.
    pub fn new(sink: Arc<dyn MsiSink>) -> Result<Self, PciError> {
        let ids = PciIds {
            vendor_id: TEST_DEVICE_VENDOR_ID,
            device_id: TEST_DEVICE_DEVICE_ID,
            class_code: TEST_DEVICE_CLASS,
            revision_id: 1,
            subsystem_vendor_id: TEST_DEVICE_VENDOR_ID,
            subsystem_id: TEST_DEVICE_DEVICE_ID,
        };
        let mut config = ConfigSpace::new(&ids);
        config.add_bar(REGISTER_BAR, BarSpec::mem32(BAR_SIZE))?;
        config.add_bar(MSIX_BAR, BarSpec::mem32(BAR_SIZE))?;
        let capability = MsixCapability {
            vectors: MSIX_VECTORS,
            table_bar: MSIX_BAR as u8,
            table_offset: MSIX_TABLE_OFFSET,
            pba_bar: MSIX_BAR as u8,
            pba_offset: MSIX_PBA_OFFSET,
        };
        let msix_capability = capability.install(&mut config)?;
        let intx = Arc::new(PciIntx::new(InterruptPin::IntA));
        intx.install(&mut config);
        let msix =
            MsixTable::new(MSIX_VECTORS, sink).map_err(|_| PciError::InvalidMsix("table size"))?;
        Ok(Self {
            config,
            msix_capability,
            msix,
            intx,
            scratch: 0,
            triggers: 0,
            last_result: RESULT_SENT,
        })
    }

    /// Doorbell writes that named a valid vector.
    pub fn trigger_count(&self) -> u32 {
        self.triggers
    }

    pub fn msix(&self) -> &MsixTable {
        &self.msix
    }

    fn ring_doorbell(&mut self, value: u64) {
        let Ok(vector) = u16::try_from(value) else {
            self.last_result = RESULT_BAD_VECTOR;
            return;
        };
        self.last_result = match self.msix.trigger(vector) {
            Ok(delivery) => {
                self.triggers = self.triggers.wrapping_add(1);
                match delivery {
                    MsixDelivery::Sent => RESULT_SENT,
                    MsixDelivery::Pending => RESULT_PENDING,
                    MsixDelivery::Disabled => RESULT_DISABLED,
                }
            }
            Err(crate::MsixError::Sink(e)) => {
                tracing::warn!("pci-test: MSI-X delivery failed: {e}");
                self.triggers = self.triggers.wrapping_add(1);
                RESULT_DELIVERY_ERROR
            }
            Err(e) => {
                tracing::debug!("pci-test: doorbell refused: {e}");
                RESULT_BAD_VECTOR
            }
        };
    }

    fn register_read(&self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (INTX_ISR, 4) => self.intx.take().into(),
            (SCRATCH, 1 | 2 | 4 | 8) => self.scratch,
            (DOORBELL, 4) => 0,
            (COUNT, 4) => self.triggers.into(),
            (RESULT, 4) => self.last_result.into(),
            _ => u64::MAX,
        };
        write_le(data, value);
    }

    fn register_write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.len()) {
            (SCRATCH, len @ (1 | 2 | 4 | 8)) => {
                let keep = if len == 8 {
                    0
                } else {
                    !0u64 << (8 * len as u32)
                };
                self.scratch = (self.scratch & keep) | read_le(data);
            }
            (DOORBELL, 4) => self.ring_doorbell(read_le(data)),
            // A 4-byte access carries at most 32 bits.
            (INTX, 4) => self.intx.raise(read_le(data) as u32),
            _ => tracing::debug!("pci-test: ignored write at {offset:#x}"),
        }
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset < pba {
            self.msix
                .read_table(offset - u64::from(MSIX_TABLE_OFFSET), data);
        } else {
            self.msix.read_pba(offset - pba, data);
        }
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let pba = u64::from(MSIX_PBA_OFFSET);
        if offset < pba {
            self.msix
                .write_table(offset - u64::from(MSIX_TABLE_OFFSET), data);
        } else {
            self.msix.write_pba(offset - pba, data);
        }
    }
}

impl PciDevice for PciTestDevice {
    fn name(&self) -> &str {
        "pci-test"
    }

    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let control = MsixCapability::message_control(&self.config, self.msix_capability);
        self.msix.set_message_control(control);
        self.intx.config_written(&self.config);
        self.intx.set_msi_active(self.msix.is_enabled());
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
        self.intx.patch_status_read(offset, data);
    }

    fn intx(&self) -> Option<Arc<PciIntx>> {
        Some(self.intx.clone())
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match bar {
            REGISTER_BAR => self.register_read(offset, data),
            MSIX_BAR => self.msix_read(offset, data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match bar {
            REGISTER_BAR => self.register_write(offset, data),
            MSIX_BAR => self.msix_write(offset, data),
            _ => {}
        }
    }
}
