//! Boot vCPU state for each boot protocol: GDT, IDT, identity page tables, segment and control
//! registers, entry registers.
//!
//! - PVH: 32-bit protected mode, paging off, flat CS/DS/ES/SS, EBX = `hvm_start_info`.
//! - Linux 64-bit: long mode with 2 MiB identity pages over the first 4 GiB, CS = 0x10,
//!   DS/ES/SS = 0x18, RSI = zero page.
//!
//! kvm-bindings gives the register structs; turning descriptors into `kvm_segment`s and building
//! the tables is small, protocol-specific work no rust-vmm crate offers, so it is written here.
//! CPUID, MSRs, FPU and LAPIC are configured elsewhere; CPUID must be set before calling
//! [`setup_boot_vcpu`] because KVM refuses EFER.LME without the long-mode CPUID bit.

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, BootInfo, BootProtocol};
use crate::layout;

/// GDT selectors; Linux's boot protocol fixes __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
pub const BOOT_CODE_SELECTOR: u16 = 0x10;
pub const BOOT_DATA_SELECTOR: u16 = 0x18;
const GDT_ENTRIES: usize = 4;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 of EFLAGS is reserved and always set; everything else (IF included) off.
const RFLAGS_RESERVED: u64 = 1 << 1;

// Descriptor access bytes: present, DPL 0, code/data (S), and the type: execute/read for code,
// read/write for data, both marked accessed.
const ACCESS_CODE: u8 = 0x9b;
const ACCESS_DATA: u8 = 0x93;
// System segment type of a busy 32/64-bit TSS and the minimal TSS limit.
const TSS_TYPE_BUSY: u8 = 0xb;
const TSS_LIMIT: u32 = 0x67;
// Descriptor flags nibble: G (4 KiB granularity), D/B (32-bit), L (64-bit code).
const FLAG_G: u8 = 1 << 3;
const FLAG_DB: u8 = 1 << 2;
const FLAG_L: u8 = 1 << 1;

// Page table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_PAGE_SIZE: u64 = 1 << 7;
const PAGE_TABLE_SIZE: u64 = 0x1000;
const ENTRIES_PER_TABLE: u64 = 512;
const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// Page directories mapping 1 GiB each; 4 cover the first 4 GiB (kernel, initrd, boot tables).
const PAGE_DIRECTORIES: u64 = 4;

// The page directories occupy PDE_START.. and must stay clear of the command line.
const _: () =
    assert!(layout::PDE_START + PAGE_DIRECTORIES * PAGE_TABLE_SIZE <= layout::CMDLINE_START);
const _: () = assert!(layout::BOOT_GDT_START + (GDT_ENTRIES as u64) * 8 <= layout::BOOT_IDT_START);

/// Which code segment the boot GDT carries at [`BOOT_CODE_SELECTOR`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CodeMode {
    Protected32,
    Long64,
}

/// Puts the boot vCPU into the state `info.protocol` defines and writes the GDT, IDT and (for
/// the Linux protocol) page tables it needs into `mem`.
pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    info: &BootInfo,
) -> Result<(), BootError> {
    let mode = match info.protocol {
        BootProtocol::Pvh { .. } => CodeMode::Protected32,
        BootProtocol::LinuxBoot64 { .. } => CodeMode::Long64,
    };
    let gdt = boot_gdt(mode);
    write_descriptor_tables(mem, &gdt)?;
    if mode == CodeMode::Long64 {
        write_identity_page_tables(mem)?;
    }

    let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
    configure_sregs(&mut sregs, &gdt, mode);
    vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;
    vcpu.set_regs(&boot_regs(info))
        .map_err(kvm_error("KVM_SET_REGS"))
}

fn kvm_error(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Kvm { what, source }
}

