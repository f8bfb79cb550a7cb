//! NVMe (NVM Express 1.4, NVM command set) over PCI, polled: the controller found by class
//! 01/08/02, enabled per §7.6.1 (CC.EN, CSTS.RDY within CAP.TO), Identify controller and
//! namespace, Set Features Number of Queues, `queues=N` I/O CQ/SQ pairs (IEN=0), Read / Write
//! with PRP1/PRP2/PRP lists and Flush, phase-tag completion polling, doorbells spaced by
//! CAP.DSTRD, and Doorbell Buffer Config (shadow doorbells + EventIdx) when OACS bit 8 offers
//! it. The I/O queues run the shared block workload (workloads/blk.rs), in ring 3 like blk.
//!
//! Hand-written because the kit is a freestanding no_std kernel whose data path runs at CPL3
//! with its own DMA allocator; NVMe crates target Linux userspace (VFIO) or SPDK. Everything the
//! controller writes (completion ids, queue counts, LBA formats, sizes) is checked before use.

use crate::arch::full_barrier;
use crate::cmdline::{NvmeHostile, NvmeParams};
use crate::drivers::vtd;
use crate::interrupts;
use crate::mem;
use crate::pci::{self, Device};
use crate::phys;
use crate::time::Deadline;
use crate::workloads::blk::{self as workload, BlkQueue, Completion, QueueState, Summary};
use crate::workloads::Outcome;
use alloc::vec::Vec;
use core::sync::atomic::{compiler_fence, Ordering};

/// PCI class code: mass storage, non-volatile memory, NVM Express.
const CLASS_NVME: u32 = 0x01_08_02;

// Controller registers (§3.1).
const REG_CAP: u64 = 0x00;
const REG_VS: u64 = 0x08;
const REG_CC: u64 = 0x14;
const REG_CSTS: u64 = 0x1c;
const REG_AQA: u64 = 0x24;
const REG_ASQ: u64 = 0x28;
const REG_ACQ: u64 = 0x30;
const DOORBELLS: u64 = 0x1000;

const CC_EN: u32 = 1;
/// I/O SQ entries of 2^6 = 64 bytes, CQ entries of 2^4 = 16 bytes; CSS=NVM, MPS=4 KiB, AMS=RR.
const CC_ENTRY_SIZES: u32 = (6 << 16) | (4 << 20);
const CSTS_RDY: u32 = 1;
const CSTS_CFS: u32 = 1 << 1;
/// CAP.CSS bit 0: the NVM command set.
const CAP_CSS_NVM: u64 = 1 << 37;

const ADMIN_CREATE_SQ: u8 = 0x01;
const ADMIN_CREATE_CQ: u8 = 0x05;
const ADMIN_IDENTIFY: u8 = 0x06;
const ADMIN_SET_FEATURES: u8 = 0x09;
const ADMIN_DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
const NVM_FLUSH: u8 = 0x00;
const NVM_WRITE: u8 = 0x01;
const NVM_READ: u8 = 0x02;

const CNS_NAMESPACE: u32 = 0;
const CNS_CONTROLLER: u32 = 1;
const CNS_ACTIVE_NAMESPACES: u32 = 2;
const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;
/// Identify controller OACS bit 8: Doorbell Buffer Config supported.
const OACS_DOORBELL_BUFFER: u16 = 1 << 8;
/// Create I/O SQ/CQ CDW11 bit 0: the queue is physically contiguous.
const QUEUE_CONTIGUOUS: u32 = 1;

const SQE_BYTES: u64 = 64;
const CQE_BYTES: u64 = 16;
const PAGE: u64 = mem::PAGE_SIZE;
const ADMIN_ENTRIES: u16 = 32;
/// I/O queue entries asked for (fewer if CAP.MQES says so).
const IO_ENTRIES: u16 = 256;
/// Largest LBA handled: one LBA never spans two PRP pages.
const MAX_LBA_SHIFT: u32 = 12;
const MIN_LBA_SHIFT: u32 = 9;
/// CAP.TO units.
const TIMEOUT_UNIT_MS: u64 = 500;
/// Where `hostile=dma_outside` points its Read: 60 GiB, far above any RAM the kit is given
/// (sluice's `dma=all` maps guest RAM only, so no IOMMU mapping covers it).
const HOSTILE_DMA_ADDR: u64 = 0xF_0000_0000;
/// The hostile command's id: outside the workload's slots (0..qd), so a completion that
/// arrives after the wait below is reported by the workload as a bad completion, not taken
/// for one of its own.
const HOSTILE_CID: u16 = 0x7fff;
/// How long the hostile command may take to complete; QEMU's NVMe completes at once.
const HOSTILE_WAIT_MS: u64 = 2000;
/// The IRTE `hostile=bad_irte` points the first I/O queue's interrupt at.
const HOSTILE_IRTE: u16 = 5;
/// The MSI-X table entry (and NVMe interrupt vector) of the first I/O queue under
/// `hostile=bad_irte`; entry 0 (the admin queue's) stays masked.
const HOSTILE_MSIX_ENTRY: u16 = 1;
/// How long an interrupt the unit must refuse is waited for (it must not come).
const REFUSED_WAIT_MS: u64 = 200;
/// How long an interrupt through the repaired IRTE may take.
const DELIVERY_WAIT_MS: u64 = 2000;
/// Commands issued through the repaired IRTE, each expecting its interrupt.
const REPAIR_COMMANDS: u64 = 4;
const CAP_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Create I/O CQ CDW11 bit 1: interrupts enabled (the vector is bits 31:16).
const QUEUE_INTERRUPTS: u32 = 1 << 1;

/// Why the controller could not be used.
#[derive(Debug)]
#[allow(
    dead_code,
    reason = "the fields are read through Debug, in the workload's failure line"
)]
pub enum NvmeError {
    NotFound,
    BadBar,
    Unsupported(&'static str),
    Timeout(&'static str),
    /// CSTS.CFS: the controller reported a fatal status.
    ControllerFatal,
    /// An admin command completed with this status (SCT << 8 | SC).
    Command {
        opcode: u8,
        status: u16,
    },
    NoNamespace,
    NoMemory,
    BadCompletion(u32),
    /// The kit's VT-d refused a step of interrupt remapping (why).
    Iommu(alloc::string::String),
}

/// The `index`-th NVMe controller in enumeration order.
fn find(index: usize) -> Option<&'static Device> {
    pci::devices()
        .iter()
        .filter(|d| d.class == CLASS_NVME)
        .nth(index)
}

/// BAR0: controller registers and doorbells.
struct Registers {
    base: u64,
    size: u64,
    /// Bytes between doorbells: 4 << CAP.DSTRD.
    stride: u64,
}

impl Registers {
    fn read32(&self, offset: u64) -> u32 {
        phys::mmio_read32(self.base + offset)
    }

