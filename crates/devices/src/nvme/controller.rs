//! The enabled controller: the admin queue pair (served on the vCPU thread that rings its
//! doorbell), the I/O queues and their workers, features, held Async Event Requests, and
//! what a reset or a shutdown does to them.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

use sluice_bus::IoEventRegistrar;
use sluice_sandbox::ThreadKind;
use sluice_virtio::QueueMetrics;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::admin::*;
use super::command::{Command, Completion, Status, CQE_SIZE, SQE_SIZE};
use super::io::{new_worker, SqHandle, CANCEL, DRAIN, NSID, RUN};
use super::prp::{prp_segments, WalkLimits};
use super::queues::{CompletionQueue, Dbbuf, PostError};
use super::registers::{Configuration, MQES};
use super::Shared;

mod snapshot;
pub use snapshot::SavedController;

/// Features the driver may set (reset with the controller).
#[derive(Debug, Clone, Copy)]
struct Features {
    arbitration: u32,
    async_event_config: u32,
    /// I/O queues granted by Set Features Number of Queues (same count of SQs and CQs).
    queues_granted: u16,
}

/// The admin submission queue.
#[derive(Debug)]
struct AdminSq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
}

/// The admin queue registers at enable time.
#[derive(Debug, Clone, Copy)]
pub struct AdminQueues {
    pub aqa: u32,
    pub asq: u64,
    pub acq: u64,
}

/// Where SQ doorbells can become ioeventfds: the registrar and BAR0's address.
#[derive(Clone)]
pub struct DoorbellEvents {
    pub registrar: Option<Arc<dyn IoEventRegistrar>>,
    pub bar0: Option<u64>,
}

/// Controller state between CC.EN=1 and the next reset.
pub struct Controller {
    shared: Arc<Shared>,
    doorbell_events: DoorbellEvents,
    page_size: u64,
    cc: Configuration,
    max_queues: u16,
    admin_sq: AdminSq,
    admin_cq: Arc<CompletionQueue>,
    admin_backlog: VecDeque<Completion>,
    sqs: BTreeMap<u16, SqHandle>,
    cqs: BTreeMap<u16, Arc<CompletionQueue>>,
    aers: Vec<u16>,
    /// An error event (Invalid Doorbell) waiting for an Async Event Request.
    pending_event: Option<u32>,
    /// Error events are masked from one event until the host reads the error log.
    error_events_masked: bool,
    features: Features,
    identity: Identity,
    started: Instant,
    shut_down: bool,
}

impl Controller {
    /// Enables with the admin queues of `asq` / `acq`; `None` if they are unusable.
    pub fn enable(
        shared: Arc<Shared>,
        cc: Configuration,
        admin: AdminQueues,
        max_queues: u16,
        identity: Identity,
        doorbell_events: DoorbellEvents,
    ) -> Option<Controller> {
        let AdminQueues { aqa, asq, acq } = admin;
        let (sq_size, cq_size) = super::registers::admin_queue_sizes(aqa)?;
        let page_mask = cc.page_size() - 1;
        if asq & 0xfff != 0 || acq & 0xfff != 0 || asq & page_mask != 0 || acq & page_mask != 0 {
            return None;
        }
        let mem = &shared.dma;
        let sq_ok = mem.check_range(
            GuestAddress(asq),
            usize::from(sq_size) * SQE_SIZE as usize,
            Permissions::Read,
        );
        let cq_ok = mem.check_range(
            GuestAddress(acq),
            usize::from(cq_size) * CQE_SIZE as usize,
            Permissions::Write,
        );
        if !sq_ok || !cq_ok {
            return None;
        }
        let admin_cq = Arc::new(CompletionQueue::new(0, acq, cq_size, 0, true));
        shared.set_cq(0, Some(admin_cq.clone()));
        Some(Controller {
            doorbell_events,
            page_size: cc.page_size(),
            cc,
            max_queues,
            admin_sq: AdminSq {
                base: asq,
                size: sq_size,
                head: 0,
                tail: 0,
            },
            admin_cq,
            admin_backlog: VecDeque::new(),
            sqs: BTreeMap::new(),
            cqs: BTreeMap::new(),
            aers: Vec::new(),
            pending_event: None,
            error_events_masked: false,
            features: Features {
                arbitration: 0,
                async_event_config: 0,
                queues_granted: max_queues,
            },
            identity,
            started: Instant::now(),
            shut_down: false,
            shared,
        })
    }

