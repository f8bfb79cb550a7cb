#!/usr/bin/env python3
"""Issue 16, the network half: two guest-kit VMs sending flat out through one `sluice serve net`
(docs/benchmarks.md, "Issue 16", "NIC share under saturation").

A tap takes every write at once, so two guests only compete for a NIC when something else is
the bottleneck: here the server's device-wide frame bucket (`--qos-device pps=CAP`), the
saturation point. Each case starts `sluice serve net` with one `--net` per VM (own socket, own
tap) and `--api-socket`, boots the VMs under QEMU (`--accel`, TCG by default) with
`vhost-user` NICs and `w=net:dir=tx` sending far more frames than the run lasts, samples the
scheduler's per-guest granted frames (`GET vm.qos`, `dispatched`) every SAMPLE seconds, and
reads the share and the rates over a window in which both guests were sending. Cases:

  share_3_1     weight=3 and weight=1, both flat out, device capped at CAP frames/s
  bucket_pps    one guest at pps=LIMIT next to an unlimited one (no device cap): the
                limited guest's granted rate against its limit

    bench/qos_net_share.py [--sluice target/debug/sluice] [--reps 3] [--secs 12] \\
        [--cap 600] [--limit 200] [--out bench/results/qos-net-DATE.json]
"""
import argparse
import glob
import json
import os
import signal
import subprocess
import time

WORK = "/var/tmp/sluice-qos-net-bench"
# Far more frames than a run sends: the VMs are stopped at the end of the window.
SENDER = "quiet w=net:dir=tx:size=64:frames=100000000"
SAMPLE = 0.25


def cases(cap, limit):
    """name -> (--qos-device spec, [(vm name, extra --net keys)])."""
    return {
        "share_3_1": (f"pps={cap}", [("w3", "weight=3"), ("w1", "weight=1")]),
        "bucket_pps": ("", [("limited", f"pps={limit}"), ("free", "")]),
    }


def guest_kernel(sluice):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sluice))))
    elves = glob.glob(f"{root}/target/*/build/sluice-guest-kit-*/out/sluice-guest.elf")
    return max(elves, key=os.path.getmtime)


ACCEL = {
    # The guest kit's default under QEMU in the tests: on this kvm_pvm host QEMU's KVM runs
    # the kit's ring-0 setup in KVM's emulator, far slower than TCG.
    "tcg": ["-accel", "tcg", "-cpu", "max"],
    # `host` minus arch-capabilities: kvm_pvm refuses MSR 0x10a.
    "kvm": ["-accel", "kvm", "-cpu", "host,-arch-capabilities"],
}


def qemu_command(kernel, socket, accel):
    return ["qemu-system-x86_64", "-machine", "q35,memory-backend=ram0", *ACCEL[accel],
            "-m", "64", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", kernel, "-append", SENDER,
            "-object", "memory-backend-memfd,id=ram0,size=64M,share=on",
            "-chardev", f"socket,id=vu0,path={socket}",
            "-netdev", "vhost-user,id=net0,chardev=vu0",
            "-device", "virtio-net-pci,netdev=net0,romfile="]


def api_qos(api):
    out = subprocess.run(["curl", "--silent", "--max-time", "5", "--unix-socket", api,
                          "http://localhost/api/v1/vm.qos"],
                         capture_output=True, text=True, check=False).stdout
    try:
        return {g["id"]: g for g in json.loads(out)["disks"]}
    except (ValueError, KeyError, TypeError):
        return None


def run_case(sluice, kernel, name, qos_device, vms, secs, accel):
    api = f"{WORK}/api.sock"
    nets = []
    for index, (vm, keys) in enumerate(vms):
        sock = f"{WORK}/{vm}.sock"
        for path in (sock, api):
            if os.path.exists(path):
                os.unlink(path)
        tap = f"slqn{index}{os.getpid() % 10000}"
        nets.append(f"--net=socket={sock},tap={tap},name={vm}" + (f",{keys}" if keys else ""))
    command = [sluice, "serve", "net", *nets, f"--api-socket={api}"]
    if qos_device:
        command.append(f"--qos-device={qos_device}")
    server = subprocess.Popen(command, stderr=open(f"{WORK}/{name}.serve.log", "w"))
    deadline = time.time() + 20
    while not all(os.path.exists(f"{WORK}/{vm}.sock") for vm, _ in vms) or \
            not os.path.exists(api):
        assert time.time() < deadline and server.poll() is None, "server did not listen"
        time.sleep(0.05)
    procs = [subprocess.Popen(qemu_command(kernel, f"{WORK}/{vm}.sock", accel),
                              stdout=open(f"{WORK}/{name}.{vm}.log", "w"),
                              stderr=subprocess.STDOUT) for vm, _ in vms]
    samples = []
    end = time.monotonic() + secs
    while time.monotonic() < end:
        time.sleep(SAMPLE)
        sent = time.monotonic()
        snap = api_qos(api)
        if snap:
            samples.append(((sent + time.monotonic()) / 2, snap))
    for proc in procs:
        proc.kill()
        proc.wait()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    return {"samples": [(t, {n: {k: g[k] for k in ("dispatched", "throttled_ms")}
                             for n, g in s.items()}) for t, s in samples],
            "window": window(samples)}


def window(samples, settle=1.0):
    """Frames per second and share per guest from `settle` s after both guests were granted
    frames until the last sample."""
    busy = [t for t, guests in samples if all(g["dispatched"] > 0 for g in guests.values())]
    if not busy:
        return None
    start = next((x for x in samples if x[0] >= busy[0] + settle), None)
    end = samples[-1]
    if not start or end[0] - start[0] < 2.0:
        return None
    seconds = end[0] - start[0]
    frames = {n: end[1][n]["dispatched"] - start[1][n]["dispatched"] for n in end[1]}
    total = sum(frames.values()) or 1
    return {n: {"frames": frames[n], "fps": round(frames[n] / seconds, 1),
                "share": round(frames[n] / total, 4), "window_s": round(seconds, 2),
                "throttled_ms": end[1][n]["throttled_ms"] - start[1][n]["throttled_ms"]}
            for n in end[1]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sluice", default="target/debug/sluice")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--secs", type=float, default=12.0)
    ap.add_argument("--cap", type=int, default=600, help="device frames/s in share_3_1")
    ap.add_argument("--limit", type=int, default=200, help="the guest's pps in bucket_pps")
    ap.add_argument("--accel", choices=sorted(ACCEL), default="tcg")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    kernel = guest_kernel(args.sluice)
    all_runs = {}
    for rep in range(args.reps):
        for name, (qos_device, vms) in cases(args.cap, args.limit).items():
            if args.only and name not in args.only:
                continue
            run = run_case(args.sluice, kernel, name, qos_device, vms, args.secs,
                           args.accel)
            summary = {"window": run["window"], "load_1min": os.getloadavg()[0]}
            print(json.dumps({"case": name, "rep": rep, **summary}), flush=True)
            all_runs.setdefault(name, []).append({"summary": summary, "raw": run})
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "secs": args.secs, "reps": args.reps,
                "sluice": args.sluice, "cap_pps": args.cap, "limit_pps": args.limit,
                "accel": args.accel, "load_avg": os.getloadavg()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cases": all_runs}, f, indent=1)


if __name__ == "__main__":
    main()
