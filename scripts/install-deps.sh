#!/usr/bin/env bash
# Installs the host packages the tests use (Debian), only those missing. Idempotent.
set -euo pipefail

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v qemu-io >/dev/null || need+=(qemu-utils)
command -v objdump >/dev/null || need+=(binutils)
command -v gcc >/dev/null || need+=(gcc)
command -v c++ >/dev/null || need+=(g++) # libfuzzer-sys (fuzz/ is linted by scripts/test.sh)
command -v iasl >/dev/null || need+=(acpica-tools)
command -v fio >/dev/null || need+=(fio) # host-side fio (linux-tests harness, sluice bench)
command -v rsvg-convert >/dev/null || need+=(librsvg2-bin)
command -v curl >/dev/null || need+=(curl) # the API test drives sluice with a real HTTP client
command -v swtpm >/dev/null || need+=(swtpm) # --tpm's backend (TPM unit, kit and QEMU tests)
command -v tpm2_pcrread >/dev/null || need+=(tpm2-tools) # the TPM seen from Linux guests
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${need[*]} (run as root or install them: apt-get install -y --no-install-recommends ${need[*]})" >&2
    exit 1
  fi
  echo "== installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
    { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
fi
