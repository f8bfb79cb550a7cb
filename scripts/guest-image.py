#!/usr/bin/env python3
"""Builds sluice's Linux test guest: Debian's cloud kernel plus an initramfs with busybox, fio and
the virtio drivers, whose /init runs one command taken from the kernel command line.

Usage: scripts/guest-image.py [--print-init]
Prints two lines on stdout: the kernel (bzImage) path and the initramfs (cpio newc, gzip) path.
Progress goes to stderr when it is a terminal; errors always do, prefixed "guest-image:".

Guest protocol (the /init below):
  - mounts proc, sysfs, devtmpfs; loads the virtio modules by path in dependency order
    (virtio_ring, virtio, virtio_pci_modern_dev, virtio_pci_legacy_dev, virtio_pci, virtio_blk,
    failover, net_failover, virtio_net, virtio-rng; checked against each module's `depends=`);
  - `sluice.wait=/dev/vda[,/dev/vdb]` waits up to 10 s for those device nodes;
  - `sluice.run=<base64 of a shell command>` runs the command with busybox sh (base64 keeps any
    quoting and spaces out of the kernel's command-line parser); it prints SLUICE-RUN-START
    before and SLUICE-RUN-EXIT=<status> after, or SLUICE-RUN-EXIT=127 if the parameter is
    missing or does not decode;
  - then `poweroff -f` (so QEMU with -no-reboot exits).

Where the pieces come from:
  - kernel and modules: tests/fetch-linux.sh --modules (cached in .cache/linux/ by version);
  - busybox-static and fio: `apt-get download` + `dpkg -x` of the candidate Debian packages.
  - fio's shared libraries (about 60, 84 MB: librbd, libglusterfs, ICU, ... are all DT_NEEDED
    and fio is linked BIND_NOW, so none can be left out) are resolved by running `ldd` on the
    extracted fio with LD_LIBRARY_PATH pointing into the extracted packages. We extract the
    library packages (fio's Depends, then theirs, round by round, only while ldd still reports
    "not found") instead of requiring fio on the host: this needs no root and no host packages,
    and the guest gets the same Debian release's binaries. A library the host already has (same
    Debian release, e.g. libc6) is taken from the host, which is the same package's file.

Cache: .cache/linux/guest-<hash>.cpio.gz (override the directory with SLUICE_LINUX_CACHE); the
hash covers this script, the kernel version, the module files and the candidate versions of fio
and busybox-static. Without apt metadata (offline) the newest cached image is reused.
"""

import fcntl
import gzip
import hashlib
import io
import os
import re
import subprocess
import sys
import tempfile

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
LIB_PACKAGE = re.compile(r"^(lib[a-z0-9][a-z0-9.+-]*|zlib1g)$")

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
for word in $(cat /proc/cmdline); do
    case "$word" in
    sluice.run=*) run=${word#sluice.run=} ;;
    sluice.wait=*) wait_for=${word#sluice.wait=} ;;
    esac
done
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


def progress(message):
    if sys.stderr.isatty():
        print(f"guest-image: {message}", file=sys.stderr, flush=True)


def die(message):
    print(f"guest-image: {message}", file=sys.stderr)
    sys.exit(1)


def run(args, **kwargs):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs).stdout


def fetch_kernel_and_modules():
    try:
        lines = run(["sh", FETCH_LINUX, "--modules"]).split()
    except subprocess.CalledProcessError as error:
        die(f"fetch-linux.sh failed: {error.stderr.strip().splitlines()[-1:]}")
    if len(lines) != 2:
        die(f"fetch-linux.sh printed {lines!r}, expected a kernel and a modules directory")
    return lines[0], lines[1]


def candidate_version(package):
    """The version apt would download, or None without apt metadata."""
    try:
        policy = run(["apt-cache", "policy", package])
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    match = re.search(r"Candidate: (\S+)", policy)
    if not match or match.group(1) == "(none)":
        return None
    return match.group(1)


