#!/usr/bin/env bash
# The test command from the README: format, lints, then every test tier that runs here.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

# A full run builds ~1.5 GB under target/ and ~0.5 GB of lab images and downloads: say so
# up front rather than failing in the middle with ENOSPC.
free_kib=$(df -Pk . | awk 'NR == 2 { print $4 }')
echo "== disk: $((free_kib / 1024)) MiB free here"
if [ "$free_kib" -lt $((3 * 1024 * 1024)) ]; then
    echo "warning: less than 3 GiB free; the build and the lab images may not fit" >&2
fi

# guest/ (no_std, its own target and flags in guest/.cargo/config.toml) and fuzz/ (libFuzzer)
# are workspaces of their own, so each is formatted and linted from its own directory.
echo "== cargo fmt --check"
cargo fmt --all -- --check
(cd guest && cargo fmt -- --check)
(cd fuzz && cargo fmt -- --check)
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd guest && cargo clippy -- -D warnings)
(cd fuzz && cargo clippy --all-targets -- -D warnings)
echo "== MSRV"
python3 scripts/check-msrv.py
echo "== cargo test (every tier but the nested lab)"
cargo test --workspace --no-fail-fast -- --test-threads=2 --skip lab_
# The nested lab (docs/testing.md): tests named lab_*, each booting an L1 hardware-KVM host in
# QEMU TCG (scripts/lab runs one L1 at a time). Its own step, so its cost shows.
# scripts/lab runs one L1 per host CPU at a time; two cargo processes (the Linux lab tests'
# biggest binary, and every other lab test) keep those slots busy across test binaries, which
# cargo runs one after another. Each one's output is printed when both are done.
echo "== cargo test: the nested lab tier"
lab_start=$(date +%s)
lab_logs=$(mktemp -d)
cargo test -p sluice-linux-tests --test lab --no-fail-fast -- --test-threads=2 lab_ \
    > "$lab_logs/linux-lab.log" 2>&1 &
linux_lab=$!
other_linux_lab=()
for file in crates/linux-tests/tests/lab_*.rs; do
    other_linux_lab+=(--test "$(basename "$file" .rs)")
done
{
    status=0
    cargo test --workspace --exclude sluice-linux-tests --no-fail-fast -- --test-threads=2 \
        lab_ || status=1
    cargo test -p sluice-linux-tests "${other_linux_lab[@]}" --no-fail-fast -- \
        --test-threads=2 lab_ || status=1
    exit $status
} > "$lab_logs/other-lab.log" 2>&1 &
other_lab=$!
lab_status=0
wait "$linux_lab" || lab_status=1
wait "$other_lab" || lab_status=1
echo "== crates/linux-tests/tests/lab.rs"; cat "$lab_logs/linux-lab.log"
echo "== every other lab test"; cat "$lab_logs/other-lab.log"
rm -rf "$lab_logs"
echo "== the nested lab tier took $(($(date +%s) - lab_start)) s"
exit "$lab_status"
