//! MSI-X: the config-space capability ([`MsixCapability`]) and the vector table and pending bit
//! array a device exposes through a BAR ([`MsixTable`]).
//!
//! Table accesses must be 4 or 8 bytes, naturally aligned and inside the table; anything else
//! reads as all ones and writes are dropped. The PBA is read-only to the guest. A vector fires
//! through an [`MsiSink`] only when MSI-X is enabled and neither the function nor the vector is
//! masked; otherwise its pending bit is set and the message goes out when it is unmasked.

use std::io;
use std::sync::Arc;

use sluice_bus::irq::{MsiMessage, MsiSink};

use crate::config::ConfigSpace;
use crate::PciError;

pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Message control bit 15: MSI-X enable.
pub const MSIX_ENABLE: u16 = 1 << 15;
/// Message control bit 14: function mask.
pub const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// The table size field is 11 bits (N - 1).
pub const MSIX_MAX_VECTORS: u16 = 2048;
/// Bytes per table entry: address low, address high, data, vector control.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;

/// Offsets inside the capability.
const MESSAGE_CONTROL: usize = 2;
const TABLE_OFFSET_BIR: usize = 4;
/// The low three bits of the table/PBA offset registers hold the BAR indicator.
const BIR_MASK: u32 = 0x7;
/// Bits of message control the guest may write: enable and function mask (high byte).
const MESSAGE_CONTROL_WRITE_MASK: [u8; 2] = [0x00, 0xc0];
/// Vector control bit 0: the vector is masked.
const VECTOR_MASKED: u32 = 1;
/// Dword index of each field in a table entry.
const ENTRY_DWORDS: usize = 4;
const VECTOR_CONTROL_DWORD: usize = 3;

/// Errors from signalling a vector.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    #[error("the saved MSI-X table has another size")]
    RestoreMismatch,
    #[error("MSI-X vector {vector} out of range (table has {vectors})")]
    VectorOutOfRange { vector: u16, vectors: u16 },
    #[error("invalid MSI-X table size {0}")]
    InvalidTableSize(u16),
    #[error("delivering MSI failed: {0}")]
    Sink(#[from] io::Error),
}

/// What happened to a triggered vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsixDelivery {
    /// The message was sent.
    Sent,
    /// The vector or function is masked: its pending bit is set.
    Pending,
    /// MSI-X is disabled: nothing was sent or recorded.
    Disabled,
}

/// Layout of a device's MSI-X structures, to install into its config space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixCapability {
    pub vectors: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

impl MsixCapability {
    /// Bytes the table takes in its BAR.
    pub fn table_len(&self) -> u64 {
        u64::from(self.vectors) * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the PBA takes in its BAR (one bit per vector, in whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Adds the capability to `config` (whose BARs must already be declared) after checking the
    /// table and PBA fit their memory BARs without overlapping. Returns the capability offset.
    pub fn install(&self, config: &mut ConfigSpace) -> Result<usize, PciError> {
        self.validate(config)?;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&(self.vectors - 1).to_le_bytes());
        let table = self.table_offset | u32::from(self.table_bar);
        let pba = self.pba_offset | u32::from(self.pba_bar);
        body[2..6].copy_from_slice(&table.to_le_bytes());
        body[6..10].copy_from_slice(&pba.to_le_bytes());
        let offset = config.add_capability(MSIX_CAPABILITY_ID, &body)?;
        config.set_write_mask(offset + MESSAGE_CONTROL, &MESSAGE_CONTROL_WRITE_MASK)?;
        Ok(offset)
    }

    fn validate(&self, config: &ConfigSpace) -> Result<(), PciError> {
        if self.vectors == 0 || self.vectors > MSIX_MAX_VECTORS {
            return Err(PciError::InvalidMsix("table size must be 1..=2048"));
        }
        if (self.table_offset | self.pba_offset) & BIR_MASK != 0 {
            return Err(PciError::InvalidMsix("offsets must be 8-byte aligned"));
        }
        let table = Self::region(config, self.table_bar, self.table_offset, self.table_len())?;
        let pba = Self::region(config, self.pba_bar, self.pba_offset, self.pba_len())?;
        let overlap = table.0 == pba.0 && table.1 < pba.2 && pba.1 < table.2;
        if overlap {
            return Err(PciError::InvalidMsix("table and PBA overlap"));
        }
        Ok(())
    }

    /// `(bar, start, end)` of a structure, checked to lie in a declared memory BAR.
    fn region(
        config: &ConfigSpace,
        bar: u8,
        offset: u32,
        len: u64,
    ) -> Result<(u8, u64, u64), PciError> {
        let spec = config
            .bar(bar.into())
            .filter(|spec| !spec.is_io())
            .ok_or(PciError::InvalidMsix("structure BAR is not a memory BAR"))?;
        let start = u64::from(offset);
        let end = start + len;
        if end > spec.size {
            return Err(PciError::InvalidMsix("structure does not fit its BAR"));
        }
        Ok((bar, start, end))
    }

    /// The message control register of the capability at `cap_offset`.
    pub fn message_control(config: &ConfigSpace, cap_offset: usize) -> u16 {
        config.read_u16(cap_offset + MESSAGE_CONTROL)
    }

    /// Offset of the table offset/BIR register (for devices that decode config writes).
    pub fn table_register(cap_offset: usize) -> usize {
        cap_offset + TABLE_OFFSET_BIR
    }
}

/// What [`MsixTable::save`] keeps.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixTableState {
    entries: Vec<[u32; ENTRY_DWORDS]>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
}

