#!/usr/bin/env python3
"""Block benchmark: 4K random reads at QD32 on one image, sluice vs host-native fio vs QEMU.

Competitors, interleaved in one run (rep 1: A B C ..., rep 2: A B C ..., ...) so that drift in
host load hits all of them alike:
  sluice-irq    the guest kit on sluice's virtio-blk (`notify=irq`, the default)
  sluice-poll   the same with `notify=poll` (device polls the ring after a kick)
  sluice-batch  the same with `notify=batch:16:50` (interrupt coalescing)
  sluice-gbatch / qemu-gbatch (opt-in) the guest kit publishes 16 requests per kick
                (`mode=batch:batch=16`) instead of kicking after each one
  qemu          the same guest kit ELF on QEMU -accel kvm, virtio-blk-pci with an iothread and
                aio=io_uring, cache=none
  native        fio on the host, io_uring, O_DIRECT, same image

Every VMM opens the image with O_DIRECT (sluice `direct=on`, QEMU `cache=none`, fio `--direct=1`),
so all three read the same bytes from the same storage without the page cache.

Guest IOPS = ops / elapsed_ns from the guest kit's RESULT line (the timed loop only, not boot).
From sluice's --metrics file, per run: userspace exits per I/O (all, and only the blk device's BAR
accesses), ioeventfd kicks per I/O (each is an in-kernel VM exit), interrupts per I/O, and the
device-side request latency (pop from the ring -> used entry) percentiles.

Usage: bench/blk.py [--reps 5] [--ops 20000] [--fio-runtime 10] [--competitors a,b,...]
Writes bench/results/blk-<date>.json and prints a markdown table.
"""
import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_ELF = os.path.join(ROOT, "guest", "target", "x86_64-unknown-linux-gnu", "release",
                         "sluice-guest")
SLUICE = os.path.join(ROOT, "target", "release", "sluice")
DEFAULT_COMPETITORS = ["sluice-irq", "qemu", "native", "sluice-poll", "sluice-batch"]
ALL_COMPETITORS = DEFAULT_COMPETITORS + ["sluice-gbatch", "qemu-gbatch"]
SLUICE_NOTIFY = {"sluice-irq": "irq", "sluice-poll": "poll", "sluice-batch": "batch:16:50",
                 "sluice-gbatch": "irq"}
# Guest-side submission: the default (and the brief's command) kicks after every request;
# `gbatch` competitors make the guest kit publish 16 requests per kick instead.
GUEST_BATCH = ":mode=batch:batch=16"
BLOCK = 4096
QD = 32


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_tools(competitors):
    missing = []
    if "native" in competitors and not shutil.which("fio"):
        missing.append("fio: apt-get install --no-install-recommends fio")
    if any(c.startswith("qemu") for c in competitors) and not shutil.which("qemu-system-x86_64"):
        missing.append("qemu-system-x86_64: apt-get install --no-install-recommends qemu-system-x86")
    if missing:
        sys.exit("missing tools (or drop the competitor with --competitors):\n  " +
                 "\n  ".join(missing))


def ensure_binaries(sluice):
    if not os.path.exists(sluice):
        log("building sluice (release)")
        subprocess.run(["cargo", "build", "--release", "-p", "sluice"], cwd=ROOT, check=True)
    if not os.path.exists(GUEST_ELF):
        log("building the guest kit (release)")
        subprocess.run(["cargo", "build", "--release"], cwd=os.path.join(ROOT, "guest"),
                       check=True)


def ensure_image(path, size_mb):
    """A fully written image of random bytes: no holes, so every read touches real blocks."""
    size = size_mb << 20
    if os.path.exists(path):
        st = os.stat(path)
        if st.st_size == size and st.st_blocks * 512 >= size:
            log(f"image {path}: reusing ({size_mb} MiB, fully allocated)")
            return
    log(f"image {path}: writing {size_mb} MiB of random data")
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))
        f.flush()
        os.fsync(f.fileno())
    st = os.stat(path)
    if st.st_blocks * 512 < size:
        sys.exit(f"image {path} has holes ({st.st_blocks * 512} of {size} bytes allocated)")


def guest_cmdline(ops, span_mb, guest_batch=False):
    extra = GUEST_BATCH if guest_batch else ""
    return f"quiet w=blk:op=randread:bs={BLOCK}:qd={QD}:ops={ops}:span_mb={span_mb}{extra}"


def parse_result(stdout):
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            if result.get("workload") == "blk":
                return result
    return None


def guest_numbers(result):
    elapsed_s = result["elapsed_ns"] / 1e9
    return {
        "iops": result["ops"] / elapsed_s,
        "elapsed_s": elapsed_s,
        "ops": result["ops"],
        "guest_lat_p50_us": result["lat_ns"]["p50"] / 1e3,
        "guest_lat_p99_us": result["lat_ns"]["p99"] / 1e3,
        "guest_notifies": result["notifies"],
        "guest_interrupts": result["interrupts"],
    }


