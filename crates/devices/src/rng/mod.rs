//! virtio-rng (virtio 1.2 §5.4, device type 4): one request queue whose device-writable buffers
//! the device fills with bytes from the host kernel's CSPRNG.
//!
//! * [`backend`] reads `getrandom(2)` (no file descriptor to keep, never blocks once the kernel
//!   pool is initialised). Written by hand: a dozen lines of libc, no crate needed for it.
//! * [`device`] is the [`sluice_virtio::VirtioDevice`] and its [`RngHandler`]. Each request is
//!   capped at [`MAX_REQUEST_BYTES`] so one huge guest buffer cannot hold the queue worker.

pub mod backend;
pub mod device;

#[cfg(test)]
mod tests;

pub use backend::fill_random;
pub use device::{Rng, RngHandler, MAX_REQUEST_BYTES, RNG_QUEUE_SIZE};
