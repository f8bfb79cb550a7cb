#!/usr/bin/env python3
"""A/B of two sluice binaries on one device workload (docs/benchmarks.md, "Device side").

Runs `sluice run` with the guest kit, alternating the binaries per repetition, and prints one
JSON object per run: the guest's rate, sluice's kicks and interrupts per op (--metrics) and
the CPU time of every sluice thread (sampled from /proc/PID/task/*/stat every 10 ms until the
process exits, so boot is included; ticks of 10 ms).

    bench/poll_ab.py --before OLD --after NEW --notify poll --workload blk --reps 3
"""
import argparse
import glob
import json
import os
import re
import subprocess
import tempfile
import threading
import time

IMAGE = "/var/tmp/sluice-bench-256M.img"
WORKLOADS = {
    "blk": (
        lambda notify: f"--disk=path={IMAGE},queues=1,direct=on,notify={notify}",
        "quiet w=blk:op=randread:bs=4096:qd=32:queues=1:ops=50000:span_mb=256",
    ),
    "blk-qd1": (
        lambda notify: f"--disk=path={IMAGE},queues=1,direct=on,notify={notify}",
        "quiet w=blk:op=randread:bs=4096:qd=1:queues=1:ops=10000:span_mb=256",
    ),
    "net": (
        lambda notify: f"--net=tap=sbnab0,notify={notify}",
        "quiet w=net:dir=tx:size=64:frames=40000",
    ),
}


def thread_cpu_ms(pid, last):
    """Updates `last` (tid -> (name, ms)) from /proc; threads that exited keep their value."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    for path in glob.glob(f"/proc/{pid}/task/*/stat"):
        try:
            stat = open(path).read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        last[path.split("/")[4]] = (name, (int(fields[11]) + int(fields[12])) * tick_ms)


def run(binary, label, notify, workload):
    device, cmdline = WORKLOADS[workload]
    with tempfile.NamedTemporaryFile(suffix=".json") as metrics:
        cmd = [binary, "run", "--cpus", "1", "--memory", "256M", f"--metrics={metrics.name}",
               device(notify), "--cmdline", cmdline]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout))
        reader.start()
        threads = {}
        while proc.poll() is None:
            thread_cpu_ms(proc.pid, threads)
            time.sleep(0.01)
        reader.join()
        text = b"".join(out).decode(errors="replace")
        result = json.loads(re.search(r"^RESULT (.*)$", text, re.M).group(1))
        m = json.load(open(metrics.name))
    queues = [q for d in m["devices"] for q in d["queues"]]
    ops = result["ops"]
    per_thread = {}
    for name, ms in threads.values():
        per_thread[name] = per_thread.get(name, 0) + ms
    return {
        "label": label, "binary": binary, "notify": notify, "workload": workload,
        "cmdline": cmdline, "ops": ops,
        "rate": ops / result["elapsed_ns"] * 1e9,
        "guest_lat_p50_us": result["lat_ns"]["p50"] / 1000,
        "kicks_per_op": sum(q["kicks"] for q in queues) / ops,
        "interrupts_per_op": sum(q["interrupts"] for q in queues) / ops,
        "thread_cpu_ms": per_thread,
        "loadavg_1min": os.getloadavg()[0],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--after", required=True)
    ap.add_argument("--notify", default="poll")
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="blk")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for _ in range(args.reps):
        for label, binary in (("before", args.before), ("after", args.after)):
            print(json.dumps(run(binary, label, args.notify, args.workload)), flush=True)


if __name__ == "__main__":
    main()
