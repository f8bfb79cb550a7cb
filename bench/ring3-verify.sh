#!/bin/sh
# Guest-kit blk verify on bare kvm_pvm with sluice (docs/benchmarks.md, "Guest kit in ring 3").
# Usage: bench/ring3-verify.sh LABEL SLUICE KERNEL|embedded CMDLINE
# Prints one JSON object: label, kernel, cmdline, wall_s (sluice start to exit) and the RESULT.
set -eu
label=$1 sluice=$2 kernel=$3 cmdline=$4
image=$(mktemp /tmp/ring3-verify-XXXXXX.img)
trap 'rm -f "$image"' EXIT
truncate -s 64M "$image"
kernel_arg=""
[ "$kernel" = embedded ] || kernel_arg="--kernel $kernel"
start=$(date +%s.%N)
# shellcheck disable=SC2086
out=$("$sluice" run --cpus 1 --memory 512M --disk "path=$image" $kernel_arg --cmdline "$cmdline")
end=$(date +%s.%N)
result=$(printf '%s\n' "$out" | sed -n 's/^RESULT //p' | head -1)
wall=$(awk "BEGIN { printf \"%.3f\", $end - $start }")
printf '{"label":"%s","kernel":"%s","cmdline":"%s","wall_s":%s,"result":%s}\n' \
    "$label" "$kernel" "$cmdline" "$wall" "${result:-null}"