    fn write32(&self, offset: u64, value: u32) {
        phys::mmio_write32(self.base + offset, value)
    }

    /// 64-bit registers as two dword accesses, low first (any controller must accept those).
    fn read64(&self, offset: u64) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// Offset of SQ `qid`'s tail doorbell (`cq`: CQ `qid`'s head doorbell), in BAR0 and, from
    /// DOORBELLS on, in the shadow buffers alike.
    fn doorbell_index(&self, qid: u16, cq: bool) -> u64 {
        (2 * u64::from(qid) + u64::from(cq)) * self.stride
    }
}

/// The shadow doorbell and EventIdx pages of Doorbell Buffer Config.
#[derive(Clone, Copy)]
struct ShadowBuffers {
    doorbells: u64,
    event_idx: u64,
}

/// One doorbell: the MMIO register and, with Doorbell Buffer Config, its shadow and EventIdx.
#[derive(Clone, Copy)]
struct Doorbell {
    mmio: u64,
    /// (shadow doorbell, EventIdx) addresses.
    shadow: Option<(u64, u64)>,
    /// Write MMIO whatever EventIdx says (the admin queue, as Linux does).
    always_mmio: bool,
}

/// Linux's nvme_dbbuf_need_event: whether moving a doorbell from `old` to `new` crossed the
/// controller's EventIdx, i.e. the controller asked to be told by MMIO.
fn need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Doorbell {
    /// Publishes `value`; returns whether the MMIO register was written (else the shadow
    /// alone carried it). The same rule as Linux's nvme_dbbuf_update_and_check_event.
    fn ring(&self, value: u16) -> bool {
        if let Some((shadow, event_idx)) = self.shadow {
            // Entries written before the doorbell value (x86 keeps stores in order; this
            // keeps the compiler from moving them).
            compiler_fence(Ordering::SeqCst);
            // SAFETY: `shadow` and `event_idx` are dwords inside this driver's DMA pages.
            let old = unsafe { core::ptr::read_volatile(shadow as *const u32) } as u16;
            // SAFETY: as above.
            unsafe { core::ptr::write_volatile(shadow as *mut u32, u32::from(value)) };
            // The shadow store must be visible before EventIdx is read (store->load order).
            full_barrier();
            // SAFETY: as above.
            let event = unsafe { core::ptr::read_volatile(event_idx as *const u32) } as u16;
            if !self.always_mmio && !need_event(event, value, old) {
                return false;
            }
        }
        phys::mmio_write32(self.mmio, u32::from(value));
        true
    }
}

/// A 64-byte submission queue entry.
struct Command([u32; 16]);

impl Command {
    fn new(opcode: u8, cid: u16) -> Command {
        let mut dwords = [0u32; 16];
        dwords[0] = u32::from(opcode) | (u32::from(cid) << 16);
        Command(dwords)
    }

    /// The same command under command id `cid`.
    fn with_cid(mut self, cid: u16) -> Command {
        self.0[0] = (self.0[0] & 0xffff) | (u32::from(cid) << 16);
        self
    }

    fn opcode(&self) -> u8 {
        self.0[0] as u8
    }

    fn nsid(mut self, nsid: u32) -> Command {
        self.0[1] = nsid;
        self
    }

    fn prp(mut self, prp1: u64, prp2: u64) -> Command {
        self.0[6] = prp1 as u32;
        self.0[7] = (prp1 >> 32) as u32;
        self.0[8] = prp2 as u32;
        self.0[9] = (prp2 >> 32) as u32;
        self
    }

    /// Command dword `index` (10..=15).
    fn cdw(mut self, index: usize, value: u32) -> Command {
        self.0[index] = value;
        self
    }
}

/// A 16-byte completion queue entry.
struct CompletionEntry {
    result: u32,
    sqid: u16,
    cid: u16,
    /// Status field without the phase tag: SC bits 7:0, SCT 10:8, CRD, More, DNR.
    status: u16,
}

impl CompletionEntry {
    /// Status code type and status code; 0 is success.
    fn code(&self) -> u16 {
        self.status & 0x7ff
    }
}

/// Doorbell updates of the I/O queues, for the RESULT line.
#[derive(Default, Clone, Copy)]
struct DoorbellCounts {
    mmio: u64,
    shadow_only: u64,
}

/// A submission queue and its completion queue (same id).
struct QueuePair {
    qid: u16,
    sq: u64,
    sq_entries: u16,
    sq_tail: u16,
    sq_tail_published: u16,
    sq_doorbell: Doorbell,
    cq: u64,
    cq_entries: u16,
    cq_head: u16,
    cq_head_published: u16,
    cq_doorbell: Doorbell,
    /// The phase tag a new completion carries.
    phase: bool,
    counts: DoorbellCounts,
    /// SQ tail updates (MMIO or shadow): the RESULT's `notifies`.
    notifies: u64,
}

impl QueuePair {
    fn new(
        regs: &Registers,
        qid: u16,
        entries: u16,
        shadow: Option<ShadowBuffers>,
    ) -> Option<Self> {
        let sq = mem::alloc_dma(u64::from(entries) * SQE_BYTES)?;
        let cq = mem::alloc_dma(u64::from(entries) * CQE_BYTES)?;
        let doorbell = |cq: bool| {
            let index = regs.doorbell_index(qid, cq);
            Doorbell {
                mmio: regs.base + DOORBELLS + index,
                shadow: shadow.map(|s| (s.doorbells + index, s.event_idx + index)),
                always_mmio: qid == 0,
            }
        };
        Some(QueuePair {
            qid,
            sq,
            sq_entries: entries,
            sq_tail: 0,
            sq_tail_published: 0,
            sq_doorbell: doorbell(false),
            cq,
            cq_entries: entries,
            cq_head: 0,
            cq_head_published: 0,
            cq_doorbell: doorbell(true),
            phase: true,
            counts: DoorbellCounts::default(),
            notifies: 0,
        })
    }

    /// Writes `command` at the SQ tail (not yet published).
    fn push(&mut self, command: &Command) {
        let entry = self.sq + u64::from(self.sq_tail) * SQE_BYTES;
        for (index, dword) in command.0.iter().enumerate() {
            // SAFETY: the entry lies inside this queue's SQ pages, which the controller only
            // reads once the tail doorbell passes it.
            unsafe { core::ptr::write_volatile((entry + 4 * index as u64) as *mut u32, *dword) };
        }
        self.sq_tail = (self.sq_tail + 1) % self.sq_entries;
    }

    fn count(&mut self, mmio: bool) {
        if mmio {
            self.counts.mmio += 1;
        } else {
            self.counts.shadow_only += 1;
        }
    }

