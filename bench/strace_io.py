#!/usr/bin/env python3
"""System calls per I/O of one sluice run (docs/benchmarks.md, "Device side").

Runs `strace -f -c` over `sluice run` with the guest kit's 4K random reads at QD32 and prints
one JSON object: the guest's RESULT, sluice's per-queue metrics and strace's call counts for
the whole process (boot included; strace slows every call, so rates here are not figures).

    bench/strace_io.py SLUICE NOTIFY [OPS]
"""
import json
import re
import subprocess
import sys
import tempfile

IMAGE = "/var/tmp/sluice-bench-256M.img"


def main():
    sluice, notify = sys.argv[1], sys.argv[2]
    ops = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
    cmdline = f"quiet w=blk:op=randread:bs=4096:qd=32:queues=1:ops={ops}:span_mb=256"
    with tempfile.NamedTemporaryFile(suffix=".json") as metrics, \
            tempfile.NamedTemporaryFile(suffix=".txt") as counts:
        cmd = ["strace", "-f", "-c", "-o", counts.name, sluice, "run", "--seccomp", "off",
               "--cpus", "1", "--memory", "256M", f"--metrics={metrics.name}",
               f"--disk=path={IMAGE},queues=1,direct=on,notify={notify}", "--cmdline", cmdline]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
        calls = {}
        for line in open(counts.name):
            f = line.split()
            if len(f) >= 5 and f[0][0].isdigit() and f[-1] != "total":
                calls[f[-1]] = int(f[3])
        queues = json.load(open(metrics.name))["devices"][0]["queues"]
    print(json.dumps({"sluice": sluice, "notify": notify, "cmdline": cmdline,
                      "ops": result["ops"], "calls": calls,
                      "calls_per_op": {k: v / result["ops"] for k, v in calls.items()},
                      "queues": queues}))


if __name__ == "__main__":
    main()
