#!/usr/bin/env python3
"""Issue 16: guest-kit VMs sharing one `sluice serve blk` (docs/benchmarks.md, "Issue 16").

Each case starts one `sluice serve blk --direct` with one `--disk` per VM (own image, own
socket), starts the VMs at once (`sluice run --disk vhost_user=on,socket=...`), stops the
server with SIGTERM (its `--metrics` has the scheduler's per-guest stats) and keeps every VM's
RESULT line. Cases:

  reader_alone      the 4K QD1 random reader alone (unscheduled)
  together_off      reader + bulk 128K sequential writer (QD16), --qos-device off
  together_qos      the same behind the scheduler (equal weights)
  together_capped   the same with the writer held to bps=WRITER_CAP by its bucket
  share_3_1         two bulk writers (128K, QD64), weight=3 and weight=1
  share_3_1_capped  the same with the device capped (--qos-device bps=DEVICE_CAP): the shared
                    backend, not the two guests' CPUs, is then what saturates
  bucket_iops       a 4K QD8 random reader at iops=LIMIT next to a bulk writer
  bucket_bps        a bulk writer at bps=LIMIT alone
  prio_alone        one guest, one queue: its high-priority QD1 slot alone (hi_slots=1, qd=1)
  prio_mixed_off    one guest, one queue: 1 high slot + 15 idle-class slots, unscheduled
  prio_mixed_qos    the same behind the scheduler
  notify_irq        reader + bulk writer behind the scheduler, both disks notify=irq
  notify_poll       the same, both disks notify=poll (the server polls both rings)
  notify_sched      the same, both disks notify=sched: the scheduler polls the guest with
                    sustained backlog (poll_guests=1: the first busy, kept while busy), the other gets
                    interrupts; CPU per I/O (server + frontends, from getrusage) compared
  qsd_*             the reference: qemu-storage-daemon (io_uring, O_DIRECT) exporting the same
                    images, QEMU throttle groups for the limits (`x-iops-total`, `x-bps-total`);
                    QEMU has no weights and ignores ioprio, so those cases have no qsd row

    bench/qos_share.py [--sluice target/debug/sluice] [--reps 3] [--dur-ms 6000] \\
        [--out bench/results/qos-DATE.json]
"""
import argparse
import glob
import json
import os
import resource
import signal
import statistics
import subprocess
import time

WORK = "/var/tmp/sluice-qos-bench"
READER = "w=blk:op=randread:bs=4096:qd=1:span_mb=200:ops=1000000000:dur_ms={dur}"
WRITER = "w=blk:op=write:bs=131072:qd=16:span_mb=200:ops=1000000000:dur_ms={dur}:mode=irq"
# The share cases' writers: deep enough that each keeps requests waiting in the scheduler
# while its others are in service or on their way back through the guest.
DEEP_WRITER = "w=blk:op=write:bs=131072:qd=64:span_mb=200:ops=1000000000:dur_ms={dur}:mode=irq"
LIMITED_READER = "w=blk:op=randread:bs=4096:qd=8:span_mb=200:ops=1000000000:dur_ms={dur}:mode=irq"
PRIO_ALONE = "w=blk:op=randread:bs=4096:qd=1:hi_slots=1:span_mb=200:ops=1000000000:dur_ms={dur}"
PRIO_MIXED = "w=blk:op=randread:bs=4096:qd=16:hi_slots=1:span_mb=200:ops=1000000000:dur_ms={dur}"
IOPS_LIMIT = 2000
BPS_LIMIT = 20 << 20
DEVICE_CAP = 400 << 20
WRITER_CAP = 400 << 20


def cases():
    """name -> (qos device spec or 'off', [(vm name, guest cmdline, qos keys)])."""
    return {
        "reader_alone": ("off", [("reader", READER, "")]),
        "together_off": ("off", [("reader", READER, ""), ("writer", WRITER, "")]),
        "together_qos": ("depth=4", [("reader", READER, ""), ("writer", WRITER, "")]),
        "together_capped": ("depth=4", [("reader", READER, ""),
                                        ("writer", WRITER, f"bps={WRITER_CAP}")]),
        "share_3_1": ("depth=4", [("w3", DEEP_WRITER, "weight=3"),
                                  ("w1", DEEP_WRITER, "weight=1")]),
        "share_3_1_capped": (f"depth=4,bps={DEVICE_CAP}",
                             [("w3", DEEP_WRITER, "weight=3"),
                              ("w1", DEEP_WRITER, "weight=1")]),
        "bucket_iops": ("depth=4", [("limited", LIMITED_READER, f"iops={IOPS_LIMIT}"),
                                    ("writer", WRITER, "")]),
        "bucket_bps": ("depth=4", [("limited", WRITER, f"bps={BPS_LIMIT}")]),
        "prio_alone": ("depth=4", [("guest", PRIO_ALONE, "")]),
        "prio_mixed_off": ("off", [("guest", PRIO_MIXED, "")]),
        "prio_mixed_qos": ("depth=4", [("guest", PRIO_MIXED, "")]),
        "notify_irq": ("depth=4", [("reader", READER, "notify=irq"),
                                   ("writer", WRITER, "notify=irq")]),
        "notify_poll": ("depth=4", [("reader", READER, "notify=poll"),
                                    ("writer", WRITER, "notify=poll")]),
        "notify_sched": ("depth=4,poll_guests=1", [("reader", READER, "notify=sched"),
                                                   ("writer", WRITER, "notify=sched")]),
        "qsd_reader_alone": ("qsd", [("reader", READER, "")]),
        "qsd_together": ("qsd", [("reader", READER, ""), ("writer", WRITER, "")]),
        "qsd_bucket_iops": ("qsd", [("limited", LIMITED_READER, f"iops={IOPS_LIMIT}"),
                                    ("writer", WRITER, "")]),
        "qsd_bucket_bps": ("qsd", [("limited", WRITER, f"bps={BPS_LIMIT}")]),
        "qsd_prio_mixed": ("qsd", [("guest", PRIO_MIXED, "")]),
    }


