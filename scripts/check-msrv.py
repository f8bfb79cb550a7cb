#!/usr/bin/env python3
"""Fails when the declared MSRV (rust-version in /Cargo.toml) is not truthful.

The MSRV is max(every dependency's own rust-version, the std APIs the code uses). This checks
the first half against the committed Cargo.lock of each workspace (root, guest/, fuzz/) and that
guest/ and fuzz/ declare the root's value; the second half is clippy's `incompatible_msrv` lint,
which reads the same rust-version when scripts/test.sh runs clippy.
"""
import json
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def version(text):
    """`1.89` and `1.89.0` alike, as (1, 89, 0)."""
    parts = [int(part) for part in text.split(".")]
    return tuple(parts + [0] * (3 - len(parts)))


def declared(manifest):
    match = re.search(r'^rust-version = "([0-9.]+)"', manifest.read_text(), re.M)
    if not match:
        sys.exit(f"{manifest}: no rust-version")
    return match.group(1)


def needed(workspace):
    """The highest rust-version any locked package of `workspace` declares, and who declares it."""
    metadata = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked"],
            cwd=workspace, check=True, capture_output=True, text=True,
        ).stdout
    )
    locked = {node["id"] for node in metadata["resolve"]["nodes"]}
    return max(
        (version(p["rust_version"]), f'{p["name"]} {p["version"]}')
        for p in metadata["packages"]
        if p["id"] in locked and p.get("rust_version")
    )


def main():
    msrv = declared(ROOT / "Cargo.toml")
    failures = []
    for workspace in (ROOT, ROOT / "guest", ROOT / "fuzz"):
        if workspace != ROOT and declared(workspace / "Cargo.toml") != msrv:
            failures.append(f"{workspace}/Cargo.toml: rust-version differs from /Cargo.toml's {msrv}")
        highest, who = needed(workspace)
        if highest > version(msrv):
            failures.append(f"{workspace}: {who} needs Rust {'.'.join(map(str, highest))} > MSRV {msrv}")
    for failure in failures:
        print(failure, file=sys.stderr)
    if failures:
        sys.exit(1)
    print(f"MSRV {msrv}: no locked dependency needs a newer Rust")


if __name__ == "__main__":
    main()
