#!/usr/bin/env python3
"""Issue 16: a disk's limit changed live through the control API (docs/benchmarks.md, "Issue 16",
"Live changes").

One guest-kit VM (`sluice run --disk path=IMG,iops=FIRST --api-socket`) reads its disk as fast
as it can (4K random, QD8); the script steps the disk's IOPS limit through LIMITS with
`PUT /api/v1/vm.qos` (curl over the Unix socket) and, in each step, samples the scheduler's
granted-request count (`GET vm.qos`) over a window that starts SETTLE seconds after the change.
It prints one row per step: the limit, the IOPS granted in the window, their ratio to the limit,
the throttled time in the window, and the p99 queueing delay since the VM started.

    bench/qos_live.py [--sluice target/debug/sluice] [--window 5] [--settle 1] \\
        [--limits 200,1000,0,100]
"""
import argparse
import json
import os
import subprocess
import tempfile
import time

WORKLOAD = "w=blk:op=randread:bs=4096:qd=8:span_mb=64:ops=1000000000:seed=16"


def curl(socket, method, route, body=None):
    command = ["curl", "--silent", "--max-time", "10", "--unix-socket", socket,
               "--request", method]
    if body is not None:
        command += ["--data", json.dumps(body)]
    out = subprocess.run(command + [f"http://localhost/api/v1/{route}"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out) if out else None


def disk0(socket):
    return curl(socket, "GET", "vm.qos")["disks"][0]


def sampled(socket):
    """disk0's entry and the time it was read: the midpoint of the request."""
    sent = time.monotonic()
    entry = disk0(socket)
    return entry, (sent + time.monotonic()) / 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", default="target/debug/sluice")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--limits", default="200,1000,0,100")
    args = parser.parse_args()
    limits = [int(x) for x in args.limits.split(",")]
    work = tempfile.mkdtemp(prefix="sluice-qos-live-")
    image, socket = os.path.join(work, "disk.img"), os.path.join(work, "api.sock")
    with open(image, "wb") as f:
        f.truncate(128 << 20)
    first = limits[0] or 1_000_000
    vm = subprocess.Popen([args.sluice, "run", f"--disk=path={image},iops={first}",
                           f"--api-socket={socket}", f"--serial=file={work}/console.txt",
                           "--cmdline", WORKLOAD],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (os.path.exists(socket) and curl(socket, "GET", "vm.qos")["disks"]
                   and disk0(socket)["dispatched"] > 0):
            if time.time() > deadline:
                raise SystemExit("the guest never started reading")
            time.sleep(0.2)
        print(f"{'limit':>8} {'granted IOPS':>13} {'ratio':>6} {'throttled ms':>13} "
              f"{'p99 so far us':>14}")
        for limit in limits:
            curl(socket, "PUT", "vm.qos", {"id": "disk0", "iops": limit})
            time.sleep(args.settle)
            before, start = sampled(socket)
            time.sleep(args.window)
            after, end = sampled(socket)
            elapsed = end - start
            iops = (after["dispatched"] - before["dispatched"]) / elapsed
            ratio = f"{iops / limit:.3f}" if limit else "-"
            throttled = after["throttled_ms"] - before["throttled_ms"]
            print(f"{limit or 'none':>8} {iops:>13.1f} {ratio:>6} {throttled:>13} "
                  f"{after['queue_delay_p99_us']:>14}")
        curl(socket, "PUT", "vm.shutdown")
        vm.wait(timeout=30)
    finally:
        if vm.poll() is None:
            vm.kill()


if __name__ == "__main__":
    main()
