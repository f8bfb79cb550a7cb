#!/usr/bin/env bash
# Live-migration cost on this host: RUNS migrations per workload of a guest kit virtio-blk verify,
# from one `sluice run` to a `sluice run --migrate-from unix:PATH`, each started a moment after
# the workload began. Records each `sluice ctl migrate` answer (total_ms, downtime_ms, rounds,
# pages_sent, throttle_percent) and whether the destination finished with the verify ok.
#
#   scripts/migration-bench.sh [RUNS] [OUT.json]      (default 5, bench/results/migration-DATE.json)
#   SLUICE=path/to/sluice   the binary (default target/debug/sluice; build it first)
#
# Not part of `sluice bench`: a migration needs two VMMs and the control API, which the matrix's
# one-process-per-run harness does not drive. Figures go to docs/benchmarks.md, never to tests.
set -euo pipefail

runs="${1:-5}"
out="${2:-bench/results/migration-$(date +%F).json}"
sluice="${SLUICE:-target/debug/sluice}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# name:requests:guest kit command line — migrate once the disk has completed that many requests.
# start: as soon as the kit found its disk (its RAM barely touched yet). busy: mid-way through a
# verify whose 128 x 16 KiB buffers (512 pages) the guest and the device rewrite all the time.
workloads=(
    "start:0:w=blk:op=verify:bs=4096:qd=16:span_mb=96:seed=9"
    "busy:512:w=blk:op=verify:bs=16384:qd=128:span_mb=768:seed=9"
)

requests_done() {
    "$sluice" ctl --api-socket "$work/api.sock" counters 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["devices"][0]["queues"][0]["requests"])' \
        2>/dev/null || echo 0
}

wait_for() { # FILE PATTERN — up to 30 s
    for _ in $(seq 300); do
        if [ -e "$1" ] && { [ -z "$2" ] || grep -q "$2" "$1" 2>/dev/null; }; then return 0; fi
        sleep 0.1
    done
    echo "timed out waiting for $1 ${2:+($2)}" >&2
    return 1
}

: >"$work/results.jsonl"
for entry in "${workloads[@]}"; do
    name="${entry%%:*}"
    rest="${entry#*:}"
    requests="${rest%%:*}"
    cmdline="${rest#*:}"
    for run in $(seq "$runs"); do
        rm -f "$work"/disk.img "$work"/*.sock "$work"/console.txt
        truncate -s 800M "$work/disk.img"
        "$sluice" run --migrate-from "unix:$work/migrate.sock" --disk="path=$work/disk.img" \
            >"$work/destination.out" 2>"$work/destination.err" &
        destination=$!
        wait_for "$work/migrate.sock" ""
        "$sluice" run --disk="path=$work/disk.img" --api-socket "$work/api.sock" \
            --serial="file=$work/console.txt" --cmdline "$cmdline" >/dev/null 2>&1 &
        source=$!
        wait_for "$work/console.txt" "virtio-blk 00:"
        while [ "$(requests_done)" -lt "$requests" ]; do sleep 0.02; done
        answer="$("$sluice" ctl --api-socket "$work/api.sock" migrate "unix:$work/migrate.sock" || true)"
        wait "$source" || true
        wait "$destination" || true
        verified=false
        if grep -q 'GUEST-KIT PASS' "$work/destination.out" \
            && grep -q '"verify":"ok"' "$work/destination.out"; then
            verified=true
        fi
        echo "$name run $run: $answer verified=$verified"
        python3 -c 'import json,sys; a=json.loads(sys.argv[3]) if sys.argv[3].startswith("{") else {"error": sys.argv[3]}; a.update(workload=sys.argv[1], run=int(sys.argv[2]), verified=sys.argv[4]=="true"); print(json.dumps(a))' \
            "$name" "$run" "$answer" "$verified" >>"$work/results.jsonl"
    done
done

python3 - "$work/results.jsonl" "$out" "$sluice" "${workloads[@]}" <<'EOF'
import json, os, platform, statistics, subprocess, sys, time
results = [json.loads(line) for line in open(sys.argv[1])]
summary = {}
for name in sorted({r["workload"] for r in results}):
    done = [r for r in results if r["workload"] == name and "downtime_ms" in r]
    if done:
        summary[name] = {key: {"median": statistics.median(r[key] for r in done),
                               "min": min(r[key] for r in done), "max": max(r[key] for r in done)}
                         for key in ("total_ms", "downtime_ms", "rounds", "pages_sent", "throttle_percent")}
        summary[name]["verified"] = f"{sum(r['verified'] for r in done)}/{len(done)}"
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
document = {
    "date": time.strftime("%Y-%m-%d"),
    "command": "scripts/migration-bench.sh " + " ".join(sys.argv[2:3]),
    "binary": sys.argv[3], "commit": commit, "kernel": platform.release(),
    "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg(),
    "workloads": {w.split(":", 2)[0]: {"migrate_after_requests": int(w.split(":", 2)[1]),
                                        "cmdline": w.split(":", 2)[2]} for w in sys.argv[4:]},
    "summary": summary, "runs": results,
}
os.makedirs(os.path.dirname(sys.argv[2]) or ".", exist_ok=True)
with open(sys.argv[2], "w") as f:
    json.dump(document, f, indent=1)
print(json.dumps(summary, indent=1))
EOF
