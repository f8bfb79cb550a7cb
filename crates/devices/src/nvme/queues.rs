//! Completion queues (shared by the submission queues that post to them and the vCPU that
//! writes their head doorbell) and the shadow doorbell buffers.

use std::sync::atomic::{fence, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use sluice_dma::DmaSpace;
use vm_memory::{Bytes, GuestAddress};

use super::command::{Completion, CQE_SIZE};

/// The two pages Doorbell Buffer Config named: the driver's shadow doorbells and the
/// controller's EventIdx values, both laid out like the doorbell registers (stride 4 bytes:
/// SQ y tail at `8y`, CQ y head at `8y + 4`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dbbuf {
    pub shadow: u64,
    pub event_idx: u64,
}

impl Dbbuf {
    fn sq_offset(qid: u16) -> u64 {
        u64::from(qid) * 8
    }

    fn cq_offset(qid: u16) -> u64 {
        u64::from(qid) * 8 + 4
    }

    fn read(mem: &DmaSpace, addr: u64) -> Option<u32> {
        // Pairs with the driver's barrier between its queue entries and its shadow write.
        let value = mem
            .read_obj::<u32>(GuestAddress(addr))
            .ok()
            .map(u32::from_le);
        fence(Ordering::Acquire);
        value
    }

    fn write(mem: &DmaSpace, addr: u64, value: u32) {
        // A live migration must send the page again (sluice_dma::dirty).
        sluice_dma::dirty::mark_on(mem, addr, 4);
        let _ = mem.write_obj::<u32>(value.to_le(), GuestAddress(addr));
        // The driver reads the EventIdx after its shadow write; ours must be visible before we
        // read the shadow again.
        fence(Ordering::SeqCst);
    }

    /// The driver's shadow SQ tail of queue `qid`.
    pub fn sq_tail(&self, mem: &DmaSpace, qid: u16) -> Option<u32> {
        Self::read(mem, self.shadow + Self::sq_offset(qid))
    }

    /// The driver's shadow CQ head of queue `qid`.
    pub fn cq_head(&self, mem: &DmaSpace, qid: u16) -> Option<u32> {
        Self::read(mem, self.shadow + Self::cq_offset(qid))
    }

    /// Asks the driver to ring the SQ doorbell once its tail moves past `tail`.
    pub fn set_sq_event(&self, mem: &DmaSpace, qid: u16, tail: u16) {
        Self::write(mem, self.event_idx + Self::sq_offset(qid), u32::from(tail));
    }

    /// Asks the driver to ring the CQ doorbell once its head moves past `head`.
    pub fn set_cq_event(&self, mem: &DmaSpace, qid: u16, head: u16) {
        Self::write(mem, self.event_idx + Self::cq_offset(qid), u32::from(head));
    }

    /// Writes the current values into the driver's shadow (a buffer configured while queues
    /// already run starts consistent with the registers).
    pub fn seed(&self, mem: &DmaSpace, qid: u16, sq_tail: Option<u16>, cq_head: Option<u16>) {
        if let Some(tail) = sq_tail {
            Self::write(mem, self.shadow + Self::sq_offset(qid), u32::from(tail));
            self.set_sq_event(mem, qid, tail);
        }
        if let Some(head) = cq_head {
            Self::write(mem, self.shadow + Self::cq_offset(qid), u32::from(head));
            self.set_cq_event(mem, qid, head);
        }
    }
}

/// Interrupt Coalescing (feature 08h): one interrupt once THR+1 entries wait, or TIME × 100 µs
/// after the first of them was posted, whichever comes first. Only I/O CQs coalesce, and only
/// when both fields are non-zero (either at zero means an interrupt per completion).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalescing {
    pub threshold: u32,
    pub window: Duration,
}