/// null, null, code (32- or 64-bit), data — all flat over 4 GiB.
fn boot_gdt(mode: CodeMode) -> [u64; GDT_ENTRIES] {
    let code_flags = match mode {
        CodeMode::Protected32 => FLAG_G | FLAG_DB,
        CodeMode::Long64 => FLAG_G | FLAG_L,
    };
    [
        0,
        0,
        gdt_descriptor(ACCESS_CODE, code_flags, 0, 0xfffff),
        gdt_descriptor(ACCESS_DATA, FLAG_G | FLAG_DB, 0, 0xfffff),
    ]
}

/// Encodes a segment descriptor (Intel SDM vol. 3, 3.4.5). `limit` is the 20-bit raw limit.
fn gdt_descriptor(access: u8, flags: u8, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit & 0xf_ffff);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (u64::from(access) << 40)
        | ((limit >> 16) << 48)
        | (u64::from(flags & 0xf) << 52)
        | ((base >> 24) << 56)
}

/// Decodes a segment descriptor into the register form KVM takes; `selector` is the selector
/// that refers to it. KVM wants the byte-granular limit, so G scales it here.
fn segment_from_descriptor(descriptor: u64, selector: u16) -> kvm_segment {
    let field = |shift: u32, bits: u32| (descriptor >> shift) & ((1 << bits) - 1);
    let raw_limit = field(0, 16) | (field(48, 4) << 16);
    let granular = field(55, 1) == 1;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = field(47, 1) as u8;
    kvm_segment {
        base: field(16, 24) | (field(56, 8) << 24),
        limit: limit as u32,
        selector,
        type_: field(40, 4) as u8,
        s: field(44, 1) as u8,
        dpl: field(45, 2) as u8,
        present,
        avl: field(52, 1) as u8,
        l: field(53, 1) as u8,
        db: field(54, 1) as u8,
        g: u8::from(granular),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

fn write_descriptor_tables(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), BootError> {
    let bytes: Vec<u8> = gdt.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(layout::BOOT_GDT_START))
        .map_err(|_| BootError::GuestWrite {
            what: "boot GDT",
            addr: layout::BOOT_GDT_START,
        })?;
    // An empty IDT: any exception before the guest installs its own shuts the VM down.
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(|_| BootError::GuestWrite {
            what: "boot IDT",
            addr: layout::BOOT_IDT_START,
        })
}

/// PML4[0] → PDPT; PDPT[0..4] → four page directories of 2 MiB pages: identity over 4 GiB.
fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    let table_entry = |addr: u64| addr | PTE_PRESENT | PTE_WRITABLE;
    let pdpt: Vec<u64> = (0..PAGE_DIRECTORIES)
        .map(|i| table_entry(layout::PDE_START + i * PAGE_TABLE_SIZE))
        .collect();
    let directories: Vec<u64> = (0..PAGE_DIRECTORIES * ENTRIES_PER_TABLE)
        .map(|page| table_entry(page * HUGE_PAGE_SIZE) | PDE_PAGE_SIZE)
        .collect();
    write_table(mem, layout::PML4_START, &[table_entry(layout::PDPTE_START)])?;
    write_table(mem, layout::PDPTE_START, &pdpt)?;
    write_table(mem, layout::PDE_START, &directories)
}

fn write_table(mem: &GuestMemoryMmap, addr: u64, entries: &[u64]) -> Result<(), BootError> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|_| BootError::GuestWrite {
            what: "boot page tables",
            addr,
        })
}

