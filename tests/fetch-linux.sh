#!/bin/sh
# Fetches the Debian cloud kernel (linux-image-cloud-amd64's versioned dependency) for sluice's
# Linux boot test and prints the path of its vmlinuz. With --initramfs, also builds a busybox
# initramfs whose /init prints SLUICE-LINUX-INIT-OK and powers off, and prints its path on a
# second line. Everything is cached in .cache/linux/ (override with SLUICE_LINUX_CACHE); a rerun
# with a warm cache needs no network.
# With --modules, also keeps the virtio guest modules (.ko, uncompressed in Debian's package) in
# modules-<version>/ next to the kernel and prints that directory on the last line.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SLUICE_LINUX_CACHE:-$repo/.cache/linux}
want_initramfs=no
want_modules=no
for arg in "$@"; do
    case "$arg" in
    --initramfs) want_initramfs=yes ;;
    --modules) want_modules=yes ;;
    *) echo "fetch-linux: unknown option $arg" >&2 && exit 2 ;;
    esac
done
# The guest drivers scripts/guest-image.sh loads, relative to lib/modules/<version>/kernel.
virtio_modules="drivers/virtio/virtio_ring.ko drivers/virtio/virtio.ko
drivers/virtio/virtio_pci_modern_dev.ko drivers/virtio/virtio_pci_legacy_dev.ko
drivers/virtio/virtio_pci.ko drivers/block/virtio_blk.ko net/core/failover.ko
drivers/net/net_failover.ko drivers/net/virtio_net.ko drivers/char/hw_random/virtio-rng.ko"

die() {
    echo "fetch-linux: $*" >&2
    exit 1
}

mkdir -p "$cache"
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT

# download_and_extract PACKAGE: leaves the package's files under $work/root.
download_and_extract() {
    (cd "$work" && apt-get download "$1") >&2 || die "apt-get download $1 failed (no network or no apt lists?)"
    dpkg -x "$work"/"$1"_*.deb "$work/root" || die "dpkg -x of $1 failed"
}

package=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
if [ -n "$package" ]; then
    version=${package#linux-image-}
    kernel="$cache/vmlinuz-$version"
    modules="$cache/modules-$version"
    if [ ! -s "$kernel" ] || { [ "$want_modules" = yes ] && [ ! -d "$modules" ]; }; then
        download_and_extract "$package"
        cp "$work/root/boot/vmlinuz-$version" "$kernel.part" || die "no vmlinuz in $package"
        mv "$kernel.part" "$kernel"
        rm -rf "$modules.part" && mkdir -p "$modules.part"
        for module in $virtio_modules; do
            cp "$work/root/lib/modules/$version/kernel/$module" "$modules.part/" ||
                die "no $module in $package"
        done
        rm -rf "$modules" && mv "$modules.part" "$modules"
    fi
else
    # No apt metadata: fall back to a kernel fetched earlier, if any.
    kernel=$(ls -1 "$cache"/vmlinuz-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$kernel" ] || die "cannot resolve linux-image-cloud-amd64's kernel package (run apt-get update?)"
    modules="$cache/modules-${kernel##*/vmlinuz-}"
fi
echo "$kernel"

if [ "$want_initramfs" = yes ]; then
initramfs="$cache/busybox-initramfs.cpio"
if [ ! -s "$initramfs" ]; then
    rm -rf "$work/root"
    download_and_extract busybox-static
    [ -x "$work/root/bin/busybox" ] || die "busybox-static has no bin/busybox"
    python3 - "$work/root/bin/busybox" "$initramfs.part" <<'PY' || die "building the initramfs failed"
import sys

busybox_path, out_path = sys.argv[1], sys.argv[2]
INIT = b"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys
/bin/busybox mount -t proc proc /proc
echo SLUICE-LINUX-INIT-OK
/bin/busybox poweroff -f
"""

def entry(name, mode, data=b"", rdev=(0, 0)):
    # cpio "newc": 110-byte ASCII header, name and data each padded to 4 bytes.
    fields = [0, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    header = b"070701" + b"".join(b"%08x" % f for f in fields)
    blob = header + name.encode() + b"\0"
    blob += b"\0" * (-len(blob) % 4)
    blob += data + b"\0" * (-len(data) % 4)
    return blob

with open(busybox_path, "rb") as f:
    busybox = f.read()
archive = b"".join([
    entry("dev", 0o040755),
    entry("dev/console", 0o020600, rdev=(5, 1)),
    entry("bin", 0o040755),
    entry("bin/busybox", 0o100755, busybox),
    entry("proc", 0o040755),
    entry("sys", 0o040755),
    entry("init", 0o100755, INIT),
    entry("TRAILER!!!", 0),
])
with open(out_path, "wb") as f:
    f.write(archive)
PY
    mv "$initramfs.part" "$initramfs"
fi
echo "$initramfs"
fi

if [ "$want_modules" = yes ]; then
    [ -d "$modules" ] || die "no cached modules for ${kernel##*/vmlinuz-} (run apt-get update?)"
    echo "$modules"
fi
