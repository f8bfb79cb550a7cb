#!/usr/bin/env python3
"""Startup benchmark: process start -> first guest instruction, and VMM RSS overhead.

Runs `sluice run` (release build) N times with a guest whose first instruction exits, 1 vCPU,
128 MiB. "Process start -> first guest instruction" is the wall-clock time from just before the
spawn to sluice's first vCPU exit (which is that instruction), as sluice logs it. Also reported:
sluice's in-process setup time, the spawn-to-exit time (which includes the kernel tearing the VM
down) and the RSS overhead (anon+file, excluding guest RAM) sluice reads at exit.

Usage: bench/startup.py [--runs 20] [--sluice target/release/sluice]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_probe(workdir):
    src = os.path.join(ROOT, "bench", "guests", "first-insn-exit.S")
    obj = os.path.join(workdir, "probe.o")
    elf = os.path.join(workdir, "probe.elf")
    subprocess.run(["gcc", "-c", src, "-o", obj], check=True)
    subprocess.run(["ld", "-static", "-nostdlib", "-N", "-Ttext=0x100000", "--no-warn-rwx-segments",
                    "-o", elf, obj], check=True)
    return elf


def one_run(sluice, elf):
    env = dict(os.environ, SLUICE_LOG="info", NO_COLOR="1")
    start = time.perf_counter()
    spawned_ns = time.time_ns()
    proc = subprocess.run([sluice, "run", "--kernel", elf, "--cpus", "1", "--memory", "128M",
                           "--serial", "off"], env=env, capture_output=True, text=True)
    wall_ms = (time.perf_counter() - start) * 1000
    if proc.returncode != 0:
        sys.exit(f"sluice failed ({proc.returncode}): {proc.stderr}")
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stderr)
    setup = re.search(r"setup_us=(\d+)", log)
    rss = re.search(r"rss_overhead_kib=(\d+)", log)
    first = re.search(r"first_exit_unix_ns=(\d+)", log)
    first_ms = (int(first.group(1)) - spawned_ns) / 1e6
    return first_ms, wall_ms, int(setup.group(1)) / 1000, int(rss.group(1))


def summary(name, values, unit):
    return (f"| {name} | {statistics.median(values):.2f} {unit} | {min(values):.2f} {unit} "
            f"| {max(values):.2f} {unit} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--sluice", default=os.path.join(ROOT, "target", "release", "sluice"))
    args = ap.parse_args()
    if not os.path.exists(args.sluice):
        subprocess.run(["cargo", "build", "--release", "-p", "sluice"], cwd=ROOT, check=True)
    with tempfile.TemporaryDirectory() as tmp:
        elf = build_probe(tmp)
        one_run(args.sluice, elf)  # warm the page cache
        runs = [one_run(args.sluice, elf) for _ in range(args.runs)]
    firsts, walls, setups, rss = zip(*runs)
    print(f"sluice startup, {args.runs} runs, 1 vCPU, 128 MiB, release build")
    print("| measure | median | min | max |")
    print("|---|---|---|---|")
    print(summary("process start -> first guest instruction", firsts, "ms"))
    print(summary("in-process setup (run() -> vCPUs started)", setups, "ms"))
    print(summary("spawn -> process exit (includes KVM VM teardown)", walls, "ms"))
    print(summary("VMM RSS overhead (anon+file, excludes guest RAM)", [r / 1024 for r in rss], "MiB"))


if __name__ == "__main__":
    main()