def process_cpu_s(pid):
    """User + system CPU time of a process, all its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields after the command name start at field 3 (state); utime and stime are 14 and 15.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_vmm(cmd, timeout):
    """Runs a VMM with the guest kit; returns (completed process, wall s, workload CPU s).

    Workload CPU = the VMM's CPU time (every thread: vCPU, I/O, iothread) between the last
    `PCI:` console line (the guest kit's device scan, printed just before the workload) and the
    RESULT line; it leaves out boot and firmware, which differ a lot between VMMs."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        killer = threading.Timer(timeout, proc.kill)
        killer.start()
        lines, cpu_before, cpu_after = [], None, None
        try:
            for line in proc.stdout:
                lines.append(line)
                if line.startswith("PCI:") or (line.startswith("RESULT ") and cpu_after is None):
                    try:
                        cpu = process_cpu_s(proc.pid)
                    except OSError:
                        cpu = None
                    if line.startswith("PCI:"):
                        cpu_before = cpu
                    else:
                        cpu_after = cpu
            proc.wait()
        finally:
            killer.cancel()
        err.seek(0)
        stderr = err.read()
    wall = time.perf_counter() - start
    workload_cpu = (cpu_after - cpu_before) if None not in (cpu_before, cpu_after) else 0.0
    done = subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines), stderr)
    return done, wall, workload_cpu


