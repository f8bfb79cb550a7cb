//! IDT with all 256 vectors, a TSS whose IST stacks every gate but #UD uses (the prebuilt
//! `core` uses the red zone, so the CPU must never push a frame onto the interrupted stack),
//! the TSS.rsp0 kernel stack that #UD from ring 3 (the service call, arch::ring3) runs on, and
//! the common assembly stub that saves the scratch registers and calls Rust. The kernel is built without
//! SSE (see .cargo/config.toml), so there is no vector state to save.
//!
//! CPU exceptions (vectors 0..32; a #UD from ring 3 is a service call instead) print vector, RIP and error code and exit with status 3;
//! every other vector goes to `crate::interrupts::on_interrupt`.

use core::ptr::{addr_of, addr_of_mut};

/// Stack for exceptions (IST1), double fault/NMI/MCE (IST2) and device interrupts (IST3).
const IST_STACK_SIZE: usize = 32 * 1024;
const TSS_SELECTOR: u16 = 0x18;
const CODE_SELECTOR: u16 = 0x08;
/// #UD: from ring 3, the service call (arch::ring3).
const INVALID_OPCODE: u64 = 6;
/// Descriptors in every GDT: null, kernel code and data, the TSS (two words), user data and
/// user code (see boot.rs and arch::ring3).
pub const GDT_ENTRIES: usize = 7;
/// The GDT words that are the same on every CPU (all but the TSS descriptor).
const SHARED_GDT_WORDS: [usize; 5] = [0, 1, 2, 5, 6];
/// Kernel stack a CPU switches to (TSS.rsp0) when an event without an IST stack arrives at CPL3.
const KERNEL_STACK_SIZE: usize = IST_STACK_SIZE;

#[repr(C, align(16))]
struct Stack([u8; IST_STACK_SIZE]);

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// What the assembly stub hands to Rust: saved scratch registers, then vector, error code and
/// the CPU-pushed interrupt frame.
#[repr(C)]
pub struct TrapFrame {
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

static mut IST_STACKS: [Stack; 3] = [const { Stack([0; IST_STACK_SIZE]) }; 3];
static mut BSP_KERNEL_STACK: Stack = Stack([0; KERNEL_STACK_SIZE]);
static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: size_of::<Tss>() as u16,
};
static mut IDT: [Gate; 256] = [Gate {
    offset_low: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_high: 0,
    reserved: 0,
}; 256];

extern "C" {
    static mut boot_gdt: [u64; GDT_ENTRIES];
    static isr_stubs: u8;
}

core::arch::global_asm!(
    r#"
    .text
    .balign 16, 0x90
    .global isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16, 0x90
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    cld
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    mov %rsp, %rdi
    call isr_dispatch
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn isr_dispatch(frame: *mut TrapFrame) {
    // SAFETY: the stub passes a pointer to the frame it just built on the IST stack.
    let frame = unsafe { &mut *frame };
    if frame.vector == INVALID_OPCODE && frame.cs & 3 == 3 && super::ring3::handle_service(frame) {
        return;
    }
    if frame.vector < 32 {
        crate::exit::cpu_exception(frame);
    }
    crate::interrupts::on_interrupt(frame.vector as u8);
}

fn stack_top(index: usize) -> u64 {
    // SAFETY: only the address is taken; the stacks are used by the CPU alone.
    let base = unsafe { addr_of!(IST_STACKS[index]) } as u64;
    base + IST_STACK_SIZE as u64
}

/// The two GDT words of an available 64-bit TSS at `base`.
fn tss_descriptor(base: u64) -> [u64; 2] {
    let limit = (size_of::<Tss>() - 1) as u64;
    let low = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x89 << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    [low, base >> 32]
}

fn install_tss() {
    // SAFETY: single CPU, called once during boot before interrupts are enabled.
    unsafe {
        let tss = &mut *addr_of_mut!(TSS);
        tss.ist[0] = stack_top(0);
        tss.ist[1] = stack_top(1);
        tss.ist[2] = stack_top(2);
        tss.rsp[0] = addr_of!(BSP_KERNEL_STACK) as u64 + KERNEL_STACK_SIZE as u64;
        let [low, high] = tss_descriptor(addr_of!(TSS) as u64);
        let gdt = &mut *addr_of_mut!(boot_gdt);
        gdt[3] = low;
        gdt[4] = high;
        core::arch::asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack));
    }
}

