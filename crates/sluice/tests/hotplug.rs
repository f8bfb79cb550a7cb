//! PCI hot-plug through the control API, on the real binary with curl and `sluice ctl`:
//! request validation (400 with a JSON error, 404 for an unknown id, 409 for what cannot be
//! done), and a disk and a NIC plugged into a VM whose guest kit runs a block verify on its
//! boot disk, then their ejection requested. The guest kit has no ACPI hot-plug driver, so
//! these tests assert what sluice reports (vm.info, counters, the image lock, the snapshot
//! refusal); the guest's side (acpiphp scanning and ejecting) runs in the nested lab
//! (crates/linux-tests/tests/lab_hotplug.rs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ctl, curl, skip_without_kvm, start_idle_vm_with_api, wait_for, wait_or_kill, SLUICE};
use serde_json::Value;

/// This suite's directory `name` (see [`common::scratch_dir`]).
fn scratch(name: &str) -> PathBuf {
    common::scratch_dir("hotplug", name)
}

fn have_curl() -> bool {
    if Command::new("curl").arg("--version").output().is_err() {
        println!("SKIP: no curl (scripts/install-deps.sh installs it)");
        return false;
    }
    true
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_default()
}

fn error_message(answer: &(u16, String)) -> String {
    json(&answer.1)["error"].as_str().unwrap_or("").to_string()
}

fn state(socket: &Path) -> String {
    json(&curl(socket, "GET", "vm.info", None).1)["state"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn device<'a>(info: &'a Value, id: &str) -> Option<&'a Value> {
    info["devices"].as_array()?.iter().find(|d| d["id"] == id)
}

fn image(dir: &Path, name: &str, size: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(size).unwrap();
    path
}

