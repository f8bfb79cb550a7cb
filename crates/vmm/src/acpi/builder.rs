//! Lays ACPI tables out in a guest-physical window and writes them to guest memory.
//!
//! The builder hands out addresses as tables are added (so a table that points at another, like
//! the FADT at the DSDT, is built after its target), keeps the list of tables the XSDT names, and
//! at the end places the XSDT and fills the RSDP reserved at the very start of the window. Nothing
//! touches guest memory until [`AcpiTableBuilder::write_to`], and every placement is checked
//! against the window first, so a table that does not fit is an error and memory stays untouched.
//! `acpi_tables` serializes tables but leaves placement to its user; this is that part.

use acpi_tables::rsdp::Rsdp;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{AcpiError, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Legacy BIOS RSDP scans look at 16-byte boundaries.
const RSDP_ALIGN: u64 = 16;
/// Every system description table starts on an 8-byte boundary (64-bit fields inside).
pub const TABLE_ALIGN: u64 = 8;
/// Every system description table begins with a 36-byte header holding its length at offset 4.
const SDT_HEADER_LEN: usize = 36;

/// Serializes any `acpi_tables` object into its bytes.
pub fn to_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Collects table blobs, gives each an address in the window, and writes them out at the end.
#[derive(Debug)]
pub struct AcpiTableBuilder {
    window_start: u64,
    window_end: u64,
    next_free: u64,
    placed: Vec<(GuestAddress, Vec<u8>)>,
    xsdt_entries: Vec<u64>,
}

impl AcpiTableBuilder {
    /// A builder for the window `start..start + size`; the RSDP is reserved at `start` itself.
    pub fn new(start: GuestAddress, size: u64) -> Result<Self, AcpiError> {
        let window_end = start.0.checked_add(size).ok_or(AcpiError::BadWindow {
            start: start.0,
            size,
        })?;
        if start.0 & (RSDP_ALIGN - 1) != 0 {
            return Err(AcpiError::BadWindow {
                start: start.0,
                size,
            });
        }
        let mut builder = Self {
            window_start: start.0,
            window_end,
            next_free: start.0,
            placed: Vec::new(),
            xsdt_entries: Vec::new(),
        };
        builder.reserve(Rsdp::len(), RSDP_ALIGN, *b"RSDP")?;
        Ok(builder)
    }

    /// Adds a system description table that the XSDT lists (FADT, MADT, MCFG, DMAR, VIOT, ...).
    /// Returns the table's guest address.
    pub fn add_table(&mut self, table: &dyn Aml) -> Result<GuestAddress, AcpiError> {
        let bytes = to_bytes(table);
        let addr = self.add_table_bytes(bytes, TABLE_ALIGN)?;
        self.xsdt_entries.push(addr.0);
        Ok(addr)
    }

    /// Adds a table that another table points at instead of the XSDT (the DSDT).
    pub fn add_unlisted_table(&mut self, table: &dyn Aml) -> Result<GuestAddress, AcpiError> {
        self.add_table_bytes(to_bytes(table), TABLE_ALIGN)
    }

    /// Adds a structure without a standard header, at `align` (the FACS wants 64 bytes).
    pub fn add_raw(&mut self, bytes: Vec<u8>, align: u64) -> Result<GuestAddress, AcpiError> {
        let signature = signature_of(&bytes);
        let addr = self.reserve(bytes.len(), align, signature)?;
        self.placed.push((addr, bytes));
        Ok(addr)
    }

    /// Addresses of the tables the XSDT will list, in order.
    pub fn xsdt_entries(&self) -> &[u64] {
        &self.xsdt_entries
    }

    /// Places the XSDT and the RSDP, then writes every table into `mem`. Returns the RSDP address.
    pub fn write_to(mut self, mem: &GuestMemoryMmap) -> Result<GuestAddress, AcpiError> {
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        for entry in &self.xsdt_entries {
            xsdt.add_entry(*entry);
        }
        let xsdt_addr = self.add_unlisted_table(&xsdt)?;
        let rsdp_addr = GuestAddress(self.window_start);
        let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0));
        self.placed.push((rsdp_addr, rsdp));

        let used = self.used_len()?;
        if !GuestMemoryBackend::check_range(mem, rsdp_addr, used) {
            return Err(AcpiError::NotInGuestMemory {
                addr: rsdp_addr.0,
                len: used as u64,
            });
        }
        for (addr, bytes) in &self.placed {
            mem.write_slice(bytes, *addr)
                .map_err(|source| AcpiError::GuestMemory {
                    addr: addr.0,
                    source,
                })?;
        }
        Ok(rsdp_addr)
    }

    fn add_table_bytes(&mut self, bytes: Vec<u8>, align: u64) -> Result<GuestAddress, AcpiError> {
        check_header_length(&bytes)?;
        self.add_raw(bytes, align)
    }

    /// Finds room for `len` bytes at `align` inside the window, or reports what it would need.
    fn reserve(
        &mut self,
        len: usize,
        align: u64,
        signature: [u8; 4],
    ) -> Result<GuestAddress, AcpiError> {
        let too_big = || AcpiError::WindowFull {
            signature: String::from_utf8_lossy(&signature).into_owned(),
            window_size: self.window_end - self.window_start,
        };
        let start = align_up(self.next_free, align).ok_or_else(too_big)?;
        let end = u64::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .ok_or_else(too_big)?;
        if end > self.window_end {
            return Err(too_big());
        }
        self.next_free = end;
        Ok(GuestAddress(start))
    }

    fn used_len(&self) -> Result<usize, AcpiError> {
        let used = self.next_free - self.window_start;
        usize::try_from(used).map_err(|_| AcpiError::BadWindow {
            start: self.window_start,
            size: used,
        })
    }
}