def guest_kernel(sluice):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sluice))))
    elves = glob.glob(f"{root}/target/*/build/sluice-guest-kit-*/out/sluice-guest.elf")
    return max(elves, key=os.path.getmtime)


def image(name):
    path = f"{WORK}/{name}.img"
    if not os.path.exists(path):
        subprocess.run(["fallocate", "-l", "256M", path], check=True)
    return path


def qsd_command(vms):
    """qemu-storage-daemon exporting one image per VM, limits through throttle groups."""
    cmd = ["qemu-storage-daemon"]
    for index, (vm, _, keys) in enumerate(vms):
        cmd += ["--blockdev", f"driver=file,node-name=f{index},filename={image(vm)},"
                "aio=io_uring,cache.direct=on"]
        node = f"f{index}"
        limits = dict(kv.split("=") for kv in keys.split(",") if kv)
        if limits:
            props = ",".join(f"x-{k}-total={v}" for k, v in limits.items())
            cmd += ["--object", f"throttle-group,id=tg{index},{props}",
                    "--blockdev", f"driver=throttle,node-name=t{index},throttle-group=tg{index},"
                    f"file=f{index}"]
            node = f"t{index}"
        cmd += ["--export", f"type=vhost-user-blk,id=e{index},node-name={node},addr.type=unix,"
                f"addr.path={WORK}/{vm}.sock,writable=on"]
    return cmd


