//! The guest kit's e1000 driver on sluice's emulated 82540EM (`--e1000`), over a real tap with
//! a host peer: frames go guest → tap → host and back.

mod common;

use common::{run_on_sluice, spawn_echo_peer};
use sluice_guest_kit::skip_without_kvm;

/// Why this host cannot run a tap test, if it cannot.
fn tap_unusable() -> Option<String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        return Some(format!("/dev/net/tun unusable ({e})"));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("creating a tap needs CAP_NET_ADMIN (not root)".into());
    }
    None
}

fn counter(metrics: &serde_json::Value, name: &str) -> u64 {
    metrics["devices"][0]["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}: {metrics}"))
}

#[test]
fn e1000_echo_through_a_tap_with_a_host_peer() {
    let name = "e1000_echo_through_a_tap_with_a_host_peer";
    if skip_without_kvm(name) {
        return;
    }
    if let Some(reason) = tap_unusable() {
        println!("SKIP {name}: {reason}");
        return;
    }
    let tap = format!("sle{}", std::process::id() % 100_000);
    let (stop, peer) = spawn_echo_peer(tap.clone());

    let (report, metrics) = run_on_sluice(
        "quiet w=e1000:dir=echo:size=1000:frames=20",
        vec![format!("--e1000=tap={tap},mac=52:54:00:e1:00:01")],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let echoed = peer.join().unwrap();

    assert!(report.passed(), "{}", report.describe());
    assert!(echoed >= 20, "the host peer echoed {echoed} frames");
    let nic = report.results_for("e1000").next().unwrap();
    assert_eq!(nic.errors, Some(0), "{}", report.describe());
    assert_eq!(nic.raw["verify"], "ok", "{}", report.describe());
    assert_eq!(metrics["devices"][0]["device"], "e1000-0", "{metrics}");
    let queues = metrics["devices"][0]["queues"].as_array().unwrap();
    let frames = |q: usize| queues[q]["requests"].as_u64().unwrap();
    assert!(
        frames(0) >= 20 && frames(1) >= 20,
        "20 in, 20 out: {metrics}"
    );
    assert!(
        counter(&metrics, "exits_tdt") >= 20,
        "one TDT write per frame: {metrics}"
    );
    assert!(
        counter(&metrics, "exits_eerd") >= 3,
        "the MAC came from the EEPROM"
    );
    assert_eq!(
        counter(&metrics, "interrupts"),
        0,
        "the kit polls, every cause masked"
    );
}

#[test]
fn e1000_transmits_a_burst_to_the_tap() {
    let name = "e1000_transmits_a_burst_to_the_tap";
    if skip_without_kvm(name) {
        return;
    }
    if let Some(reason) = tap_unusable() {
        println!("SKIP {name}: {reason}");
        return;
    }
    let tap = format!("slx{}", std::process::id() % 100_000);

    let (report, metrics) = run_on_sluice(
        "quiet w=e1000:dir=tx:size=1500:frames=2000",
        vec![format!("--e1000=tap={tap}")],
    );

    assert!(report.passed(), "{}", report.describe());
    let nic = report.results_for("e1000").next().unwrap();
    assert_eq!(nic.raw["frames"], 2000, "{}", report.describe());
    let queues = metrics["devices"][0]["queues"].as_array().unwrap();
    assert_eq!(queues[1]["requests"], 2000, "{metrics}");
    assert_eq!(queues[1]["bytes"], 2000 * 1514, "{metrics}");
    assert_eq!(queues[1]["errors"], 0, "{metrics}");
    let elapsed = nic.raw["elapsed_ns"].as_u64().unwrap_or(0);
    println!(
        "e1000 tx: 2000 frames of 1514 bytes in {} ms ({:.0} frames/s)",
        elapsed / 1_000_000,
        2000.0 * 1e9 / elapsed.max(1) as f64
    );
}
