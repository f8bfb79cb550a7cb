#!/usr/bin/env python3
"""Builds sluice's Linux test guest: Debian's cloud kernel plus an initramfs with busybox, fio and
the virtio drivers, whose /init runs one command taken from the kernel command line.

Usage: scripts/guest-image.py [--tpm] [--print-init]
Prints two lines on stdout: the kernel (bzImage) path and the initramfs (cpio newc, gzip) path.
Progress goes to stderr when it is a terminal; errors always do, prefixed "guest-image:".

Guest protocol (the /init below):
  - mounts proc, sysfs, devtmpfs; loads the virtio modules by path in dependency order
    (virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, virtio_blk,
    failover, net_failover, virtio_net, virtio-rng; checked against each module's `depends=`);
  - `sluice.wait=/dev/vda[,/dev/vdb]` waits up to 10 s for those device nodes;
  - `sluice.watchdog=SECS` prints /proc/interrupts, the disks' in-flight counts and blk-mq's busy
    requests after SECS seconds if the command is still running (a hung run then says why);
  - `sluice.run=<base64 of a shell command>` runs the command with busybox sh (base64 keeps any
    quoting and spaces out of the kernel's command-line parser); it prints SLUICE-RUN-START
    before and SLUICE-RUN-EXIT=<status> after, or SLUICE-RUN-EXIT=127 if the parameter is
    missing or does not decode;
  - then `poweroff -f` (so QEMU with -no-reboot exits).

Where the pieces come from:
  - kernel and modules: tests/fetch-linux.sh --modules (cached in .cache/linux/ by version);
  - busybox-static and fio, and with --tpm also tpm2-tools (with the device TCTI it dlopens;
    for lab_tpm — a separate image, 4 MB larger unpacked, which a 256 MiB guest failed to
    unpack; the migration lab tests boot the default one with 256 MiB): `apt-get download` + `dpkg -x` of the candidate Debian packages.
  - fio's shared libraries (about 60, 84 MB: librbd, libglusterfs, ICU, ... are all DT_NEEDED
    and fio is linked BIND_NOW, so none can be left out) are resolved by running `ldd` on the
    extracted fio with LD_LIBRARY_PATH pointing into the extracted packages. We extract the
    library packages (fio's Depends, then theirs, round by round, only while ldd still reports
    "not found") instead of requiring fio on the host: this needs no root and no host packages,
    and the guest gets the same Debian release's binaries. A library the host already has (same
    Debian release, e.g. libc6) is taken from the host, which is the same package's file.

Cache: .cache/linux/guest-<hash>.cpio.gz (guest-tpm-<hash>.cpio.gz with --tpm) (override the directory with SLUICE_LINUX_CACHE); the
hash covers this script, the kernel version, the module files and the candidate versions of the
packages. Without apt metadata (offline) the newest cached image is reused.
"""

import fcntl
import gzip
import hashlib
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import debimage  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("SLUICE_LINUX_CACHE", os.path.join(REPO, ".cache", "linux"))
FETCH_LINUX = os.path.join(REPO, "tests", "fetch-linux.sh")

# Load order: each module's dependencies come before it (verified in check_module_order).
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio-rng",
]
PACKAGES = ["busybox-static", "fio"]
TPM_PACKAGES = ["tpm2-tools", "libtss2-tcti-device0"]
# tpm2-tools is one binary, `tpm2`, called through tool-named links (lab_tpm uses these).
TPM2_TOOLS = ["tpm2_pcrread", "tpm2_pcrextend", "tpm2_getrandom", "tpm2_startup"]
# libtss2-tctildr dlopens the TCTI it is told to use (TPM2TOOLS_TCTI=device:/dev/tpmrm0), so
# ldd cannot see it.
TCTI_LIBRARY = "usr/lib/x86_64-linux-gnu/libtss2-tcti-device.so.0"

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp
for module in $(cat /sluice/modules.order); do
    insmod "/sluice/modules/$module.ko" || echo "SLUICE-INIT: insmod $module failed"