    /// Tells the controller about new SQ entries.
    fn publish_sq(&mut self) {
        if self.sq_tail != self.sq_tail_published {
            let mmio = self.sq_doorbell.ring(self.sq_tail);
            self.count(mmio);
            self.notifies += 1;
            self.sq_tail_published = self.sq_tail;
        }
    }

    /// Tells the controller which CQ entries it may reuse.
    fn publish_cq(&mut self) {
        if self.cq_head != self.cq_head_published {
            let mmio = self.cq_doorbell.ring(self.cq_head);
            self.count(mmio);
            self.cq_head_published = self.cq_head;
        }
    }

    fn head_dword(&self, index: u64) -> u32 {
        let entry = self.cq + u64::from(self.cq_head) * CQE_BYTES;
        // SAFETY: the entry lies inside this queue's CQ pages (head < cq_entries).
        unsafe { core::ptr::read_volatile((entry + 4 * index) as *const u32) }
    }

    /// Whether the entry at the CQ head carries the current phase (a new completion).
    fn has_completion(&self) -> bool {
        (self.head_dword(3) >> 16) & 1 == u32::from(self.phase)
    }

    /// The next completion, if the controller posted one.
    fn pop(&mut self) -> Option<CompletionEntry> {
        if !self.has_completion() {
            return None;
        }
        // The phase dword was read first; the rest of the entry was written before it.
        compiler_fence(Ordering::SeqCst);
        let dw3 = self.head_dword(3);
        let entry = CompletionEntry {
            result: self.head_dword(0),
            sqid: (self.head_dword(2) >> 16) as u16,
            cid: dw3 as u16,
            status: (dw3 >> 17) as u16,
        };
        self.cq_head += 1;
        if self.cq_head == self.cq_entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }
}

/// The namespace the workload uses.
struct Namespace {
    nsid: u32,
    lba_shift: u32,
    lbas: u64,
}

impl Namespace {
    fn capacity(&self) -> u64 {
        self.lbas.saturating_mul(1 << self.lba_shift)
    }
}

/// An enabled controller with its admin queue.
pub struct Controller {
    pci: Device,
    regs: Registers,
    cap: u64,
    /// CAP.TO in milliseconds: how long CSTS.RDY may take to follow CC.EN.
    ready_timeout_ms: u64,
    timeout_ms: u64,
    admin: QueuePair,
    next_cid: u16,
    /// Largest transfer (MDTS), if the controller limits it.
    max_transfer: Option<u64>,
    oacs: u16,
    shadow: Option<ShadowBuffers>,
}

/// Address of BAR0, mapped, with its size.
fn map_bar0(device: &Device) -> Result<(u64, u64), NvmeError> {
    let bar = device.bars[0];
    if bar.is_io || bar.addr == 0 || bar.size < DOORBELLS + 8 {
        return Err(NvmeError::BadBar);
    }
    if bar.addr + bar.size > phys::IDENTITY_LIMIT {
        crate::arch::paging::map_identity(bar.addr, bar.size).map_err(|_| NvmeError::BadBar)?;
    }
    Ok((bar.addr, bar.size))
}

impl Controller {
    fn csts(&self) -> u32 {
        self.regs.read32(REG_CSTS)
    }

    fn fatal(&self) -> bool {
        self.csts() & CSTS_CFS != 0
    }

    /// Waits until CSTS.RDY equals `ready` (bounded by CAP.TO).
    fn wait_ready(&self, ready: bool, what: &'static str) -> Result<(), NvmeError> {
        let deadline = Deadline::after_ms(self.ready_timeout_ms);
        loop {
            let csts = self.csts();
            if csts == u32::MAX {
                return Err(NvmeError::BadBar);
            }
            if ready && csts & CSTS_CFS != 0 {
                return Err(NvmeError::ControllerFatal);
            }
            if (csts & CSTS_RDY != 0) == ready {
                return Ok(());
            }
            if deadline.expired() {
                return Err(NvmeError::Timeout(what));
            }
            crate::arch::pause();
        }
    }

    /// Clears CC.EN and waits for CSTS.RDY to follow (a reset of the controller's queues).
    fn disable(&self) -> Result<(), NvmeError> {
        let cc = self.regs.read32(REG_CC);
        if cc & CC_EN != 0 {
            self.regs.write32(REG_CC, cc & !CC_EN);
        }
        self.wait_ready(false, "CSTS.RDY=0 after CC.EN=0")
    }

    /// Finds BAR0, checks CAP, disables the controller, sets up the admin queue and enables it.
    fn enable(device: &Device, timeout_ms: u64) -> Result<Controller, NvmeError> {
        device.set_command_bits(
            pci::COMMAND_MEMORY | pci::COMMAND_BUS_MASTER | pci::COMMAND_INTX_DISABLE,
        );
        let (base, size) = map_bar0(device)?;
        let mut regs = Registers {
            base,
            size,
            stride: 4,
        };
        let cap = regs.read64(REG_CAP);
        if cap == u64::MAX {
            return Err(NvmeError::BadBar);
        }
        regs.stride = 4 << ((cap >> 32) & 0xf);
        if cap & CAP_CSS_NVM == 0 {
            return Err(NvmeError::Unsupported("no NVM command set in CAP.CSS"));
        }
        if (cap >> 48) & 0xf != 0 {
            return Err(NvmeError::Unsupported("CAP.MPSMIN above 4 KiB"));
        }
        let ready_timeout_ms = (((cap >> 24) & 0xff) * TIMEOUT_UNIT_MS).max(TIMEOUT_UNIT_MS);
        let admin_entries = ADMIN_ENTRIES.min(max_queue_entries(cap));
        let admin = QueuePair::new(&regs, 0, admin_entries, None).ok_or(NvmeError::NoMemory)?;
        let controller = Controller {
            pci: device.clone(),
            regs,
            cap,
            ready_timeout_ms,
            timeout_ms,
            admin,
            next_cid: 0,
            max_transfer: None,
            oacs: 0,
            shadow: None,
        };
        controller.disable()?;
        let queue_size = u32::from(admin_entries - 1);
        controller
            .regs
            .write32(REG_AQA, (queue_size << 16) | queue_size);
        controller.regs.write64(REG_ASQ, controller.admin.sq);
        controller.regs.write64(REG_ACQ, controller.admin.cq);
        controller.regs.write32(REG_CC, CC_ENTRY_SIZES | CC_EN);
        controller.wait_ready(true, "CSTS.RDY=1 after CC.EN=1")?;
        Ok(controller)
    }

