//! The disk's config space as the guest sees it, kept apart from the control connection: the
//! vCPU reads and writes it under a lock held for a copy only, never while a request to the
//! backend is pending. Guest writes (the `wce` byte) reach the backend from a helper thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::session::Session;
use super::{CONFIG_NUM_QUEUES_OFFSET, VIRTIO_BLK_CONFIG_SIZE};

/// The cached `virtio_blk_config` (from GET_CONFIG, with sluice's queue count).
pub(super) struct ConfigSpace {
    bytes: Mutex<Vec<u8>>,
}

impl Default for ConfigSpace {
    fn default() -> Self {
        Self {
            bytes: Mutex::new(vec![0; VIRTIO_BLK_CONFIG_SIZE]),
        }
    }
}

impl ConfigSpace {
    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // Plain bytes, consistent at every unlock: a poisoned lock is still usable.
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Bytes past the end read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let bytes = self.lock();
        let Some(tail) = usize::try_from(offset).ok().and_then(|at| bytes.get(at..)) else {
            return;
        };
        let n = tail.len().min(data.len());
        data[..n].copy_from_slice(&tail[..n]);
    }

    /// Overwrites the bytes at `offset` that exist.
    pub fn write(&self, offset: u64, data: &[u8]) {
        let mut bytes = self.lock();
        let Some(tail) = usize::try_from(offset)
            .ok()
            .and_then(|at| bytes.get_mut(at..))
        else {
            return;
        };
        let n = tail.len().min(data.len());
        tail[..n].copy_from_slice(&data[..n]);
    }

    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }

    pub fn replace(&self, bytes: Vec<u8>) {
        *self.lock() = bytes;
    }

    pub fn num_queues(&self) -> Option<u16> {
        let bytes = self.lock();
        let field = bytes.get(CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2)?;
        Some(u16::from_le_bytes([field[0], field[1]]))
    }

    pub fn set_num_queues(&self, queues: u16) {
        Self::patch_num_queues(&mut self.lock(), queues);
    }

    pub fn patch_num_queues(bytes: &mut [u8], queues: u16) {
        if let Some(field) = bytes.get_mut(CONFIG_NUM_QUEUES_OFFSET..CONFIG_NUM_QUEUES_OFFSET + 2) {
            field.copy_from_slice(&queues.to_le_bytes());
        }
    }
}

/// Sends guest writes of one config byte to the backend off the vCPU thread. Only the latest
/// value matters, and at most one thread sends at a time, however fast the guest writes.
pub(super) struct ConfigForwarder {
    offset: u32,
    pending: Mutex<Option<u8>>,
    sending: AtomicBool,
}

impl ConfigForwarder {
    pub fn new(offset: u32) -> Self {
        Self {
            offset,
            pending: Mutex::new(None),
            sending: AtomicBool::new(false),
        }
    }

    fn take(&self) -> Option<u8> {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Queues `value`; starts a sender thread unless one is running (it will pick it up).
    pub fn forward(self: &Arc<Self>, session: &Arc<Mutex<Session>>, value: u8) {
        *self.pending.lock().unwrap_or_else(PoisonError::into_inner) = Some(value);
        if self.sending.swap(true, Ordering::AcqRel) {
            return;
        }
        let (forwarder, session) = (self.clone(), session.clone());
        let spawned = std::thread::Builder::new()
            .name("vhost-user-config".into())
            .spawn(move || forwarder.send_pending(&session));
        if let Err(e) = spawned {
            self.sending.store(false, Ordering::Release);
            tracing::warn!("vhost-user-blk: config write dropped, no thread to send it: {e}");
        }
    }

    fn send_pending(&self, session: &Mutex<Session>) {
        loop {
            while let Some(value) = self.take() {
                let sent = session
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write_config(self.offset, &[value]);
                if let Err(e) = sent {
                    tracing::warn!("vhost-user-blk: config write: {e}");
                }
            }
            self.sending.store(false, Ordering::Release);
            // A value queued after the last take but before the store above has no sender.
            let orphaned = self
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some();
            if !orphaned || self.sending.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }
}
