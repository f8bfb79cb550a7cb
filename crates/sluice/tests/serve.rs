//! `sluice serve` and the path it listens on (issue 9, defects 1 and 13): it never deletes
//! what is not a stale socket, refuses a live server's socket, says what is wrong with a
//! directory, and on SIGTERM / SIGINT removes its own socket and exits 0.

mod common;

use std::fs;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{run_sluice, EXIT_VMM_ERROR, SLUICE};

const TIMEOUT: Duration = Duration::from_secs(20);

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve");
    fs::create_dir_all(&dir).expect("create the scratch directory");
    let path = dir.join(format!("{}.{name}", std::process::id()));
    let _ = fs::remove_file(&path);
    path
}

fn image(name: &str) -> PathBuf {
    let path = scratch(name);
    fs::write(&path, vec![0xa5u8; 1 << 16]).unwrap();
    path
}

fn spawn_serve(args: &[&str]) -> Child {
    Command::new(SLUICE)
        .arg("serve")
        .args(args)
        .env_remove("SLUICE_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start sluice serve")
}

/// Waits until something accepts connections on `socket`.
fn wait_listening(socket: &Path, child: &mut Child) {
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(socket).is_err() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "sluice serve exited before listening"
        );
        assert!(Instant::now() < deadline, "sluice serve never listened");
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn signal(child: &Child, signal: i32) {
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the pid of a child we started and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

fn assert_refused(args: &[&str], mention: &str) {
    let run = run_sluice(args, TIMEOUT);
    let transcript = run.transcript();
    assert_eq!(run.status, Some(EXIT_VMM_ERROR), "{transcript}");
    assert!(
        run.stderr.to_lowercase().contains(mention),
        "should mention {mention:?}\n{transcript}"
    );
}

#[test]
fn serve_refuses_to_replace_a_regular_file() {
    let path = scratch("notes.txt");
    fs::write(&path, b"keep me").unwrap();

    assert_refused(
        &["serve", "rng", "--socket", path.to_str().unwrap()],
        "not a socket",
    );

    assert_eq!(fs::read(&path).unwrap(), b"keep me");
}

#[test]
fn serve_blk_with_the_socket_on_its_own_image_keeps_the_image() {
    let disk = image("same.img");
    let disk_arg = disk.to_str().unwrap();

    assert_refused(
        &["serve", "blk", "--socket", disk_arg, "--image", disk_arg],
        "not a socket",
    );

    assert_eq!(fs::read(&disk).unwrap(), vec![0xa5u8; 1 << 16]);
}

#[test]
fn serve_says_what_is_wrong_with_a_directory() {
    let dir = scratch("a-dir");
    fs::create_dir_all(&dir).unwrap();

    assert_refused(
        &["serve", "rng", "--socket", dir.to_str().unwrap()],
        "is a directory",
    );
}

#[test]
fn a_second_server_on_a_live_socket_is_refused() {
    let socket = scratch("live.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut first = spawn_serve(&["rng", "--socket", socket_arg]);
    wait_listening(&socket, &mut first);

    assert_refused(
        &["serve", "rng", "--socket", socket_arg],
        "already listening",
    );

    assert!(first.try_wait().unwrap().is_none(), "the first still runs");
    assert!(UnixStream::connect(&socket).is_ok(), "and still listens");
    signal(&first, libc::SIGTERM);
    wait_exit(&mut first);
}

#[test]
fn a_stale_socket_is_replaced() {
    let socket = scratch("stale.sock");
    drop(UnixListener::bind(&socket).unwrap());
    let mut server = spawn_serve(&["rng", "--socket", socket.to_str().unwrap()]);

    wait_listening(&socket, &mut server);

    signal(&server, libc::SIGTERM);
    wait_exit(&mut server);
}

#[test]
fn sigterm_and_sigint_remove_the_socket_and_exit_0() {
    for (name, sig) in [("term.sock", libc::SIGTERM), ("int.sock", libc::SIGINT)] {
        let socket = scratch(name);
        let mut server = spawn_serve(&["rng", "--socket", socket.to_str().unwrap()]);
        wait_listening(&socket, &mut server);

        signal(&server, sig);
        let status = wait_exit(&mut server);

        assert_eq!(status.and_then(|s| s.code()), Some(0), "signal {sig}");
        assert!(!socket.exists(), "signal {sig}: the socket file is gone");
    }
}