def children_cpu_s():
    """User + system CPU seconds of every child waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(sluice, kernel, name, qos_device, vms, dur):
    metrics = f"{WORK}/{name}.metrics.json"
    cpu_start = children_cpu_s()
    disks = []
    for vm, _, keys in vms:
        sock = f"{WORK}/{vm}.sock"
        if os.path.exists(sock):
            os.unlink(sock)
        spec = f"socket={sock},image={image(vm)},name={vm}" + (f",{keys}" if keys else "")
        disks.append(f"--disk={spec}")
    if qos_device == "qsd":
        command = qsd_command(vms)
    else:
        command = [sluice, "serve", "blk", "--direct", *disks, f"--qos-device={qos_device}",
                   f"--metrics={metrics}", "--metrics-every=250"]
    server = subprocess.Popen(command, stderr=open(f"{WORK}/{name}.serve.log", "w"))
    deadline = time.time() + 20
    while not all(os.path.exists(f"{WORK}/{vm}.sock") for vm, _, _ in vms):
        assert time.time() < deadline and server.poll() is None, "server did not listen"
        time.sleep(0.05)
    procs = []
    for vm, cmdline, _ in vms:
        cmd = [sluice, "run", "--kernel", kernel, "--cpus", "1", "--memory", "64M",
               f"--disk=vhost_user=on,socket={WORK}/{vm}.sock",
               "--cmdline", "quiet " + cmdline.format(dur=dur)]
        procs.append((vm, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True)))
    samples = []
    while any(proc.poll() is None for _, proc in procs) and qos_device != "qsd":
        time.sleep(0.25)
        try:
            with open(metrics) as f:
                snap = json.load(f)
        except (OSError, ValueError):
            continue
        if snap.get("qos"):
            samples.append((snap["unix_ms"], {g["name"]: g for g in snap["qos"]["guests"]}))
    results = {}
    for vm, proc in procs:
        out, _ = proc.communicate(timeout=dur / 1000 + 120)
        line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
        results[vm] = json.loads(line[7:]) if line else {"error": out[-2000:]}
    cpu_vms = children_cpu_s()
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=20)
    cpu = {"frontends_s": round(cpu_vms - cpu_start, 3),
           "server_s": round(children_cpu_s() - cpu_vms, 3)}
    if qos_device == "qsd":
        return {"vms": results, "qos": None, "cpu": cpu}
    with open(metrics) as f:
        snap = json.load(f)
    return {"vms": results, "qos": snap.get("qos"), "window": window(samples), "cpu": cpu,
            "devices": snap.get("devices")}


def window(samples, settle_ms=1000, length_ms=3000):
    """Per-guest share and rate over a window in which every guest was busy: from
    `settle_ms` after the first sample where all had requests dispatched, `length_ms` long."""
    busy = [t for t, guests in samples if all(g["dispatched"] > 0 for g in guests.values())]
    if not busy:
        return None
    start = next((x for x in samples if x[0] >= busy[0] + settle_ms), None)
    end = next((x for x in samples if start and x[0] >= start[0] + length_ms), None)
    if not start or not end:
        return None
    seconds = (end[0] - start[0]) / 1000
    cost = {n: end[1][n]["cost"] - start[1][n]["cost"] for n in end[1]}
    total = sum(cost.values()) or 1
    return {n: {"window_share": round(cost[n] / total, 4),
                "window_mib_s": round((end[1][n]["bytes"] - start[1][n]["bytes"])
                                      / seconds / 2**20, 2),
                "window_s": seconds} for n in end[1]}


def summary(name, run):
    """The figures the docs table uses."""
    out = {}
    for vm, r in run["vms"].items():
        if "error" in r:
            out[vm] = {"error": True}
            continue
        secs = r["elapsed_ns"] / 1e9
        entry = {"iops": round(r["ops"] / secs), "mib_s": round(r["bytes"] / secs / 2**20, 2),
                 "p50_us": r["lat_ns"]["p50"] / 1000, "p99_us": r["lat_ns"]["p99"] / 1000}
        if "lat_hi_ns" in r:
            entry["hi_p50_us"] = r["lat_hi_ns"]["p50"] / 1000
            entry["hi_p99_us"] = r["lat_hi_ns"]["p99"] / 1000
            entry["lo_p99_us"] = r["lat_lo_ns"]["p99"] / 1000
        out[vm] = entry
    for vm, figures in (run.get("window") or {}).items():
        out.setdefault(vm, {}).update(figures)
    if run["qos"]:
        for g in run["qos"]["guests"]:
            out.setdefault(g["name"], {}).update({
                "qos_share": round(g["share"], 4),
                "queue_delay_mean_us": round(g["queue_delay_mean_us"], 1),
                "throttled_ms": g["throttled_ms"],
                "polled_ms": g.get("polled_ms"),
                "poll_switches": g.get("poll_switches")})
    cpu = run.get("cpu")
    ops = sum(r.get("ops", 0) for r in run["vms"].values())
    if cpu and ops:
        out["cpu"] = {**cpu, "ops": ops,
                      "server_us_per_io": round(cpu["server_s"] / ops * 1e6, 2),
                      "total_us_per_io": round((cpu["server_s"] + cpu["frontends_s"])
                                               / ops * 1e6, 2)}
    # The server's queue counters, every disk together.
    queues = [q for device in run.get("devices") or [] for q in device.get("queues", [])]
    if queues:
        out["queues"] = {k: sum(q.get(k, 0) for q in queues)
                         for k in ("kicks", "interrupts", "poll_entries", "requests")}
    return out


def table(paths):
    """Medians over the repetitions of every figure, per case and VM, from result files."""
    runs = {}
    for path in paths:
        with open(path) as f:
            for name, reps in json.load(f)["cases"].items():
                runs.setdefault(name, []).extend(r["summary"] for r in reps)
    for name, reps in runs.items():
        vms = sorted({vm for r in reps for vm, v in r.items() if isinstance(v, dict)})
        for vm in vms:
            keys = sorted({k for r in reps for k in r.get(vm, {})})
            med = {}
            for k in keys:
                values = [r[vm][k] for r in reps if k in r.get(vm, {})]
                med[k] = round(statistics.median(values), 4) if values else None
                if k.endswith("p99_us") or k in ("iops", "mib_s", "qos_share"):
                    med[k + "_all"] = values
            print(json.dumps({"case": name, "vm": vm, "reps": len(reps), **med}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--table", nargs="*", help="print medians from these result files")
    ap.add_argument("--sluice", default="target/debug/sluice")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dur-ms", type=int, default=6000)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.table:
        return table(args.table)
    os.makedirs(WORK, exist_ok=True)
    kernel = guest_kernel(args.sluice)
    all_runs = {}
    for rep in range(args.reps):
        for name, (qos_device, vms) in cases().items():
            if args.only and name not in args.only:
                continue
            run = run_case(args.sluice, kernel, name, qos_device, vms, args.dur_ms)
            s = summary(name, run)
            s["load_1min"] = os.getloadavg()[0]
            print(json.dumps({"case": name, "rep": rep, **s}), flush=True)
            all_runs.setdefault(name, []).append({"summary": s, "raw": run})
    if args.out:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "dur_ms": args.dur_ms,
                "reps": args.reps, "sluice": args.sluice,
                "load_avg": os.getloadavg(), "iops_limit": IOPS_LIMIT, "bps_limit": BPS_LIMIT,
                "device_cap": DEVICE_CAP}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "cases": all_runs}, f, indent=1)


if __name__ == "__main__":
    main()
