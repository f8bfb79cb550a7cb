#!/usr/bin/env bash
# The test command from the README: format, lints, then every test tier that runs here.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-deps.sh

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
echo "== cargo test: the nested lab tier"
lab_start=$(date +%s)
cargo test --workspace --no-fail-fast -- --test-threads=2 lab_
echo "== the nested lab tier took $(($(date +%s) - lab_start)) s"