    /// Runs one admin command (built with any id; it gets the next one) to completion; returns
    /// its result dword.
    fn admin(&mut self, command: Command) -> Result<u32, NvmeError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        let opcode = command.opcode();
        self.admin.push(&command.with_cid(cid));
        self.admin.publish_sq();
        let deadline = Deadline::after_ms(self.timeout_ms);
        loop {
            // A completion for another id (none should exist: one admin command at a time)
            // is consumed and ignored; the deadline still bounds the wait.
            if let Some(done) = self.admin.pop() {
                self.admin.publish_cq();
                if done.cid == cid {
                    return match done.code() {
                        0 => Ok(done.result),
                        status => Err(NvmeError::Command { opcode, status }),
                    };
                }
            }
            if deadline.expired() {
                // CSTS is read only now: each MMIO read is an exit.
                return Err(if self.fatal() {
                    NvmeError::ControllerFatal
                } else {
                    NvmeError::Timeout("admin command")
                });
            }
            crate::arch::pause();
        }
    }

    /// Identify with `cns` for `nsid` into a fresh page.
    fn identify(&mut self, cns: u32, nsid: u32) -> Result<&'static [u8], NvmeError> {
        let page = mem::alloc_dma(PAGE).ok_or(NvmeError::NoMemory)?;
        self.admin(
            Command::new(ADMIN_IDENTIFY, 0)
                .nsid(nsid)
                .prp(page, 0)
                .cdw(10, cns),
        )?;
        phys::bytes(page, PAGE as usize).ok_or(NvmeError::NoMemory)
    }

    /// Identify controller: entry sizes, MDTS, OACS.
    fn identify_controller(&mut self) -> Result<(), NvmeError> {
        let data = self.identify(CNS_CONTROLLER, 0)?;
        let sqes = phys::le_u8(data, 512);
        let cqes = phys::le_u8(data, 513);
        // Required (low nibble) <= our size <= maximum (high nibble); 0 means "not reported".
        let fits = |sizes: u8, ours: u8| {
            sizes == 0 || (sizes & 0xf <= ours && (sizes >> 4 == 0 || ours <= sizes >> 4))
        };
        if !fits(sqes, 6) || !fits(cqes, 4) {
            return Err(NvmeError::Unsupported("SQ/CQ entry sizes"));
        }
        let mdts = phys::le_u8(data, 77);
        self.max_transfer = (mdts != 0).then(|| PAGE << mdts.min(20));
        self.oacs = phys::le_u16(data, 256);
        crate::chatter!(
            "nvme {}: VS {:#x}, CAP {:#x}, MDTS {}, OACS {:#x}, {} namespace(s)",
            self.pci.bdf,
            self.regs.read32(REG_VS),
            self.cap,
            mdts,
            self.oacs,
            phys::le_u32(data, 516)
        );
        Ok(())
    }

    /// The first active namespace (the active list, or NSID 1 for controllers without one),
    /// with its LBA size from FLBAS/LBAF and its size.
    fn first_namespace(&mut self) -> Result<Namespace, NvmeError> {
        let nsid = match self.identify(CNS_ACTIVE_NAMESPACES, 0) {
            Ok(list) => phys::le_u32(list, 0),
            Err(NvmeError::Command { .. }) => 1,
            Err(other) => return Err(other),
        };
        if nsid == 0 || nsid == u32::MAX {
            return Err(NvmeError::NoNamespace);
        }
        let data = self.identify(CNS_NAMESPACE, nsid)?;
        let lbas = phys::le_u64(data, 0);
        let formats = usize::from(phys::le_u8(data, 25)) + 1;
        let flbas = phys::le_u8(data, 26);
        let format = usize::from(flbas & 0xf) | (usize::from((flbas >> 5) & 3) << 4);
        if lbas == 0 || format >= formats.min(64) {
            return Err(NvmeError::NoNamespace);
        }
        let lbaf = phys::le_u32(data, 128 + 4 * format);
        let lba_shift = (lbaf >> 16) & 0xff;
        if lbaf & 0xffff != 0 {
            return Err(NvmeError::Unsupported("LBA format with metadata"));
        }
        if !(MIN_LBA_SHIFT..=MAX_LBA_SHIFT).contains(&lba_shift) {
            return Err(NvmeError::Unsupported("LBA size outside 512..=4096"));
        }
        Ok(Namespace {
            nsid,
            lba_shift,
            lbas,
        })
    }

    /// Doorbell Buffer Config for `queues` I/O queues if OACS offers it; false if not offered
    /// or refused (the driver then rings MMIO doorbells only).
    fn configure_doorbell_buffer(&mut self, queues: u16) -> Result<bool, NvmeError> {
        if self.oacs & OACS_DOORBELL_BUFFER == 0 {
            return Ok(false);
        }
        if self.regs.doorbell_index(queues, true) + 4 > PAGE {
            return Ok(false);
        }
        let doorbells = mem::alloc_dma(PAGE).ok_or(NvmeError::NoMemory)?;
        let event_idx = mem::alloc_dma(PAGE).ok_or(NvmeError::NoMemory)?;
        let command = Command::new(ADMIN_DOORBELL_BUFFER_CONFIG, 0).prp(doorbells, event_idx);
        match self.admin(command) {
            Ok(_) => {}
            Err(NvmeError::Command { status, .. }) => {
                crate::say!(
                    "nvme: Doorbell Buffer Config refused (status {:#x})",
                    status
                );
                return Ok(false);
            }
            Err(other) => return Err(other),
        }
        let shadow = ShadowBuffers {
            doorbells,
            event_idx,
        };
        self.shadow = Some(shadow);
        // The admin queue keeps ringing MMIO (as Linux does) but keeps its shadow current too,
        // for controllers that read the admin shadow once the buffer is configured.
        let regs = &self.regs;
        for (doorbell, cq) in [
            (&mut self.admin.sq_doorbell, false),
            (&mut self.admin.cq_doorbell, true),
        ] {
            let index = regs.doorbell_index(0, cq);
            doorbell.shadow = Some((doorbells + index, event_idx + index));
        }
        let tail = u32::from(self.admin.sq_tail);
        let head = u32::from(self.admin.cq_head);
        // SAFETY: dwords at the start of the shadow page this driver just handed over.
        unsafe {
            core::ptr::write_volatile(doorbells as *mut u32, tail);
            core::ptr::write_volatile((doorbells + regs.stride) as *mut u32, head);
        }
        Ok(true)
    }

    /// Set Features Number of Queues: how many I/O queue pairs the controller grants, at most
    /// `wanted`.
    fn set_queue_count(&mut self, wanted: u16) -> Result<u16, NvmeError> {
        let asked = u32::from(wanted - 1);
        let granted = self.admin(
            Command::new(ADMIN_SET_FEATURES, 0)
                .cdw(10, FEATURE_NUMBER_OF_QUEUES)
                .cdw(11, (asked << 16) | asked),
        )?;
        let submission = (granted & 0xffff) as u16;
        let completion = (granted >> 16) as u16;
        Ok(wanted
            .min(submission.saturating_add(1))
            .min(completion.saturating_add(1)))
    }

    /// Creates I/O CQ and SQ `qid`: polled, or also interrupting on MSI-X entry `vector`.
    fn create_io_queue(&mut self, qid: u16, vector: Option<u16>) -> Result<QueuePair, NvmeError> {
        if DOORBELLS + self.regs.doorbell_index(qid, true) + 4 > self.regs.size {
            return Err(NvmeError::BadBar);
        }
        let entries = IO_ENTRIES.min(max_queue_entries(self.cap));
        let pair =
            QueuePair::new(&self.regs, qid, entries, self.shadow).ok_or(NvmeError::NoMemory)?;
        let size_and_id = (u32::from(entries - 1) << 16) | u32::from(qid);
        let interrupts = vector.map_or(0, |v| (u32::from(v) << 16) | QUEUE_INTERRUPTS);
        self.admin(
            Command::new(ADMIN_CREATE_CQ, 0)
                .prp(pair.cq, 0)
                .cdw(10, size_and_id)
                .cdw(11, QUEUE_CONTIGUOUS | interrupts),
        )?;
        self.admin(
            Command::new(ADMIN_CREATE_SQ, 0)
                .prp(pair.sq, 0)
                .cdw(10, size_and_id)
                .cdw(11, (u32::from(qid) << 16) | QUEUE_CONTIGUOUS),
        )?;
        Ok(pair)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.disable();
    }
}

