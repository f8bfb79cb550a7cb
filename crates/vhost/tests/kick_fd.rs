//! A frontend whose kick fd is not an eventfd: the backend must neither spin, flood the log,
//! nor block on it.

mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::thread;
use std::time::Duration;

use common::*;
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A pipe (read end, write end), blocking.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes; the result is checked.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nobody else.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

#[test]
fn a_kick_pipe_whose_writer_closed_stops_its_ring_once_through_the_error_fd() {
    let server = start_server("dead-kick");
    let mut session = connect(&server.socket);
    let guest = Guest::new();
    let (read_end, write_end) = pipe();
    // SAFETY: the descriptor is owned by `read_end` and handed over whole; the frontend only
    // passes it on (SET_VRING_KICK).
    session.kick = unsafe { EventFd::from_raw_fd(read_end.into_raw_fd()) };
    let error = EventFd::new(EFD_NONBLOCK).unwrap();
    session
        .frontend
        .set_vring_err(0, &error)
        .expect("SET_VRING_ERR");
    session.start_ring(&guest, 0);

    drop(write_end);
    let signalled = wait_until(|| error.read().is_ok());
    thread::sleep(Duration::from_millis(50));
    let signalled_again = error.read().is_ok();

    assert!(signalled, "the dead kick fd was reported on the error fd");
    assert!(!signalled_again, "once, not once per wakeup");
    assert!(!session.is_dropped(), "the connection stays usable");
}

/// Fills `pipe`'s buffer (the write end) so that a blocking write would block.
fn fill(pipe: &File) {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = pipe.as_raw_fd();
    // SAFETY: fcntl on a descriptor `pipe` owns; results checked.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    assert!(flags >= 0);
    // SAFETY: as above.
    let set = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(set, 0);
    let chunk = [0u8; 4096];
    while (&*pipe).write(&chunk).is_ok() {}
    // SAFETY: as above; the backend gets the descriptor blocking again.
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }, 0);
}

#[test]
fn a_full_pipe_as_kick_fd_does_not_block_the_backend() {
    let server = start_server("full-kick");
    let (read_end, write_end) = pipe();
    fill(&write_end);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let socket = server.socket.clone();
    thread::spawn(move || {
        let mut session = connect(&socket);
        let guest = Guest::new();
        // SAFETY: the descriptor is owned by `write_end` and handed over whole; the frontend
        // only passes it on (SET_VRING_KICK).
        session.kick = unsafe { EventFd::from_raw_fd(write_end.into_raw_fd()) };
        session.start_ring(&guest, 0);
        let _ = done_tx.send(!session.is_dropped());
    });

    let answered = done_rx.recv_timeout(Duration::from_secs(10));

    assert_eq!(
        answered,
        Ok(true),
        "the ring started and the backend still answers"
    );
    drop(read_end);
}
