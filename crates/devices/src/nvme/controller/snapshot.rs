//! The enabled controller in a snapshot (and a live migration's state): quiesced first —
//! each I/O worker stops as for Delete I/O SQ (commands it took complete and post; any its
//! full CQ could not take are kept) —, then its queues (admin and I/O: addresses, sizes,
//! heads, tails, CQ phases, vectors), the completions the admin CQ has not taken, held Async
//! Event Requests and the pending event, the features; after a save the workers start again
//! where they stopped. A restore rebuilds all that on a fresh controller of the same shape,
//! validating it as it would a driver's commands (a snapshot is a file, not trusted more than
//! the guest) and writing nothing to guest memory: the shadow doorbells, EventIdx values and
//! queue entries came with the RAM.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sluice_sandbox::ThreadKind;
use vm_memory::{GuestAddress, GuestMemory, Permissions};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::command::{Completion, Status, CQE_SIZE, SQE_SIZE};
use super::super::io::{new_worker, SqHandle, DRAIN, RUN};
use super::super::queues::CompletionQueue;
use super::super::registers::{Configuration, MQES};
use super::super::Shared;
use super::{AdminSq, Controller, DoorbellEvents, Features, Identity};

/// A completion waiting for room in its CQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCompletion {
    result: u32,
    sq_head: u16,
    sq_id: u16,
    cid: u16,
    status: u16,
}

impl From<Completion> for SavedCompletion {
    fn from(c: Completion) -> Self {
        Self {
            result: c.result,
            sq_head: c.sq_head,
            sq_id: c.sq_id,
            cid: c.cid,
            status: c.status.0,
        }
    }
}