#[test]
fn bad_hotplug_requests_get_json_errors_and_an_unknown_id_is_404() {
    if skip_without_kvm("bad_hotplug_requests_get_json_errors_and_an_unknown_id_is_404")
        || !have_curl()
    {
        return;
    }
    let dir = scratch("bad");
    let socket = dir.join("api.sock");
    let boot_disk = image(&dir, "boot.img", 1 << 20);
    let mut vm = start_idle_vm_with_api(
        &socket,
        &[
            format!("--disk=path={}", boot_disk.display()),
            "--rng".into(),
        ],
    );
    wait_for("the VM to run", Duration::from_secs(20), || {
        state(&socket) == "Running"
    });

    let put = |endpoint: &str, body: &str| curl(&socket, "PUT", endpoint, Some(body));
    let hot = image(&dir, "hot.img", 1 << 20);
    let hot_path = hot.display().to_string();
    let bad = [
        ("malformed", put("vm.add-disk", "{\"path\": "), 400),
        ("not an object", put("vm.add-disk", "[1, 2]"), 400),
        (
            "unknown field",
            put(
                "vm.add-disk",
                &format!("{{\"path\": \"{hot_path}\", \"colour\": \"red\"}}"),
            ),
            400,
        ),
        (
            "nested value",
            put("vm.add-disk", "{\"path\": {\"file\": \"x\"}}"),
            400,
        ),
        (
            "comma in a value",
            put("vm.add-disk", "{\"path\": \"a,readonly=on\"}"),
            400,
        ),
        ("no path", put("vm.add-disk", "{\"readonly\": true}"), 400),
        (
            "bad id",
            put(
                "vm.add-disk",
                &format!("{{\"path\": \"{hot_path}\", \"id\": \"no spaces\"}}"),
            ),
            400,
        ),
        (
            "id in use",
            put(
                "vm.add-disk",
                &format!("{{\"path\": \"{hot_path}\", \"id\": \"disk0\"}}"),
            ),
            409,
        ),
        (
            "image locked by disk0",
            put(
                "vm.add-disk",
                &format!("{{\"path\": \"{}\"}}", boot_disk.display()),
            ),
            500,
        ),
        (
            "missing image",
            put("vm.add-disk", "{\"path\": \"/nonexistent/x.img\"}"),
            500,
        ),
        (
            "net without tap",
            put("vm.add-net", "{\"mac\": \"52:54:00:00:00:01\"}"),
            400,
        ),
        (
            "bad mac",
            put("vm.add-net", "{\"tap\": \"hpbad0\", \"mac\": \"zz\"}"),
            400,
        ),
        (
            "bad bdf",
            put("vm.add-device", "{\"path\": \"not-a-bdf\"}"),
            400,
        ),
        (
            "no such host function",
            put(
                "vm.add-device",
                "{\"path\": \"/sys/bus/pci/devices/ffff:ff:1f.7\"}",
            ),
            400,
        ),
        (
            "unknown vm.add-device field",
            put(
                "vm.add-device",
                "{\"path\": \"0000:00:00.0\", \"dma\": \"all\"}",
            ),
            400,
        ),
        (
            "unknown id",
            put("vm.remove-device", "{\"id\": \"disk9\"}"),
            404,
        ),
        ("remove without id", put("vm.remove-device", "{}"), 400),
        (
            "remove with extra field",
            put("vm.remove-device", "{\"id\": \"disk0\", \"now\": true}"),
            400,
        ),
        ("remove malformed", put("vm.remove-device", "disk0"), 400),
        (
            "wrong method",
            curl(&socket, "GET", "vm.add-disk", None),
            405,
        ),
    ];
    // A host function that exists but is not bound to vfio-pci (any host has some): its
    // group is not viable, or it has none; refused as a conflict, the VM unharmed.
    let not_vfio = host_function_not_bound_to_vfio()
        .map(|bdf| put("vm.add-device", &format!("{{\"path\": \"{bdf}\"}}")));
    let info = json(&curl(&socket, "GET", "vm.info", None).1);
    let counters = json(&curl(&socket, "GET", "vm.counters", None).1);
    let ctl_unknown = ctl(&socket, &["remove-device", "nope"]);
    let ctl_bad = ctl(&socket, &["add-disk", "readonly=on"]);
    let still = state(&socket);
    let _ = curl(&socket, "PUT", "vm.shutdown", None);
    let status = wait_or_kill(&mut vm, Duration::from_secs(20));

    for (what, answer, code) in &bad {
        assert_eq!(answer.0, *code, "{what}: {answer:?}");
        assert!(
            !error_message(answer).is_empty(),
            "{what}: a JSON error: {answer:?}"
        );
    }
    if let Some(answer) = &not_vfio {
        assert_eq!(
            answer.0, 409,
            "a function not bound to vfio-pci: {answer:?}"
        );
        assert!(!error_message(answer).is_empty(), "{answer:?}");
    }
    let ids: Vec<&str> = info["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["disk0", "rng0"], "boot devices have ids: {info:#}");
    assert_eq!(
        device(&info, "disk0").unwrap()["bdf"],
        "00:01.0",
        "{info:#}"
    );
    assert_eq!(counters["hotplug"]["insertions"], 0, "{counters:#}");
    assert_eq!(ctl_unknown.0, 1, "{ctl_unknown:?}");
    assert!(ctl_unknown.1.contains("nope"), "{ctl_unknown:?}");
    assert_eq!(ctl_bad.0, 1, "{ctl_bad:?}");
    assert_eq!(still, "Running", "the VM carried on");
    assert_eq!(status, Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The first host PCI function whose driver is not vfio-pci, if the host has one.
fn host_function_not_bound_to_vfio() -> Option<String> {
    let mut functions: Vec<_> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .map(|entry| entry.path())
        .collect();
    functions.sort();
    functions
        .into_iter()
        .find(|path| {
            let driver = std::fs::read_link(path.join("driver")).ok();
            driver.and_then(|d| d.file_name().map(|n| n != "vfio-pci")) != Some(false)
        })
        .and_then(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The guest kit verifies its boot disk while a disk and a NIC are plugged and their
/// ejection is requested: the workload finishes with verify ok, vm.info and the counters
/// follow each step, the plugged image is locked (a second plug of it is refused), and a
/// snapshot is refused by name.
#[test]
fn a_disk_and_a_nic_plugged_next_to_a_running_verify_are_listed_and_their_eject_requested() {
    if skip_without_kvm(
        "a_disk_and_a_nic_plugged_next_to_a_running_verify_are_listed_and_their_eject_requested",
    ) || !have_curl()
    {
        return;
    }
    let dir = scratch("plug");
    let socket = dir.join("api.sock");
    let console = dir.join("console.txt");
    let boot_disk = image(&dir, "boot.img", 64 << 20);
    let hot = image(&dir, "hot.img", 8 << 20);
    let mut vm = Command::new(SLUICE)
        .arg("run")
        .arg(format!("--disk=path={}", boot_disk.display()))
        .arg("--api-socket")
        .arg(&socket)
        .arg(format!("--serial=file={}", console.display()))
        .args([
            "--cmdline",
            "w=blk:op=verify:bs=4096:qd=8:span_mb=32:seed=5",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice");
    wait_for("the blk workload", Duration::from_secs(30), || {
        std::fs::read_to_string(&console).is_ok_and(|c| c.contains("virtio-blk 00:"))
    });

    let added = ctl(
        &socket,
        &["add-disk", &format!("path={},id=hot0", hot.display())],
    );
    let again = ctl(&socket, &["add-disk", &format!("path={}", hot.display())]);
    let net = ctl(&socket, &["add-net", "tap=sluicehp0,mac=52:54:00:12:34:56"]);
    let after_add = json(&ctl(&socket, &["info"]).1);
    let removed = ctl(&socket, &["remove-device", "hot0"]);
    let removed_net = ctl(&socket, &["remove-device", "net0"]);
    let after_remove = json(&ctl(&socket, &["info"]).1);
    let counters = json(&ctl(&socket, &["counters"]).1);
    let _ = ctl(&socket, &["pause"]);
    let snapshot = ctl(
        &socket,
        &["snapshot", &dir.join("snap").display().to_string()],
    );
    let _ = ctl(&socket, &["resume"]);
    let status = wait_or_kill(&mut vm, Duration::from_secs(120));
    let report = std::fs::read_to_string(&console).unwrap_or_default();

    assert_eq!(added.0, 0, "{added:?}");
    let added = json(&added.1);
    assert_eq!(added["id"], "hot0", "{added:#}");
    assert_eq!(added["bdf"], "00:02.0", "the first free slot: {added:#}");
    assert_eq!(again.0, 1, "the image is locked by hot0: {again:?}");
    assert!(again.1.contains("in use"), "{again:?}");
    assert_eq!(net.0, 0, "{net:?}");
    assert_eq!(json(&net.1)["id"], "net0", "{net:?}");
    let hot0 = device(&after_add, "hot0").expect("hot0 listed");
    assert_eq!(hot0["hotplugged"], true, "{after_add:#}");
    assert_eq!(hot0["state"], "present", "{after_add:#}");
    assert_eq!(hot0["kind"], "virtio-blk", "{after_add:#}");
    assert_eq!(removed.0, 0, "{removed:?}");
    assert_eq!(removed_net.0, 0, "{removed_net:?}");
    for id in ["hot0", "net0"] {
        assert_eq!(
            device(&after_remove, id).expect("listed until the guest ejects")["state"],
            "eject-requested",
            "{after_remove:#}"
        );
    }
    assert_eq!(counters["hotplug"]["insertions"], 2, "{counters:#}");
    assert_eq!(counters["hotplug"]["eject_requests"], 2, "{counters:#}");
    assert_eq!(counters["hotplug"]["ejects"], 0, "{counters:#}");
    assert_eq!(snapshot.0, 1, "{snapshot:?}");
    assert!(snapshot.1.contains("hot-plugged"), "{snapshot:?}");
    assert_eq!(status, Some(0), "{report}");
    assert!(report.contains("GUEST-KIT PASS"), "{report}");
    assert!(report.contains("\"verify\":\"ok\""), "{report}");
    let _ = std::fs::remove_dir_all(&dir);
}
