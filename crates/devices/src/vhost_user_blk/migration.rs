//! The vhost-user disks' part in a live migration of the VM (sluice-vmm's `migration`): their
//! backends write guest RAM from another process, which neither KVM's dirty log nor
//! sluice-dma's device log sees, so while a migration runs each backend logs the pages it
//! writes into a shared bitmap (VHOST_USER_SET_LOG_BASE with VHOST_USER_PROTOCOL_F_LOG_SHMFD,
//! VHOST_F_LOG_ALL, VHOST_VRING_F_LOG on every ring — the layout is
//! `sluice_dma::shared_log`), which the source reads and clears every round. At the
//! stop-and-copy each backend is quiesced (GET_VRING_BASE: what it took completes) and handed
//! over — the connection closes, so the destination's frontend can own it — before the last
//! read of its log. A migration that fails takes the backends back (the reconnect path
//! restores the rings) and turns logging off; a backend that cannot log refuses the migration
//! before it starts.
//!
//! Process-wide, like sluice-dma's device log and sluice-storage's image locks (a sluice
//! process runs one VM): every [`super::VhostUserBlk`] registers its session here.

use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::session::Session;

static SESSIONS: Mutex<Vec<Weak<Mutex<Session>>>> = Mutex::new(Vec::new());

/// Called by every new device.
pub(super) fn register(session: &Arc<Mutex<Session>>) {
    let mut sessions = SESSIONS.lock().unwrap_or_else(PoisonError::into_inner);
    sessions.retain(|s| s.strong_count() > 0);
    sessions.push(Arc::downgrade(session));
}

fn sessions() -> Vec<Arc<Mutex<Session>>> {
    SESSIONS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect()
}

fn locked(session: &Mutex<Session>) -> std::sync::MutexGuard<'_, Session> {
    session.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether any vhost-user disk exists in this process.
pub fn any() -> bool {
    !sessions().is_empty()
}

/// Every backend starts logging; the first that cannot (named by its socket) stops the others
/// and refuses the migration.
pub fn start_logging() -> Result<(), String> {
    let all = sessions();
    for (index, session) in all.iter().enumerate() {
        let mut session = locked(session);
        if let Err(e) = session.start_logging() {
            let why = format!(
                "the vhost-user disk at {} cannot be migrated: {e}",
                session.socket_path().display()
            );
            drop(session);
            all.iter()
                .take(index)
                .for_each(|s| locked(s).stop_logging());
            return Err(why);
        }
    }
    Ok(())
}

/// The guest physical pages the backends wrote since the last call (page numbers, 4 KiB),
/// clearing their logs.
pub fn take_logged() -> Vec<u64> {
    let mut pages: Vec<u64> = sessions()
        .iter()
        .flat_map(|s| locked(s).take_logged())
        .collect();
    pages.sort_unstable();
    pages.dedup();
    pages
}

/// The migration is over (either way): logging off.
pub fn stop_logging() {
    sessions().iter().for_each(|s| locked(s).stop_logging());
}

/// The stop-and-copy: every backend quiesced and its connection closed for the destination.
/// On an error the ones handed over already are taken back.
pub fn hand_over() -> Result<(), String> {
    let all = sessions();
    for (index, session) in all.iter().enumerate() {
        let mut session = locked(session);
        if let Err(e) = session.hand_over() {
            let why = format!(
                "cannot hand the vhost-user disk at {} over: {e}",
                session.socket_path().display()
            );
            session.take_back();
            drop(session);
            all.iter().take(index).for_each(|s| locked(s).take_back());
            return Err(why);
        }
    }
    Ok(())
}

/// The migration failed after [`hand_over`]: the frontends reconnect (their pumps, within a
/// second) and restore the rings.
pub fn take_back() {
    sessions().iter().for_each(|s| locked(s).take_back());
}
