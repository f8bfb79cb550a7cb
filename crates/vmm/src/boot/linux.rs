//! Linux 64-bit boot protocol (Documentation/x86/boot.rst): loads a bzImage with linux-loader
//! and fills the zero page (`boot_params`) for it or for a vmlinux ELF.
//!
//! linux-loader copies the image and returns its setup header; deciding where things go, which
//! header fields the loader must set and checking the protocol version is left to the VMM.

use std::fs::File;

use linux_loader::bootparam::{boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams as LoaderBootParams};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::e820::e820_map;
use super::{
    first_ram_region_end, load_initrd, write_cmdline, BootError, BootInfo, BootParams,
    BootProtocol, InitrdPlacement,
};
use crate::layout;

/// First protocol version with `xloadflags` (and so XLF_KERNEL_64).
const MIN_PROTOCOL_VERSION: u16 = 0x020c;
/// Protocol version that added `pref_address` and `init_size`.
const PREF_ADDRESS_PROTOCOL_VERSION: u16 = 0x020a;
/// xloadflags: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// The 64-bit entry point's offset from the protected-mode kernel's start.
const ENTRY_64_OFFSET: u64 = 0x200;
/// loadflags set by the loader: kernel loaded at 1 MiB+, heap_end_ptr is valid.
const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
/// type_of_loader for a boot loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// heap_end_ptr: end of the setup heap (0xe000 in boot.rst's example layout) minus 0x200. The
/// 64-bit entry skips the real-mode setup code, so this only has to be plausible.
const HEAP_END_PTR: u16 = 0xe000 - 0x200;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");
/// A vmlinux carries no setup header; these are the values x86-64 kernels advertise.
const VMLINUX_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
const VMLINUX_KERNEL_ALIGNMENT: u32 = 0x20_0000;

/// Loads a bzImage whose setup header is `header` and writes its zero page.
pub(super) fn load_bzimage(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    kernel: &mut File,
    header: setup_header,
) -> Result<BootInfo, BootError> {
    check_64bit_entry(params, &header)?;
    let file_len = kernel
        .metadata()
        .map_err(super::kernel_read_error(&params.kernel))?
        .len();
    let (load, kernel_end) = bzimage_footprint(params, &header, file_len)?;
    let loaded = BzImage::load(
        mem,
        None,
        kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|source| BootError::KernelLoad {
        path: params.kernel.clone(),
        source,
    })?;
    debug_assert_eq!(loaded.kernel_load.0, load);
    write_zero_page(mem, params, header, kernel_end)?;
    Ok(linux_boot_info(GuestAddress(load + ENTRY_64_OFFSET)))
}

/// Writes the zero page for a vmlinux ELF already loaded by linux-loader.
pub(super) fn configure_vmlinux(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    entry: GuestAddress,
    kernel_end: u64,
) -> Result<BootInfo, BootError> {
    let header = setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        kernel_alignment: VMLINUX_KERNEL_ALIGNMENT,
        initrd_addr_max: VMLINUX_INITRD_ADDR_MAX,
        cmdline_size: (layout::CMDLINE_MAX_SIZE - 1) as u32,
        ..Default::default()
    };
    write_zero_page(mem, params, header, kernel_end)?;
    Ok(linux_boot_info(entry))
}

fn linux_boot_info(entry: GuestAddress) -> BootInfo {
    BootInfo {
        entry,
        protocol: BootProtocol::LinuxBoot64 {
            zero_page: GuestAddress(layout::ZERO_PAGE_START),
        },
    }
}

fn check_64bit_entry(params: &BootParams, header: &setup_header) -> Result<(), BootError> {
    let (version, xloadflags) = (header.version, header.xloadflags);
    if version >= MIN_PROTOCOL_VERSION && xloadflags & XLF_KERNEL_64 != 0 {
        Ok(())
    } else {
        Err(BootError::UnsupportedBootProtocol {
            path: params.kernel.clone(),
            version,
            xloadflags,
        })
    }
}