/// CAP.MQES + 1, at least 2 (a queue of one entry cannot hold anything).
fn max_queue_entries(cap: u64) -> u16 {
    ((cap & 0xffff) as u16).saturating_add(1).max(2)
}

/// An I/O queue pair as the block workload drives it: slot i is command id i.
struct NvmeQueue<'a> {
    controller: &'a Controller,
    pair: QueuePair,
    nsid: u32,
    lba_shift: u32,
    /// One PRP list page per slot (transfers above two pages).
    prp_lists: Vec<u64>,
}

impl NvmeQueue<'_> {
    /// PRP1 and PRP2 for a page-aligned buffer of `len` bytes (§4.3).
    fn prps(&self, slot: usize, data: u64, len: u64) -> (u64, u64) {
        let pages = len.div_ceil(PAGE);
        match pages {
            0 | 1 => (data, 0),
            2 => (data, data + PAGE),
            _ => {
                let list = self.prp_lists[slot];
                for page in 1..pages {
                    // SAFETY: the list page belongs to this slot and is not in flight; one
                    // page holds 512 entries, more than a 1 MiB transfer needs.
                    unsafe {
                        core::ptr::write_volatile(
                            (list + 8 * (page - 1)) as *mut u64,
                            data + page * PAGE,
                        )
                    };
                }
                (data, list)
            }
        }
    }
}

impl BlkQueue for NvmeQueue<'_> {
    type Error = NvmeError;

    fn submit(
        &mut self,
        slot: usize,
        data: u64,
        offset: u64,
        len: u32,
        write: bool,
    ) -> Result<(), NvmeError> {
        let lba = offset >> self.lba_shift;
        let blocks = u64::from(len) >> self.lba_shift;
        let (prp1, prp2) = self.prps(slot, data, u64::from(len));
        let opcode = if write { NVM_WRITE } else { NVM_READ };
        let command = Command::new(opcode, slot as u16)
            .nsid(self.nsid)
            .prp(prp1, prp2)
            .cdw(10, lba as u32)
            .cdw(11, (lba >> 32) as u32)
            .cdw(12, (blocks.saturating_sub(1) & 0xffff) as u32);
        self.pair.push(&command);
        Ok(())
    }

    fn submit_flush(&mut self, slot: usize) -> Result<(), NvmeError> {
        self.pair
            .push(&Command::new(NVM_FLUSH, slot as u16).nsid(self.nsid));
        Ok(())
    }

    fn publish(&mut self) {
        self.pair.publish_sq();
    }

    fn pop_completion(&mut self) -> Result<Option<Completion>, NvmeError> {
        let Some(done) = self.pair.pop() else {
            // Nothing more now: hand the reaped entries back in one doorbell update.
            self.pair.publish_cq();
            return Ok(None);
        };
        if done.sqid != self.pair.qid || usize::from(done.cid) >= self.prp_lists.len() {
            return Err(NvmeError::BadCompletion(u32::from(done.cid)));
        }
        Ok(Some(Completion {
            slot: usize::from(done.cid),
            ok: done.code() == 0,
        }))
    }

    fn has_completion(&self) -> bool {
        self.pair.has_completion()
    }

    fn notifies(&self) -> u64 {
        self.pair.notifies
    }

    fn stalled(&self, what: &'static str) -> NvmeError {
        if self.controller.fatal() {
            NvmeError::ControllerFatal
        } else {
            NvmeError::Timeout(what)
        }
    }

    fn bad_completion(&self, slot: usize) -> NvmeError {
        NvmeError::BadCompletion(slot as u32)
    }
}

/// Issues one Read of LBA 0 whose PRP1 is `HOSTILE_DMA_ADDR` on `pair` and waits a bounded
/// time for its completion. The controller may complete it with an error status, with success
/// (QEMU 7.2's NVMe does when the IOMMU refused the DMA) or never; the RESULT line says which.
/// The guest cannot see the IOMMU: containment is proven outside (the host kernel's DMAR fault
/// log); here the probe passes unless the controller went fatal. The workload that follows on
/// the same queue shows the device still works.
fn hostile_dma_outside(
    controller: &Controller,
    pair: &mut QueuePair,
    nsid: u32,
) -> Result<(), NvmeError> {
    let command = Command::new(NVM_READ, HOSTILE_CID)
        .nsid(nsid)
        .prp(HOSTILE_DMA_ADDR, 0)
        .cdw(10, 0)
        .cdw(11, 0)
        .cdw(12, 0);
    pair.push(&command);
    pair.publish_sq();
    let deadline = Deadline::after_ms(HOSTILE_WAIT_MS);
    let done = loop {
        if let Some(done) = pair.pop() {
            pair.publish_cq();
            break Some(done);
        }
        if deadline.expired() {
            break None;
        }
        crate::arch::pause();
    };
    let fatal = controller.fatal();
    // An entry for another id or queue would be a controller bug: report it, do not trust it.
    let stray = done
        .as_ref()
        .filter(|d| d.cid != HOSTILE_CID || d.sqid != pair.qid)
        .map(|d| d.cid);
    let status = match (&done, stray) {
        (Some(d), None) => alloc::format!("{}", d.code()),
        _ => alloc::string::String::from("null"),
    };
    crate::println!(
        "RESULT {{\"workload\":\"nvme_hostile\",\"op\":\"dma_outside\",\"addr\":{},\
         \"completed\":{},\"hostile_status\":{},\"controller_fatal\":{},\"pass\":{}}}",
        HOSTILE_DMA_ADDR,
        done.is_some() && stray.is_none(),
        status,
        fatal,
        !fatal && stray.is_none()
    );
    if fatal {
        return Err(NvmeError::ControllerFatal);
    }
    match stray {
        Some(cid) => Err(NvmeError::BadCompletion(u32::from(cid))),
        None => Ok(()),
    }
}

