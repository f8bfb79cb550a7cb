//! A real Linux virtio-net driver against `sluice serve net`: Debian's cloud kernel under QEMU
//! 7.2 TCG with `-netdev vhost-user` + `virtio-net-pci`; the backend puts the guest's frames on
//! a tap whose host side has an address, and the guest pings it.
//!
//! `vectors=0` (legacy INTx): QEMU 7.2 segfaults in `vhost_net_start` when it routes the
//! MSI-X vectors of a vhost-user virtio-net device under TCG (before any ring message reaches
//! the backend: msix_set_vector_notifiers), so the guest takes INTx instead.
//!
//! No QEMU, no `ip`, no way to build the guest image, or no permission to create a tap: a SKIP.

mod common;

use std::process::Command;
use std::time::Duration;

use common::backend::sluice_binary;
use common::qemu::{CustomBoot, Guest};
use common::serve::Served;
use common::{prerequisites, GuestImage, Scratch};

/// Boot (~8 s under TCG) plus three pings, with room for a loaded host.
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

fn setup(test: &str) -> Option<GuestImage> {
    let image = prerequisites(test, &["qemu-system-x86_64", "ip"])?;
    if !std::path::Path::new("/dev/net/tun").exists() {
        println!("SKIP {test}: no /dev/net/tun");
        return None;
    }
    Some(image)
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Serves a NIC with `pairs` queue pairs on tap `tap`, gives the host side `host_ip`/24, and
/// has the guest configure `guest_ip`/24 and ping the host; asserts the replies arrived and the
/// driver set up every pair.
fn ping_through_tap(test: &str, tap: &str, pairs: u16, host_ip: &str, guest_ip: &str) {
    let Some(image) = setup(test) else { return };
    let sluice = sluice_binary().unwrap_or_else(|e| panic!("cannot build sluice: {e}"));
    let scratch = Scratch::new(test);
    let socket = scratch.path("net.sock");
    let queues = pairs.to_string();
    let args = [
        "net",
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--tap",
        tap,
        "--queues",
        &queues,
    ];
    let mut served = match Served::start(&sluice, &args, &socket, &scratch.path("serve.log")) {
        Ok(served) => served,
        Err(log) if log.contains("cannot open tap") => {
            println!("SKIP {test}: cannot create a tap: {log}");
            return;
        }
        Err(log) => panic!("sluice serve net did not start: {log}"),
    };
    ip(&["addr", "add", &format!("{host_ip}/24"), "dev", tap]);
    ip(&["link", "set", tap, "up"]);
    let netdev = if pairs > 1 {
        format!("vhost-user,id=net0,chardev=n0,queues={pairs}")
    } else {
        "vhost-user,id=net0,chardev=n0".to_string()
    };
    let device = if pairs > 1 {
        "virtio-net-pci,netdev=net0,vectors=0,mq=on".to_string()
    } else {
        "virtio-net-pci,netdev=net0,vectors=0".to_string()
    };
    let boot = CustomBoot {
        devices: [
            "-chardev",
            &format!("socket,id=n0,path={}", socket.display()),
            "-netdev",
            &netdev,
            "-device",
            &device,
        ]
        .map(String::from)
        .to_vec(),
        command: format!(
            "ls /sys/class/net/eth0/queues; ip link set eth0 up && \
             ip addr add {guest_ip}/24 dev eth0 && ping -c 3 -W 5 {host_ip}"
        ),
        timeout: GUEST_TIMEOUT,
    };

    let run = Guest::boot_custom(&image, &boot).finish();
    let still_running = served.running();

    let context = || {
        format!(
            "{}\n--- sluice serve net ---\n{}",
            run.transcript(),
            served.log()
        )
    };
    assert_eq!(run.exit, Some(0), "ping failed in the guest: {}", context());
    assert!(
        run.console.contains(&format!("bytes from {host_ip}")),
        "no echo reply on the console: {}",
        context()
    );
    for pair in 0..pairs {
        assert!(
            run.console.contains(&format!("rx-{pair}")),
            "the guest driver did not set up queue pair {pair}: {}",
            context()
        );
    }
    assert!(still_running, "sluice serve net exited: {}", context());
}

#[test]
fn guest_pings_the_host_through_sluice_serve_net() {
    let tap = format!("slvun{}", std::process::id() % 100_000);
    ping_through_tap(
        "guest_pings_the_host_through_sluice_serve_net",
        &tap,
        1,
        "10.99.0.1",
        "10.99.0.2",
    );
}

#[test]
fn guest_pings_the_host_through_two_queue_pairs() {
    let tap = format!("slvum{}", std::process::id() % 100_000);
    ping_through_tap(
        "guest_pings_the_host_through_two_queue_pairs",
        &tap,
        2,
        "10.99.1.1",
        "10.99.1.2",
    );
}
