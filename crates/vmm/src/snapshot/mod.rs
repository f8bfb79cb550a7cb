//! Snapshots of a paused VM: a directory with `state` (a one-line header — format, version,
//! checksum of the rest — then JSON: the machine's shape, every vCPU's [`VcpuState`], the
//! in-kernel PIC/IOAPIC, PIT and kvmclock) and `memory` (guest RAM as the memfd holds it,
//! sparse: all-zero pages are holes). `sluice run --restore DIR` builds the same machine,
//! loads both and runs on.
//!
//! What is carried: CPU, interrupt controller, timer and memory state, and every PCI function's
//! own state (`PciDevice::save_state`: a virtio-pci function saves what its driver programmed
//! and where its rings stand, after letting requests in flight complete). Device models keep
//! their state in sluice, and saving it is per device; until a device can, a VM that has it is
//! refused with a message naming it, rather than restored with a device that forgot what the
//! guest told it (today virtio-blk — on an image or on a vhost-user backend, whose rings are
//! quiesced with GET_VRING_BASE —, the emulated NVMe controller, virtio-net on a tap — the
//! restoring `sluice run` names its own tap —, the e1000 likewise, and virtio-rng can). The platform devices carry
//! what the guest programmed: COM1's registers and unread input, the i8042's controller state,
//! the RTC's CMOS bytes, control registers and time offset from the host clock (the guest's
//! clock runs on with the host's), the ACPI PM1 registers (the PM timer restarts, so a guest
//! sees it jump as after a long pause), and the TPM (`--tpm`): its CRB registers and buffer and
//! swtpm's state blobs, set into the restoring process's own swtpm.
//!
//! Writing and loading the memory show their progress (crate::progress).
//!
//! The checksums are FNV-1a over 64-bit words, written here: they detect corruption and
//! truncation, not tampering, and no hashing crate is in the verified dependency set.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::memory::GuestRam;
use crate::progress::Progress;
use crate::vcpu::state::VcpuState;

/// First word of the state file.
const FORMAT: &str = "sluice-snapshot";
/// Bumped whenever the state's layout changes; older and newer snapshots are refused.
pub const VERSION: u32 = 1;
const STATE_FILE: &str = "state";
const MEMORY_FILE: &str = "memory";
const PAGE: usize = 4096;
/// Bytes read or written per step when copying memory.
const CHUNK: usize = 1 << 20;
const IRQCHIP_PIC_MASTER: u32 = 0;
const IRQCHIP_PIC_SLAVE: u32 = 1;
const IRQCHIP_IOAPIC: u32 = 2;
/// kvm_clock_data flags KVM_SET_CLOCK accepts back (KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC
/// are read-only facts of the source host).
const SETTABLE_CLOCK_FLAGS: u32 = 0;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: not a sluice snapshot")]
    NotASnapshot(PathBuf),
    #[error("{path}: snapshot format version {found}, this sluice reads version {VERSION}")]
    Version { path: PathBuf, found: u32 },
    #[error("{0}: corrupt (checksum mismatch)")]
    Corrupt(PathBuf),
    #[error("{path}: bad state: {reason}")]
    BadState { path: PathBuf, reason: String },
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SnapshotError> {
    r.map_err(|source| SnapshotError::Kvm { what, source })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The VM-wide in-kernel state: interrupt controllers, PIT, kvmclock.
#[derive(Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl IrqchipState {
    pub fn capture(vm: &VmFd) -> Result<Self, SnapshotError> {
        let chip = |chip_id| {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            kvm("KVM_GET_IRQCHIP", vm.get_irqchip(&mut chip)).map(|()| chip)
        };
        Ok(Self {
            pic_master: chip(IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(IRQCHIP_IOAPIC)?,
            pit: kvm("KVM_GET_PIT2", vm.get_pit2())?,
            clock: kvm("KVM_GET_CLOCK", vm.get_clock())?,
        })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            kvm("KVM_SET_IRQCHIP", vm.set_irqchip(chip))?;
        }
        kvm("KVM_SET_PIT2", vm.set_pit2(&self.pit))?;
        let clock = kvm_clock_data {
            flags: self.clock.flags & SETTABLE_CLOCK_FLAGS,
            ..self.clock
        };
        kvm("KVM_SET_CLOCK", vm.set_clock(&clock))
    }
}

/// Everything in the state file.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub cpus: u8,
    /// Guest RAM in bytes (the memory file holds exactly that much).
    pub memory: u64,
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    /// Each PCI function's saved state (its `PciDevice::save_state`), by address.
    #[serde(default)]
    pub devices: Vec<(sluice_pci::PciAddress, serde_json::Value)>,
    /// COM1, i8042, RTC and ACPI PM registers (absent: they restart from reset).
    #[serde(default)]
    pub platform: Option<crate::platform::PlatformState>,
    /// Checksum of the memory file's contents (holes read as zeros).
    pub memory_checksum: u64,
}

/// FNV-1a over little-endian 64-bit words (a short tail is zero-padded).
#[derive(Clone, Copy)]
struct Checksum(u64);

