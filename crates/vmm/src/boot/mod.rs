//! Boot loaders: put a kernel, its command line, initrd and boot tables into guest memory and
//! describe how the boot vCPU must start ([`load_kernel`], then [`cpu::setup_boot_vcpu`]).
//!
//! Three kernel formats are accepted:
//! - an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note boots through PVH (32-bit entry, `hvm_start_info`),
//! - a bzImage boots through the Linux 64-bit boot protocol (zero page, entry = load + 0x200),
//! - an ELF without the note (a vmlinux) boots through the Linux 64-bit protocol with a zero page.
//!
//! Parsing and loading the images, the command line, and writing the tables are done by
//! `linux-loader`; this module adds what it leaves to the VMM: format detection, the memory map
//! ([`e820`]), placement and bounds checks (kernel, initrd, tables), the zero page / start info
//! contents and errors a user can act on.

pub mod cpu;
pub mod e820;
mod linux;
mod pvh;

pub use cpu::setup_boot_vcpu;
pub use e820::{e820_map, E820Entry, E820Kind};

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::setup_header;
use linux_loader::cmdline::Cmdline;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout;

/// Guest page size used to align the initrd.
const PAGE_SIZE: u64 = 0x1000;

/// What the caller wants booted.
#[derive(Clone, Debug)]
pub struct BootParams {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM size; guest memory must back `layout::ram_regions(ram_size)`.
    pub ram_size: u64,
    /// Guest-physical address of the ACPI RSDP, handed to the kernel.
    pub rsdp: GuestAddress,
}

/// How the boot vCPU must be started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    LinuxBoot64 { zero_page: GuestAddress },
    /// PVH: 32-bit protected mode without paging, EBX = `hvm_start_info`.
    Pvh { start_info: GuestAddress },
}

/// Result of loading a kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub entry: GuestAddress,
    pub protocol: BootProtocol,
}

/// Why a kernel could not be prepared for boot. Each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {}: {source}", path.display())]
    KernelOpen { path: PathBuf, source: io::Error },
    #[error("cannot read kernel {}: {source}", path.display())]
    KernelRead { path: PathBuf, source: io::Error },
    #[error("{} is not a bootable kernel: expected a bzImage or an x86-64 ELF (vmlinux or PVH)", path.display())]
    UnknownKernelFormat { path: PathBuf },
    #[error("kernel {} uses Linux boot protocol {}.{} (xloadflags {xloadflags:#x}); sluice needs 2.12 or newer with a 64-bit entry point (XLF_KERNEL_64)", path.display(), version >> 8, version & 0xff)]
    UnsupportedBootProtocol {
        path: PathBuf,
        version: u16,
        xloadflags: u16,
    },
    #[error("kernel {} needs guest memory {start:#x}..{end:#x} but RAM for the kernel is {:#x}..{ram_end:#x}; give the VM more memory", path.display(), layout::HIGH_RAM_START)]
    KernelOutsideRam {
        path: PathBuf,
        start: u64,
        end: u64,
        ram_end: u64,
    },
    #[error("cannot load kernel {}: {source}", path.display())]
    KernelLoad {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line is invalid ({source}); use printable ASCII only")]
    InvalidCmdline {
        source: linux_loader::cmdline::Error,
    },
    #[error("cannot open initrd {}: {source}", path.display())]
    InitrdOpen { path: PathBuf, source: io::Error },
    #[error("cannot read initrd {} into guest memory: {source}", path.display())]
    InitrdRead {
        path: PathBuf,
        source: vm_memory::GuestMemoryError,
    },
    #[error("initrd is {size} bytes but only {available} bytes of RAM are free for it above the kernel; give the VM more memory or use a smaller initrd")]
    InitrdTooLarge { size: u64, available: u64 },
    #[error("guest memory does not back the {ram_size:#x} bytes of RAM the memory map describes; build guest memory from layout::ram_regions")]
    MemoryMismatch { ram_size: u64 },
    #[error("the {what} ({start:#x}..{end:#x}) does not fit below {limit:#x}")]
    BootTableTooLarge {
        what: &'static str,
        start: u64,
        end: u64,
        limit: u64,
    },
    #[error("cannot write the {what} at guest address {addr:#x}: outside guest memory")]
    GuestWrite { what: &'static str, addr: u64 },
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Loads the kernel (and initrd, command line, boot tables) named by `params` into `mem`.
pub fn load_kernel(mem: &GuestMemoryMmap, params: &BootParams) -> Result<BootInfo, BootError> {
    check_memory_backs_ram(mem, params.ram_size)?;
    let mut kernel = open_kernel(&params.kernel)?;
    match detect_format(&mut kernel, &params.kernel)? {
        KernelFormat::BzImage(header) => linux::load_bzimage(mem, params, &mut kernel, header),
        KernelFormat::Elf => load_elf(mem, params, &mut kernel),
    }
}

/// Kernel image formats, told apart by their headers.
#[derive(Debug)]
enum KernelFormat {
    /// Carries the setup header as declared by the image (bytes past its length zeroed).
    BzImage(setup_header),
    Elf,
}

fn open_kernel(path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.to_owned(),
        source,
    })
}

