#!/usr/bin/env python3
"""Split vs packed virtqueues with the guest kit on bare kvm_pvm (docs/benchmarks.md,
"Packed vs split virtqueues").

Runs `sluice run` with the embedded guest kit, alternating split / packed / packed / split ...:
4K random reads, QD32, one queue, data path in ring 3 with completion polling (the kit's
defaults for ring 3), on one fully written raw image whose disk offers packed rings
(`packed=on`) in every run, so only the kit's `vq=` differs. The RESULT's `vq` field (read by
the kit from the negotiated features) is checked against the layout asked for. Host CPU is
sluice's user + system time (getrusage of the child) over the run, boot included.

Usage: bench/packed_kit.py [--sluice target/release/sluice] [--rounds 2] [--dur-ms 3000]
                           [--out FILE]
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

SPAN_MB = 64


def cmdline(layout, dur_ms):
    return (
        f"quiet vq={layout} w=blk:op=randread:bs=4096:qd=32:queues=1:mode=poll:"
        f"dur_ms={dur_ms}:span_mb={SPAN_MB}:seed=1"
    )


def run_once(sluice, image, layout, dur_ms):
    args = [
        sluice, "run", "--cpus", "1", "--memory", "512M",
        "--disk", f"path={image},packed=on",
        "--cmdline", cmdline(layout, dur_ms),
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines()
               if line.startswith("RESULT ")]
    if out.returncode != 0 or len(results) != 1:
        sys.exit(f"run failed ({layout}): rc={out.returncode}\n{out.stdout}\n{out.stderr}")
    result = results[0]
    if result.get("vq") != layout or not result.get("pass"):
        sys.exit(f"{layout} run reported vq={result.get('vq')} pass={result.get('pass')}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    iops = result["ops"] / (result["elapsed_ns"] / 1e9)
    return {
        "layout": layout,
        "cmdline": cmdline(layout, dur_ms),
        "wall_s": round(wall, 3),
        "sluice_cpu_s": round(cpu, 3),
        "iops": round(iops),
        "cpu_us_per_op": round(cpu / result["ops"] * 1e6, 2),
        "notifies_per_op": round(result["notifies"] / result["ops"], 4),
        "result": result,
    }


def median(values):
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return round((values[middle - 1] + values[middle]) / 2, 2)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sluice", default="target/release/sluice")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dur-ms", type=int, default=3000)
    parser.add_argument("--out")
    args = parser.parse_args()

    with tempfile.NamedTemporaryFile(prefix="packed-kit-", suffix=".img", dir="/tmp") as image:
        # Fully written: reads of holes would not touch the page cache's data path.
        image.write(os.urandom(1 << 20) * SPAN_MB)
        image.flush()
        order = []
        for _ in range(args.rounds):
            order += ["split", "packed", "packed", "split"]
        runs = []
        for layout in order:
            run = run_once(args.sluice, image.name, layout, args.dur_ms)
            print(f"{layout:6} {run['iops']:>8} IOPS  {run['notifies_per_op']:.4f} kicks/op  "
                  f"p50 {run['result']['lat_ns']['p50']} ns  cpu {run['sluice_cpu_s']} s",
                  file=sys.stderr)
            runs.append(run)

    summary = {}
    for layout in ("split", "packed"):
        mine = [r for r in runs if r["layout"] == layout]
        values = sorted(r["iops"] for r in mine)
        cpu = sorted(r["cpu_us_per_op"] for r in mine)
        summary[layout] = {
            "runs": len(values),
            "iops_mean": round(sum(values) / len(values)),
            "iops_median": median(values),
            "iops_min": values[0],
            "iops_max": values[-1],
            "cpu_us_per_op_median": median(cpu),
        }
    report = {
        "benchmark": "guest kit blk 4K randread QD32, 1 queue, ring 3, poll: split vs packed",
        "date": datetime.date.today().isoformat(),
        "host_kernel": platform.release(),
        "command": " ".join(["bench/packed_kit.py"] + sys.argv[1:]),
        "summary": summary,
        "runs": runs,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