impl Checksum {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn update(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

fn checksum_of(bytes: &[u8]) -> u64 {
    let mut sum = Checksum::new();
    sum.update(bytes);
    sum.0
}

/// Writes `ram` to `dir/memory` (sparse) and returns its checksum.
fn write_memory(ram: &GuestRam, dir: &Path) -> Result<u64, SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let out = File::create(&path).map_err(io(&path))?;
    out.set_len(ram.size).map_err(io(&path))?;
    let mut sum = Checksum::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut progress = Progress::start("snapshot", ram.size);
    while offset < ram.size {
        let len = (ram.size - offset).min(CHUNK as u64) as usize;
        let chunk = &mut buffer[..len];
        ram.file.read_exact_at(chunk, offset).map_err(io(&path))?;
        sum.update(chunk);
        let mut written = 0;
        for (index, page) in chunk.chunks(PAGE).enumerate() {
            if page.iter().any(|&b| b != 0) {
                out.write_all_at(page, offset + (index * PAGE) as u64)
                    .map_err(io(&path))?;
                written += 1;
            }
        }
        offset += len as u64;
        progress.advance(len as u64, written);
    }
    progress.finish();
    Ok(sum.0)
}

/// Loads `dir/memory` into `ram`, checking its size and checksum.
fn read_memory(ram: &GuestRam, dir: &Path, expected: u64) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let mut input = File::open(&path).map_err(io(&path))?;
    let size = input.seek(SeekFrom::End(0)).map_err(io(&path))?;
    if size != ram.size {
        return Err(SnapshotError::BadState {
            path,
            reason: format!("memory holds {size} bytes, the VM has {}", ram.size),
        });
    }
    input.seek(SeekFrom::Start(0)).map_err(io(&path))?;
    let mut sum = Checksum::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut offset = 0u64;
    let mut progress = Progress::start("restore", ram.size);
    while offset < ram.size {
        let len = (ram.size - offset).min(CHUNK as u64) as usize;
        let chunk = &mut buffer[..len];
        input.read_exact(chunk).map_err(io(&path))?;
        sum.update(chunk);
        ram.file.write_all_at(chunk, offset).map_err(io(&path))?;
        offset += len as u64;
        progress.advance(len as u64, (len / PAGE) as u64);
    }
    if sum.0 != expected {
        return Err(SnapshotError::Corrupt(path));
    }
    progress.finish();
    Ok(())
}

/// Writes a snapshot of `state` and `ram` into `dir` (created if missing).
pub fn write(dir: &Path, mut state: MachineState, ram: &GuestRam) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    state.memory_checksum = write_memory(ram, dir)?;
    let body = serde_json::to_string(&state).map_err(|e| SnapshotError::BadState {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let path = dir.join(STATE_FILE);
    let text = format!(
        "{FORMAT} {VERSION} {:016x}\n{body}\n",
        checksum_of(body.as_bytes())
    );
    let part = dir.join(format!("{STATE_FILE}.part"));
    std::fs::write(&part, text).map_err(io(&part))?;
    // The state file appears whole or not at all.
    std::fs::rename(&part, &path).map_err(io(&path))
}

/// Reads and checks the state of the snapshot in `dir` (the memory is loaded by [`load_memory`]).
pub fn read(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let file = File::open(&path).map_err(io(&path))?;
    let mut lines = BufReader::new(file);
    let mut header = String::new();
    lines.read_line(&mut header).map_err(io(&path))?;
    let mut words = header.split_whitespace();
    if words.next() != Some(FORMAT) {
        return Err(SnapshotError::NotASnapshot(path));
    }
    let version: u32 = words
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SnapshotError::NotASnapshot(path.clone()))?;
    if version != VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
        });
    }
    let checksum = words
        .next()
        .and_then(|c| u64::from_str_radix(c, 16).ok())
        .ok_or_else(|| SnapshotError::NotASnapshot(path.clone()))?;
    let mut body = String::new();
    lines.read_to_string(&mut body).map_err(io(&path))?;
    let body = body.trim_end_matches('\n');
    if checksum_of(body.as_bytes()) != checksum {
        return Err(SnapshotError::Corrupt(path));
    }
    let state: MachineState = serde_json::from_str(body).map_err(|e| SnapshotError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.vcpus.len() != usize::from(state.cpus) || state.cpus == 0 {
        return Err(SnapshotError::BadState {
            path,
            reason: format!("{} vCPU states for {} vCPUs", state.vcpus.len(), state.cpus),
        });
    }
    Ok(state)
}

/// Reads the snapshot in `dir` for a VM built from `config` (same vCPU count and RAM size)
/// and loads its memory into `ram`.
pub fn load(
    dir: &Path,
    config: &crate::machine::VmConfig,
    ram: &GuestRam,
) -> Result<MachineState, SnapshotError> {
    let state = read(dir)?;
    if state.cpus != config.cpus || state.memory != config.memory {
        return Err(SnapshotError::BadState {
            path: dir.to_path_buf(),
            reason: format!(
                "taken with {} vCPUs and {} bytes of RAM, restoring into {} and {}",
                state.cpus, state.memory, config.cpus, config.memory
            ),
        });
    }
    load_memory(dir, &state, ram)?;
    Ok(state)
}

/// Loads the memory of the snapshot in `dir` into `ram`.
pub fn load_memory(dir: &Path, state: &MachineState, ram: &GuestRam) -> Result<(), SnapshotError> {
    read_memory(ram, dir, state.memory_checksum)
}

#[cfg(test)]
pub(crate) mod tests;