done
run=
wait_for=
watchdog=
for word in $(cat /proc/cmdline); do
    case "$word" in
    sluice.run=*) run=${word#sluice.run=} ;;
    sluice.wait=*) wait_for=${word#sluice.wait=} ;;
    sluice.watchdog=*) watchdog=${word#sluice.watchdog=} ;;
    esac
done
if [ -n "$watchdog" ]; then
    (
        sleep "$watchdog"
        echo "SLUICE-WATCHDOG: still running after $watchdog s"
        cat /proc/interrupts
        for disk in /sys/block/*; do echo "$disk in flight: $(cat $disk/inflight)"; done
        mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
        for hctx in /sys/kernel/debug/block/*/hctx*; do
            echo "$hctx busy:"; cat "$hctx/busy" "$hctx/dispatch" 2>/dev/null
        done
        echo SLUICE-WATCHDOG-END
    ) &
fi
for node in $(echo "$wait_for" | tr , ' '); do
    tries=0
    while [ ! -e "$node" ] && [ $tries -lt 100 ]; do
        sleep 0.1
        tries=$((tries + 1))
    done
    [ -e "$node" ] || echo "SLUICE-INIT: $node did not appear"
done
cd /tmp
if command=$(echo "$run" | base64 -d 2>/dev/null) && [ -n "$command" ]; then
    echo SLUICE-RUN-START
    sh -c "$command"
    status=$?
else
    echo "SLUICE-INIT: no sluice.run=<base64 command> on the kernel command line"
    status=127
fi
sync
echo "SLUICE-RUN-EXIT=$status"
poweroff -f
"""


TOOL = debimage.Tool("guest-image")
die = TOOL.die
progress = TOOL.progress


def fetch_kernel_and_modules():
    try:
        lines = debimage.run(["sh", FETCH_LINUX, "--modules"]).split()
    except subprocess.CalledProcessError as error:
        die(f"fetch-linux.sh failed: {error.stderr.strip().splitlines()[-1:]}")
    if len(lines) != 2:
        die(f"fetch-linux.sh printed {lines!r}, expected a kernel and a modules directory")
    return lines[0], lines[1]


def cache_key(kernel, modules_dir, versions, with_tpm):
    digest = hashlib.sha256()
    digest.update(b"tpm\n" if with_tpm else b"plain\n")
    for source in (os.path.abspath(__file__), debimage.__file__):
        digest.update(debimage.read(source))
    digest.update(os.path.basename(kernel).encode())
    for module in MODULES:
        digest.update(hashlib.sha256(debimage.read(os.path.join(modules_dir, module + ".ko"))).digest())
    for package, version in versions.items():
        digest.update(f"{package}={version}\n".encode())
    return digest.hexdigest()[:16]


def check_module_order(modules_dir):
    loaded = set()
    for module in MODULES:
        for dep in debimage.module_depends(os.path.join(modules_dir, module + ".ko")):
            if dep not in loaded:
                die(f"module order: {module} needs {dep}, which is not loaded before it")
        loaded.add(module.replace("-", "_"))


def build_archive(root, libraries, modules_dir, with_tpm):
    cpio = debimage.Cpio()
    for name in ("usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp"):
        cpio.directory(name)
    cpio.symlink("lib", "usr/lib")
    cpio.symlink("lib64", "usr/lib64")
    cpio.directory("bin")
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", debimage.read(os.path.join(root, "bin", "busybox")))
    cpio.file("usr/bin/fio", debimage.read(os.path.join(root, "usr", "bin", "fio")))
    if with_tpm:
        cpio.file("usr/bin/tpm2", debimage.read(os.path.join(root, "usr", "bin", "tpm2")))
        for tool in TPM2_TOOLS:
            cpio.symlink(f"usr/bin/{tool}", "tpm2")
    for library in sorted(set(libraries)):
        # Copy the file behind the soname link under the soname, as ld.so looks it up.
        cpio.file(debimage.image_path(library, root), debimage.read(os.path.realpath(library)))
    for module in MODULES:
        cpio.file(f"sluice/modules/{module}.ko", debimage.read(os.path.join(modules_dir, module + ".ko")), 0o100644)
    cpio.file("sluice/modules.order", ("\n".join(MODULES) + "\n").encode(), 0o100644)
    cpio.file("init", INIT.encode())
    return cpio.finish()


def is_image(name, prefix):
    """guest-<16 hex>.cpio.gz or guest-tpm-<16 hex>.cpio.gz, by `prefix`."""
    return name.startswith(prefix) and name.endswith(".cpio.gz") and len(name) == len(prefix) + 16 + 8


def newest_cached_image(prefix):
    images = [n for n in os.listdir(CACHE) if is_image(n, prefix)]
    images.sort(key=lambda n: os.path.getmtime(os.path.join(CACHE, n)))
    return os.path.join(CACHE, images[-1]) if images else None


def main():
    if "--print-init" in sys.argv[1:]:
        sys.stdout.write(INIT)
        return
    # Concurrent test binaries want the same image: one builds, the others wait and reuse it.
    os.makedirs(CACHE, exist_ok=True)
    lock = open(os.path.join(CACHE, "guest-image.lock"), "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    progress("fetching the kernel and its virtio modules")
    kernel, modules_dir = fetch_kernel_and_modules()
    check_module_order(modules_dir)
    with_tpm = "--tpm" in sys.argv[1:]
    packages = PACKAGES + (TPM_PACKAGES if with_tpm else [])
    prefix = "guest-tpm-" if with_tpm else "guest-"
    versions = {p: debimage.candidate_version(p) for p in packages}
    if None in versions.values():
        image = newest_cached_image(prefix)
        if not image:
            die("no apt metadata for fio/busybox-static (run apt-get update?) and no cached image")
        print(kernel)
        print(image)
        return
    image = os.path.join(CACHE, f"{prefix}{cache_key(kernel, modules_dir, versions, with_tpm)}.cpio.gz")
    if not os.path.exists(image):
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="tmp.guest.") as work:
            root = os.path.join(work, "root")
            progress(f"downloading {', '.join(f'{p} {v}' for p, v in versions.items())}")
            debimage.download_and_extract(TOOL, packages, work, root)
            fio = os.path.join(root, "usr", "bin", "fio")
            fetched = set(packages)
            libraries = debimage.resolve_libraries(TOOL, "fio", fio, work, root, fetched)
            if with_tpm:
                tpm2 = os.path.join(root, "usr", "bin", "tpm2")
                libraries += debimage.resolve_libraries(TOOL, "tpm2-tools", tpm2, work, root, fetched)
                libraries.append(os.path.join(root, TCTI_LIBRARY))
            progress(f"{len(set(libraries))} shared libraries; writing the initramfs")
            archive = build_archive(root, libraries, modules_dir, with_tpm)
            partial = image + ".part"
            with open(partial, "wb") as out:
                out.write(gzip.compress(archive, compresslevel=6, mtime=0))
            os.rename(partial, image)
            for stale in os.listdir(CACHE):  # images built from older inputs
                if is_image(stale, prefix) and stale != os.path.basename(image):
                    os.remove(os.path.join(CACHE, stale))
            progress(f"{image}: {len(archive) >> 20} MiB, {os.path.getsize(image) >> 20} MiB gzipped")
    print(kernel)
    print(image)


if __name__ == "__main__":
    main()
