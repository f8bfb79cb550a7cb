//! [`BufferCursor`]: reads or writes a packed chain's buffers as one byte stream.
//!
//! The same contract as virtio-queue's `Reader` / `Writer` (every buffer resolved through the
//! DMA space up front, with the access it will get; a buffer outside it fails construction;
//! `split_at` semantics), which cannot be reused because they are built only from virtio-queue's
//! own split `DescriptorChain`s.

use std::collections::VecDeque;

use sluice_dma::DmaSpace;
use virtio_queue::Error;
use vm_memory::{GuestMemory, Permissions, VolatileSlice};

use super::packed::PackedBuffer;

/// A byte stream over guest buffers.
#[derive(Clone)]
pub struct BufferCursor<'m> {
    slices: VecDeque<VolatileSlice<'m, ()>>,
    done: usize,
}

impl<'m> BufferCursor<'m> {
    /// Resolves `buffers` in `mem` for `access`.
    pub fn new<'b, I>(mem: &'m DmaSpace, buffers: I, access: Permissions) -> Result<Self, Error>
    where
        I: Iterator<Item = &'b PackedBuffer>,
    {
        let mut total: usize = 0;
        let mut slices = VecDeque::new();
        for buffer in buffers {
            // A chain may not carry more than usize bytes (on 32-bit hosts 4 GiB is reachable).
            total = total
                .checked_add(buffer.len as usize)
                .ok_or(Error::DescriptorChainOverflow)?;
            let pieces = mem
                .get_slices(buffer.addr, buffer.len as usize, access)
                .map_err(Error::GuestMemoryError)?;
            for piece in pieces {
                slices.push_back(piece.map_err(Error::GuestMemoryError)?);
            }
        }
        Ok(BufferCursor { slices, done: 0 })
    }

    /// Bytes left.
    pub fn available_bytes(&self) -> usize {
        self.slices.iter().map(|s| s.len()).sum()
    }

    /// Bytes read or written so far.
    pub fn bytes_done(&self) -> usize {
        self.done
    }

    /// Copies into `buf` as much as is left; returns the bytes copied.
    pub fn read_into(&mut self, buf: &mut [u8]) -> usize {
        let mut copied = 0;
        while copied < buf.len() {
            let Some(front) = self.slices.front() else {
                break;
            };
            let n = front.copy_to(&mut buf[copied..]);
            copied += n;
            self.consume_front(n);
        }
        self.done += copied;
        copied
    }

    /// Copies from `buf` as much as fits; returns the bytes copied.
    pub fn write_from(&mut self, buf: &[u8]) -> usize {
        let mut copied = 0;
        while copied < buf.len() {
            let Some(front) = self.slices.front() else {
                break;
            };
            let n = front.len().min(buf.len() - copied);
            front.copy_from(&buf[copied..copied + n]);
            copied += n;
            self.consume_front(n);
        }
        self.done += copied;
        copied
    }

    /// Drops `n` bytes (at most its length) from the front slice.
    fn consume_front(&mut self, n: usize) {
        let Some(front) = self.slices.pop_front() else {
            return;
        };
        if n < front.len() {
            if let Ok(rest) = front.offset(n) {
                self.slices.push_front(rest);
            }
        }
    }

    /// Keeps the first `offset` bytes here and returns a cursor over the rest; fails if fewer
    /// than `offset` bytes are left.
    pub fn split_at(&mut self, offset: usize) -> Result<BufferCursor<'m>, Error> {
        let mut kept = VecDeque::new();
        let mut left = offset;
        while left > 0 {
            let Some(front) = self.slices.pop_front() else {
                // Put back what was taken, so a failed split changes nothing.
                while let Some(slice) = kept.pop_back() {
                    self.slices.push_front(slice);
                }
                return Err(Error::SplitOutOfBounds(offset));
            };
            if front.len() <= left {
                left -= front.len();
                kept.push_back(front);
                continue;
            }
            let (head, tail) = front.split_at(left).map_err(Error::VolatileMemoryError)?;
            kept.push_back(head);
            self.slices.push_front(tail);
            left = 0;
        }
        let rest = std::mem::replace(&mut self.slices, kept);
        Ok(BufferCursor {
            slices: rest,
            done: 0,
        })
    }
}