impl Coalescing {
    pub fn from_feature(value: u32) -> Option<Coalescing> {
        let (thr, time) = (value & 0xff, (value >> 8) & 0xff);
        (thr > 0 && time > 0).then(|| Coalescing {
            threshold: thr + 1,
            window: Duration::from_micros(100 * u64::from(time)),
        })
    }
}

#[derive(Debug)]
struct CqState {
    head: u16,
    tail: u16,
    phase: bool,
    /// Shadow doorbells for this queue (I/O queues only).
    dbbuf: Option<Dbbuf>,
    /// Entries posted since the last interrupt, and when that interrupt is due (coalescing).
    unsignalled: u32,
    deadline: Option<Instant>,
}

/// Why a completion could not be posted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostError {
    /// The queue is full: the entry must wait for the driver to move the head.
    Full,
}

/// One completion queue.
#[derive(Debug)]
pub struct CompletionQueue {
    pub qid: u16,
    pub base: u64,
    pub size: u16,
    pub vector: u16,
    pub interrupts_enabled: bool,
    state: Mutex<CqState>,
}

impl CompletionQueue {
    pub fn new(qid: u16, base: u64, size: u16, vector: u16, interrupts_enabled: bool) -> Self {
        CompletionQueue {
            qid,
            base,
            size,
            vector,
            interrupts_enabled,
            state: Mutex::new(CqState {
                head: 0,
                tail: 0,
                phase: true,
                dbbuf: None,
                unsignalled: 0,
                deadline: None,
            }),
        }
    }

    /// A queue restored from a snapshot at `head`, `tail` and `phase` (checked by the caller
    /// against `size`), reading shadow doorbells from `dbbuf` without writing them: guest
    /// memory came with the snapshot.
    pub fn restored(
        queue: (u16, u64, u16, u16, bool),
        (head, tail, phase): (u16, u16, bool),
        dbbuf: Option<Dbbuf>,
    ) -> Self {
        let (qid, base, size, vector, interrupts_enabled) = queue;
        let cq = Self::new(qid, base, size, vector, interrupts_enabled);
        {
            let mut state = cq.state();
            state.head = head;
            state.tail = tail;
            state.phase = phase;
            state.dbbuf = dbbuf;
        }
        cq
    }

    /// (head, tail, phase) for a snapshot.
    pub fn position(&self) -> (u16, u16, bool) {
        let state = self.state();
        (state.head, state.tail, state.phase)
    }

    fn state(&self) -> MutexGuard<'_, CqState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The head doorbell was written. False (and nothing changes) if `head` is not an entry
    /// of this queue.
    pub fn set_head(&self, head: u32) -> bool {
        match u16::try_from(head) {
            Ok(head) if head < self.size => {
                self.state().head = head;
                true
            }
            _ => false,
        }
    }

    pub fn head(&self) -> u16 {
        self.state().head
    }

    /// Starts or stops reading the head from the driver's shadow doorbell.
    pub fn set_dbbuf(&self, mem: &DmaSpace, dbbuf: Option<Dbbuf>) {
        let mut state = self.state();
        if let Some(buffers) = dbbuf {
            buffers.seed(mem, self.qid, None, Some(state.head));
        }
        state.dbbuf = dbbuf;
    }

    /// `posted` entries were just posted: `Ok` to interrupt now, or the time an interrupt is
    /// due if coalescing holds it back.
    pub fn coalesce(
        &self,
        posted: u32,
        policy: Option<Coalescing>,
        now: Instant,
    ) -> Result<(), Instant> {
        let Some(policy) = policy else {
            return Ok(());
        };
        let mut state = self.state();
        state.unsignalled = state.unsignalled.saturating_add(posted);
        let deadline = *state.deadline.get_or_insert(now + policy.window);
        if state.unsignalled >= policy.threshold || now >= deadline {
            state.unsignalled = 0;
            state.deadline = None;
            return Ok(());
        }
        Err(deadline)
    }