    /// Controller reset (CC.EN 1→0): every worker stops without posting; queues, shadow
    /// doorbells, features and held requests are dropped.
    pub fn reset(mut self) {
        self.stop_all(CANCEL);
        self.shared.clear_queues();
        *self.shared.dbbuf_slot() = None;
        self.shared.write_cache.store(true, Ordering::Relaxed);
        self.shared.coalescing.store(0, Ordering::Relaxed);
        for cd in &self.shared.coalescing_disabled {
            cd.store(false, Ordering::Relaxed);
        }
    }

    /// Normal or abrupt shutdown: in-flight commands complete, the image is made durable.
    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.stop_all(DRAIN);
        // SAFETY: fdatasync on the image's open descriptor; no memory is passed.
        let rc = unsafe { libc::fdatasync(self.shared.image.fd()) };
        if rc != 0 {
            tracing::warn!(
                "nvme: flushing the image at shutdown failed: {}",
                std::io::Error::last_os_error()
            );
        }
        self.shut_down = true;
    }

    fn stop_all(&mut self, how: u8) {
        let registrar = self.doorbell_events.registrar.clone();
        for handle in self.sqs.values_mut() {
            unregister_doorbell(registrar.as_deref(), handle);
            handle.stop(how);
        }
        self.sqs.clear();
    }

    /// With shadow doorbells on, SQ `qid`'s doorbell becomes an ioeventfd: the guest's write
    /// wakes the worker without an exit, and the worker reads the tail from the shadow.
    fn register_doorbell(&mut self, qid: u16) {
        let (Some(registrar), Some(bar0)) = (
            self.doorbell_events.registrar.clone(),
            self.doorbell_events.bar0,
        ) else {
            return;
        };
        let Some(handle) = self.sqs.get_mut(&qid) else {
            return;
        };
        if handle.ioevent.is_some() || !handle.shadow.load(Ordering::Acquire) {
            return;
        }
        let addr = bar0 + super::registers::DOORBELLS + u64::from(qid) * 8;
        match registrar.register(&handle.doorbell, addr, 4, None) {
            Ok(()) => handle.ioevent = Some(addr),
            Err(e) => tracing::warn!("nvme: ioeventfd for SQ {qid} at {addr:#x}: {e}"),
        }
    }

    /// BAR0 moved (or was unmapped): the doorbell ioeventfds follow it.
    pub fn set_bar0(&mut self, bar0: Option<u64>) {
        let registrar = self.doorbell_events.registrar.clone();
        for handle in self.sqs.values_mut() {
            unregister_doorbell(registrar.as_deref(), handle);
        }
        self.doorbell_events.bar0 = bar0;
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            self.register_doorbell(qid);
        }
    }

    fn limits(&self, allow_sgl: bool) -> WalkLimits {
        WalkLimits {
            page_size: self.page_size,
            max_transfer: (self.page_size as usize) << super::registers::MDTS,
            allow_sgl,
        }
    }

    /// The SQ y tail doorbell; `Err(info)` names the Invalid Doorbell event it raises.
    pub fn sq_doorbell(&mut self, qid: u16, value: u32) -> Result<(), u8> {
        if qid == 0 {
            QueueMetrics::add(&self.shared.queue_metrics(0).kicks, 1);
            let tail = u16::try_from(value)
                .ok()
                .filter(|t| *t < self.admin_sq.size)
                .ok_or(EVENT_INVALID_DOORBELL_VALUE)?;
            self.admin_sq.tail = tail;
            self.process_admin();
            return Ok(());
        }
        let handle = self.sqs.get(&qid).ok_or(EVENT_INVALID_DOORBELL_REGISTER)?;
        if value >= u32::from(handle.size) {
            return Err(EVENT_INVALID_DOORBELL_VALUE);
        }
        handle.tail.store(value, Ordering::Release);
        let _ = handle.doorbell.write(1);
        Ok(())
    }

    /// The CQ y head doorbell: room for entries waiting to be posted.
    pub fn cq_doorbell(&mut self, qid: u16, value: u32) -> Result<(), u8> {
        if qid == 0 {
            if !self.admin_cq.set_head(value) {
                return Err(EVENT_INVALID_DOORBELL_VALUE);
            }
            self.post_admin_backlog();
        } else {
            let cq = self.cqs.get(&qid).ok_or(EVENT_INVALID_DOORBELL_REGISTER)?;
            if !cq.set_head(value) {
                return Err(EVENT_INVALID_DOORBELL_VALUE);
            }
            for handle in self.sqs.values().filter(|h| h.cqid == qid) {
                let _ = handle.kick.write(1);
            }
        }
        self.shared.update_intx();
        Ok(())
    }

    /// A doorbell write the controller refused: an error event (type 0, Error Information
    /// log), unless error events are masked until the host reads that log.
    pub fn invalid_doorbell(&mut self, info: u8) {
        if self.error_events_masked {
            return;
        }
        self.error_events_masked = true;
        let result = (u32::from(info) << 8) | (u32::from(LOG_ERROR) << 16);
        match self.aers.pop() {
            Some(cid) => {
                self.admin_backlog
                    .push_back(Completion::new(cid, Status::SUCCESS, result));
                self.post_admin_backlog();
            }
            None => self.pending_event = Some(result),
        }
    }

    fn process_admin(&mut self) {
        while self.admin_sq.head != self.admin_sq.tail {
            let addr = self.admin_sq.base + u64::from(self.admin_sq.head) * SQE_SIZE;
            self.admin_sq.head = (self.admin_sq.head + 1) % self.admin_sq.size;
            let mut raw = [0u8; 64];
            if self
                .shared
                .dma
                .read_slice(&mut raw, GuestAddress(addr))
                .is_err()
            {
                continue;
            }
            let cmd = Command(raw);
            let started = Instant::now();
            if let Some((status, result)) = self.admin_command(&cmd) {
                let outcome = if status.is_success() { Ok(0) } else { Err(()) };
                self.shared
                    .queue_metrics(0)
                    .record_request(started, outcome);
                self.admin_backlog
                    .push_back(Completion::new(cmd.cid(), status, result));
            }
        }
        self.post_admin_backlog();
    }

    fn post_admin_backlog(&mut self) {
        let mut posted = false;
        while let Some(mut entry) = self.admin_backlog.pop_front() {
            entry.sq_head = self.admin_sq.head;
            if self.admin_cq.post(&self.shared.dma, entry) == Err(PostError::Full) {
                self.admin_backlog.push_front(entry);
                break;
            }
            posted = true;
        }
        if posted {
            self.shared.interrupt(&self.admin_cq, 0);
        }
    }

    /// One admin command: `Some((status, DW0))` to complete now, `None` to hold it (an Async
    /// Event Request waits for an event).
    fn admin_command(&mut self, cmd: &Command) -> Option<(Status, u32)> {
        if cmd.psdt() != 0 || cmd.fuse() != 0 {
            return Some((Status::INVALID_FIELD, 0));
        }
        let done = |status: Status| Some((status, 0));
        match cmd.opcode() {
            OPC_IDENTIFY => done(self.identify(cmd)),
            OPC_CREATE_CQ => done(self.create_cq(cmd)),
            OPC_CREATE_SQ => done(self.create_sq(cmd)),
            OPC_DELETE_SQ => done(self.delete_sq(cmd)),
            OPC_DELETE_CQ => done(self.delete_cq(cmd)),
            OPC_GET_LOG_PAGE => {
                let status = self.get_log_page(cmd);
                // Reading the error log without Retain Asynchronous Event unmasks error events.
                let lid = (cmd.cdw(10) & 0xff) as u8;
                if status.is_success() && lid == LOG_ERROR && cmd.cdw(10) & (1 << 15) == 0 {
                    self.error_events_masked = false;
                }
                done(status)
            }
            OPC_SET_FEATURES => Some(self.set_features(cmd)),
            OPC_GET_FEATURES => Some(self.get_features(cmd)),
            // Commands are never aborted: DW0 bit 0 says so.
            OPC_ABORT => Some((Status::SUCCESS, 1)),
            OPC_ASYNC_EVENT_REQUEST => {
                if self.aers.len() >= AER_LIMIT {
                    return done(Status::AER_LIMIT_EXCEEDED);
                }
                if let Some(result) = self.pending_event.take() {
                    return Some((Status::SUCCESS, result));
                }
                self.aers.push(cmd.cid());
                None
            }
            OPC_KEEP_ALIVE => done(Status::SUCCESS),
            OPC_DOORBELL_BUFFER_CONFIG if self.identity.shadow_doorbells => {
                done(self.doorbell_buffer_config(cmd))
            }
            _ => done(Status::INVALID_OPCODE),
        }
    }

    /// Copies `data` to the command's PRPs (admin transfers are PRP only).
    fn write_data(&self, cmd: &Command, data: &[u8]) -> Status {
        let limits = self.limits(false);
        if data.len() > limits.max_transfer {
            return Status::INVALID_FIELD;
        }
        let segments = match prp_segments(
            &self.shared.dma,
            cmd.prp1(),
            cmd.prp2(),
            data.len(),
            self.page_size,
        ) {
            Ok(segments) => segments,
            Err(status) => return status,
        };
        let mut at = 0;
        for (addr, len) in segments {
            // A live migration must send the page again (sluice_dma::dirty).
            sluice_dma::dirty::mark_on(&self.shared.dma, addr.0, len as u64);
            if self
                .shared
                .dma
                .write_slice(&data[at..at + len], addr)
                .is_err()
            {
                return Status::DATA_TRANSFER_ERROR;
            }
            at += len;
        }
        Status::SUCCESS
    }

    fn identify(&self, cmd: &Command) -> Status {
        let cns = (cmd.cdw(10) & 0xff) as u8;
        let nsid = cmd.nsid();
        let page = match cns {
            CNS_NAMESPACE if nsid == NSID => identify_namespace(&self.shared.namespace),
            CNS_NAMESPACE_DESCRIPTORS if nsid == NSID => {
                namespace_descriptors(&self.identity.serial)
            }
            CNS_NAMESPACE | CNS_NAMESPACE_DESCRIPTORS => return Status::INVALID_NAMESPACE,
            CNS_CONTROLLER => identify_controller(&self.identity, self.max_queues),
            CNS_ACTIVE_NAMESPACES if nsid < 0xffff_fffe => active_namespaces(nsid),
            CNS_ACTIVE_NAMESPACES => return Status::INVALID_NAMESPACE,
            _ => return Status::INVALID_FIELD,
        };
        self.write_data(cmd, &page)
    }

    fn queue_id_and_size(&self, cmd: &Command) -> Result<(u16, u16), Status> {
        let qid = (cmd.cdw(10) & 0xffff) as u16;
        let size = (cmd.cdw(10) >> 16) as u16;
        if qid == 0 || qid > self.max_queues.min(self.features.queues_granted) {
            return Err(Status::INVALID_QUEUE_IDENTIFIER);
        }
        if size == 0 || size > MQES {
            return Err(Status::INVALID_QUEUE_SIZE);
        }
        Ok((qid, size + 1))
    }

    /// Queue memory: page aligned (PC=1 only: CAP.CQR) and inside guest memory.
    fn queue_memory(
        &self,
        cmd: &Command,
        bytes: usize,
        access: Permissions,
    ) -> Result<u64, Status> {
        if cmd.cdw(11) & 1 == 0 {
            return Err(Status::INVALID_FIELD);
        }
        let base = cmd.prp1();
        if base & (self.page_size - 1) != 0 {
            return Err(Status::PRP_OFFSET_INVALID);
        }
        if !self
            .shared
            .dma
            .check_range(GuestAddress(base), bytes, access)
        {
            return Err(Status::INVALID_FIELD);
        }
        Ok(base)
    }

    fn create_cq(&mut self, cmd: &Command) -> Status {
        if self.cc.iocqes() != 4 {
            return Status::INVALID_FIELD;
        }
        let (qid, size) = match self.queue_id_and_size(cmd) {
            Ok(v) => v,
            Err(status) => return status,
        };
        if self.cqs.contains_key(&qid) {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        let base = match self.queue_memory(
            cmd,
            usize::from(size) * CQE_SIZE as usize,
            Permissions::Write,
        ) {
            Ok(base) => base,
            Err(status) => return status,
        };
        let interrupts = cmd.cdw(11) & 0x2 != 0;
        let vector = (cmd.cdw(11) >> 16) as u16;
        if interrupts && vector >= self.shared.msix.vectors() {
            return Status::INVALID_INTERRUPT_VECTOR;
        }
        let cq = Arc::new(CompletionQueue::new(qid, base, size, vector, interrupts));
        cq.set_dbbuf(&self.shared.dma, self.shared.dbbuf());
        self.shared.set_cq(qid, Some(cq.clone()));
        self.cqs.insert(qid, cq);
        Status::SUCCESS
    }

    fn create_sq(&mut self, cmd: &Command) -> Status {
        if self.cc.iosqes() != 6 {
            return Status::INVALID_FIELD;
        }
        let (qid, size) = match self.queue_id_and_size(cmd) {
            Ok(v) => v,
            Err(status) => return status,
        };
        if self.sqs.contains_key(&qid) {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        let cqid = (cmd.cdw(11) >> 16) as u16;
        let Some(cq) = self.cqs.get(&cqid).cloned() else {
            return Status::COMPLETION_QUEUE_INVALID;
        };
        let base = match self.queue_memory(
            cmd,
            usize::from(size) * SQE_SIZE as usize,
            Permissions::Read,
        ) {
            Ok(base) => base,
            Err(status) => return status,
        };
        match self.start_sq(qid, cqid, base, size, cq) {
            Ok(handle) => {
                self.sqs.insert(qid, handle);
                self.register_doorbell(qid);
                Status::SUCCESS
            }
            Err(e) => {
                tracing::warn!("nvme: cannot start I/O queue {qid}: {e}");
                Status::INTERNAL_ERROR
            }
        }
    }

    fn start_sq(
        &self,
        qid: u16,
        cqid: u16,
        base: u64,
        size: u16,
        cq: Arc<CompletionQueue>,
    ) -> std::io::Result<SqHandle> {
        let dbbuf = self.shared.dbbuf();
        if let Some(buffers) = dbbuf {
            buffers.seed(&self.shared.dma, qid, Some(0), None);
        }
        let mut handle = SqHandle {
            qid,
            cqid,
            base,
            size,
            tail: Arc::new(AtomicU32::new(0)),
            doorbell: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            ioevent: None,
            kick: Arc::new(EventFd::new(EFD_NONBLOCK)?),
            stop: Arc::new(AtomicU8::new(RUN)),
            shadow: Arc::new(AtomicBool::new(dbbuf.is_some())),
            head: Arc::new(AtomicU32::new(0)),
            leftover: Arc::new(std::sync::Mutex::new(Vec::new())),
            thread: None,
        };
        let worker = new_worker(
            qid,
            base,
            size,
            cq,
            self.shared.clone(),
            self.limits(true),
            &handle,
        )?;
        let name = format!("{}-q{qid}", self.shared.name);
        handle.thread = Some(sluice_sandbox::spawn(
            ThreadKind::QueueWorker,
            name,
            move || worker.run(),
        )?);
        Ok(handle)
    }

    fn delete_sq(&mut self, cmd: &Command) -> Status {
        let qid = (cmd.cdw(10) & 0xffff) as u16;
        let Some(mut handle) = self.sqs.remove(&qid) else {
            return Status::INVALID_QUEUE_IDENTIFIER;
        };
        unregister_doorbell(self.doorbell_events.registrar.as_deref(), &mut handle);
        handle.stop(DRAIN);
        Status::SUCCESS
    }

    fn delete_cq(&mut self, cmd: &Command) -> Status {
        let qid = (cmd.cdw(10) & 0xffff) as u16;
        if qid == 0 || !self.cqs.contains_key(&qid) {
            return Status::INVALID_QUEUE_IDENTIFIER;
        }
        if self.sqs.values().any(|h| h.cqid == qid) {
            return Status::INVALID_QUEUE_DELETION;
        }
        self.cqs.remove(&qid);
        self.shared.set_cq(qid, None);
        self.shared.update_intx();
        Status::SUCCESS
    }

    fn get_log_page(&self, cmd: &Command) -> Status {
        let lid = (cmd.cdw(10) & 0xff) as u8;
        let dwords = ((u64::from(cmd.cdw(11) & 0xffff) << 16) | u64::from(cmd.cdw(10) >> 16)) + 1;
        let offset = u64::from(cmd.cdw(12)) | (u64::from(cmd.cdw(13)) << 32);
        let log = match lid {
            LOG_ERROR => error_log(),
            LOG_SMART => smart_log(&self.health()),
            LOG_FIRMWARE_SLOT => firmware_log(&self.identity.firmware),
            _ => return Status::INVALID_LOG_PAGE,
        };
        let len = dwords * 4;
        if offset & 0x3 != 0
            || offset > log.len() as u64
            || len > self.limits(false).max_transfer as u64
        {
            return Status::INVALID_FIELD;
        }
        // Bounded by the transfer limit above.
        let mut data = vec![0u8; len as usize];
        let from = &log[offset as usize..];
        let n = from.len().min(data.len());
        data[..n].copy_from_slice(&from[..n]);
        self.write_data(cmd, &data)
    }

    fn health(&self) -> Health {
        let smart = &self.shared.smart;
        Health {
            bytes_read: smart.bytes_read.load(Ordering::Relaxed),
            bytes_written: smart.bytes_written.load(Ordering::Relaxed),
            read_commands: smart.read_commands.load(Ordering::Relaxed),
            write_commands: smart.write_commands.load(Ordering::Relaxed),
            power_on_hours: self.started.elapsed().as_secs() / 3600,
        }
    }

    fn granted_queues(&self) -> u32 {
        let n = u32::from(self.features.queues_granted - 1);
        n | (n << 16)
    }

    fn set_features(&mut self, cmd: &Command) -> (Status, u32) {
        if cmd.cdw(10) & (1 << 31) != 0 {
            return (Status::FEATURE_NOT_SAVEABLE, 0);
        }
        let value = cmd.cdw(11);
        match (cmd.cdw(10) & 0xff) as u8 {
            FEAT_ARBITRATION => self.features.arbitration = value,
            FEAT_VOLATILE_WRITE_CACHE => {
                self.shared
                    .write_cache
                    .store(value & 1 != 0, Ordering::Relaxed);
            }
            FEAT_NUMBER_OF_QUEUES => {
                let (sqs, cqs) = (value & 0xffff, value >> 16);
                if sqs == 0xffff || cqs == 0xffff {
                    return (Status::INVALID_FIELD, 0);
                }
                let wanted = (sqs.max(cqs) + 1).min(u32::from(self.max_queues));
                // At most max_queues, which is a u16.
                self.features.queues_granted = wanted as u16;
                return (Status::SUCCESS, self.granted_queues());
            }
            FEAT_INTERRUPT_COALESCING => {
                self.shared
                    .coalescing
                    .store(value & 0xffff, Ordering::Relaxed);
            }
            FEAT_INTERRUPT_VECTOR_CONFIG => {
                let Some(cd) = self
                    .shared
                    .coalescing_disabled
                    .get((value & 0xffff) as usize)
                else {
                    return (Status::INVALID_FIELD, 0);
                };
                cd.store(value & (1 << 16) != 0, Ordering::Relaxed);
            }
            FEAT_ASYNC_EVENT_CONFIG => self.features.async_event_config = value,
            _ => return (Status::INVALID_FIELD, 0),
        }
        (Status::SUCCESS, 0)
    }

    fn get_features(&self, cmd: &Command) -> (Status, u32) {
        let select = (cmd.cdw(10) >> 8) & 0x7;
        let fid = (cmd.cdw(10) & 0xff) as u8;
        let known = matches!(
            fid,
            FEAT_ARBITRATION
                | FEAT_VOLATILE_WRITE_CACHE
                | FEAT_NUMBER_OF_QUEUES
                | FEAT_INTERRUPT_COALESCING
                | FEAT_INTERRUPT_VECTOR_CONFIG
                | FEAT_ASYNC_EVENT_CONFIG
        );
        if !known {
            return (Status::INVALID_FIELD, 0);
        }
        let current = match select {
            0 => true,
            1 | 2 => false,
            // Supported capabilities: changeable, not saveable, not per namespace.
            3 => return (Status::SUCCESS, 1 << 2),
            _ => return (Status::INVALID_FIELD, 0),
        };
        let value = match fid {
            FEAT_ARBITRATION if current => self.features.arbitration,
            FEAT_VOLATILE_WRITE_CACHE if current => {
                u32::from(self.shared.write_cache.load(Ordering::Relaxed))
            }
            FEAT_VOLATILE_WRITE_CACHE => 1,
            FEAT_NUMBER_OF_QUEUES if current => self.granted_queues(),
            FEAT_NUMBER_OF_QUEUES => {
                let n = u32::from(self.max_queues - 1);
                n | (n << 16)
            }
            FEAT_INTERRUPT_COALESCING if current => self.shared.coalescing.load(Ordering::Relaxed),
            FEAT_INTERRUPT_VECTOR_CONFIG => {
                let vector = cmd.cdw(11) & 0xffff;
                let Some(cd) = self.shared.coalescing_disabled.get(vector as usize) else {
                    return (Status::INVALID_FIELD, 0);
                };
                vector | (u32::from(current && cd.load(Ordering::Relaxed)) << 16)
            }
            FEAT_ASYNC_EVENT_CONFIG if current => self.features.async_event_config,
            _ => 0,
        };
        (Status::SUCCESS, value)
    }

    /// Doorbell Buffer Config: two page-aligned pages inside guest memory; from now on the
    /// I/O queues read the shadow doorbells and publish EventIdx values.
    fn doorbell_buffer_config(&mut self, cmd: &Command) -> Status {
        let (shadow, event_idx) = (cmd.prp1(), cmd.prp2());
        let page = self.page_size;
        let mem = &self.shared.dma;
        let usable = |addr: u64| {
            addr & (page - 1) == 0
                && mem.check_range(GuestAddress(addr), page as usize, Permissions::ReadWrite)
        };
        if !usable(shadow) || !usable(event_idx) || shadow == event_idx {
            return Status::INVALID_FIELD;
        }
        // Queue ids 1..=max_queues must fit in one page of 8-byte pairs.
        if (u64::from(self.max_queues) + 1) * 8 > page {
            return Status::INVALID_FIELD;
        }
        let buffers = Dbbuf { shadow, event_idx };
        *self.shared.dbbuf_slot() = Some(buffers);
        tracing::info!(
            "{}: shadow doorbells at {shadow:#x}, EventIdx at {event_idx:#x}",
            self.shared.name
        );
        for cq in self.cqs.values() {
            cq.set_dbbuf(mem, Some(buffers));
        }
        for handle in self.sqs.values() {
            // The register value is where the driver's shadow must start.
            let tail = handle.tail.load(Ordering::Acquire) as u16;
            buffers.seed(mem, handle.qid, Some(tail), None);
            handle.shadow.store(true, Ordering::Release);
            let _ = handle.kick.write(1);
        }
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            self.register_doorbell(qid);
        }
        Status::SUCCESS
    }

    /// Held Async Event Requests (for tests and the register view).
    pub fn held_event_requests(&self) -> usize {
        self.aers.len()
    }

    /// Running I/O submission queues.
    pub fn io_queues(&self) -> usize {
        self.sqs.len()
    }
}

/// Removes `handle`'s doorbell ioeventfd, if it has one (before its eventfd goes away: KVM
/// would keep the registration and refuse the next one at that address).
fn unregister_doorbell(registrar: Option<&dyn IoEventRegistrar>, handle: &mut SqHandle) {
    let (Some(registrar), Some(addr)) = (registrar, handle.ioevent.take()) else {
        return;
    };
    if let Err(e) = registrar.unregister(&handle.doorbell, addr, 4, None) {
        tracing::warn!(
            "nvme: removing the ioeventfd of SQ {} at {addr:#x}: {e}",
            handle.qid
        );
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop_all(CANCEL);
    }
}
