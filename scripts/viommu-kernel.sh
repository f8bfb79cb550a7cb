#!/bin/sh
# Fetches an L2 kernel that can drive sluice's virtio-iommu, for the nested lab's
# lab_virtio_iommu_fio_verify_on_virtio_blk_and_nvme, and prints the directory holding it:
# vmlinuz, virtio_iommu.ko and virtio_blk.ko (uncompressed).
#
# Why not the guest image's kernel: Debian bookworm's 6.1 kernels (cloud and generic) are built
# with `# CONFIG_VIRTIO_IOMMU is not set` and without ACPI_VIOT. Debian trixie's cloud kernel
# (6.12) has CONFIG_VIRTIO_IOMMU=m and CONFIG_ACPI_VIOT=y, with virtio-pci and NVMe built in,
# so two modules are all L2 needs besides the kernel (the guest image's userspace is reused).
#
# trixie's package index is read through a temporary apt configuration whose lists live in the
# cache; the host's apt sources are not touched. Cached in .cache/linux/viommu-<version>/
# (override the parent with SLUICE_LINUX_CACHE); a rerun with a warm cache needs no network.
set -eu

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${SLUICE_LINUX_CACHE:-$repo/.cache/linux}
suite=trixie

die() {
    echo "viommu-kernel: $*" >&2
    exit 1
}

# A cached kernel, newest first, if complete.
for dir in $(ls -1d "$cache"/viommu-* 2>/dev/null | sort -rV); do
    if [ -s "$dir/vmlinuz" ] && [ -s "$dir/virtio_iommu.ko" ] && [ -s "$dir/virtio_blk.ko" ]; then
        echo "$dir"
        exit 0
    fi
done

mkdir -p "$cache"
work=$(mktemp -d "$cache/tmp.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/archives/partial"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" \
    > "$work/sources.list"
apt_options="-o Dir::Etc::SourceList=$work/sources.list -o Dir::Etc::SourceParts=/dev/null
-o Dir::State::Lists=$work/lists -o Dir::Cache=$work -o Dir::Cache::Archives=$work/archives"
# shellcheck disable=SC2086 # the options are one word each
apt-get $apt_options update >&2 || die "apt-get update of $suite failed (no network?)"
# shellcheck disable=SC2086
package=$(apt-cache $apt_options depends linux-image-cloud-amd64 2>/dev/null |
    sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | head -n 1)
[ -n "$package" ] || die "no linux-image-cloud-amd64 in $suite"
version=${package#linux-image-}
# shellcheck disable=SC2086
(cd "$work" && apt-get $apt_options download "$package") >&2 || die "apt-get download $package failed"
dpkg -x "$work"/"$package"_*.deb "$work/root" || die "dpkg -x of $package failed"

out="$cache/viommu-$version"
rm -rf "$out.part" && mkdir -p "$out.part"
cp "$work/root/boot/vmlinuz-$version" "$out.part/vmlinuz" || die "no vmlinuz in $package"
modules="$work/root/usr/lib/modules/$version/kernel"
xz -dc "$modules/drivers/iommu/virtio-iommu.ko.xz" > "$out.part/virtio_iommu.ko" ||
    die "no virtio-iommu module in $package"
xz -dc "$modules/drivers/block/virtio_blk.ko.xz" > "$out.part/virtio_blk.ko" ||
    die "no virtio_blk module in $package"
rm -rf "$out" && mv "$out.part" "$out"
echo "$out"