fn ist_for(vector: usize) -> u8 {
    match vector {
        // No IST: the service call from ring 3 (arch::ring3) runs on TSS.rsp0, where it may
        // enable interrupts and halt (they take IST3).
        6 => 0,
        2 | 8 | 18 => 2,
        0..=31 => 1,
        _ => 3,
    }
}

fn install_idt() {
    // `isr_stubs` is the start of 256 16-byte stubs emitted above (taking its address is safe).
    let stubs = addr_of!(isr_stubs) as u64;
    // SAFETY: single CPU, boot time, interrupts off.
    unsafe {
        let idt = &mut *addr_of_mut!(IDT);
        for (vector, gate) in idt.iter_mut().enumerate() {
            let handler = stubs + 16 * vector as u64;
            *gate = Gate {
                offset_low: handler as u16,
                selector: CODE_SELECTOR,
                ist: ist_for(vector),
                type_attr: 0x8e,
                offset_mid: (handler >> 16) as u16,
                offset_high: (handler >> 32) as u32,
                reserved: 0,
            };
        }
    }
    load_idt();
}

/// Loads the shared IDT on this CPU.
fn load_idt() {
    let pointer = DescriptorPointer {
        limit: (size_of::<[Gate; 256]>() - 1) as u16,
        base: addr_of!(IDT) as u64,
    };
    // SAFETY: IDT is a static that lives forever and is fully initialised by `install_idt`
    // before any CPU loads it.
    unsafe {
        core::arch::asm!("lidt [{}]", in(reg) &raw const pointer, options(nostack, readonly))
    };
}

/// Installs the TSS and the IDT. Interrupts stay disabled.
pub fn init() {
    install_tss();
    install_idt();
}

/// What an application processor needs of its own: a GDT (a TSS descriptor turns busy when
/// loaded, so CPUs cannot share one), a TSS and the IST stacks it names. The IDT is shared.
#[repr(C)]
pub struct CpuTables {
    gdt: [u64; GDT_ENTRIES],
    tss: Tss,
    ist_stacks: [Stack; 3],
    kernel_stack: Stack,
}

impl CpuTables {
    /// Allocates zeroed tables for one AP. Never freed: an AP lives as long as the run.
    pub fn allocate() -> Option<&'static mut CpuTables> {
        let addr = crate::mem::alloc_private(size_of::<CpuTables>() as u64)?;
        // SAFETY: the range is fresh, zeroed, page aligned and ours alone; all-zero bytes are
        // a valid `CpuTables` (it holds only integers).
        Some(unsafe { &mut *(addr as *mut CpuTables) })
    }
}

/// Makes `tables` this CPU's GDT and TSS (same selectors as the BSP's) and loads the shared
/// IDT. Called once on each AP, interrupts off, before it takes any interrupt.
pub fn load_on_this_cpu(tables: &'static mut CpuTables) {
    // SAFETY: the BSP wrote boot_gdt's code and data descriptors at boot and never changes
    // them; only those words are read (not the BSP's TSS descriptor, which it owns).
    let shared = unsafe { &*addr_of!(boot_gdt) };
    for word in SHARED_GDT_WORDS {
        tables.gdt[word] = shared[word];
    }
    tables.tss.rsp[0] = addr_of!(tables.kernel_stack) as u64 + KERNEL_STACK_SIZE as u64;
    for (index, stack) in tables.ist_stacks.iter().enumerate() {
        let base = addr_of!(*stack) as u64;
        tables.tss.ist[index] = base + IST_STACK_SIZE as u64;
    }
    tables.tss.iomap_base = size_of::<Tss>() as u16;
    let [low, high] = tss_descriptor(addr_of!(tables.tss) as u64);
    tables.gdt[3] = low;
    tables.gdt[4] = high;
    let pointer = DescriptorPointer {
        limit: (size_of::<[u64; GDT_ENTRIES]>() - 1) as u16,
        base: addr_of!(tables.gdt) as u64,
    };
    // SAFETY: the GDT lives forever (leaked allocation) and keeps selector 0x08 a 64-bit code
    // segment and 0x10 data, which CS and the data segments already hold; 0x18 is the TSS
    // just described, whose IST stacks are this CPU's own.
    unsafe {
        core::arch::asm!("lgdt [{}]", in(reg) &raw const pointer, options(nostack, readonly));
        core::arch::asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack));
    }
    load_idt();
}