/// MSI-X vector state: the table, the pending bits, enable and function mask.
pub struct MsixTable {
    /// Per vector: address low, address high, data, vector control.
    entries: Vec<[u32; ENTRY_DWORDS]>,
    pending: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    sink: Arc<dyn MsiSink>,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("vectors", &self.entries.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl MsixTable {
    /// A table of `vectors` entries, all masked, MSI-X disabled (the reset state).
    pub fn new(vectors: u16, sink: Arc<dyn MsiSink>) -> Result<Self, MsixError> {
        if vectors == 0 || vectors > MSIX_MAX_VECTORS {
            return Err(MsixError::InvalidTableSize(vectors));
        }
        let count = usize::from(vectors);
        Ok(Self {
            entries: vec![Self::reset_entry(); count],
            pending: vec![0; count.div_ceil(64)],
            enabled: false,
            function_masked: false,
            sink,
        })
    }

    /// The table's state for a snapshot.
    pub fn save(&self) -> MsixTableState {
        MsixTableState {
            entries: self.entries.clone(),
            pending: self.pending.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Puts back a state from [`MsixTable::save`] of a table of the same size (nothing is
    /// sent: pending vectors stay pending until unmasked, as they were).
    pub fn restore(&mut self, state: &MsixTableState) -> Result<(), MsixError> {
        if state.entries.len() != self.entries.len() || state.pending.len() != self.pending.len() {
            return Err(MsixError::RestoreMismatch);
        }
        self.entries.clone_from(&state.entries);
        self.pending.clone_from(&state.pending);
        self.enabled = state.enabled;
        self.function_masked = state.function_masked;
        Ok(())
    }

    fn reset_entry() -> [u32; ENTRY_DWORDS] {
        [0, 0, 0, VECTOR_MASKED]
    }

    /// Returns to the reset state (device reset).
    pub fn reset(&mut self) {
        self.entries.fill(Self::reset_entry());
        self.pending.fill(0);
        self.enabled = false;
        self.function_masked = false;
    }

    pub fn vectors(&self) -> u16 {
        // At most MSIX_MAX_VECTORS entries, checked in `new`.
        self.entries.len() as u16
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    pub fn is_function_masked(&self) -> bool {
        self.function_masked
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        let v = usize::from(vector);
        self.pending
            .get(v / 64)
            .is_some_and(|word| word & (1 << (v % 64)) != 0)
    }

    /// The message programmed for `vector`.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        self.entries
            .get(usize::from(vector))
            .map(|entry| MsiMessage {
                address: (u64::from(entry[1]) << 32) | u64::from(entry[0]),
                data: entry[2],
            })
    }

    fn vector_masked(&self, vector: usize) -> bool {
        self.entries
            .get(vector)
            .is_none_or(|entry| entry[VECTOR_CONTROL_DWORD] & VECTOR_MASKED != 0)
    }

    /// Whether `vector`'s mask bit is set (a vector the table lacks counts as masked).
    pub fn is_vector_masked(&self, vector: u16) -> bool {
        self.vector_masked(usize::from(vector))
    }

    /// Applies a new message control value (from the capability) and sends any pending
    /// messages that became deliverable.
    pub fn set_message_control(&mut self, control: u16) {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// Signals `vector`: sends its message, or records it pending while masked.
    pub fn trigger(&mut self, vector: u16) -> Result<MsixDelivery, MsixError> {
        let v = usize::from(vector);
        if v >= self.entries.len() {
            return Err(MsixError::VectorOutOfRange {
                vector,
                vectors: self.vectors(),
            });
        }
        if !self.enabled {
            return Ok(MsixDelivery::Disabled);
        }
        if self.function_masked || self.vector_masked(v) {
            self.set_pending(v, true);
            return Ok(MsixDelivery::Pending);
        }
        self.send(v)?;
        Ok(MsixDelivery::Sent)
    }

    fn send(&self, vector: usize) -> io::Result<()> {
        match self.message(vector as u16) {
            Some(message) => self.sink.send(message),
            None => Ok(()),
        }
    }

    fn set_pending(&mut self, vector: usize, pending: bool) {
        if let Some(word) = self.pending.get_mut(vector / 64) {
            let bit = 1u64 << (vector % 64);
            if pending {
                *word |= bit;
            } else {
                *word &= !bit;
            }
        }
    }

    fn deliver_pending(&mut self) {
        if !self.enabled || self.function_masked {
            return;
        }
        for vector in 0..self.entries.len() {
            self.deliver_if_pending(vector);
        }
    }

    fn deliver_if_pending(&mut self, vector: usize) {
        let deliverable = self.enabled && !self.function_masked && !self.vector_masked(vector);
        if !deliverable || !self.is_pending(vector as u16) {
            return;
        }
        match self.send(vector) {
            Ok(()) => self.set_pending(vector, false),
            // Keep the bit so a later unmask retries.
            Err(e) => tracing::warn!("MSI-X vector {vector}: delivery failed: {e}"),
        }
    }

    /// Bytes the table spans.
    pub fn table_len(&self) -> u64 {
        self.entries.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the PBA spans.
    pub fn pba_len(&self) -> u64 {
        self.pending.len() as u64 * 8
    }

    /// A 4- or 8-byte, naturally aligned access inside `len` bytes: the first dword index.
    fn checked_dword(offset: u64, access_len: usize, len: u64) -> Option<usize> {
        let width = access_len as u64;
        let valid = matches!(access_len, 4 | 8)
            && offset.is_multiple_of(width)
            && offset.checked_add(width).is_some_and(|end| end <= len);
        valid.then_some((offset / 4) as usize)
    }

    /// Guest read of the table.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        let Some(first) = Self::checked_dword(offset, data.len(), self.table_len()) else {
            tracing::debug!("MSI-X table: bad read at {offset:#x} len {}", data.len());
            data.fill(0xff);
            return;
        };
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let dword = first + i;
            let value = self
                .entries
                .get(dword / ENTRY_DWORDS)
                .map_or(u32::MAX, |entry| entry[dword % ENTRY_DWORDS]);
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the table. Unmasking a vector sends its pending message.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let Some(first) = Self::checked_dword(offset, data.len(), self.table_len()) else {
            tracing::debug!("MSI-X table: bad write at {offset:#x} len {}", data.len());
            return;
        };
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let dword = first + i;
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(chunk);
            let value = u32::from_le_bytes(bytes);
            let field = dword % ENTRY_DWORDS;
            let Some(entry) = self.entries.get_mut(dword / ENTRY_DWORDS) else {
                return;
            };
            // Only the mask bit of vector control is defined; the rest is reserved (zero).
            entry[field] = if field == VECTOR_CONTROL_DWORD {
                value & VECTOR_MASKED
            } else {
                value
            };
            if field == VECTOR_CONTROL_DWORD {
                self.deliver_if_pending(dword / ENTRY_DWORDS);
            }
        }
    }

    /// Guest read of the PBA.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        let Some(first) = Self::checked_dword(offset, data.len(), self.pba_len()) else {
            tracing::debug!("MSI-X PBA: bad read at {offset:#x} len {}", data.len());
            data.fill(0xff);
            return;
        };
        for (i, chunk) in data.chunks_exact_mut(4).enumerate() {
            let dword = first + i;
            let word = self.pending.get(dword / 2).copied().unwrap_or(u64::MAX);
            let value = (word >> (32 * (dword % 2))) as u32;
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Guest write of the PBA: read-only, dropped.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!("MSI-X PBA: ignored write at {offset:#x} len {}", data.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bar::BarSpec;
    use crate::config::PciIds;
    use crate::testing::RecordingSink;

    fn table(vectors: u16) -> (MsixTable, Arc<RecordingSink>) {
        let sink = Arc::new(RecordingSink::default());
        (MsixTable::new(vectors, sink.clone()).unwrap(), sink)
    }

    fn program(table: &mut MsixTable, vector: u64, address: u64, data: u32, masked: bool) {
        let base = vector * MSIX_TABLE_ENTRY_SIZE;
        table.write_table(base, &address.to_le_bytes());
        table.write_table(base + 8, &data.to_le_bytes());
        let control = if masked { VECTOR_MASKED } else { 0 };
        table.write_table(base + 12, &control.to_le_bytes());
    }

    fn read_u32(table: &MsixTable, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        table.read_table(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn pba(table: &MsixTable) -> u64 {
        let mut data = [0u8; 8];
        table.read_pba(0, &mut data);
        u64::from_le_bytes(data)
    }

    #[test]
    fn entries_reset_masked_and_read_back_as_written() {
        let (mut table, _) = table(4);
        assert_eq!(read_u32(&table, 12), 1);

        program(&mut table, 2, 0xfee0_1000, 0x4041, false);

        assert_eq!(read_u32(&table, 32), 0xfee0_1000);
        assert_eq!(read_u32(&table, 36), 0);
        assert_eq!(read_u32(&table, 40), 0x4041);
        assert_eq!(read_u32(&table, 44), 0);
        let mut qword = [0u8; 8];
        table.read_table(40, &mut qword);
        assert_eq!(u64::from_le_bytes(qword), 0x4041);
    }

    #[test]
    fn masked_vector_sets_pending_and_unmask_delivers_once() {
        let (mut table, sink) = table(4);
        table.set_message_control(MSIX_ENABLE);
        program(&mut table, 1, 0xfee0_0000, 0x31, true);

        let result = table.trigger(1).unwrap();

        assert_eq!(result, MsixDelivery::Pending);
        assert!(sink.sent().is_empty());
        assert_eq!(pba(&table), 0b10);
        table.write_table(16 + 12, &0u32.to_le_bytes());
        let expected = MsiMessage {
            address: 0xfee0_0000,
            data: 0x31,
        };
        assert_eq!(sink.sent(), vec![expected]);
        assert_eq!(pba(&table), 0);
        table.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(sink.sent().len(), 1, "no second delivery");
    }

    #[test]
    fn function_mask_holds_messages_until_cleared() {
        let (mut table, sink) = table(4);
        program(&mut table, 0, 0xfee0_0000, 0x20, false);
        program(&mut table, 3, 0xfee0_1000, 0x23, false);
        table.set_message_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);

        assert_eq!(table.trigger(3).unwrap(), MsixDelivery::Pending);
        assert_eq!(table.trigger(0).unwrap(), MsixDelivery::Pending);
        assert!(sink.sent().is_empty());

        table.set_message_control(MSIX_ENABLE);

        let data: Vec<u32> = sink.sent().iter().map(|m| m.data).collect();
        assert_eq!(data, vec![0x20, 0x23]);
        assert_eq!(pba(&table), 0);
    }

    #[test]
    fn unmasked_enabled_vector_sends_immediately() {
        let (mut table, sink) = table(2);
        table.set_message_control(MSIX_ENABLE);
        program(&mut table, 1, 0x1_fee0_2000, 0x99, false);

        assert_eq!(table.trigger(1).unwrap(), MsixDelivery::Sent);

        let expected = MsiMessage {
            address: 0x1_fee0_2000,
            data: 0x99,
        };
        assert_eq!(sink.sent(), vec![expected]);
    }

    #[test]
    fn disabled_msix_does_not_deliver_or_record() {
        let (mut table, sink) = table(2);
        program(&mut table, 0, 0xfee0_0000, 0x20, false);

        assert_eq!(table.trigger(0).unwrap(), MsixDelivery::Disabled);
        table.set_message_control(MSIX_ENABLE);

        assert!(sink.sent().is_empty());
        assert!(!table.is_pending(0));
    }

    #[test]
    fn out_of_range_vector_is_an_error() {
        let (mut table, _) = table(4);
        table.set_message_control(MSIX_ENABLE);

        assert!(matches!(
            table.trigger(4),
            Err(MsixError::VectorOutOfRange { vector: 4, .. })
        ));
        assert!(table.trigger(u16::MAX).is_err());
        assert!(!table.is_pending(u16::MAX));
        assert!(table.message(4).is_none());
    }

    #[test]
    fn bad_table_and_pba_accesses_are_refused() {
        let (mut table, _) = table(4);
        program(&mut table, 0, 0xfee0_0000, 0x20, true);
        let mut bytes = [0u8; 4];

        table.write_table(2, &[0; 4]);
        table.write_table(0, &[0; 2]);
        table.write_table(4 * 16, &[0; 4]);
        table.write_table(u64::MAX - 3, &[0; 4]);
        table.write_table(4, &[0; 8]);
        table.write_pba(0, &[0xff; 8]);

        assert_eq!(read_u32(&table, 0), 0xfee0_0000);
        table.read_table(1, &mut bytes);
        assert_eq!(bytes, [0xff; 4]);
        table.read_table(4 * 16, &mut bytes);
        assert_eq!(bytes, [0xff; 4]);
        let mut short = [0u8; 2];
        table.read_table(0, &mut short);
        assert_eq!(short, [0xff; 2]);
        table.read_pba(8, &mut bytes);
        assert_eq!(bytes, [0xff; 4]);
        assert_eq!(pba(&table), 0);
    }

    #[test]
    fn table_size_is_validated() {
        let sink: Arc<dyn MsiSink> = Arc::new(RecordingSink::default());
        assert!(MsixTable::new(0, sink.clone()).is_err());
        assert!(MsixTable::new(MSIX_MAX_VECTORS + 1, sink.clone()).is_err());
        let table = MsixTable::new(MSIX_MAX_VECTORS, sink).unwrap();
        assert_eq!(table.pba_len(), 256);
    }

    fn config_with_bar() -> ConfigSpace {
        let mut config = ConfigSpace::new(&PciIds::default());
        config.add_bar(0, BarSpec::mem32(0x1000)).unwrap();
        config.add_bar(1, BarSpec::io(0x10)).unwrap();
        config
    }

    #[test]
    fn capability_encodes_layout_and_only_control_bits_are_writable() {
        let mut config = config_with_bar();
        let cap = MsixCapability {
            vectors: 4,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        };

        let offset = cap.install(&mut config).unwrap();
        config.write(offset, &[0xff; 12]);

        assert_eq!(config.read_u8(offset), MSIX_CAPABILITY_ID);
        assert_eq!(
            MsixCapability::message_control(&config, offset),
            MSIX_ENABLE | MSIX_FUNCTION_MASK | 3
        );
        assert_eq!(config.read_u32(offset + 4), 0);
        assert_eq!(config.read_u32(offset + 8), 0x800);
    }

    #[test]
    fn capability_layout_is_validated() {
        let mut config = config_with_bar();
        let good = MsixCapability {
            vectors: 4,
            table_bar: 0,
            table_offset: 0,
            pba_bar: 0,
            pba_offset: 0x800,
        };
        let bad = [
            MsixCapability { vectors: 0, ..good },
            MsixCapability {
                vectors: 2049,
                ..good
            },
            MsixCapability {
                table_bar: 1,
                ..good
            },
            MsixCapability { pba_bar: 6, ..good },
            MsixCapability { pba_bar: 7, ..good },
            MsixCapability {
                pba_offset: 0x20,
                ..good
            },
            MsixCapability {
                table_offset: 0x804,
                ..good
            },
            MsixCapability {
                pba_offset: 0xff8 + 8,
                ..good
            },
            MsixCapability {
                vectors: 256,
                ..good
            },
        ];

        for cap in bad {
            assert!(cap.install(&mut config).is_err(), "{cap:?}");
        }
        assert!(good.install(&mut config).is_ok());
    }
}
