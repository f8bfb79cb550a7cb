//! `eject[:wait=MS]`: plays the guest's side of sluice's ACPI PCI hot-plug without an ACPI
//! interpreter. It polls the hot-plug register block's `PCID` word (slots the host asks the
//! guest to eject, read-to-clear) until a request arrives or `wait` ms pass, then writes those
//! slots to `PCEJ`, as the DSDT's `_EJ0` does. The host can then finish a removal with the
//! guest kit (its other workloads never touch the ejected device).

use super::Outcome;

/// sluice's hot-plug register block (sluice-vmm `layout::HOTPLUG_PORT`).
const HOTPLUG_PORT: u16 = 0x620;
const PCID: u16 = HOTPLUG_PORT + 0x4;
const PCEJ: u16 = HOTPLUG_PORT + 0x8;
/// Between two reads of `PCID`: each read is an exit to the VMM.
const POLL_US: u64 = 2000;

/// Waits for an eject request; the slot bitmap asked for, 0 if none came in time.
fn wait_for_request(wait_ms: u64) -> u32 {
    let deadline = crate::time::Deadline::after_ms(wait_ms);
    loop {
        // A VMM without the block reads all ones: no slot 0 (the host bridge) is ever asked.
        let slots = crate::arch::inl(PCID);
        if slots != 0 && slots != u32::MAX {
            return slots;
        }
        if deadline.expired() {
            return 0;
        }
        let pause = crate::time::Deadline::after_us(POLL_US);
        while !pause.expired() {
            core::hint::spin_loop();
        }
    }
}

pub fn run(wait_ms: u64) -> Outcome {
    let slots = wait_for_request(wait_ms);
    if slots != 0 {
        crate::arch::outl(PCEJ, slots);
    }
    let pass = slots != 0;
    crate::println!(
        "RESULT {{\"workload\":\"eject\",\"slots\":\"{:#x}\",\"pass\":{}}}",
        slots,
        pass
    );
    if pass {
        Outcome::Pass
    } else {
        Outcome::Fail
    }
}