/// The byte `hostile=dma_unmapped` fills its page with before asking the device to overwrite it.
const UNMAPPED_FILL: u8 = 0xa5;

/// Issues one Read of LBA 0 into a page of guest RAM no device was given (`mem::alloc_private`)
/// and waits a bounded time for it. Behind the kit's own VT-d (`iommu=vtd`) the read must not
/// land: the page keeps its fill (`pass` says so), and for an emulated controller the unit
/// records a fault for it at that page, which the RESULT line reports. Without the IOMMU
/// nothing stops the device, so the same probe shows the page overwritten: the check can
/// fail.
fn hostile_dma_unmapped(
    controller: &Controller,
    pair: &mut QueuePair,
    nsid: u32,
) -> Result<(), NvmeError> {
    let page = mem::alloc_private(PAGE).ok_or(NvmeError::NoMemory)?;
    // SAFETY: a page the bump allocator just handed out, identity mapped, used only here.
    let bytes = unsafe { core::slice::from_raw_parts_mut(page as *mut u8, PAGE as usize) };
    bytes.fill(UNMAPPED_FILL);
    let _ = vtd::take_faults();
    let command = Command::new(NVM_READ, HOSTILE_CID)
        .nsid(nsid)
        .prp(page, 0)
        .cdw(10, 0)
        .cdw(11, 0)
        .cdw(12, 0);
    pair.push(&command);
    pair.publish_sq();
    let deadline = Deadline::after_ms(HOSTILE_WAIT_MS);
    let done = loop {
        if let Some(done) = pair.pop() {
            pair.publish_cq();
            break Some(done);
        }
        if deadline.expired() {
            break None;
        }
        crate::arch::pause();
    };
    let fatal = controller.fatal();
    let intact = bytes.iter().all(|&b| b == UNMAPPED_FILL);
    let source = controller.pci.bdf;
    let requester =
        u16::from(source.bus) << 8 | u16::from(source.device) << 3 | u16::from(source.function);
    let fault = vtd::take_faults()
        .into_iter()
        .find(|f| f.source == requester && f.address == page);
    let status = match &done {
        Some(d) if d.cid == HOSTILE_CID => alloc::format!("{}", d.code()),
        _ => alloc::string::String::from("null"),
    };
    let fault_text = match fault {
        Some(f) => alloc::format!(
            "{{\"source\":\"{}\",\"address\":{},\"reason\":{},\"read\":{}}}",
            source,
            f.address,
            f.reason,
            f.read
        ),
        None => alloc::string::String::from("null"),
    };
    // Behind the kit's own VT-d the page must stay as it was. Who refused the DMA depends on
    // where the device is: an emulated one's refusal is this unit's fault record; an assigned
    // one's is the host IOMMU's (sluice maps only what this unit maps), invisible here.
    let contained = intact || !vtd::active();
    crate::println!(
        "RESULT {{\"workload\":\"nvme_hostile\",\"op\":\"dma_unmapped\",\"addr\":{},\
         \"iommu\":{},\"page_intact\":{},\"completed\":{},\"hostile_status\":{},\
         \"iommu_fault\":{},\"iommu_mapped_bytes\":{},\"controller_fatal\":{},\"pass\":{}}}",
        page,
        vtd::active(),
        intact,
        done.is_some(),
        status,
        fault_text,
        vtd::mapped_bytes(),
        fatal,
        !fatal && contained
    );
    if fatal {
        return Err(NvmeError::ControllerFatal);
    }
    Ok(())
}

/// The first I/O queue's interrupt under `hostile=bad_irte`: MSI-X entry
/// [`HOSTILE_MSIX_ENTRY`] in remappable format, naming IRTE [`HOSTILE_IRTE`].
struct RemappedVector {
    vector: u8,
    destination: u8,
    requester: u16,
}

fn requester_id(device: &Device) -> u16 {
    let bdf = device.bdf;
    u16::from(bdf.bus) << 8 | u16::from(bdf.device) << 3 | u16::from(bdf.function)
}

/// The MSI-X table of `device`, mapped, and its number of entries.
fn msix_table(device: &Device) -> Result<(u64, u16), NvmeError> {
    let cap = *device
        .capabilities(CAP_MSIX)
        .first()
        .ok_or(NvmeError::Unsupported("no MSI-X capability"))?;
    let entries = (pci::read16(device.bdf, cap + 2) & 0x7ff) + 1;
    let location = pci::read32(device.bdf, cap + 4);
    let bir = (location & 7) as usize;
    let bar = *device.bars.get(bir).ok_or(NvmeError::BadBar)?;
    let offset = u64::from(location & !7);
    let len = 16 * u64::from(entries);
    if bar.is_io || bar.addr == 0 || bar.size < offset + len {
        return Err(NvmeError::BadBar);
    }
    let table = bar.addr + offset;
    // BAR0 is mapped whole already (map_bar0).
    if bir != 0 && table + len > phys::IDENTITY_LIMIT {
        crate::arch::paging::map_identity(table, len).map_err(|_| NvmeError::BadBar)?;
    }
    Ok((table, entries))
}

/// Turns MSI-X on with every entry masked but `entry`, which gets `address`/`data`.
fn program_msix_entry(
    device: &Device,
    entry: u16,
    address: u64,
    data: u32,
) -> Result<(), NvmeError> {
    let (table, entries) = msix_table(device)?;
    if entry >= entries {
        return Err(NvmeError::Unsupported("too few MSI-X entries"));
    }
    let cap = device.capabilities(CAP_MSIX)[0];
    let control = pci::read16(device.bdf, cap + 2);
    pci::write16(
        device.bdf,
        cap + 2,
        (control | MSIX_ENABLE) & !MSIX_FUNCTION_MASK,
    );
    let base = table + 16 * u64::from(entry);
    phys::mmio_write32(base + 12, 1);
    phys::mmio_write32(base, address as u32);
    phys::mmio_write32(base + 4, (address >> 32) as u32);
    phys::mmio_write32(base + 8, data);
    phys::mmio_write32(base + 12, 0);
    Ok(())
}