/// Returns (load address, end of the memory the kernel uses) for a bzImage of `file_len` bytes,
/// checked to lie in RAM above 1 MiB.
///
/// The kernel decompresses itself into `init_size` bytes starting at the larger of its aligned
/// load address and `pref_address`, so that whole range is the kernel's, not only the file copy.
fn bzimage_footprint(
    params: &BootParams,
    header: &setup_header,
    file_len: u64,
) -> Result<(u64, u64), BootError> {
    let load = u64::from(header.code32_start);
    let setup_sectors = match header.setup_sects {
        0 => 4,
        n => u64::from(n),
    };
    let payload_len = file_len
        .checked_sub((setup_sectors + 1) * 512)
        .ok_or_else(|| BootError::UnknownKernelFormat {
            path: params.kernel.clone(),
        })?;
    let ram_end = first_ram_region_end(params.ram_size);
    let outside = |end| BootError::KernelOutsideRam {
        path: params.kernel.clone(),
        start: load,
        end,
        ram_end,
    };
    let payload_end = load.checked_add(payload_len).ok_or(outside(u64::MAX))?;
    let runtime_end = if header.version >= PREF_ADDRESS_PROTOCOL_VERSION {
        let alignment = u64::from(header.kernel_alignment).max(1);
        let base = super::align_up(load, alignment).max(header.pref_address);
        base.checked_add(u64::from(header.init_size))
            .ok_or(outside(u64::MAX))?
    } else {
        payload_end
    };
    let end = payload_end.max(runtime_end);
    if load < layout::HIGH_RAM_START || end > ram_end {
        return Err(outside(end));
    }
    Ok((load, end))
}

