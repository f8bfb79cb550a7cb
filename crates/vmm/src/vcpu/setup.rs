//! Per-vCPU architectural setup that does not depend on the boot protocol: CPUID, MSRs, FPU and
//! LAPIC LINT pins. The boot protocol's register state lives in `crate::boot`.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 failed: {0}")]
    SetCpuid(kvm_ioctls::Error),
    #[error("KVM_SET_MSRS failed: {0}")]
    SetMsrs(kvm_ioctls::Error),
    #[error("KVM accepted only {set} of {wanted} boot MSRs")]
    PartialMsrs { set: usize, wanted: usize },
    #[error("KVM_SET_FPU failed: {0}")]
    SetFpu(kvm_ioctls::Error),
    #[error("LAPIC state access failed: {0}")]
    Lapic(kvm_ioctls::Error),
    #[error("building an MSR list failed")]
    MsrList,
}

/// What the host's KVM can run; decides which CPU features guests may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKvm {
    /// Hardware-backed (kvm_intel / kvm_amd).
    Hardware,
    /// kvm_pvm: software nested virtualization that fails on XSAVE/XGETBV and CMPXCHG16B.
    Pvm,
}

impl HostKvm {
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HostKvm::Pvm
        } else {
            HostKvm::Hardware
        }
    }
}

// CPUID bit positions used below (Intel SDM vol. 2A, CPUID).
const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_OSXSAVE: u32 = 1 << 27;
const LEAF1_ECX_AVX: u32 = 1 << 28;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF7_EBX_AVX2: u32 = 1 << 5;
const LEAF7_EBX_AVX512F: u32 = 1 << 16;
/// KVM's TSC/bus frequency leaf (kHz), read by guests that want a calibrated clock.
const KVM_TIMING_LEAF: u32 = 0x4000_0010;
const KVM_SIGNATURE_LEAF: u32 = 0x4000_0000;

/// The CPUID table every vCPU of the VM starts from.
pub fn base_cpuid(kvm: &Kvm, host: HostKvm) -> Result<CpuId, SetupError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(SetupError::SupportedCpuid)?;
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                entry.ecx &= !LEAF1_ECX_OSXSAVE; // reflects guest CR4; the guest sets it itself
                if host == HostKvm::Pvm {
                    entry.ecx &= !(LEAF1_ECX_XSAVE | LEAF1_ECX_AVX | LEAF1_ECX_CX16);
                }
            }
            7 if entry.index == 0 && host == HostKvm::Pvm => {
                entry.ebx &= !(LEAF7_EBX_AVX2 | LEAF7_EBX_AVX512F);
            }
            0xd if host == HostKvm::Pvm => {
                // No XSAVE: no XSAVE state components either.
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

/// Adds the per-vCPU facts (APIC ids, topology) and the TSC frequency leaf.
pub fn vcpu_cpuid(base: &CpuId, cpu_index: u8, num_cpus: u8, tsc_khz: Option<u32>) -> CpuId {
    let mut cpuid = base.clone();
    let mut has_timing_leaf = false;
    let mut max_kvm_leaf_index = None;
    for (i, entry) in cpuid.as_mut_slice().iter_mut().enumerate() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_index) << 24)
                    | (u32::from(num_cpus) << 16);
            }
            0xb | 0x1f => entry.edx = u32::from(cpu_index),
            KVM_SIGNATURE_LEAF => max_kvm_leaf_index = Some(i),
            KVM_TIMING_LEAF => has_timing_leaf = true,
            _ => {}
        }
    }
    if let (Some(khz), false) = (tsc_khz, has_timing_leaf) {
        if let Some(i) = max_kvm_leaf_index {
            let entries = cpuid.as_mut_slice();
            entries[i].eax = entries[i].eax.max(KVM_TIMING_LEAF);
            let timing = kvm_bindings::kvm_cpuid_entry2 {
                function: KVM_TIMING_LEAF,
                eax: khz,
                // LAPIC bus frequency in kHz: KVM's LAPIC timer runs at 1 GHz.
                ebx: 1_000_000,
                ..Default::default()
            };
            // A full table just goes without the timing leaf; guests calibrate instead.
            let _ = cpuid.push(timing);
        }
    }
    cpuid
}

/// Applies CPUID, boot MSRs, FPU and LAPIC LINT setup to one vCPU.
pub fn configure_vcpu(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), SetupError> {
    vcpu.set_cpuid2(cpuid).map_err(SetupError::SetCpuid)?;
    set_boot_msrs(vcpu)?;
    set_fpu(vcpu)?;
    set_lint(vcpu)
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back.
const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

fn set_boot_msrs(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| SetupError::MsrList)?;
    let set = vcpu.set_msrs(&msrs).map_err(SetupError::SetMsrs)?;
    if set != entries.len() {
        return Err(SetupError::PartialMsrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

fn set_fpu(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(SetupError::SetFpu)
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 = ExtINT (the PIC, for guests that never program the IOAPIC), LINT1 = NMI, as a PC does.
fn set_lint(vcpu: &VcpuFd) -> Result<(), SetupError> {
    let mut lapic = vcpu.get_lapic().map_err(SetupError::Lapic)?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes = lapic_reg_bytes(&mut lapic.regs, reg);
        let value = u32::from_le_bytes(*bytes);
        let value = (value & !0x700) | (mode << 8);
        *bytes = value.to_le_bytes();
    }
    vcpu.set_lapic(&lapic).map_err(SetupError::Lapic)
}

fn lapic_reg_bytes(regs: &mut [std::os::raw::c_char; 1024], offset: usize) -> &mut [u8; 4] {
    // SAFETY: c_char and u8 have the same size and alignment; the array is 1024 bytes long.
    let bytes: &mut [u8; 1024] = unsafe { &mut *std::ptr::from_mut(regs).cast::<[u8; 1024]>() };
    (&mut bytes[offset..offset + 4])
        .try_into()
        .expect("slice of 4 bytes")
}
