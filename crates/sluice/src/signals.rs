//! SIGTERM and SIGINT for `sluice run` and `sluice serve`: blocked in every thread (the mask is
//! set before any thread starts, and threads inherit it) and taken by one thread with
//! sigwait(2), so the handling — stopping the VM and writing its metrics, or removing a
//! vhost-user socket — runs as ordinary code rather than in a signal handler.

use anyhow::Context;

/// The blocked stop signals; [`StopSignals::block`] before starting threads.
pub struct StopSignals {
    set: libc::sigset_t,
}

impl StopSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts later).
    pub fn block() -> std::io::Result<Self> {
        // SAFETY: sigemptyset/sigaddset initialise and fill the set we own.
        let set = unsafe {
            let mut set = std::mem::zeroed::<libc::sigset_t>();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            set
        };
        // SAFETY: a valid, initialised set; the old mask is not wanted.
        let result =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
        if result != 0 {
            return Err(std::io::Error::from_raw_os_error(result));
        }
        Ok(StopSignals { set })
    }

    /// Starts the thread that waits for a stop signal and then runs `on_signal` with its number.
    pub fn on_signal(self, on_signal: impl FnOnce(i32) + Send + 'static) -> anyhow::Result<()> {
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || on_signal(self.wait()))
            .context("cannot start the signal thread")?;
        Ok(())
    }

    fn wait(&self) -> i32 {
        loop {
            let mut signal = 0;
            // SAFETY: a valid set of blocked signals and a valid output pointer.
            if unsafe { libc::sigwait(&raw const self.set, &raw mut signal) } == 0 {
                return signal;
            }
        }
    }
}