def cache_key(kernel, modules_dir, versions):
    digest = hashlib.sha256()
    with open(os.path.abspath(__file__), "rb") as script:
        digest.update(script.read())
    digest.update(os.path.basename(kernel).encode())
    for module in MODULES:
        with open(os.path.join(modules_dir, module + ".ko"), "rb") as ko:
            digest.update(hashlib.sha256(ko.read()).digest())
    for package, version in versions.items():
        digest.update(f"{package}={version}\n".encode())
    return digest.hexdigest()[:16]


def download_and_extract(packages, work, root):
    """apt-get download + dpkg -x of each package into root."""
    debs = os.path.join(work, "debs")
    os.makedirs(debs, exist_ok=True)
    try:
        run(["apt-get", "download", *packages], cwd=debs)
    except subprocess.CalledProcessError as error:
        die(f"apt-get download {' '.join(packages)} failed (no network?): {error.stderr.strip()}")
    for package in packages:
        names = [n for n in os.listdir(debs) if n.startswith(package + "_") and n.endswith(".deb")]
        if not names:
            die(f"apt-get download left no .deb for {package}")
        for name in names:
            run(["dpkg", "-x", os.path.join(debs, name), root])
            os.rename(os.path.join(debs, name), os.path.join(debs, name + ".done"))


def library_depends(package):
    """The library packages a package depends on (first alternative of each Depends)."""
    try:
        output = run(["apt-cache", "depends", "--no-recommends", "--no-suggests", package])
    except subprocess.CalledProcessError:
        return []
    names = re.findall(r"^\s+\|?Depends: ([^\s<>]+)", output, re.M)
    return [n.split(":")[0] for n in names if LIB_PACKAGE.match(n.split(":")[0])]


def library_dirs(root):
    dirs = []
    for sub in ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu/ceph"):
        path = os.path.join(root, sub)
        if os.path.isdir(path):
            dirs.append(path)
    return dirs


def ldd(binary, root):
    """(resolved paths, missing sonames) of binary, searching the extracted tree first."""
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(library_dirs(root)))
    output = run(["ldd", binary], env=env)
    resolved, missing = [], []
    for line in output.splitlines():
        line = line.strip()
        if "=> not found" in line:
            if line.split()[0] not in missing:
                missing.append(line.split()[0])
        elif "=>" in line:
            path = line.split("=>")[1].split("(")[0].strip()
            if path:
                resolved.append(path)
        elif line.startswith("/"):
            resolved.append(line.split()[0])  # the program interpreter
    return resolved, missing


def resolve_fio_libraries(work, root):
    """Extracts library packages until ldd resolves every library fio needs."""
    fio = os.path.join(root, "usr", "bin", "fio")
    fetched = set(PACKAGES)
    frontier = ["fio"]
    while True:
        resolved, missing = ldd(fio, root)
        if not missing:
            return resolved
        wanted = sorted({dep for p in frontier for dep in library_depends(p)} - fetched)
        if not wanted:
            die(f"fio needs {', '.join(missing)} and no further Debian package provides it")
        progress(f"fio needs {len(missing)} more libraries; extracting {len(wanted)} packages")
        download_and_extract(wanted, work, root)
        fetched.update(wanted)
        frontier = wanted


def guest_path(path, root):
    """Where a library goes in the guest: its path in the package, /lib folded into /usr/lib."""
    if path.startswith(root + os.sep):
        path = path[len(root):]
    path = path.lstrip("/")
    for merged in ("lib/", "lib64/"):
        if path.startswith(merged):
            return "usr/" + path
    return path


def module_depends(ko_path):
    with open(ko_path, "rb") as ko:
        match = re.search(rb"\0depends=([^\0]*)\0", ko.read())
    return [d.decode() for d in match.group(1).split(b",") if d] if match else []


