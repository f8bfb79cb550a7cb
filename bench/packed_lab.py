#!/usr/bin/env python3
"""Split vs packed virtqueues, measured with Linux's virtio_blk in the nested lab.

No `sluice bench` scenario can measure this yet: the guest kit has no packed-ring driver, so
the measurement uses Debian's kernel as sluice's L2 guest (scripts/guest-image.py) inside L1
(scripts/lab), which negotiates packed rings when sluice offers them (`packed=on`).

One L1 boot runs ROUNDS x 2 L2 boots, alternating split and packed (split first in even
rounds, packed first in odd ones), each running fio 4K random reads at QD32 on one queue for
RUNTIME seconds against a fresh sparse 256 MiB image. Per run: fio's IOPS and completion
latency, and sluice's per-queue metrics (requests, kicks, interrupts, suppressed). Writes
bench/results/packed-vs-split-lab-<date>.json and prints a table.

Caveat, and the reason for the per-request counters: L1 is QEMU TCG, so every L2 exit and
every instruction of L1's KVM is emulated; absolute IOPS measure that emulation far more than
sluice's rings. The kicks and interrupts per request are exact however the host runs.

Usage: bench/packed_lab.py [--sluice target/release/sluice] [--rounds 2] [--runtime 15]
"""

import argparse
import base64
import datetime
import json
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent


def guest_image():
    out = subprocess.run([sys.executable, str(ROOT / "scripts/guest-image.py")],
                         check=True, capture_output=True, text=True).stdout.split()
    return out[0], out[1]


def fio_command(runtime):
    return ("fio --name=r --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randread "
            f"--bs=4096 --iodepth=32 --numjobs=1 --size=256M --time_based --runtime={runtime} "
            "--output-format=json --output=/tmp/fio.json; status=$?; "
            "echo FIO-JSON-BEGIN; cat /tmp/fio.json; echo FIO-JSON-END; "
            "echo features=$(cat /sys/bus/virtio/devices/virtio0/features); exit $status")


def l1_script(sluice, kernel, initrd, plan, runtime):
    command = base64.b64encode(fio_command(runtime).encode()).decode()
    cmdline = f"console=ttyS0 quiet panic=-1 sluice.wait=/dev/vda sluice.run={command}"
    lines = ["set -u"]
    for i, mode in enumerate(plan):
        packed = "on" if mode == "packed" else "off"
        lines += [
            "rm -f /tmp/d.img && truncate -s 256M /tmp/d.img",
            f"{sluice} run --kernel {kernel} --initrd {initrd} --memory 512M "
            f"--disk path=/tmp/d.img,packed={packed} --metrics /scratch/run{i}.json "
            f"--cmdline '{cmdline}' > /scratch/run{i}.console 2>&1",
            f"echo run{i}-exit=$?",
        ]
    return "\n".join(lines) + "\n"


def parse_run(share, i, mode):
    console = (share / f"run{i}.console").read_text(errors="replace")
    body = re.search(r"FIO-JSON-BEGIN\s*(.*?)\s*FIO-JSON-END", console, re.S)
    if not body:
        raise SystemExit(f"run{i} ({mode}): no fio JSON\n{console[-3000:]}")
    job = json.loads(body.group(1))["jobs"][0]["read"]
    features = re.search(r"features=([01]+)", console).group(1)
    metrics = json.loads((share / f"run{i}.json").read_text())
    blk = next(d for d in metrics["devices"] if d["device"].startswith("blk"))
    queue = blk["queues"][0]
    requests = max(queue["requests"], 1)
    return {
        "run": i,
        "mode": mode,
        "packed_negotiated": len(features) > 34 and features[34] == "1",
        "iops": round(job["iops"], 1),
        "clat_mean_us": round(job["clat_ns"]["mean"] / 1000, 1),
        "requests": queue["requests"],
        "kicks": queue["kicks"],
        "interrupts": queue["interrupts"],
        "notifications_suppressed": queue["notifications_suppressed"],
        "kicks_per_request": round(queue["kicks"] / requests, 4),
        "interrupts_per_request": round(queue["interrupts"] / requests, 4),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sluice", default=str(ROOT / "target/release/sluice"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runtime", type=int, default=15)
    args = parser.parse_args()
    kernel, initrd = guest_image()
    plan = []
    for r in range(args.rounds):
        plan += ["split", "packed"] if r % 2 == 0 else ["packed", "split"]
    with tempfile.TemporaryDirectory(prefix="sluice-packed-bench-") as tmp:
        share = pathlib.Path(tmp)
        script = l1_script(args.sluice, kernel, initrd, plan, args.runtime)
        lab = subprocess.run([str(ROOT / "scripts/lab"), "run", "--share", str(share),
                              "--timeout", "900", "--", script],
                             capture_output=True, text=True)
        if lab.returncode != 0:
            raise SystemExit(f"lab failed ({lab.returncode}):\n{lab.stdout}\n{lab.stderr}")
        runs = [parse_run(share, i, mode) for i, mode in enumerate(plan)]
    summary = {}
    for mode in ("split", "packed"):
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            key: round(sum(r[key] for r in mine) / len(mine), 4)
            for key in ("iops", "clat_mean_us", "kicks_per_request", "interrupts_per_request")
        }
    date = datetime.date.today().isoformat()
    result = {
        "what": "Linux virtio_blk in the nested lab: fio randread 4K QD32, 1 queue, split vs packed",
        "command": " ".join(["bench/packed_lab.py"] + sys.argv[1:]),
        "date": date,
        "sluice": args.sluice,
        "runtime_s": args.runtime,
        "runs": runs,
        "mean": summary,
    }
    out = ROOT / "bench/results" / f"packed-vs-split-lab-{date}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':>4} {'mode':>7} {'packed?':>8} {'IOPS':>8} {'clat us':>8} "
          f"{'kicks/req':>10} {'irqs/req':>9}")
    for r in runs:
        print(f"{r['run']:>4} {r['mode']:>7} {str(r['packed_negotiated']):>8} {r['iops']:>8} "
              f"{r['clat_mean_us']:>8} {r['kicks_per_request']:>10} "
              f"{r['interrupts_per_request']:>9}")
    print(json.dumps(summary))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
