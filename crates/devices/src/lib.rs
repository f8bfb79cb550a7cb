//! Device models. Platform devices live in `platform`.

/// Why a device asks the VM to stop: the guest powered off, reset, or asked a test exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    PowerOff,
    Reset,
    /// Value written to the debug-exit port; becomes sluice's exit status.
    DebugExit(u8),
}

/// Receives exit requests from devices (implemented by the VMM's run loop).
pub trait ExitSink: Send + Sync {
    fn request_exit(&self, why: GuestExit);
}

pub mod block;
pub mod e1000;
pub mod net;
pub mod nvme;
pub mod platform;
pub mod request_log;
pub mod rng;
pub mod tpm;
pub mod vhost_user_blk;

#[cfg(test)]
mod mock_queue;