/// Before the I/O queues exist: turns the kit's interrupt remapping on, writes the bad IRTE
/// (a reserved bit set) and points MSI-X entry [`HOSTILE_MSIX_ENTRY`] at it. Without an
/// IOMMU offering interrupt remapping there is nothing to show: the RESULT line says so
/// (`applicable` false) and the workload runs polled.
fn prepare_bad_irte(controller: &Controller) -> Result<Option<RemappedVector>, NvmeError> {
    if !vtd::offers_interrupt_remapping() {
        crate::println!(
            "RESULT {{\"workload\":\"nvme_hostile\",\"op\":\"bad_irte\",\"iommu\":{},\
             \"ir\":false,\"applicable\":false,\"pass\":false}}",
            vtd::active()
        );
        return Ok(None);
    }
    let iommu_error = |e: vtd::VtdError| NvmeError::Iommu(alloc::format!("{e}"));
    vtd::enable_interrupt_remapping().map_err(iommu_error)?;
    let device = &controller.pci;
    let requester = requester_id(device);
    let owner = u32::from(requester) << 16 | u32::from(HOSTILE_MSIX_ENTRY);
    let vector = interrupts::vector_for(owner).ok_or(NvmeError::Unsupported("no free vector"))?;
    let destination = u8::try_from(interrupts::apic_id())
        .map_err(|_| NvmeError::Unsupported("APIC id beyond xAPIC"))?;
    vtd::program_bad_irte(HOSTILE_IRTE, vector, destination, requester).map_err(iommu_error)?;
    let (address, data) = vtd::remappable_msi(HOSTILE_IRTE);
    program_msix_entry(device, HOSTILE_MSIX_ENTRY, address, data)?;
    Ok(Some(RemappedVector {
        vector,
        destination,
        requester,
    }))
}

/// Reads LBA 0 into `buffer` on `pair` as [`HOSTILE_CID`] and waits (bounded, polling) for
/// its completion.
fn read_and_wait(pair: &mut QueuePair, nsid: u32, buffer: u64) -> Option<CompletionEntry> {
    let command = Command::new(NVM_READ, HOSTILE_CID)
        .nsid(nsid)
        .prp(buffer, 0)
        .cdw(10, 0)
        .cdw(11, 0)
        .cdw(12, 0);
    pair.push(&command);
    pair.publish_sq();
    let deadline = Deadline::after_ms(HOSTILE_WAIT_MS);
    loop {
        if let Some(done) = pair.pop() {
            pair.publish_cq();
            return Some(done).filter(|d| d.cid == HOSTILE_CID && d.sqid == pair.qid);
        }
        if deadline.expired() {
            return None;
        }
        crate::arch::pause();
    }
}

/// Whether `vector` fired more than `before` times within `ms` milliseconds.
fn interrupt_within(vector: u8, before: u64, ms: u64) -> bool {
    let deadline = Deadline::after_ms(ms);
    let arrived = || interrupts::count(vector) > before;
    while !arrived() && !deadline.expired() {
        crate::arch::wait_for_interrupt_unless(arrived);
    }
    arrived()
}

/// One Read whose completion interrupt goes through the bad IRTE: the command completes (the
/// CQ is polled) but the interrupt must not arrive, and the unit must record fault 0x24 for
/// the IRTE's index and the controller. Then the IRTE is repaired (and the interrupt entry
/// cache invalidated): each of [`REPAIR_COMMANDS`] Reads must bring its interrupt. Returns
/// whether all of that held.
fn hostile_bad_irte(
    controller: &Controller,
    pair: &mut QueuePair,
    nsid: u32,
    irq: &RemappedVector,
) -> Result<bool, NvmeError> {
    let buffer = mem::alloc_dma(PAGE).ok_or(NvmeError::NoMemory)?;
    let _ = vtd::take_faults();
    let before = interrupts::count(irq.vector);
    let refused = read_and_wait(pair, nsid, buffer);
    let delivered = interrupt_within(irq.vector, before, REFUSED_WAIT_MS);
    let fault = vtd::take_faults()
        .into_iter()
        .find(|f| f.interrupt_index.is_some() && f.source == irq.requester);
    vtd::program_irte(HOSTILE_IRTE, irq.vector, irq.destination, irq.requester)
        .map_err(|e| NvmeError::Iommu(alloc::format!("{e}")))?;
    let repaired_before = interrupts::count(irq.vector);
    let mut repaired_completions = 0;
    for _ in 0..REPAIR_COMMANDS {
        let before = interrupts::count(irq.vector);
        if read_and_wait(pair, nsid, buffer).is_some_and(|d| d.code() == 0) {
            repaired_completions += 1;
        }
        interrupt_within(irq.vector, before, DELIVERY_WAIT_MS);
    }
    let repaired_interrupts = interrupts::count(irq.vector) - repaired_before;
    let fatal = controller.fatal();
    let recorded = fault.is_some_and(|f| {
        f.reason == vtd::REASON_IRTE_RESERVED && f.interrupt_index == Some(HOSTILE_IRTE)
    });
    let status = match &refused {
        Some(d) => alloc::format!("{}", d.code()),
        None => alloc::string::String::from("null"),
    };
    let fault_text = match fault {
        Some(f) => alloc::format!(
            "{{\"source\":\"{}\",\"reason\":{},\"index\":{}}}",
            controller.pci.bdf,
            f.reason,
            f.interrupt_index.unwrap_or_default()
        ),
        None => alloc::string::String::from("null"),
    };
    let pass = refused.as_ref().is_some_and(|d| d.code() == 0)
        && !delivered
        && recorded
        && repaired_completions == REPAIR_COMMANDS
        && repaired_interrupts >= REPAIR_COMMANDS
        && !fatal;
    crate::println!(
        "RESULT {{\"workload\":\"nvme_hostile\",\"op\":\"bad_irte\",\"iommu\":true,\
         \"ir\":true,\"applicable\":true,\"irte_index\":{},\"vector\":{},\"completed\":{},\
         \"hostile_status\":{},\"delivered\":{},\"fault\":{},\"repaired_completions\":{},\
         \"repaired_interrupts\":{},\"controller_fatal\":{},\"pass\":{}}}",
        HOSTILE_IRTE,
        irq.vector,
        refused.is_some(),
        status,
        delivered,
        fault_text,
        repaired_completions,
        repaired_interrupts,
        fatal,
        pass
    );
    if fatal {
        return Err(NvmeError::ControllerFatal);
    }
    Ok(pass)
}