    /// The coalescing timer: `Ok` if a held interrupt is due now, else the pending deadline.
    pub fn due(&self, now: Instant) -> Result<(), Option<Instant>> {
        let mut state = self.state();
        match state.deadline {
            Some(deadline) if now >= deadline => {
                state.unsignalled = 0;
                state.deadline = None;
                Ok(())
            }
            pending => Err(pending),
        }
    }

    /// Drops a held interrupt: true if one was held (its entries must still be signalled).
    pub fn take_held(&self) -> bool {
        let mut state = self.state();
        state.unsignalled = 0;
        state.deadline.take().is_some()
    }

    /// Whether entries are posted that the driver has not consumed (INTx level).
    pub fn has_pending(&self) -> bool {
        let state = self.state();
        state.head != state.tail
    }

    /// Writes `entry` at the tail: the first 12 bytes, then the dword with the phase tag, so
    /// a driver polling the phase never sees a half-written entry.
    pub fn post(&self, mem: &DmaSpace, entry: Completion) -> Result<(), PostError> {
        let mut state = self.state();
        let next = (state.tail + 1) % self.size;
        if next == state.head {
            self.refresh_shadow_head(mem, &mut state);
            if next == state.head {
                return Err(PostError::Full);
            }
        }
        let bytes = entry.to_bytes(state.phase);
        let addr = self.base + u64::from(state.tail) * CQE_SIZE;
        // A live migration must send the page again (sluice_dma::dirty).
        sluice_dma::dirty::mark_on(mem, addr, CQE_SIZE);
        let _ = mem.write_slice(&bytes[..12], GuestAddress(addr));
        fence(Ordering::Release);
        let mut dw3 = [0u8; 4];
        dw3.copy_from_slice(&bytes[12..16]);
        let _ = mem.write_obj::<u32>(u32::from_le_bytes(dw3).to_le(), GuestAddress(addr + 12));
        state.tail = next;
        if next == 0 {
            state.phase = !state.phase;
        }
        Ok(())
    }

    fn refresh_shadow_head(&self, mem: &DmaSpace, state: &mut CqState) {
        let Some(dbbuf) = state.dbbuf else {
            return;
        };
        if let Some(head) = dbbuf.cq_head(mem, self.qid) {
            if let Ok(head) = u16::try_from(head) {
                if head < self.size {
                    state.head = head;
                }
            }
        }
        dbbuf.set_cq_event(mem, self.qid, state.head);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescing_holds_interrupts_until_the_threshold_or_the_time() {
        let cq = CompletionQueue::new(1, 0, 16, 1, true);
        let policy = Coalescing::from_feature(2 | (10 << 8)); // 3 entries or 1 ms
        let t0 = Instant::now();

        let first = cq.coalesce(1, policy, t0);
        let second = cq.coalesce(1, policy, t0 + Duration::from_micros(100));
        let third = cq.coalesce(1, policy, t0 + Duration::from_micros(200));
        let lone = cq.coalesce(1, policy, t0 + Duration::from_millis(5));
        let early = cq.due(t0 + Duration::from_millis(5));
        let late = cq.due(t0 + Duration::from_millis(7));

        assert_eq!(first, Err(t0 + Duration::from_millis(1)));
        assert!(second.is_err());
        assert_eq!(third, Ok(()), "the third entry reaches the threshold");
        assert_eq!(lone, Err(t0 + Duration::from_millis(6)));
        assert_eq!(early, Err(Some(t0 + Duration::from_millis(6))));
        assert_eq!(late, Ok(()), "the time limit fires the held interrupt");
        assert_eq!(cq.due(t0 + Duration::from_millis(8)), Err(None));
        assert_eq!(
            cq.coalesce(1, None, t0),
            Ok(()),
            "no policy: every batch interrupts"
        );
        assert_eq!(Coalescing::from_feature(0x0a00), None, "THR 0: off");
        assert_eq!(Coalescing::from_feature(0x0003), None, "TIME 0: off");
    }
}
