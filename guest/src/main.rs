//! sluice guest kit: a freestanding x86_64 kernel booted via PVH that enumerates ACPI and PCI,
//! drives virtio devices and runs the workloads named on its command line, reporting `RESULT`
//! lines and a final `GUEST-KIT PASS|FAIL` on COM1 and its status on the debug-exit port.
//! See the guest kit contract (helpers/guest-kit-contract.md) for the command line and output.
//!
//! Built without SSE (guest/.cargo/config.toml): under kvm_pvm the guest runs inside KVM's
//! instruction emulator, which has no SSE arithmetic. Also never emitted: int n/int3, XSAVE
//! family, XGETBV, cmpxchg16b.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod cmdline;
mod console;
mod drivers;
mod exit;
mod global;
mod interrupts;
mod mem;
mod pci;
mod phys;
mod pvh;
mod rt;
mod smp;
mod time;
mod workloads;

use exit::Status;

/// Wake-up timer period: bounds every HLT so deadlines are checked.
const WAKEUP_PERIOD_US: u32 = 10_000;

#[no_mangle]
extern "C" fn rust_main(start_info: u32) -> ! {
    console::init();
    arch::idt::init();
    let Some(boot) = pvh::parse(u64::from(start_info)) else {
        exit::fail(Status::BadCommandLine, format_args!("no PVH start info"));
    };
    mem::init(boot.ram_regions());
    smp::init(boot.ram_regions());
    say!("guest kit booting, cmdline \"{}\"", boot.cmdline());
    let config = match cmdline::parse(boot.cmdline()) {
        Ok(config) => config,
        Err(error) => exit::fail(
            Status::BadCommandLine,
            format_args!("bad command line: {}", error),
        ),
    };
    console::set_quiet(config.quiet);
    arch::ring3::set_workload_ring(config.ring);
    drivers::virtio::set_wanted_layout(config.vq);
    chatter!("{} KiB free for heap and DMA", mem::free_bytes() / 1024);
    acpi::init(boot.rsdp);
    if config.virtual_clock {
        time::init_virtual();
    } else {
        time::init();
    }
    interrupts::init();
    // With the virtual clock no timer interrupt either: it would land at points that depend on
    // host time (its HLT waits are then bounded by the interrupts they wait for only).
    if !config.virtual_clock {
        interrupts::start_wakeup_timer(WAKEUP_PERIOD_US);
    }
    // Interrupts stay enabled from here on: handlers only count and EOI.
    arch::enable_interrupts();
    pci::init(
        acpi::info().and_then(|info| info.ecam.first().copied()),
        true,
    );
    if config.iommu {
        if let Err(error) = drivers::vtd::enable() {
            exit::fail(Status::WorkloadFailed, format_args!("iommu=vtd: {}", error));
        }
    }
    let status = workloads::run_all(&config);
    match status {
        Status::Pass => println!("GUEST-KIT PASS"),
        Status::Timeout => println!("GUEST-KIT FAIL timeout"),
        _ => println!("GUEST-KIT FAIL workload failed"),
    }
    exit::exit(status)
}
