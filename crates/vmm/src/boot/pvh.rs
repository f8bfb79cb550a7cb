//! PVH boot (xenbits.xen.org docs/misc/pvh.html): the `hvm_start_info` block, its memory map
//! and module list for an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
//!
//! linux-loader finds the entry point and writes the tables; this module decides their contents
//! and places them in the low page reserved for them:
//!
//! ```text
//! PVH_INFO_START   hvm_start_info
//!                  hvm_memmap_table_entry[memmap_entries]   (= the e820 map)
//!                  hvm_modlist_entry[nr_modules]            (the initrd, if any)
//! ZERO_PAGE_START  (limit; unused by PVH, but the tables must not grow into it)
//! ```

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams as LoaderBootParams};
use linux_loader::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::e820::e820_map;
use super::{load_initrd, write_cmdline, BootError, BootInfo, BootParams, BootProtocol};
use crate::layout;

/// hvm_start_info version with the memory map fields.
const START_INFO_VERSION: u32 = 1;
/// The initrd must be addressable by the 32-bit entry code.
const PVH_INITRD_LIMIT: u64 = 1 << 32;
/// The start info block and its tables end before this address.
const PVH_TABLES_LIMIT: u64 = layout::ZERO_PAGE_START;

/// Writes the command line, initrd and start info for a PVH kernel entered at `entry`.
pub(super) fn configure(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    entry: GuestAddress,
    kernel_end: u64,
) -> Result<BootInfo, BootError> {
    write_cmdline(mem, &params.cmdline, layout::CMDLINE_MAX_SIZE - 1)?;
    let initrd = load_initrd(mem, params, kernel_end, PVH_INITRD_LIMIT)?;
    let memmap = memory_map(params.ram_size);
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|initrd| hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        })
        .collect();
    let placement = TablePlacement::new(memmap.len(), modules.len())?;

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            placement.modlist
        },
        cmdline_paddr: layout::CMDLINE_START,
        rsdp_paddr: params.rsdp.0,
        memmap_paddr: placement.memmap,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut boot = LoaderBootParams::new(&start_info, GuestAddress(layout::PVH_INFO_START));
    boot.set_sections(&memmap, GuestAddress(placement.memmap));
    if !modules.is_empty() {
        boot.set_modules(&modules, GuestAddress(placement.modlist));
    }
    PvhBootConfigurator::write_bootparams(&boot, mem).map_err(|_| BootError::GuestWrite {
        what: "PVH start info",
        addr: layout::PVH_INFO_START,
    })?;
    Ok(BootInfo {
        entry,
        protocol: BootProtocol::Pvh {
            start_info: GuestAddress(layout::PVH_INFO_START),
        },
    })
}

fn memory_map(ram_size: u64) -> Vec<hvm_memmap_table_entry> {
    e820_map(ram_size)
        .iter()
        .map(|entry| hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind.raw(),
            reserved: 0,
        })
        .collect()
}

/// Guest addresses of the memory map and module list, right after the start info block.
#[derive(Debug, PartialEq, Eq)]
struct TablePlacement {
    memmap: u64,
    modlist: u64,
}

impl TablePlacement {
    fn new(memmap_entries: usize, modules: usize) -> Result<Self, BootError> {
        let start = layout::PVH_INFO_START;
        let memmap = start + size_of::<hvm_start_info>() as u64;
        let modlist = table_end(memmap, memmap_entries, size_of::<hvm_memmap_table_entry>());
        let end = table_end(modlist, modules, size_of::<hvm_modlist_entry>());
        match end {
            Some(end) if end <= PVH_TABLES_LIMIT => Ok(TablePlacement {
                memmap,
                modlist: modlist.unwrap_or(u64::MAX),
            }),
            _ => Err(BootError::BootTableTooLarge {
                what: "PVH start info with its memory map and module list",
                start,
                end: end.unwrap_or(u64::MAX),
                limit: PVH_TABLES_LIMIT,
            }),
        }
    }
}

fn table_end(start: impl Into<Option<u64>>, count: usize, entry_size: usize) -> Option<u64> {
    let bytes = u64::try_from(count.checked_mul(entry_size)?).ok()?;
    start.into()?.checked_add(bytes)
}

#[cfg(test)]
mod tests {
    use super::super::test_images::*;
    use super::super::{load_kernel, BootError};
    use super::*;
    use vm_memory::Bytes;

    const PVH_ENTRY: u64 = TEST_ENTRY + 0x10;

    fn read_start_info(mem: &GuestMemoryMmap) -> hvm_start_info {
        mem.read_obj(GuestAddress(layout::PVH_INFO_START)).unwrap()
    }

