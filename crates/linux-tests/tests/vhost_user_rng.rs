//! A real Linux virtio-rng driver against `sluice serve rng`: Debian's cloud kernel under QEMU
//! 7.2 TCG with `vhost-user-rng-pci`. The guest's hw_random core must pick the virtio device,
//! and two 256-byte reads of /dev/hwrng must be full length and differ.
//!
//! QEMU's vhost-user-rng passes every feature the guest acked to the backend, including
//! VIRTIO_RING_F_INDIRECT_DESC which the model does not offer; the backend serves the offered
//! subset (this test fails if SET_FEATURES is refused).
//!
//! No QEMU or no way to build the guest image: a SKIP line.

mod common;

use std::time::Duration;

use common::backend::sluice_binary;
use common::qemu::{CustomBoot, Guest};
use common::serve::Served;
use common::{prerequisites, Scratch};

const GUEST_TIMEOUT: Duration = Duration::from_secs(60);
const READ_BYTES: usize = 256;

/// The hex strings the guest printed after `prefix`.
fn hex_after(console: &str, prefix: &str) -> Vec<String> {
    console
        .lines()
        .filter_map(|line| line.trim().strip_prefix(prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn guest_reads_entropy_from_sluice_serve_rng() {
    let test = "guest_reads_entropy_from_sluice_serve_rng";
    let Some(image) = prerequisites(test, &["qemu-system-x86_64"]) else {
        return;
    };
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    let scratch = Scratch::new(test);
    let socket = scratch.path("rng.sock");
    let args = ["rng", "--socket", socket.to_str().expect("utf-8 path")];
    let mut served = Served::start(&sluice, &args, &socket, &scratch.path("serve.log"))
        .unwrap_or_else(|log| panic!("sluice serve rng did not start: {log}"));
    let read = format!("head -c {READ_BYTES} /dev/hwrng | od -An -tx1 | tr -d ' \\n'");
    let boot = CustomBoot {
        devices: [
            "-chardev",
            &format!("socket,id=r0,path={}", socket.display()),
            "-device",
            "vhost-user-rng-pci,chardev=r0",
        ]
        .map(String::from)
        .to_vec(),
        command: format!(
            "echo RNG-CURRENT=$(cat /sys/class/misc/hw_random/rng_current) && \
             echo RNG-A=$({read}) && echo RNG-B=$({read})"
        ),
        timeout: GUEST_TIMEOUT,
    };

    let run = Guest::boot_custom(&image, &boot).finish();
    let still_running = served.running();

    let context = || {
        format!(
            "{}\n--- sluice serve rng ---\n{}",
            run.transcript(),
            served.log()
        )
    };
    assert_eq!(run.exit, Some(0), "the guest command failed: {}", context());
    let current = hex_after(&run.console, "RNG-CURRENT=");
    assert!(
        current.iter().any(|name| name.starts_with("virtio_rng")),
        "hw_random did not pick virtio-rng ({current:?}): {}",
        context()
    );
    let (a, b) = (
        hex_after(&run.console, "RNG-A="),
        hex_after(&run.console, "RNG-B="),
    );
    assert_eq!(a.len(), 1, "one RNG-A line: {}", context());
    assert_eq!(b.len(), 1, "one RNG-B line: {}", context());
    for sample in [&a[0], &b[0]] {
        assert_eq!(
            sample.len(),
            2 * READ_BYTES,
            "short read {sample:?}: {}",
            context()
        );
        assert!(
            sample.bytes().all(|c| c.is_ascii_hexdigit()),
            "not hex: {sample:?}"
        );
    }
    assert_ne!(
        a[0],
        b[0],
        "two reads returned the same bytes: {}",
        context()
    );
    assert!(still_running, "sluice serve rng exited: {}", context());
}