def check_module_order(modules_dir):
    loaded = set()
    for module in MODULES:
        for dep in module_depends(os.path.join(modules_dir, module + ".ko")):
            if dep.replace("-", "_") not in loaded:
                die(f"module order: {module} needs {dep}, which is not loaded before it")
        loaded.add(module.replace("-", "_"))


class Cpio:
    """A cpio "newc" archive: 110-byte ASCII header, name and data each padded to 4 bytes."""

    def __init__(self):
        self.out = io.BytesIO()
        self.inode = 0
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.inode += 1
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        blob = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        self.out.write(blob + b"\0" * (-len(blob) % 4))
        self.out.write(data + b"\0" * (-len(data) % 4))

    def directory(self, name):
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            path = "/".join(parts[:depth])
            if path not in self.dirs:
                self.dirs.add(path)
                self._entry(path, 0o040755)

    def file(self, name, data, mode=0o100755):
        if "/" in name:
            self.directory(os.path.dirname(name))
        self._entry(name, mode, data)

    def symlink(self, name, target):
        self._entry(name, 0o120777, target.encode())

    def char_device(self, name, major, minor):
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self):
        self._entry("TRAILER!!!", 0)
        return self.out.getvalue()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def build_archive(root, libraries, modules_dir):
    cpio = Cpio()
    for name in ("usr/bin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp"):
        cpio.directory(name)
    cpio.symlink("lib", "usr/lib")
    cpio.symlink("lib64", "usr/lib64")
    cpio.directory("bin")
    cpio.char_device("dev/console", 5, 1)
    cpio.file("bin/busybox", read(os.path.join(root, "bin", "busybox")))
    cpio.file("usr/bin/fio", read(os.path.join(root, "usr", "bin", "fio")))
    for library in sorted(set(libraries)):
        # Copy the file behind the soname link under the soname, as ld.so looks it up.
        cpio.file(guest_path(library, root), read(os.path.realpath(library)))
    for module in MODULES:
        cpio.file(f"sluice/modules/{module}.ko", read(os.path.join(modules_dir, module + ".ko")), 0o100644)
    cpio.file("sluice/modules.order", ("\n".join(MODULES) + "\n").encode(), 0o100644)
    cpio.file("init", INIT.encode())
    return cpio.finish()


def newest_cached_image():
    images = [n for n in os.listdir(CACHE) if n.startswith("guest-") and n.endswith(".cpio.gz")]
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
    versions = {p: candidate_version(p) for p in PACKAGES}
    if None in versions.values():
        image = newest_cached_image()
        if not image:
            die("no apt metadata for fio/busybox-static (run apt-get update?) and no cached image")
        print(kernel)
        print(image)
        return
    image = os.path.join(CACHE, f"guest-{cache_key(kernel, modules_dir, versions)}.cpio.gz")
    if not os.path.exists(image):
        with tempfile.TemporaryDirectory(dir=CACHE, prefix="tmp.guest.") as work:
            root = os.path.join(work, "root")
            progress(f"downloading {', '.join(f'{p} {v}' for p, v in versions.items())}")
            download_and_extract(PACKAGES, work, root)
            libraries = resolve_fio_libraries(work, root)
            progress(f"fio needs {len(libraries)} shared libraries; writing the initramfs")
            archive = build_archive(root, libraries, modules_dir)
            partial = image + ".part"
            with open(partial, "wb") as out:
                out.write(gzip.compress(archive, compresslevel=6, mtime=0))
            os.rename(partial, image)
            for stale in os.listdir(CACHE):  # images built from older inputs
                if stale.startswith("guest-") and stale.endswith(".cpio.gz") and stale != os.path.basename(image):
                    os.remove(os.path.join(CACHE, stale))
            progress(f"{image}: {len(archive) >> 20} MiB, {os.path.getsize(image) >> 20} MiB gzipped")
    print(kernel)
    print(image)


if __name__ == "__main__":
    main()