/// `value` rounded up to a multiple of `align` (a power of two), or `None` on overflow.
fn align_up(value: u64, align: u64) -> Option<u64> {
    if !align.is_power_of_two() {
        return None;
    }
    value.checked_add(align - 1).map(|v| v & !(align - 1))
}

/// The first four bytes, for error messages; blanks when there are fewer.
fn signature_of(bytes: &[u8]) -> [u8; 4] {
    bytes
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .unwrap_or(*b"    ")
}

/// A table whose header length disagrees with its size would make the guest read past it.
fn check_header_length(bytes: &[u8]) -> Result<(), AcpiError> {
    let declared = bytes
        .get(4..8)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes);
    let consistent = bytes.len() >= SDT_HEADER_LEN
        && declared.and_then(|d| usize::try_from(d).ok()) == Some(bytes.len());
    if consistent {
        Ok(())
    } else {
        Err(AcpiError::MalformedTable {
            signature: String::from_utf8_lossy(&signature_of(bytes)).into_owned(),
            len: bytes.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use acpi_tables::sdt::Sdt;

    fn blank_table(signature: [u8; 4], len: u32) -> Sdt {
        Sdt::new(signature, len, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION)
    }

    #[test]
    fn align_up_rounds_to_power_of_two() {
        assert_eq!(align_up(0x24, 8), Some(0x28));
        assert_eq!(align_up(0x28, 8), Some(0x28));
        assert_eq!(align_up(0x41, 64), Some(0x80));
        assert_eq!(align_up(u64::MAX, 8), None);
        assert_eq!(align_up(3, 6), None);
    }

    #[test]
    fn tables_are_placed_after_the_rsdp_eight_byte_aligned() {
        let mut builder = AcpiTableBuilder::new(GuestAddress(0x1000), 0x1000).unwrap();

        let first = builder.add_table(&blank_table(*b"AAAA", 37)).unwrap();
        let second = builder.add_table(&blank_table(*b"BBBB", 40)).unwrap();

        // RSDP is 36 bytes: 0x1000..0x1024, so the first table starts at 0x1028.
        assert_eq!(first, GuestAddress(0x1028));
        assert_eq!(second, GuestAddress(0x1028 + 40));
        assert_eq!(builder.xsdt_entries(), &[0x1028, 0x1050]);
    }

    #[test]
    fn table_past_the_window_is_an_error() {
        let mut builder = AcpiTableBuilder::new(GuestAddress(0x1000), 0x100).unwrap();

        let result = builder.add_table(&blank_table(*b"HUGE", 0x100));

        match result {
            Err(AcpiError::WindowFull { signature, .. }) => assert_eq!(signature, "HUGE"),
            other => panic!("expected WindowFull, got {other:?}"),
        }
    }

    #[test]
    fn xsdt_that_does_not_fit_is_an_error() {
        // Room for the RSDP and one 40-byte table, but not for the XSDT after them.
        let mut builder = AcpiTableBuilder::new(GuestAddress(0), 0x50).unwrap();
        builder.add_table(&blank_table(*b"AAAA", 40)).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        let result = builder.write_to(&mem);

        assert!(matches!(result, Err(AcpiError::WindowFull { .. })));
        let mut untouched = [0u8; 8];
        mem.read_slice(&mut untouched, GuestAddress(0)).unwrap();
        assert_eq!(untouched, [0; 8], "nothing is written when layout fails");
    }

    #[test]
    fn misaligned_or_wrapping_window_is_rejected() {
        assert!(matches!(
            AcpiTableBuilder::new(GuestAddress(0x1008), 0x1000),
            Err(AcpiError::BadWindow { .. })
        ));
        assert!(matches!(
            AcpiTableBuilder::new(GuestAddress(u64::MAX - 15), 0x1000),
            Err(AcpiError::BadWindow { .. })
        ));
    }

    #[test]
    fn window_outside_guest_memory_is_an_error() {
        let builder = AcpiTableBuilder::new(GuestAddress(0x10_0000), 0x1000).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();

        let result = builder.write_to(&mem);

        assert!(matches!(result, Err(AcpiError::NotInGuestMemory { .. })));
    }

    #[test]
    fn table_with_inconsistent_length_is_rejected() {
        let mut builder = AcpiTableBuilder::new(GuestAddress(0), 0x1000).unwrap();
        let mut bytes = to_bytes(&blank_table(*b"LIAR", 40));
        bytes.truncate(38);

        let result = builder.add_table_bytes(bytes, TABLE_ALIGN);

        assert!(matches!(result, Err(AcpiError::MalformedTable { .. })));
    }
}