    #[test]
    fn pvh_elf_boots_at_the_note_entry_with_a_complete_start_info() {
        let dir = TempDir::new("pvh");
        let kernel = dir.write("kernel.elf", &pvh_elf(PVH_ENTRY));
        let initrd_bytes: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let initrd = dir.write("initrd", &initrd_bytes);
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.initrd = Some(initrd);

        let info = load_kernel(&mem, &boot).unwrap();

        assert_eq!(info.entry, GuestAddress(PVH_ENTRY));
        assert_eq!(
            info.protocol,
            BootProtocol::Pvh {
                start_info: GuestAddress(layout::PVH_INFO_START)
            }
        );
        let code: [u8; 5] = mem.read_obj(GuestAddress(TEST_ENTRY)).unwrap();
        assert_eq!(code, EXIT_CODE);

        let start_info = read_start_info(&mem);
        assert_eq!(start_info.magic, 0x336e_c578);
        assert_eq!(start_info.version, 1);
        assert_eq!(start_info.rsdp_paddr, TEST_RSDP);

        let mut cmdline = vec![0u8; TEST_CMDLINE.len() + 1];
        mem.read_slice(&mut cmdline, GuestAddress(start_info.cmdline_paddr))
            .unwrap();
        assert_eq!(&cmdline[..TEST_CMDLINE.len()], TEST_CMDLINE.as_bytes());
        assert_eq!(cmdline[TEST_CMDLINE.len()], 0);

        let expected: Vec<(u64, u64, u32)> = e820_map(TEST_RAM)
            .iter()
            .map(|e| (e.addr, e.size, e.kind.raw()))
            .collect();
        let memmap: Vec<(u64, u64, u32)> = (0..u64::from(start_info.memmap_entries))
            .map(|i| {
                let addr = start_info.memmap_paddr + i * size_of::<hvm_memmap_table_entry>() as u64;
                let e: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
                (e.addr, e.size, e.type_)
            })
            .collect();
        assert_eq!(memmap, expected);

        assert_eq!(start_info.nr_modules, 1);
        let module: hvm_modlist_entry = mem
            .read_obj(GuestAddress(start_info.modlist_paddr))
            .unwrap();
        assert_eq!(module.size, initrd_bytes.len() as u64);
        assert_eq!(module.paddr, TEST_RAM - 0x2000);
        let mut loaded = vec![0u8; initrd_bytes.len()];
        mem.read_slice(&mut loaded, GuestAddress(module.paddr))
            .unwrap();
        assert_eq!(loaded, initrd_bytes);
        assert!(
            start_info.modlist_paddr + size_of::<hvm_modlist_entry>() as u64
                <= layout::ZERO_PAGE_START
        );
    }

    #[test]
    fn pvh_without_initrd_has_no_modules() {
        let dir = TempDir::new("pvh-no-initrd");
        let kernel = dir.write("kernel.elf", &pvh_elf(PVH_ENTRY));
        let mem = guest_memory(TEST_RAM);

        load_kernel(&mem, &params(&kernel)).unwrap();

        let start_info = read_start_info(&mem);
        assert_eq!(start_info.nr_modules, 0);
        assert_eq!(start_info.modlist_paddr, 0);
    }

    #[test]
    fn pvh_initrd_larger_than_free_ram_is_rejected() {
        let dir = TempDir::new("pvh-big-initrd");
        let kernel = dir.write("kernel.elf", &pvh_elf(PVH_ENTRY));
        // Kernel ends at TEST_ENTRY + code + bss, rounded up to a page: 1 MiB + 8 KiB.
        let available = TEST_RAM - (TEST_ENTRY + 0x2000);
        let initrd = dir.write("initrd", &vec![0u8; available as usize + 1]);
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.initrd = Some(initrd);

        let error = load_kernel(&mem, &boot).unwrap_err();

        assert!(
            matches!(error, BootError::InitrdTooLarge { size, available: a }
                if size == available + 1 && a == available),
            "{error}"
        );
    }

    #[test]
    fn pvh_cmdline_longer_than_the_buffer_is_rejected() {
        let dir = TempDir::new("pvh-cmdline");
        let kernel = dir.write("kernel.elf", &pvh_elf(PVH_ENTRY));
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.cmdline = "z".repeat(layout::CMDLINE_MAX_SIZE);

        let error = load_kernel(&mem, &boot).unwrap_err();

        assert!(matches!(error, BootError::CmdlineTooLong { len, max }
            if len == layout::CMDLINE_MAX_SIZE && max == layout::CMDLINE_MAX_SIZE - 1));
    }

    #[test]
    fn tables_that_would_reach_the_zero_page_are_rejected() {
        let fits = TablePlacement::new(8, 1).unwrap();
        assert_eq!(fits.memmap, layout::PVH_INFO_START + 56);
        assert_eq!(fits.modlist, fits.memmap + 8 * 24);

        let error = TablePlacement::new(4096, 1).unwrap_err();

        assert!(matches!(error, BootError::BootTableTooLarge { limit, .. }
            if limit == layout::ZERO_PAGE_START));
    }
}
