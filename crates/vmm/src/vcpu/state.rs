//! [`VcpuState`]: everything KVM holds for one vCPU that a snapshot must carry — general and
//! system registers, the FPU/SSE state (KVM_GET_XSAVE), XCRs, debug registers, the MSRs KVM
//! lists as saveable and this vCPU can read, the local APIC, pending events and the MP state —
//! captured from a vCPU that is not running and put back into a fresh one of the same shape.
//! Serialisable (kvm-bindings' serde support), so it rides in the snapshot's versioned JSON.
//!
//! Restore order follows what KVM needs: MP state, then registers, FPU and XCRs, LAPIC (before
//! MSRs, since the TSC deadline MSR needs the LAPIC's mode), MSRs, and the vCPU events last,
//! because setting registers can clear a pending exception or interrupt.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// Why a vCPU's state could not be taken or put back.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the MSR list does not fit KVM's limits")]
    MsrList,
    #[error("KVM took {set} of {wanted} MSRs back")]
    MsrsRefused { set: usize, wanted: usize },
}

fn step<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Kvm { what, source })
}

/// One vCPU's architectural and KVM state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    /// `None` where the host has no XCRs to give (no XSAVE, e.g. kvm_pvm).
    pub xcrs: Option<kvm_xcrs>,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish_non_exhaustive()
    }
}

/// The MSR indices KVM says it can save and restore.
pub fn saveable_msrs(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    let list = step("KVM_GET_MSR_INDEX_LIST", kvm.get_msr_index_list())?;
    Ok(list.as_slice().to_vec())
}

impl VcpuState {
    /// Reads the state of `vcpu`, which must not be in KVM_RUN. `msr_indices` come from
    /// [`saveable_msrs`]; those this vCPU refuses to read are left out.
    pub fn capture(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self, StateError> {
        Ok(Self {
            regs: step("KVM_GET_REGS", vcpu.get_regs())?,
            sregs: step("KVM_GET_SREGS", vcpu.get_sregs())?,
            xsave: step("KVM_GET_XSAVE", vcpu.get_xsave())?,
            xcrs: vcpu.get_xcrs().ok(),
            debug_regs: step("KVM_GET_DEBUGREGS", vcpu.get_debug_regs())?,
            lapic: step("KVM_GET_LAPIC", vcpu.get_lapic())?,
            msrs: readable_msrs(vcpu, msr_indices)?,
            events: step("KVM_GET_VCPU_EVENTS", vcpu.get_vcpu_events())?,
            mp_state: step("KVM_GET_MP_STATE", vcpu.get_mp_state())?,
        })
    }

    /// Puts the state into `vcpu` (created on a VM of the same shape, its CPUID already set).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        step("KVM_SET_MP_STATE", vcpu.set_mp_state(self.mp_state))?;
        step("KVM_SET_REGS", vcpu.set_regs(&self.regs))?;
        step("KVM_SET_SREGS", vcpu.set_sregs(&self.sregs))?;
        // SAFETY: the buffer was filled by KVM_GET_XSAVE on a vCPU of the same kind, so its
        // layout is the one KVM_SET_XSAVE expects.
        step("KVM_SET_XSAVE", unsafe { vcpu.set_xsave(&self.xsave) })?;
        if let Some(xcrs) = &self.xcrs {
            step("KVM_SET_XCRS", vcpu.set_xcrs(xcrs))?;
        }
        step("KVM_SET_DEBUGREGS", vcpu.set_debug_regs(&self.debug_regs))?;
        step("KVM_SET_LAPIC", vcpu.set_lapic(&self.lapic))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| StateError::MsrList)?;
        let set = step("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
        if set != self.msrs.len() {
            return Err(StateError::MsrsRefused {
                set,
                wanted: self.msrs.len(),
            });
        }
        step("KVM_SET_VCPU_EVENTS", vcpu.set_vcpu_events(&self.events))
    }
}

/// MSRs asked for in one KVM_GET_MSRS (within kvm-bindings' `Msrs` limit).
const MSRS_PER_CALL: usize = 200;

/// The MSRs of `indices` this vCPU gives back, with their values. KVM stops a KVM_GET_MSRS at
/// the first index it refuses, so a short read skips that index and goes on after it.
fn readable_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut read = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest[..rest.len().min(MSRS_PER_CALL)]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| StateError::MsrList)?;
        let got = step("KVM_GET_MSRS", vcpu.get_msrs(&mut msrs))?.min(chunk.len());
        read.extend_from_slice(&msrs.as_slice()[..got]);
        // A full chunk goes on with the next one; a short one skips the refused index.
        let consumed = if got == chunk.len() { got } else { got + 1 };
        rest = rest.get(consumed..).unwrap_or(&[]);
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestRam;
    use kvm_ioctls::{VcpuExit, VmFd};
    use vm_memory::{Bytes, GuestAddress};

    /// Real mode at 0:0x1000: `1: inc word [0x2000]; out 0x80, al; jmp 1b` — one port exit
    /// per count.
    const COUNTER: [u8; 8] = [0xff, 0x06, 0x00, 0x20, 0xe6, 0x80, 0xeb, 0xf8];

    fn vm_with(kvm: &Kvm, ram: &GuestRam) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        ram.register(&vm).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        (vm, vcpu)
    }

    /// Runs `vcpu` until it has taken `exits` port exits.
    fn run_exits(vcpu: &mut VcpuFd, exits: u32) {
        let mut seen = 0;
        while seen < exits {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(0x80, _) => seen += 1,
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    fn counter(ram: &GuestRam) -> u16 {
        ram.memory.read_obj(GuestAddress(0x2000)).unwrap()
    }

    #[test]
    fn a_vcpu_captured_mid_run_continues_on_a_fresh_vm_from_its_json() {
        let Ok(kvm) = Kvm::new() else {
            println!("SKIP vcpu state test: /dev/kvm unusable");
            return;
        };
        let ram = GuestRam::new(16 << 20).unwrap();
        ram.memory
            .write_slice(&COUNTER, GuestAddress(0x1000))
            .unwrap();
        let (_vm, mut vcpu) = vm_with(&kvm, &ram);
        let mut sregs = vcpu.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        regs.rbx = 0x5eed;
        vcpu.set_regs(&regs).unwrap();
        run_exits(&mut vcpu, 10);
        let msrs = saveable_msrs(&kvm).unwrap();

        let state = VcpuState::capture(&vcpu, &msrs).unwrap();
        let json = serde_json::to_string(&state).unwrap();
        let copy = GuestRam::new(16 << 20).unwrap();
        let mut image = vec![0u8; 0x3000];
        ram.memory.read_slice(&mut image, GuestAddress(0)).unwrap();
        copy.memory.write_slice(&image, GuestAddress(0)).unwrap();
        let (_vm2, mut restored) = vm_with(&kvm, &copy);
        let back: VcpuState = serde_json::from_str(&json).unwrap();
        back.restore(&restored).unwrap();
        run_exits(&mut restored, 5);

        assert_eq!(counter(&ram), 10);
        assert_eq!(
            counter(&copy),
            15,
            "the copy went on counting where the original stopped"
        );
        let regs = restored.get_regs().unwrap();
        assert_eq!(regs.rbx, 0x5eed);
        assert!(!state.msrs.is_empty(), "{state:?}");
    }
}