def run_sluice(args, workdir, notify, guest_batch):
    metrics_path = os.path.join(workdir, f"metrics-{notify.replace(':', '_')}.json")
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    cmd = [args.sluice, "run", "--kernel", args.guest, "--cpus", "1", "--memory", "256M",
           "--disk", f"path={args.image},queues=1,direct=on,notify={notify}",
           "--metrics", metrics_path,
           "--cmdline", guest_cmdline(args.ops, args.span_mb, guest_batch)]
    proc, wall, workload_cpu_s = run_vmm(cmd, args.timeout)
    result = parse_result(proc.stdout)
    if proc.returncode != 0 or result is None or not result.get("pass"):
        raise RuntimeError(f"sluice notify={notify} failed ({proc.returncode}):\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(metrics_path) as f:
        metrics = json.load(f)
    numbers = guest_numbers(result)
    numbers["wall_s"] = wall
    numbers["host_cpu_s"] = workload_cpu_s
    numbers.update(sluice_metrics(metrics))
    return {"command": cmd, "numbers": numbers, "result": result, "metrics": metrics}


def sluice_metrics(metrics):
    queues = [q for d in metrics["devices"] if d["device"].startswith("blk") for q in d["queues"]]
    requests = sum(q["requests"] for q in queues)
    kicks = sum(q["kicks"] for q in queues)
    interrupts = sum(q["interrupts"] for q in queues)
    bar_exits = sum(d["reads"] + d["writes"] for d in metrics["exits"]["per_device"]
                    if "virtio-blk" in d["device"])
    console_exits = sum(d["reads"] + d["writes"] for d in metrics["exits"]["per_device"]
                        if d["device"] == "com1")
    total = metrics["exits"]["total"]
    # Device-side latency: the busiest queue's histogram (there is one queue here).
    latency = max(queues, key=lambda q: q["requests"])["latency_ns"]
    return {
        "requests": requests,
        "exits_total": total,
        "exits_per_io": total / requests,
        "exits_per_io_without_console": (total - console_exits) / requests,
        "bar_exits": bar_exits,
        "bar_exits_per_io": bar_exits / requests,
        "kicks": kicks,
        "kicks_per_io": kicks / requests,
        "interrupts": interrupts,
        "interrupts_per_io": interrupts / requests,
        "device_lat_p50_us": latency["p50"] / 1e3,
        "device_lat_p90_us": latency["p90"] / 1e3,
        "device_lat_p99_us": latency["p99"] / 1e3,
    }


def qemu_command(args, guest_batch):
    # `host` minus arch-capabilities: kvm_pvm refuses MSR 0x10a and QEMU 7.2 aborts on it.
    # SeaBIOS (the default) assigns the PCI BARs; qboot would leave them unassigned.
    return ["qemu-system-x86_64", "-machine", "q35", "-accel", "kvm",
            "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", args.guest, "-append", guest_cmdline(args.ops, args.span_mb, guest_batch),
            "-object", "iothread,id=io0",
            "-drive", f"if=none,id=d0,file={args.image},format=raw,aio=io_uring,cache=none",
            "-device", "virtio-blk-pci,drive=d0,iothread=io0"]


def run_qemu(args, guest_batch):
    cmd = qemu_command(args, guest_batch)
    proc, wall, workload_cpu_s = run_vmm(cmd, args.timeout)
    result = parse_result(proc.stdout)
    # isa-debug-exit: QEMU exits with (byte << 1) | 1, so a guest pass is 1.
    if proc.returncode != 1 or result is None or not result.get("pass"):
        raise RuntimeError(f"qemu failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-2000:]}")
    numbers = guest_numbers(result)
    numbers["wall_s"] = wall
    numbers["host_cpu_s"] = workload_cpu_s
    return {"command": cmd, "numbers": numbers, "result": result}


def run_fio(args):
    cmd = ["fio", "--name=r", f"--filename={args.image}", "--rw=randread", "--bs=4k",
           f"--iodepth={QD}", "--ioengine=io_uring", "--direct=1",
           f"--runtime={args.fio_runtime}", "--time_based", "--output-format=json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fio_runtime + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr[-2000:]}")
    job_cpu = json.loads(proc.stdout)["jobs"][0]
    job = job_cpu["read"]
    pct = job["clat_ns"]["percentile"]
    numbers = {
        "iops": job["iops"],
        "ops": job["total_ios"],
        "elapsed_s": job["runtime"] / 1e3,
        "lat_p50_us": pct["50.000000"] / 1e3,
        "lat_p99_us": pct["99.000000"] / 1e3,
        # fio reports its CPU use as percentages of the job's runtime.
        "host_cpu_s": (job_cpu["usr_cpu"] + job_cpu["sys_cpu"]) / 100 * job["runtime"] / 1e3,
    }
    return {"command": cmd, "numbers": numbers}


def run_one(name, args, workdir):
    """Runs one competitor once and adds I/Os per host CPU-second of the timed phase, which the
    other load on this host disturbs far less than wall-clock IOPS."""
    run = run_competitor(name, args, workdir)
    n = run["numbers"]
    n["ops_per_host_cpu_s"] = n["ops"] / n["host_cpu_s"] if n["host_cpu_s"] > 0 else 0.0
    with open("/proc/loadavg") as f:
        n["loadavg_1min"] = float(f.read().split()[0])
    return run


def run_competitor(name, args, workdir):
    guest_batch = name.endswith("-gbatch")
    if name in SLUICE_NOTIFY:
        return run_sluice(args, workdir, SLUICE_NOTIFY[name], guest_batch)
    if name in ("qemu", "qemu-gbatch"):
        return run_qemu(args, guest_batch)
    if name == "native":
        return run_fio(args)
    raise ValueError(name)


def machine_info(sluice):
    def read(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return ""
    cpu = re.search(r"^model name\s*:\s*(.*)$", read("/proc/cpuinfo"), re.M)
    kvm_modules = sorted(m for m in ("kvm_pvm", "kvm_intel", "kvm_amd")
                         if os.path.exists(f"/sys/module/{m}"))

    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True).stdout
            return out.splitlines()[0] if out else ""
        except OSError:
            return ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu.group(1) if cpu else "",
        "kernel": os.uname().release,
        "kvm_modules": kvm_modules,
        "qemu": version(["qemu-system-x86_64", "--version"]),
        "fio": version(["fio", "--version"]),
        # HEAD when the benchmark ran; the binary may be older (see its build time).
        "sluice_commit": version(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]),
        "sluice_binary_built": datetime.datetime.fromtimestamp(
            os.path.getmtime(sluice), datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": read("/proc/loadavg").strip(),
    }


def stats(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs):
    """Per competitor: median/min/max of every numeric field across reps."""
    summary = {}
    for name, reps in runs.items():
        keys = reps[0]["numbers"].keys()
        summary[name] = {k: stats([r["numbers"][k] for r in reps]) for k in keys}
    return summary


def ratio_pairs(names):
    """(numerator, denominator) pairs: each sluice variant against native and against QEMU with
    the same guest-side submission, and QEMU against native."""
    pairs = []
    for name in SLUICE_NOTIFY:
        if name not in names:
            continue
        qemu = "qemu-gbatch" if name.endswith("-gbatch") else "qemu"
        pairs += [(name, other) for other in ("native", qemu) if other in names]
    pairs += [(qemu, "native") for qemu in ("qemu", "qemu-gbatch")
              if qemu in names and "native" in names]
    return pairs


def ratios(summary):
    """Ratios of medians, by guest-visible IOPS and by I/Os per host CPU-second."""
    out = {}
    for a, b in ratio_pairs(summary.keys()):
        out[f"{a}/{b}"] = {
            key: summary[a][key]["median"] / summary[b][key]["median"]
            for key in ("iops", "ops_per_host_cpu_s")
            if summary[b][key]["median"] > 0
        }
    return out


def fmt(s, key, digits):
    if key not in s:
        return "-"
    v = s[key]
    return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"