/// Prints the failure and maps it to an outcome (timeouts end the run with status 4).
fn report_error(error: &NvmeError) -> Outcome {
    let text = alloc::format!("{:?}", error).replace('"', "'");
    crate::say!("nvme: device error {}", text);
    crate::println!(
        "RESULT {{\"workload\":\"nvme\",\"error\":\"{}\",\"pass\":false}}",
        text
    );
    match error {
        NvmeError::Timeout(_) => Outcome::Timeout,
        _ => Outcome::Fail,
    }
}

/// Whether `bs` suits the namespace and controller; says why not.
fn block_size_fits(bs: u64, namespace: &Namespace, max_transfer: Option<u64>) -> bool {
    let lba = 1u64 << namespace.lba_shift;
    if !bs.is_multiple_of(lba) || (bs >> namespace.lba_shift) > 65536 {
        crate::say!("nvme: bs={} is not a whole number of {}-byte LBAs", bs, lba);
        return false;
    }
    if let Some(max) = max_transfer.filter(|&max| bs > max) {
        crate::say!(
            "nvme: bs={} exceeds the controller's MDTS ({} bytes)",
            bs,
            max
        );
        return false;
    }
    true
}

/// Identifies, configures the doorbell buffer and creates the I/O queues.
fn run(p: &NvmeParams, timeout_ms: u64) -> Result<Outcome, NvmeError> {
    let blk = &p.blk;
    let Some(cpus) = workload::start_cpus("nvme", blk, timeout_ms) else {
        return Ok(Outcome::Fail);
    };
    let device = find(blk.dev).ok_or(NvmeError::NotFound)?;
    let mut controller = Controller::enable(device, timeout_ms)?;
    controller.identify_controller()?;
    let namespace = controller.first_namespace()?;
    let bs = u64::from(blk.bs);
    let span = blk
        .span_mb
        .map(|mb| mb << 20)
        .unwrap_or(workload::DEFAULT_SPAN)
        .min(namespace.capacity());
    let blocks = span / bs;
    if blocks == 0 || !block_size_fits(bs, &namespace, controller.max_transfer) {
        crate::say!(
            "nvme: namespace too small or bs unsuitable for op {}",
            blk.op.name()
        );
        return Ok(Outcome::Fail);
    }
    let wanted = blk.queues as u16;
    let dbbuf = p.dbbuf && controller.configure_doorbell_buffer(wanted)?;
    let count = controller.set_queue_count(wanted)?;
    crate::chatter!(
        "nvme {}: namespace {} of {} bytes ({}-byte LBAs), {} queue(s), dbbuf {}",
        controller.pci.bdf,
        namespace.nsid,
        namespace.capacity(),
        1u64 << namespace.lba_shift,
        count,
        dbbuf
    );
    if usize::from(count) < cpus {
        crate::say!("nvme: {} queue(s) for cpus={}", count, cpus);
        return Ok(Outcome::Fail);
    }
    let prp_pages_per_slot = u64::from(bs > 2 * PAGE) * PAGE;
    if workload::slot_memory(blk, u64::from(count), prp_pages_per_slot) > mem::free_bytes() / 2 {
        return Err(NvmeError::NoMemory);
    }
    let remapped = match p.hostile {
        Some(NvmeHostile::BadIrte) => prepare_bad_irte(&controller)?,
        _ => None,
    };
    let mut pairs = (1..=count)
        .map(|qid| {
            let vector = remapped.as_ref().filter(|_| qid == 1);
            controller.create_io_queue(qid, vector.map(|_| HOSTILE_MSIX_ENTRY))
        })
        .collect::<Result<Vec<QueuePair>, NvmeError>>()?;
    let mut hostile_passed = true;
    match p.hostile {
        Some(NvmeHostile::DmaOutside) => {
            hostile_dma_outside(&controller, &mut pairs[0], namespace.nsid)?
        }
        Some(NvmeHostile::DmaUnmapped) => {
            hostile_dma_unmapped(&controller, &mut pairs[0], namespace.nsid)?
        }
        Some(NvmeHostile::BadIrte) => {
            if let Some(irq) = &remapped {
                hostile_passed = hostile_bad_irte(&controller, &mut pairs[0], namespace.nsid, irq)?;
            }
        }
        None => {}
    }
    // The first queue's interrupts during the workload (it polls; they only arrive).
    let interrupts_before = remapped.as_ref().map(|irq| interrupts::count(irq.vector));
    let controller = &controller;
    let queues = pairs
        .into_iter()
        .map(|pair| {
            let depth = (blk.qd as usize)
                .min(usize::from(pair.sq_entries) - 1)
                .max(1);
            let prp_lists = (0..depth)
                .map(|_| match prp_pages_per_slot {
                    0 => Some(0),
                    _ => mem::alloc_dma(PAGE),
                })
                .collect::<Option<Vec<u64>>>()
                .ok_or(NvmeError::NoMemory)?;
            let queue = NvmeQueue {
                controller,
                pair,
                nsid: namespace.nsid,
                lba_shift: namespace.lba_shift,
                prp_lists,
            };
            QueueState::new(queue, depth, blk).ok_or(NvmeError::NoMemory)
        })
        .collect::<Result<Vec<_>, NvmeError>>()?;
    let depth = queues[0].depth();
    let finished = workload::execute(blk, queues, cpus, blocks, true, timeout_ms)?;
    let counts = finished
        .engine
        .queues
        .iter()
        .fold(DoorbellCounts::default(), |sum, q| DoorbellCounts {
            mmio: sum.mmio + q.queue.pair.counts.mmio,
            shadow_only: sum.shadow_only + q.queue.pair.counts.shadow_only,
        });
    let transport_fields = alloc::format!("\"dbbuf\":{dbbuf}");
    let trailing_fields = alloc::format!(
        "\"doorbell_mmio\":{},\"doorbell_shadow\":{},\"lba_bytes\":{},\"nsid\":{}",
        counts.mmio,
        counts.shadow_only,
        1u64 << namespace.lba_shift,
        namespace.nsid
    );
    workload::print_result(
        &finished,
        &Summary {
            workload: "nvme",
            queues: usize::from(count),
            depth,
            interrupts: remapped
                .as_ref()
                .zip(interrupts_before)
                .map_or(0, |(irq, before)| interrupts::count(irq.vector) - before),
            transport_fields: &transport_fields,
            trailing_fields: &trailing_fields,
        },
    );
    Ok(if finished.passed() && hostile_passed {
        Outcome::Pass
    } else {
        Outcome::Fail
    })
}

/// The `nvme` workload.
pub fn run_workload(p: &NvmeParams, timeout_ms: u64) -> Outcome {
    run(p, timeout_ms).unwrap_or_else(|error| report_error(&error))
}