/// Builds and writes the zero page, the command line and the initrd.
fn write_zero_page(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    mut header: setup_header,
    kernel_end: u64,
) -> Result<(), BootError> {
    write_cmdline(mem, &params.cmdline, header.cmdline_size as usize)?;
    let initrd_limit = u64::from(header.initrd_addr_max) + 1;
    let initrd = load_initrd(mem, params, kernel_end, initrd_limit)?;

    header.type_of_loader = LOADER_TYPE_UNDEFINED;
    header.loadflags |= LOADED_HIGH | CAN_USE_HEAP;
    header.heap_end_ptr = HEAP_END_PTR;
    header.cmd_line_ptr = layout::CMDLINE_START as u32;

    let mut zero_page = boot_params {
        hdr: header,
        ext_cmd_line_ptr: (layout::CMDLINE_START >> 32) as u32,
        // Read by kernels with protocol 2.14+; older ones ignore it and scan the BIOS area.
        acpi_rsdp_addr: params.rsdp.0,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        set_ramdisk(&mut zero_page, initrd);
    }
    set_e820(&mut zero_page, params.ram_size)?;

    let boot = LoaderBootParams::new(&zero_page, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams(&boot, mem).map_err(|_| BootError::GuestWrite {
        what: "zero page",
        addr: layout::ZERO_PAGE_START,
    })
}

fn set_ramdisk(zero_page: &mut boot_params, initrd: InitrdPlacement) {
    zero_page.hdr.ramdisk_image = initrd.addr as u32;
    zero_page.hdr.ramdisk_size = initrd.size as u32;
    zero_page.ext_ramdisk_image = (initrd.addr >> 32) as u32;
    zero_page.ext_ramdisk_size = (initrd.size >> 32) as u32;
}

fn set_e820(zero_page: &mut boot_params, ram_size: u64) -> Result<(), BootError> {
    let map = e820_map(ram_size);
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootError::BootTableTooLarge {
            what: "zero page e820 table",
            start: 0,
            end: map.len() as u64,
            limit: E820_MAX_ENTRIES_ZEROPAGE as u64,
        });
    }
    for (slot, entry) in zero_page.e820_table.iter_mut().zip(&map) {
        slot.addr = entry.addr;
        slot.size = entry.size;
        slot.r#type = entry.kind.raw();
    }
    zero_page.e820_entries = map.len() as u8;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_images::*;
    use super::super::{load_kernel, BootError};
    use super::*;
    use vm_memory::Bytes;

    fn read_zero_page(mem: &GuestMemoryMmap) -> boot_params {
        mem.read_obj(GuestAddress(layout::ZERO_PAGE_START))
            .expect("zero page in guest memory")
    }

    fn read_cstring(mem: &GuestMemoryMmap, addr: u64) -> String {
        let mut bytes = vec![0u8; layout::CMDLINE_MAX_SIZE];
        mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
        let len = bytes.iter().position(|&b| b == 0).expect("NUL terminator");
        String::from_utf8(bytes[..len].to_vec()).unwrap()
    }

    fn e820_from_zero_page(zero_page: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = zero_page.e820_table;
        table[..usize::from(zero_page.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    fn expected_e820() -> Vec<(u64, u64, u32)> {
        e820_map(TEST_RAM)
            .iter()
            .map(|e| (e.addr, e.size, e.kind.raw()))
            .collect()
    }

    #[test]
    fn bzimage_boots_at_load_plus_0x200_with_a_filled_zero_page() {
        let dir = TempDir::new("bzimage");
        let kernel = dir.write("bzImage", &bzimage(bz_header(0x020f, XLF_KERNEL_64)));
        let initrd_bytes: Vec<u8> = (0..0x1800u32).map(|i| (i % 251) as u8).collect();
        let initrd = dir.write("initrd", &initrd_bytes);
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.initrd = Some(initrd);

        let info = load_kernel(&mem, &boot).unwrap();

        assert_eq!(info.entry, GuestAddress(u64::from(BZ_LOAD) + 0x200));
        assert_eq!(
            info.protocol,
            BootProtocol::LinuxBoot64 {
                zero_page: GuestAddress(layout::ZERO_PAGE_START)
            }
        );
        let code: [u8; 5] = mem.read_obj(info.entry).unwrap();
        assert_eq!(code, EXIT_CODE);

        let zero_page = read_zero_page(&mem);
        let hdr = zero_page.hdr;
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!(
            hdr.loadflags & (LOADED_HIGH | CAN_USE_HEAP),
            LOADED_HIGH | CAN_USE_HEAP
        );
        assert_eq!({ hdr.heap_end_ptr }, HEAP_END_PTR);
        assert_eq!(u64::from(hdr.cmd_line_ptr), layout::CMDLINE_START);
        assert_eq!({ zero_page.ext_cmd_line_ptr }, 0);
        assert_eq!(read_cstring(&mem, layout::CMDLINE_START), TEST_CMDLINE);
        assert_eq!({ zero_page.acpi_rsdp_addr }, TEST_RSDP);
        assert_eq!(e820_from_zero_page(&zero_page), expected_e820());

        // initrd: top of RAM (64 MiB is below initrd_addr_max), page aligned, bytes intact.
        let (ramdisk, size) = (u64::from(hdr.ramdisk_image), u64::from(hdr.ramdisk_size));
        assert_eq!(size, initrd_bytes.len() as u64);
        assert_eq!(ramdisk, TEST_RAM - 0x2000);
        assert_eq!({ zero_page.ext_ramdisk_image }, 0);
        let mut loaded = vec![0u8; initrd_bytes.len()];
        mem.read_slice(&mut loaded, GuestAddress(ramdisk)).unwrap();
        assert_eq!(loaded, initrd_bytes);
    }

    #[test]
    fn bzimage_initrd_stays_below_initrd_addr_max() {
        let dir = TempDir::new("bz-initrd-max");
        let mut header = bz_header(0x020f, XLF_KERNEL_64);
        header.initrd_addr_max = 0x1ff_ffff; // 32 MiB - 1, below the 64 MiB of RAM
        let kernel = dir.write("bzImage", &bzimage(header));
        let initrd = dir.write("initrd", &[7u8; 0x1000]);
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.initrd = Some(initrd);

        load_kernel(&mem, &boot).unwrap();

        assert_eq!(
            { read_zero_page(&mem).hdr.ramdisk_image },
            0x200_0000 - 0x1000
        );
    }

    #[test]
    fn bzimage_initrd_overlapping_the_decompressed_kernel_is_too_large() {
        let dir = TempDir::new("bz-initrd-large");
        let kernel = dir.write("bzImage", &bzimage(bz_header(0x020f, XLF_KERNEL_64)));
        // The kernel owns pref_address + init_size = 18 MiB; 64 MiB of RAM leaves 46 MiB.
        let available = TEST_RAM - (BZ_PREF_ADDRESS + u64::from(BZ_INIT_SIZE));
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
    fn cmdline_longer_than_the_header_allows_is_rejected() {
        let dir = TempDir::new("bz-cmdline");
        let mut header = bz_header(0x020f, XLF_KERNEL_64);
        header.cmdline_size = 16;
        let kernel = dir.write("bzImage", &bzimage(header));
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.cmdline = "x".repeat(17);

        let error = load_kernel(&mem, &boot).unwrap_err();

        assert!(matches!(
            error,
            BootError::CmdlineTooLong { len: 17, max: 16 }
        ));
    }

    #[test]
    fn cmdline_of_exactly_the_header_limit_is_accepted() {
        let dir = TempDir::new("bz-cmdline-max");
        let mut header = bz_header(0x020f, XLF_KERNEL_64);
        header.cmdline_size = 16;
        let kernel = dir.write("bzImage", &bzimage(header));
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.cmdline = "y".repeat(16);

        load_kernel(&mem, &boot).unwrap();

        assert_eq!(read_cstring(&mem, layout::CMDLINE_START), "y".repeat(16));
    }

    #[test]
    fn old_boot_protocol_or_missing_64bit_entry_is_unsupported() {
        for (version, xloadflags) in [(0x020b, XLF_KERNEL_64), (0x020f, 0)] {
            let dir = TempDir::new("bz-old");
            let kernel = dir.write("bzImage", &bzimage(bz_header(version, xloadflags)));
            let mem = guest_memory(TEST_RAM);

            let error = load_kernel(&mem, &params(&kernel)).unwrap_err();

            assert!(
                matches!(error, BootError::UnsupportedBootProtocol { version: v, .. } if v == version),
                "{error}"
            );
        }
    }

    #[test]
    fn bzimage_too_big_for_ram_is_rejected_before_loading() {
        let dir = TempDir::new("bz-big");
        let mut header = bz_header(0x020f, XLF_KERNEL_64);
        header.init_size = TEST_RAM as u32; // decompressed kernel larger than the VM
        let kernel = dir.write("bzImage", &bzimage(header));
        let mem = guest_memory(TEST_RAM);

        let error = load_kernel(&mem, &params(&kernel)).unwrap_err();

        assert!(
            matches!(error, BootError::KernelOutsideRam { end, ram_end, .. }
                if end == BZ_PREF_ADDRESS + TEST_RAM && ram_end == TEST_RAM),
            "{error}"
        );
    }

    #[test]
    fn setup_header_bytes_past_the_declared_length_are_not_copied() {
        let mut header = bz_header(0x020f, XLF_KERNEL_64);
        // Declare a header ending right after `version` (0x206..0x208): later fields are code.
        header.jump = 0xeb | ((0x208 - 0x202) << 8);
        let image = bzimage(header);

        let parsed = super::super::bzimage_header(&image).unwrap();

        assert_eq!({ parsed.version }, 0x020f);
        assert_eq!({ parsed.code32_start }, 0);
        assert_eq!({ parsed.init_size }, 0);
    }

    #[test]
    fn vmlinux_elf_boots_through_the_zero_page_at_its_entry() {
        let dir = TempDir::new("vmlinux");
        let kernel = dir.write("vmlinux", &vmlinux_elf());
        let mem = guest_memory(TEST_RAM);

        let info = load_kernel(&mem, &params(&kernel)).unwrap();

        assert_eq!(info.entry, GuestAddress(TEST_ENTRY));
        assert!(matches!(info.protocol, BootProtocol::LinuxBoot64 { .. }));
        let zero_page = read_zero_page(&mem);
        assert_eq!({ zero_page.hdr.header }, HDRS_MAGIC);
        assert_eq!({ zero_page.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!(u64::from(zero_page.hdr.cmd_line_ptr), layout::CMDLINE_START);
        assert_eq!({ zero_page.acpi_rsdp_addr }, TEST_RSDP);
        assert_eq!(e820_from_zero_page(&zero_page), expected_e820());
        assert_eq!({ zero_page.hdr.ramdisk_size }, 0);
    }
}