fn kernel_read_error(path: &Path) -> impl FnOnce(io::Error) -> BootError + '_ {
    move |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    }
}

// Offsets in a bzImage (Documentation/x86/boot.rst).
const SETUP_HEADER_OFFSET: usize = 0x1f1;
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const JUMP_LENGTH_OFFSET: usize = 0x201;
const HDRS_OFFSET: usize = 0x202;
const BOOT_FLAG: [u8; 2] = [0x55, 0xaa];
const HDRS_MAGIC: &[u8; 4] = b"HdrS";

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;

fn detect_format(kernel: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let prefix_len = SETUP_HEADER_OFFSET + size_of::<setup_header>();
    let mut prefix = Vec::with_capacity(prefix_len);
    kernel
        .by_ref()
        .take(prefix_len as u64)
        .read_to_end(&mut prefix)
        .map_err(kernel_read_error(path))?;
    if is_x86_64_elf(&prefix) {
        return Ok(KernelFormat::Elf);
    }
    bzimage_header(&prefix)
        .map(KernelFormat::BzImage)
        .ok_or_else(|| BootError::UnknownKernelFormat {
            path: path.to_owned(),
        })
}

fn is_x86_64_elf(prefix: &[u8]) -> bool {
    let mut header = Elf64_Ehdr::default();
    let Some(bytes) = prefix.get(..size_of::<Elf64_Ehdr>()) else {
        return false;
    };
    header.as_mut_slice().copy_from_slice(bytes);
    header.e_ident.starts_with(ELF_MAGIC)
        && header.e_ident[4] == ELFCLASS64
        && header.e_ident[5] == ELFDATA2LSB
        && header.e_machine == EM_X86_64
}

/// The setup header of a bzImage, or `None` if `prefix` is not one. Only the bytes the image
/// declares as header (up to 0x202 + byte 0x201) are kept; the rest is setup code, not header.
fn bzimage_header(prefix: &[u8]) -> Option<setup_header> {
    if prefix.get(BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2) != Some(&BOOT_FLAG[..])
        || prefix.get(HDRS_OFFSET..HDRS_OFFSET + 4) != Some(&HDRS_MAGIC[..])
    {
        return None;
    }
    let declared_end = HDRS_OFFSET + usize::from(*prefix.get(JUMP_LENGTH_OFFSET)?);
    let available = prefix.get(SETUP_HEADER_OFFSET..)?;
    let mut header = setup_header::default();
    let header_bytes = header.as_mut_slice();
    let len = (declared_end - SETUP_HEADER_OFFSET)
        .min(header_bytes.len())
        .min(available.len());
    header_bytes[..len].copy_from_slice(&available[..len]);
    Some(header)
}

/// ELF kernels: PVH if the image carries the PHYS32_ENTRY note, else a vmlinux for the Linux
/// 64-bit protocol.
fn load_elf(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    kernel: &mut File,
) -> Result<BootInfo, BootError> {
    check_elf_segments_fit(kernel, params)?;
    let loaded = Elf::load(
        mem,
        None,
        kernel,
        Some(GuestAddress(layout::HIGH_RAM_START)),
    )
    .map_err(|source| BootError::KernelLoad {
        path: params.kernel.clone(),
        source,
    })?;
    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            pvh::configure(mem, params, entry, loaded.kernel_end)
        }
        _ => linux::configure_vmlinux(mem, params, loaded.kernel_load, loaded.kernel_end),
    }
}

