//! Test fixtures: synthetic kernel images (PVH ELF, vmlinux-style ELF, bzImage), guest memory
//! and a self-deleting temporary directory. Built byte by byte so tests need no downloads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::bootparam::setup_header;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Nhdr, Elf64_Phdr, PT_LOAD, PT_NOTE};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::BootParams;
use crate::layout;

pub const TEST_RAM: u64 = 64 << 20;
/// Where the synthetic ELF kernels load and start.
pub const TEST_ENTRY: u64 = 0x10_0000;
/// Bytes of zero-initialised memory (bss) each synthetic ELF asks for past its code.
pub const TEST_BSS: u64 = 0x1000;
pub const TEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
pub const TEST_RSDP: u64 = layout::ACPI_START;
/// `mov al, 0x42; out 0xf4, al; hlt` — runs the same in 32- and 64-bit mode.
pub const EXIT_CODE: [u8; 5] = [0xb0, 0x42, 0xe6, 0xf4, 0xf4];

pub fn guest_memory(ram_size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(ram_size)
        .into_iter()
        .map(|(start, size)| (GuestAddress(start), size as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("test guest memory")
}

pub fn params(kernel: &Path) -> BootParams {
    BootParams {
        kernel: kernel.to_owned(),
        initrd: None,
        cmdline: TEST_CMDLINE.to_string(),
        ram_size: TEST_RAM,
        rsdp: GuestAddress(TEST_RSDP),
    }
}

const ELF_HEADER_SIZE: usize = size_of::<Elf64_Ehdr>();
const PROGRAM_HEADER_SIZE: usize = size_of::<Elf64_Phdr>();
const CODE_OFFSET: usize = 0x200;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// A minimal x86-64 ELF: one PT_LOAD of `code` at `paddr` and, with `pvh_entry`, a PT_NOTE
/// holding the Xen PHYS32_ENTRY note.
pub fn elf_image(paddr: u64, entry: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
    let note = pvh_entry.map(pvh_note).unwrap_or_default();
    let phnum = if note.is_empty() { 1 } else { 2 };
    let note_offset = ELF_HEADER_SIZE + phnum * PROGRAM_HEADER_SIZE;
    assert!(note_offset + note.len() <= CODE_OFFSET);

    let mut image = vec![0u8; CODE_OFFSET + code.len()];
    image[..ELF_HEADER_SIZE].copy_from_slice(elf_header(entry, phnum as u16).as_slice());
    let load = Elf64_Phdr {
        p_type: PT_LOAD,
        p_flags: 0x5, // R+X
        p_offset: CODE_OFFSET as u64,
        p_vaddr: paddr,
        p_paddr: paddr,
        p_filesz: code.len() as u64,
        p_memsz: code.len() as u64 + TEST_BSS,
        p_align: 0x1000,
    };
    let mut headers = vec![load];
    if !note.is_empty() {
        headers.push(Elf64_Phdr {
            p_type: PT_NOTE,
            p_offset: note_offset as u64,
            p_filesz: note.len() as u64,
            p_memsz: note.len() as u64,
            p_align: 4,
            ..Default::default()
        });
    }
    for (index, header) in headers.iter().enumerate() {
        let at = ELF_HEADER_SIZE + index * PROGRAM_HEADER_SIZE;
        image[at..at + PROGRAM_HEADER_SIZE].copy_from_slice(header.as_slice());
    }
    image[note_offset..note_offset + note.len()].copy_from_slice(&note);
    image[CODE_OFFSET..].copy_from_slice(code);
    image
}

fn elf_header(entry: u64, phnum: u16) -> Elf64_Ehdr {
    let mut ident = [0u8; 16];
    ident[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    Elf64_Ehdr {
        e_ident: ident,
        e_type: 2, // ET_EXEC
        e_machine: 62,
        e_version: 1,
        e_entry: entry,
        e_phoff: ELF_HEADER_SIZE as u64,
        e_ehsize: ELF_HEADER_SIZE as u16,
        e_phentsize: PROGRAM_HEADER_SIZE as u16,
        e_phnum: phnum,
        ..Default::default()
    }
}

fn pvh_note(entry: u32) -> Vec<u8> {
    let header = Elf64_Nhdr {
        n_namesz: 4,
        n_descsz: 4,
        n_type: XEN_ELFNOTE_PHYS32_ENTRY,
    };
    let mut note = header.as_slice().to_vec();
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&entry.to_le_bytes());
    note
}

/// A PVH kernel whose entry point runs [`EXIT_CODE`].
pub fn pvh_elf(entry: u64) -> Vec<u8> {
    elf_image(TEST_ENTRY, TEST_ENTRY, &EXIT_CODE, Some(entry as u32))
}

/// A vmlinux-style ELF (no PVH note) whose entry point runs [`EXIT_CODE`].
pub fn vmlinux_elf() -> Vec<u8> {
    elf_image(TEST_ENTRY, TEST_ENTRY, &EXIT_CODE, None)
}

pub const BZ_SETUP_SECTS: u8 = 1;
pub const BZ_LOAD: u32 = 0x10_0000;
pub const BZ_PREF_ADDRESS: u64 = 0x100_0000;
pub const BZ_INIT_SIZE: u32 = 0x20_0000;
pub const BZ_INITRD_ADDR_MAX: u32 = 0x7fff_ffff;
pub const BZ_CMDLINE_SIZE: u32 = 2047;

/// The header of a synthetic bzImage in the layout Linux 2.15 kernels use.
pub fn bz_header(version: u16, xloadflags: u16) -> setup_header {
    let header_end = 0x1f1 + size_of::<setup_header>();
    setup_header {
        setup_sects: BZ_SETUP_SECTS,
        boot_flag: 0xaa55,
        // `jmp short` over the header: byte 0x201 is the header length past 0x202.
        jump: 0xeb | (((header_end - 0x202) as u16) << 8),
        header: u32::from_le_bytes(*b"HdrS"),
        version,
        loadflags: 0x01, // LOADED_HIGH: a bzImage
        code32_start: BZ_LOAD,
        initrd_addr_max: BZ_INITRD_ADDR_MAX,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        xloadflags,
        cmdline_size: BZ_CMDLINE_SIZE,
        pref_address: BZ_PREF_ADDRESS,
        init_size: BZ_INIT_SIZE,
        ..Default::default()
    }
}

/// A bzImage: boot sector + one setup sector carrying `header`, then a protected-mode payload
/// whose 64-bit entry (offset 0x200) runs [`EXIT_CODE`].
pub fn bzimage(header: setup_header) -> Vec<u8> {
    let setup_len = (usize::from(BZ_SETUP_SECTS) + 1) * 512;
    let mut image = vec![0u8; setup_len + 0x200 + EXIT_CODE.len()];
    let header_bytes = header.as_slice();
    image[0x1f1..0x1f1 + header_bytes.len()].copy_from_slice(header_bytes);
    image[setup_len + 0x200..].copy_from_slice(&EXIT_CODE);
    image
}

/// A directory under the system temp dir, removed with everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let unique = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "sluice-boot-{label}-{}-{unique}",
            std::process::id()
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: &[u8]) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
