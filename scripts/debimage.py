"""Shared pieces of the scripts that build Linux images from Debian's packages
(scripts/guest-image.py: the L2 test guest; scripts/lab: the nested lab's L1 host).

- packages: `apt-get download` + `dpkg -x` (no root, no host packages needed), candidate versions;
- shared libraries: a binary's closure resolved with `ldd` against the extracted packages, more
  library packages extracted round by round while ldd still reports "not found";
- kernel modules: dependencies from each module's `depends=` modinfo (Debian ships no
  modules.dep), so a dependency order needs no depmod;
- `Cpio`: a cpio "newc" archive writer (what the kernel unpacks as an initramfs).
"""

import os
import re
import subprocess
import sys

LIB_PACKAGE = re.compile(r"^(lib[a-z0-9][a-z0-9.+-]*|zlib1g)$")


class Tool:
    """Progress and error messages prefixed with the calling script's name."""

    def __init__(self, name):
        self.name = name

    def progress(self, message):
        if sys.stderr.isatty() or os.environ.get("SLUICE_IMAGE_PROGRESS"):
            print(f"{self.name}: {message}", file=sys.stderr, flush=True)

    def die(self, message):
        print(f"{self.name}: {message}", file=sys.stderr)
        sys.exit(1)


def run(args, **kwargs):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kwargs).stdout


def read(path):
    with open(path, "rb") as f:
        return f.read()


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


def versioned_dependency(metapackage, pattern):
    """The versioned package a metapackage depends on (e.g. linux-image-amd64 ->
    linux-image-6.1.0-48-amd64), or None without apt metadata."""
    try:
        output = run(["apt-cache", "depends", metapackage])
    except (subprocess.CalledProcessError, FileNotFoundError):
        return None
    for name in re.findall(r"^\s*Depends: (\S+)$", output, re.M):
        if re.fullmatch(pattern, name):
            return name
    return None


def download_and_extract(tool, packages, work, root):
    """apt-get download + dpkg -x of each package into root."""
    debs = os.path.join(work, "debs")
    os.makedirs(debs, exist_ok=True)
    try:
        run(["apt-get", "download", *packages], cwd=debs)
    except subprocess.CalledProcessError as error:
        tool.die(f"apt-get download {' '.join(packages)} failed (no network?): {error.stderr.strip()}")
    for package in packages:
        names = [n for n in os.listdir(debs) if n.startswith(package + "_") and n.endswith(".deb")]
        if not names:
            tool.die(f"apt-get download left no .deb for {package}")
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
    # ceph: fio's librbd; swtpm: swtpm's own library (its RUNPATH).
    for sub in (
        "lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu",
        "usr/lib/x86_64-linux-gnu/ceph",
        "usr/lib/x86_64-linux-gnu/swtpm",
    ):
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


def resolve_libraries(tool, package, binary, work, root, fetched):
    """Extracts library packages (the package's Depends, then theirs) until ldd resolves every
    library `binary` (a path under root) needs; returns the resolved paths. A library the host
    already has (same Debian release, e.g. libc6) is taken from the host: the same package's file."""
    frontier = [package]
    while True:
        resolved, missing = ldd(binary, root)
        if not missing:
            return resolved
        wanted = sorted({dep for p in frontier for dep in library_depends(p)} - fetched)
        if not wanted:
            tool.die(f"{package} needs {', '.join(missing)} and no further Debian package provides it")
        tool.progress(f"{package} needs {len(missing)} more libraries; extracting {len(wanted)} packages")
        download_and_extract(tool, wanted, work, root)
        fetched.update(wanted)
        frontier = wanted


def image_path(path, root):
    """Where a file goes in the image: its path in the package, /lib folded into /usr/lib."""
    if path.startswith(root + os.sep):
        path = path[len(root):]
    path = path.lstrip("/")
    for merged in ("lib/", "lib64/"):
        if path.startswith(merged):
            return "usr/" + path
    return path


def module_name(ko_path):
    return os.path.basename(ko_path)[: -len(".ko")].replace("-", "_")


def module_depends(ko_path):
    """The module names in a module's `depends=` modinfo."""
    with open(ko_path, "rb") as ko:
        match = re.search(rb"\0depends=([^\0]*)\0", ko.read())
    return [d.decode().replace("-", "_") for d in match.group(1).split(b",") if d] if match else []


def module_index(modules_root):
    """Module name -> .ko path for every module under lib/modules/<version>/kernel."""
    index = {}
    for directory, _, files in os.walk(modules_root):
        for name in files:
            if name.endswith(".ko"):
                path = os.path.join(directory, name)
                index[module_name(path)] = path
    return index


def module_closure(tool, index, wanted):
    """`wanted` and everything they depend on, each after its dependencies."""
    ordered, seen = [], set()

    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen:
            return
        if name in chain:
            tool.die(f"module dependency cycle: {' -> '.join(chain + [name])}")
        if name not in index:
            tool.die(f"no module {name} in the kernel package (needed by {chain[-1] if chain else 'the image'})")
        for dep in module_depends(index[name]):
            visit(dep, chain + [name])
        seen.add(name)
        ordered.append(name)

    for name in wanted:
        visit(name, [])
    return ordered


class Cpio:
    """A cpio "newc" archive: 110-byte ASCII header, name and data each padded to 4 bytes."""

    def __init__(self):
        self.parts = []
        self.inode = 0
        self.dirs = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.inode += 1
        fields = [self.inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        blob = b"070701" + b"".join(b"%08x" % f for f in fields) + name.encode() + b"\0"
        self.parts.append(blob + b"\0" * (-len(blob) % 4))
        self.parts.append(data + b"\0" * (-len(data) % 4))

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
        return b"".join(self.parts)