/// Checks that every loadable segment lies in RAM above 1 MiB before anything is written, so a
/// kernel too big for the VM gets a clear error instead of a failed copy.
fn check_elf_segments_fit(kernel: &mut File, params: &BootParams) -> Result<(), BootError> {
    let path = &params.kernel;
    let ram_end = first_ram_region_end(params.ram_size);
    for segment in read_program_headers(kernel, path)? {
        // linux-loader skips segments without file contents; so do we.
        if segment.p_type != PT_LOAD || segment.p_filesz == 0 {
            continue;
        }
        let start = segment.p_paddr;
        let end = start.checked_add(segment.p_memsz.max(segment.p_filesz));
        match end {
            Some(end) if start >= layout::HIGH_RAM_START && end <= ram_end => {}
            _ => {
                return Err(BootError::KernelOutsideRam {
                    path: path.clone(),
                    start,
                    end: end.unwrap_or(u64::MAX),
                    ram_end,
                })
            }
        }
    }
    Ok(())
}

fn read_program_headers(kernel: &mut File, path: &Path) -> Result<Vec<Elf64_Phdr>, BootError> {
    let mut header = Elf64_Ehdr::default();
    kernel.rewind().map_err(kernel_read_error(path))?;
    kernel
        .read_exact(header.as_mut_slice())
        .map_err(kernel_read_error(path))?;
    if usize::from(header.e_phentsize) != size_of::<Elf64_Phdr>() {
        return Err(BootError::UnknownKernelFormat {
            path: path.to_owned(),
        });
    }
    kernel
        .seek(SeekFrom::Start(header.e_phoff))
        .map_err(kernel_read_error(path))?;
    (0..header.e_phnum)
        .map(|_| {
            let mut phdr = Elf64_Phdr::default();
            kernel
                .read_exact(phdr.as_mut_slice())
                .map_err(kernel_read_error(path))?;
            Ok(phdr)
        })
        .collect()
}

/// End of the RAM region that starts at 0; kernels and initrds stay inside it.
fn first_ram_region_end(ram_size: u64) -> u64 {
    layout::ram_regions(ram_size)
        .first()
        .map(|&(start, size)| start + size)
        .unwrap_or(0)
}

fn check_memory_backs_ram(mem: &GuestMemoryMmap, ram_size: u64) -> Result<(), BootError> {
    let backed = layout::ram_regions(ram_size).iter().all(|&(start, size)| {
        usize::try_from(size).is_ok_and(|len| mem.check_range(GuestAddress(start), len))
    });
    if backed && first_ram_region_end(ram_size) > layout::HIGH_RAM_START {
        Ok(())
    } else {
        Err(BootError::MemoryMismatch { ram_size })
    }
}

/// Validates `cmdline` against `max_len` (bytes, without the NUL) and writes it at
/// `layout::CMDLINE_START`.
fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str, max_len: usize) -> Result<(), BootError> {
    let max_len = max_len.min(layout::CMDLINE_MAX_SIZE - 1);
    if cmdline.len() > max_len {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max_len,
        });
    }
    let mut checked =
        Cmdline::new(max_len + 1).map_err(|source| BootError::InvalidCmdline { source })?;
    checked
        .insert_str(cmdline)
        .map_err(|source| BootError::InvalidCmdline { source })?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &checked).map_err(
        |_| BootError::GuestWrite {
            what: "kernel command line",
            addr: layout::CMDLINE_START,
        },
    )
}

/// Where the initrd ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct InitrdPlacement {
    addr: u64,
    size: u64,
}

/// Loads the initrd, if any, at the highest page-aligned address whose last byte is below
/// `limit_end` (and the end of the first RAM region) and which starts above `kernel_end`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    params: &BootParams,
    kernel_end: u64,
    limit_end: u64,
) -> Result<Option<InitrdPlacement>, BootError> {
    let Some(path) = &params.initrd else {
        return Ok(None);
    };
    let open_error = |source| BootError::InitrdOpen {
        path: path.clone(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    let limit_end = limit_end.min(first_ram_region_end(params.ram_size));
    let placement = place_initrd(size, kernel_end, limit_end)?;
    let len =
        usize::try_from(size).map_err(|_| BootError::InitrdTooLarge { size, available: 0 })?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut file, len)
        .map_err(|source| BootError::InitrdRead {
            path: path.clone(),
            source,
        })?;
    Ok(Some(placement))
}

fn place_initrd(size: u64, kernel_end: u64, limit_end: u64) -> Result<InitrdPlacement, BootError> {
    let lowest = align_up(kernel_end, PAGE_SIZE);
    let highest_end = align_down(limit_end, PAGE_SIZE);
    let available = highest_end.saturating_sub(lowest);
    if size > available {
        return Err(BootError::InitrdTooLarge { size, available });
    }
    Ok(InitrdPlacement {
        addr: align_down(highest_end - size, PAGE_SIZE),
        size,
    })
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align).saturating_mul(align)
}