fn configure_sregs(sregs: &mut kvm_sregs, gdt: &[u64; GDT_ENTRIES], mode: CodeMode) {
    let code_index = usize::from(BOOT_CODE_SELECTOR / 8);
    let data_index = usize::from(BOOT_DATA_SELECTOR / 8);
    sregs.cs = segment_from_descriptor(gdt[code_index], BOOT_CODE_SELECTOR);
    let data = segment_from_descriptor(gdt[data_index], BOOT_DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::BOOT_GDT_START;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = layout::BOOT_IDT_START;
    sregs.idt.limit = 0;
    sregs.tr = boot_task_register();

    match mode {
        CodeMode::Protected32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        CodeMode::Long64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// The PVH spec asks for an active 32-bit TSS with base 0 and limit 0x67; the same busy-TSS type
/// is valid in long mode. The guest loads its own TSS before it ever switches tasks.
fn boot_task_register() -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: TSS_LIMIT,
        type_: TSS_TYPE_BUSY,
        present: 1,
        ..Default::default()
    }
}

fn boot_regs(info: &BootInfo) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: info.entry.0,
        ..Default::default()
    };
    match info.protocol {
        BootProtocol::Pvh { start_info } => regs.rbx = start_info.0,
        BootProtocol::LinuxBoot64 { zero_page } => {
            regs.rsi = zero_page.0;
            regs.rsp = layout::BOOT_STACK_POINTER;
            regs.rbp = layout::BOOT_STACK_POINTER;
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::super::test_images::*;
    use super::super::{load_kernel, BootInfo};
    use super::*;
    use kvm_ioctls::{Kvm, VcpuExit, VmFd};

    #[test]
    fn flat_descriptors_have_their_architectural_encodings() {
        assert_eq!(boot_gdt(CodeMode::Protected32)[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(boot_gdt(CodeMode::Long64)[2], 0x00af_9b00_0000_ffff);
        assert_eq!(boot_gdt(CodeMode::Long64)[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn long_mode_code_descriptor_becomes_a_64bit_kvm_segment() {
        let segment = segment_from_descriptor(boot_gdt(CodeMode::Long64)[2], 0x10);

        assert_eq!(segment.selector, 0x10);
        assert_eq!((segment.base, segment.limit), (0, 0xffff_ffff));
        assert_eq!((segment.type_, segment.s, segment.dpl), (0xb, 1, 0));
        assert_eq!((segment.present, segment.unusable), (1, 0));
        assert_eq!((segment.l, segment.db, segment.g), (1, 0, 1));
    }

    #[test]
    fn data_descriptor_becomes_a_32bit_writable_kvm_segment() {
        let segment = segment_from_descriptor(boot_gdt(CodeMode::Protected32)[3], 0x18);

        assert_eq!((segment.type_, segment.l, segment.db), (0x3, 0, 1));
        assert_eq!(segment.limit, 0xffff_ffff);
    }

    #[test]
    fn base_and_byte_granular_limit_round_trip() {
        let descriptor = gdt_descriptor(ACCESS_DATA, 0, 0x1234_5678, 0x0_abcd);

        let segment = segment_from_descriptor(descriptor, 0x8);

        assert_eq!(segment.base, 0x1234_5678);
        assert_eq!(segment.limit, 0xabcd);
        assert_eq!(segment.g, 0);
    }

    #[test]
    fn not_present_descriptor_is_unusable() {
        let segment = segment_from_descriptor(0, 0);

        assert_eq!((segment.present, segment.unusable), (0, 1));
    }

    #[test]
    fn identity_tables_map_the_first_4_gib_with_2_mib_pages() {
        let mem = guest_memory(TEST_RAM);

        write_identity_page_tables(&mem).unwrap();

        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        assert_eq!(read(layout::PML4_START), layout::PDPTE_START | 0x3);
        for directory in 0..4 {
            assert_eq!(
                read(layout::PDPTE_START + directory * 8),
                (layout::PDE_START + directory * 0x1000) | 0x3
            );
        }
        assert_eq!(read(layout::PDPTE_START + 4 * 8), 0);
        assert_eq!(read(layout::PDE_START), 0x83);
        let last = layout::PDE_START + 4 * 0x1000 - 8;
        assert_eq!(read(last), ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    /// A VM with `TEST_RAM` of memory and one vCPU whose CPUID is the host's supported set,
    /// or `None` (after printing SKIP) without usable KVM.
    fn kvm_vcpu() -> Option<(Kvm, VmFd, VcpuFd, GuestMemoryMmap)> {
        let kvm = match Kvm::new() {
            Ok(kvm) => kvm,
            Err(error) => {
                println!("SKIP: no /dev/kvm ({error})");
                return None;
            }
        };
        let vm = kvm.create_vm().expect("create VM");
        let mem = guest_memory(TEST_RAM);
        for (slot, region) in layout::ram_regions(TEST_RAM).iter().enumerate() {
            let host = mem
                .get_host_address(GuestAddress(region.0))
                .expect("host address");
            let region = kvm_bindings::kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.0,
                memory_size: region.1,
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region maps `mem`, which outlives the VM in every test using it
            // (returned together, dropped together at the end of the test).
            unsafe { vm.set_user_memory_region(region) }.expect("map guest memory");
        }
        let vcpu = vm.create_vcpu(0).expect("create vCPU");
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .expect("supported CPUID");
        vcpu.set_cpuid2(&cpuid).expect("set CPUID");
        Some((kvm, vm, vcpu, mem))
    }

    fn load(mem: &GuestMemoryMmap, name: &str, image: &[u8]) -> BootInfo {
        let dir = TempDir::new(name);
        let kernel = dir.write(name, image);
        load_kernel(mem, &params(&kernel)).expect("load test kernel")
    }

    /// Runs the vCPU until the first exit and returns the port-0xf4 byte the guest wrote.
    fn run_to_exit_port(vcpu: &mut VcpuFd) -> Option<u8> {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(0xf4, data)) => data.first().copied(),
            other => {
                println!("unexpected exit: {other:?}");
                None
            }
        }
    }

    use vm_memory::GuestMemoryBackend;

    #[test]
    fn linux_boot_puts_the_vcpu_in_long_mode_at_the_entry() {
        let Some((_kvm, _vm, mut vcpu, mem)) = kvm_vcpu() else {
            return;
        };
        let info = load(&mem, "bzImage", &bzimage(bz_header(0x020f, 1)));

        setup_boot_vcpu(&vcpu, &mem, &info).unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.db), (0x10, 1, 0));
        for data in [sregs.ds, sregs.es, sregs.ss] {
            assert_eq!(data.selector, 0x18);
        }
        assert_eq!(
            (sregs.gdt.base, sregs.gdt.limit),
            (layout::BOOT_GDT_START, 31)
        );
        assert_eq!(
            (sregs.idt.base, sregs.idt.limit),
            (layout::BOOT_IDT_START, 0)
        );
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, u64::from(BZ_LOAD) + 0x200);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
        assert_eq!(regs.rflags, 0x2);

        // The entry code runs under these page tables and segments and reaches its port write.
        assert_eq!(run_to_exit_port(&mut vcpu), Some(0x42));
    }

    #[test]
    fn pvh_boot_puts_the_vcpu_in_flat_32bit_protected_mode() {
        let Some((_kvm, _vm, mut vcpu, mem)) = kvm_vcpu() else {
            return;
        };
        let info = load(&mem, "pvh.elf", &pvh_elf(TEST_ENTRY));

        setup_boot_vcpu(&vcpu, &mem, &info).unwrap();

        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), 0);
        assert_eq!(sregs.cr4 & CR4_PAE, 0);
        let cs = sregs.cs;
        assert_eq!((cs.selector, cs.base, cs.limit), (0x10, 0, 0xffff_ffff));
        assert_eq!((cs.l, cs.db, cs.type_ & 0x8), (0, 1, 0x8));
        for data in [sregs.ds, sregs.es, sregs.ss] {
            assert_eq!(
                (data.selector, data.base, data.limit),
                (0x18, 0, 0xffff_ffff)
            );
        }
        assert_eq!(
            (sregs.tr.type_, sregs.tr.limit, sregs.tr.present),
            (0xb, 0x67, 1)
        );
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, TEST_ENTRY);
        assert_eq!(regs.rbx, layout::PVH_INFO_START);
        assert_eq!(regs.rflags, 0x2);

        assert_eq!(run_to_exit_port(&mut vcpu), Some(0x42));
    }
}
