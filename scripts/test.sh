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
echo "== cargo test"
cargo test --workspace --no-fail-fast -- --test-threads=2