fn align_down(value: u64, align: u64) -> u64 {
    value / align * align
}

#[cfg(test)]
pub(crate) mod test_images;

#[cfg(test)]
mod tests {
    use super::*;
    use test_images::*;

    #[test]
    fn initrd_goes_to_the_highest_page_below_the_limit() {
        let placement = place_initrd(0x1800, 0x20_0000, 0x100_0000).unwrap();

        assert_eq!(
            placement,
            InitrdPlacement {
                addr: 0x100_0000 - 0x2000,
                size: 0x1800
            }
        );
    }

    #[test]
    fn initrd_limit_that_is_not_page_aligned_rounds_down() {
        // initrd_addr_max style limits end in ...fff; the initrd must stay below them.
        let placement = place_initrd(0x1000, 0x20_0000, 0x7fff_ffff + 1 - 0x10).unwrap();

        assert_eq!(placement.addr, 0x7fff_e000);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_is_too_large() {
        let error = place_initrd(0x10_0001, 0x20_0000, 0x30_0000).unwrap_err();

        assert!(matches!(
            error,
            BootError::InitrdTooLarge {
                size: 0x10_0001,
                available: 0x10_0000
            }
        ));
    }

    #[test]
    fn garbage_file_is_an_unknown_kernel_format_naming_the_path() {
        let dir = TempDir::new("garbage");
        let kernel = dir.write("kernel", &[0x5a; 4096]);
        let mem = guest_memory(TEST_RAM);

        let error = load_kernel(&mem, &params(&kernel)).unwrap_err();

        assert!(matches!(&error, BootError::UnknownKernelFormat { path } if *path == kernel));
        assert!(error.to_string().contains(&kernel.display().to_string()));
    }

    #[test]
    fn missing_kernel_file_names_the_path_and_the_os_error() {
        let dir = TempDir::new("missing");
        let kernel = dir.path().join("no-such-kernel");
        let mem = guest_memory(TEST_RAM);

        let error = load_kernel(&mem, &params(&kernel)).unwrap_err();

        assert!(matches!(&error, BootError::KernelOpen { path, source }
            if *path == kernel && source.kind() == io::ErrorKind::NotFound));
        let message = error.to_string();
        assert!(message.contains("no-such-kernel"), "{message}");
        assert!(message.contains("No such file"), "{message}");
    }

    #[test]
    fn missing_initrd_file_names_the_path() {
        let dir = TempDir::new("missing-initrd");
        let kernel = dir.write("kernel", &pvh_elf(TEST_ENTRY));
        let initrd = dir.path().join("no-such-initrd");
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.initrd = Some(initrd.clone());

        let error = load_kernel(&mem, &boot).unwrap_err();

        assert!(matches!(&error, BootError::InitrdOpen { path, .. } if *path == initrd));
    }

    #[test]
    fn memory_smaller_than_ram_size_is_rejected() {
        let dir = TempDir::new("mismatch");
        let kernel = dir.write("kernel", &pvh_elf(TEST_ENTRY));
        let mem = guest_memory(TEST_RAM);
        let mut boot = params(&kernel);
        boot.ram_size = TEST_RAM * 2;

        let error = load_kernel(&mem, &boot).unwrap_err();

        assert!(matches!(error, BootError::MemoryMismatch { .. }));
    }

    #[test]
    fn cmdline_with_control_characters_is_invalid() {
        let mem = guest_memory(TEST_RAM);

        let error = write_cmdline(&mem, "console=ttyS0\nquiet", 100).unwrap_err();

        assert!(matches!(error, BootError::InvalidCmdline { .. }));
    }

    #[test]
    fn cmdline_limit_never_exceeds_the_layout_buffer() {
        let mem = guest_memory(TEST_RAM);
        let cmdline = "a".repeat(layout::CMDLINE_MAX_SIZE);

        let error = write_cmdline(&mem, &cmdline, usize::MAX).unwrap_err();

        assert!(matches!(
            error,
            BootError::CmdlineTooLong { max, .. } if max == layout::CMDLINE_MAX_SIZE - 1
        ));
    }

    #[test]
    fn elf_segment_below_1_mib_is_outside_ram() {
        let dir = TempDir::new("low-elf");
        let kernel = dir.write("kernel", &elf_image(0x8000, 0x8000, &[0xf4], None));
        let mem = guest_memory(TEST_RAM);

        let error = load_kernel(&mem, &params(&kernel)).unwrap_err();

        assert!(matches!(
            error,
            BootError::KernelOutsideRam { start: 0x8000, .. }
        ));
    }
}