impl From<SavedCompletion> for Completion {
    fn from(c: SavedCompletion) -> Self {
        let mut entry = Completion::new(c.cid, Status(c.status), c.result);
        entry.sq_head = c.sq_head;
        entry.sq_id = c.sq_id;
        entry
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCq {
    qid: u16,
    base: u64,
    size: u16,
    vector: u16,
    interrupts: bool,
    head: u16,
    tail: u16,
    phase: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSq {
    qid: u16,
    cqid: u16,
    base: u64,
    size: u16,
    head: u16,
    /// The last tail written to the doorbell register (the shadow's is in guest memory).
    tail: u32,
    shadow: bool,
    /// Completions its full CQ had no room for.
    unposted: Vec<SavedCompletion>,
}

/// The controller's part of a saved NVMe function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedController {
    admin_sq: (u64, u16, u16, u16),
    admin_cq: SavedCq,
    admin_backlog: Vec<SavedCompletion>,
    cqs: Vec<SavedCq>,
    sqs: Vec<SavedSq>,
    aers: Vec<u16>,
    pending_event: Option<u32>,
    error_events_masked: bool,
    arbitration: u32,
    async_event_config: u32,
    queues_granted: u16,
    shut_down: bool,
}

fn saved_cq(cq: &CompletionQueue) -> SavedCq {
    let (head, tail, phase) = cq.position();
    SavedCq {
        qid: cq.qid,
        base: cq.base,
        size: cq.size,
        vector: cq.vector,
        interrupts: cq.interrupts_enabled,
        head,
        tail,
        phase,
    }
}

impl Controller {
    /// Stops every I/O worker with what it took completed (see the module doc); their
    /// positions are in their handles.
    fn quiesce(&mut self) {
        for handle in self.sqs.values_mut() {
            handle.stop(DRAIN);
        }
    }

    /// Starts the stopped workers again where they left off.
    fn resume(&mut self) -> Result<(), String> {
        let qids: Vec<u16> = self.sqs.keys().copied().collect();
        for qid in qids {
            self.restart_worker(qid)?;
        }
        Ok(())
    }

    fn restart_worker(&mut self, qid: u16) -> Result<(), String> {
        let limits = self.limits(true);
        let shared = self.shared.clone();
        let handle = self.sqs.get_mut(&qid).ok_or("no such queue")?;
        let cq = self
            .cqs
            .get(&handle.cqid)
            .cloned()
            .ok_or("its completion queue is gone")?;
        handle.stop.store(RUN, Ordering::Release);
        let worker = new_worker(
            qid,
            handle.base,
            handle.size,
            cq,
            shared.clone(),
            limits,
            handle,
        )
        .map_err(|e| format!("I/O queue {qid}: {e}"))?;
        let name = format!("{}-q{qid}", shared.name);
        let thread = sluice_sandbox::spawn(ThreadKind::QueueWorker, name, move || worker.run())
            .map_err(|e| format!("I/O queue {qid}: {e}"))?;
        handle.thread = Some(thread);
        Ok(())
    }

    /// The controller's state, quiesced; the workers run again afterwards.
    pub fn save(&mut self) -> Result<SavedController, String> {
        self.quiesce();
        let saved = self.saved();
        self.resume()?;
        Ok(saved)
    }

    fn saved(&self) -> SavedController {
        let sqs = self
            .sqs
            .values()
            .map(|h| {
                let unposted = h
                    .leftover
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .map(|&c| c.into())
                    .collect();
                SavedSq {
                    qid: h.qid,
                    cqid: h.cqid,
                    base: h.base,
                    size: h.size,
                    head: h.head.load(Ordering::Acquire) as u16,
                    tail: h.tail.load(Ordering::Acquire),
                    shadow: h.shadow.load(Ordering::Acquire),
                    unposted,
                }
            })
            .collect();
        SavedController {
            admin_sq: (
                self.admin_sq.base,
                self.admin_sq.size,
                self.admin_sq.head,
                self.admin_sq.tail,
            ),
            admin_cq: saved_cq(&self.admin_cq),
            admin_backlog: self.admin_backlog.iter().map(|&c| c.into()).collect(),
            cqs: self.cqs.values().map(|cq| saved_cq(cq)).collect(),
            sqs,
            aers: self.aers.clone(),
            pending_event: self.pending_event,
            error_events_masked: self.error_events_masked,
            arbitration: self.features.arbitration,
            async_event_config: self.features.async_event_config,
            queues_granted: self.features.queues_granted,
            shut_down: self.shut_down,
        }
    }

    /// Rebuilds a saved controller (see the module doc); the I/O workers start at once.
    pub fn restore(
        shared: Arc<Shared>,
        cc: Configuration,
        saved: &SavedController,
        max_queues: u16,
        identity: Identity,
        doorbell_events: DoorbellEvents,
    ) -> Result<Controller, String> {
        let page = cc.page_size();
        let (asq, sq_size, sq_head, sq_tail) = saved.admin_sq;
        let fits = |base: u64, entries: u16, entry: u64, access| {
            base & (page - 1) == 0
                && shared.dma.check_range(
                    GuestAddress(base),
                    usize::from(entries) * entry as usize,
                    access,
                )
        };
        let queue_ok = |size: u16, head: u16, tail: u16| {
            (2..=MQES + 1).contains(&size) && head < size && tail < size
        };
        if !fits(asq, sq_size, SQE_SIZE, Permissions::Read) || !queue_ok(sq_size, sq_head, sq_tail)
        {
            return Err("bad admin submission queue".into());
        }
        let vectors = shared.msix.vectors();
        let restore_cq = |cq: &SavedCq| -> Result<Arc<CompletionQueue>, String> {
            let valid = fits(cq.base, cq.size, CQE_SIZE, Permissions::Write)
                && queue_ok(cq.size, cq.head, cq.tail)
                && cq.qid <= max_queues
                && (!cq.interrupts || cq.vector < vectors);
            if !valid {
                return Err(format!("bad completion queue {}", cq.qid));
            }
            let dbbuf = shared.dbbuf().filter(|_| cq.qid != 0);
            Ok(Arc::new(CompletionQueue::restored(
                (cq.qid, cq.base, cq.size, cq.vector, cq.interrupts),
                (cq.head, cq.tail, cq.phase),
                dbbuf,
            )))
        };
        if saved.admin_cq.qid != 0 || saved.admin_cq.vector != 0 {
            return Err("bad admin completion queue".into());
        }
        let admin_cq = restore_cq(&saved.admin_cq)?;
        let mut cqs = BTreeMap::new();
        for cq in &saved.cqs {
            if cq.qid == 0 || cqs.insert(cq.qid, restore_cq(cq)?).is_some() {
                return Err(format!("bad completion queue {}", cq.qid));
            }
        }
        let granted = saved.queues_granted;
        if granted == 0 || granted > max_queues || saved.aers.len() > super::super::admin::AER_LIMIT
        {
            return Err("bad features".into());
        }
        shared.set_cq(0, Some(admin_cq.clone()));
        for (qid, cq) in &cqs {
            shared.set_cq(*qid, Some(cq.clone()));
        }
        let mut controller = Controller {
            doorbell_events,
            page_size: page,
            cc,
            max_queues,
            admin_sq: AdminSq {
                base: asq,
                size: sq_size,
                head: sq_head,
                tail: sq_tail,
            },
            admin_cq,
            admin_backlog: saved
                .admin_backlog
                .iter()
                .map(|&c| c.into())
                .collect::<VecDeque<_>>(),
            sqs: BTreeMap::new(),
            cqs,
            aers: saved.aers.clone(),
            pending_event: saved.pending_event,
            error_events_masked: saved.error_events_masked,
            features: Features {
                arbitration: saved.arbitration,
                async_event_config: saved.async_event_config,
                queues_granted: granted,
            },
            identity,
            started: Instant::now(),
            shut_down: saved.shut_down,
            shared,
        };
        for sq in &saved.sqs {
            controller.restore_sq(sq)?;
        }
        Ok(controller)
    }

    fn restore_sq(&mut self, sq: &SavedSq) -> Result<(), String> {
        let page = self.page_size;
        let valid = sq.qid != 0
            && sq.qid <= self.max_queues
            && !self.sqs.contains_key(&sq.qid)
            && self.cqs.contains_key(&sq.cqid)
            && (2..=MQES + 1).contains(&sq.size)
            && sq.head < sq.size
            && sq.tail < u32::from(sq.size)
            && sq.base & (page - 1) == 0
            && sq.unposted.len() <= usize::from(sq.size)
            && self.shared.dma.check_range(
                GuestAddress(sq.base),
                usize::from(sq.size) * SQE_SIZE as usize,
                Permissions::Read,
            );
        if !valid {
            return Err(format!("bad submission queue {}", sq.qid));
        }
        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string());
        let handle = SqHandle {
            qid: sq.qid,
            cqid: sq.cqid,
            base: sq.base,
            size: sq.size,
            tail: Arc::new(AtomicU32::new(sq.tail)),
            doorbell: Arc::new(eventfd()?),
            ioevent: None,
            kick: Arc::new(eventfd()?),
            stop: Arc::new(AtomicU8::new(RUN)),
            shadow: Arc::new(AtomicBool::new(sq.shadow && self.shared.dbbuf().is_some())),
            head: Arc::new(AtomicU32::new(u32::from(sq.head))),
            leftover: Arc::new(Mutex::new(sq.unposted.iter().map(|&c| c.into()).collect())),
            thread: None,
        };
        self.sqs.insert(sq.qid, handle);
        self.restart_worker(sq.qid)?;
        self.register_doorbell(sq.qid);
        Ok(())
    }
}