def markdown(summary, ratio):
    lines = [
        "| competitor | IOPS median (min-max) | I/Os per host CPU-s "
        "| userspace exits/IO: all | without COM1 "
        "| blk BAR exits/IO | kicks/IO | interrupts/IO | device lat p50 / p99 (µs) "
        "| guest-seen lat p50 (µs) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        if "device_lat_p50_us" in s:
            dev = f"{s['device_lat_p50_us']['median']:.0f} / {s['device_lat_p99_us']['median']:.0f}"
        else:
            dev = "-"
        guest_lat = s.get("guest_lat_p50_us") or s.get("lat_p50_us")
        lines.append(
            f"| {name} | {fmt(s, 'iops', 0)} | {fmt(s, 'ops_per_host_cpu_s', 0)} "
            f"| {fmt(s, 'exits_per_io', 3)} "
            f"| {fmt(s, 'exits_per_io_without_console', 4)} "
            f"| {fmt(s, 'bar_exits_per_io', 4)} | {fmt(s, 'kicks_per_io', 3)} "
            f"| {fmt(s, 'interrupts_per_io', 3)} | {dev} | {guest_lat['median']:.0f} |")
    lines.append("")
    lines.append("| ratio of medians | by IOPS | by I/Os per host CPU-s |")
    lines.append("|---|---|---|")
    for k, v in ratio.items():
        lines.append(f"| {k} | {v.get('iops', 0):.3f} | {v.get('ops_per_host_cpu_s', 0):.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--ops", type=int, default=20000,
                    help="guest I/Os per VM run (~14 s on kvm_pvm, where the guest is emulated)")
    ap.add_argument("--fio-runtime", type=int, default=10, help="seconds per fio run")
    ap.add_argument("--image", default="/var/tmp/sluice-blk-bench.img")
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--competitors", default=",".join(DEFAULT_COMPETITORS),
                    help=f"comma-separated, run in this order each rep; from {ALL_COMPETITORS}")
    ap.add_argument("--sluice", default=SLUICE)
    ap.add_argument("--guest", default=GUEST_ELF)
    ap.add_argument("--timeout", type=int, default=300, help="hard limit per VM run (s)")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/blk-DATE.json)")
    args = ap.parse_args()
    args.span_mb = args.size_mb
    competitors = [c for c in args.competitors.split(",") if c]
    unknown = set(competitors) - set(ALL_COMPETITORS)
    if unknown:
        sys.exit(f"unknown competitors {sorted(unknown)}; choose from {ALL_COMPETITORS}")

    check_tools(competitors)
    ensure_binaries(args.sluice)
    ensure_image(args.image, args.size_mb)
    workdir = os.path.join(os.path.dirname(args.image), f"sluice-blk-bench-{os.getpid()}")
    os.makedirs(workdir, exist_ok=True)
    machine = machine_info(args.sluice)
    log(f"machine: {machine}")

    runs = {name: [] for name in competitors}
    started = time.time()
    for rep in range(1, args.reps + 1):
        for name in competitors:
            log(f"rep {rep}/{args.reps} {name} ...")
            run = run_one(name, args, workdir)
            runs[name].append(run)
            n = run["numbers"]
            extra = ""
            if "kicks_per_io" in n:
                extra = (f" exits/IO {n['exits_per_io']:.3f} kicks/IO {n['kicks_per_io']:.3f}"
                         f" irq/IO {n['interrupts_per_io']:.3f}"
                         f" dev p50 {n['device_lat_p50_us']:.0f} µs")
            log(f"rep {rep}/{args.reps} {name}: {n['iops']:.0f} IOPS over {n['elapsed_s']:.1f} s,"
                f" {n['ops_per_host_cpu_s']:.0f} I/Os per host CPU-s, load {n['loadavg_1min']}"
                + extra)
    shutil.rmtree(workdir, ignore_errors=True)
    machine["loadavg_end"] = open("/proc/loadavg").read().strip()

    summary = summarize(runs)
    ratio = ratios(summary)
    table = markdown(summary, ratio)
    print()
    print(table)

    date = datetime.date.today().isoformat()
    out = args.out or os.path.join(ROOT, "bench", "results", f"blk-{date}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {
        "benchmark": "blk randread 4K QD32",
        "date": date,
        "duration_s": time.time() - started,
        "argv": sys.argv,
        "settings": {"reps": args.reps, "ops": args.ops, "fio_runtime_s": args.fio_runtime,
                     "image_mb": args.size_mb, "bs": BLOCK, "qd": QD,
                     "order": competitors},
        "machine": machine,
        "summary": summary,
        "ratios": ratio,
        "targets": {"sluice/native": ">= 0.90", "sluice/qemu": ">= 1.3",
                    "exits_per_io_qd32": "<= 0.05"},
        "markdown": table,
        "runs": runs,
    }
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
