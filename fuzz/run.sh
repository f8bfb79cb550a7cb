#!/usr/bin/env bash
# Runs one fuzz target: fuzz/run.sh [target] [seconds]   (defaults: blk_request, 600)
#
# Installs cargo-fuzz if missing, then runs the target in one process on stable Rust without a
# sanitizer (see docs/fuzzing.md for why, and for the ASan variant: SANITIZER=address).
# New inputs go to fuzz/target/corpus/<target> (not committed); the committed seeds in
# fuzz/corpus/<target> are only read. Crashes land in fuzz/artifacts/<target>.
#
# Environment: SANITIZER (none | address; default none), FUZZ_ARGS (extra libFuzzer flags).
set -euo pipefail

target="${1:-blk_request}"
seconds="${2:-600}"
sanitizer="${SANITIZER:-none}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

if [ ! -f "fuzz_targets/$target.rs" ]; then
    known="$(cd fuzz_targets && ls -- *.rs | sed 's/\.rs$//' | paste -sd ' ')"
    echo "unknown target '$target' (one of: $known)" >&2
    exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2
fi
# libFuzzer's C++ runtime is compiled by libfuzzer-sys.
if ! command -v c++ >/dev/null 2>&1; then
    echo "libfuzzer-sys needs a C++ compiler (apt-get install g++)" >&2
    exit 1
fi

# Stable rustc has no -Zsanitizer; ASan needs the nightly-only flag unlocked.
if [ "$sanitizer" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi

work_corpus="$here/target/corpus/$target"
mkdir -p "$work_corpus"

# shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
exec cargo fuzz run --sanitizer "$sanitizer" "$target" "$work_corpus" "$here/corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 ${FUZZ_ARGS:-}
