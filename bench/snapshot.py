#!/usr/bin/env python3
"""Snapshot benchmark: save and eager restore of a populated random guest,
as ratios of dd with O_DIRECT moving the same bytes in the same run.

    python3 bench/snapshot.py [--mem-size 2G] [--reps 3] [--dir /var/tmp]

Each repetition runs, in this order:
- dd writing the guest's size from a tmpfs file of random bytes to the
  disk with oflag=direct bs=4M and a final fdatasync (the save baseline);
- `migrate-cli save --direct-io` of an idle random guest of that size,
  timed from the sender's "handshake done" line to its exit (every page
  written, bitmaps, device state, fdatasync twice, rename, directory fsync,
  and hashing the frozen RAM for the verification);
- the snapshot evicted from the page cache, then dd reading the snapshot with iflag=direct
  bs=4M (the restore baseline);
- the snapshot evicted from the page cache, then `migrate-cli restore --direct-io --prealloc`,
  rated by its JSON report (guest RAM / total_ms: first byte read to the
  guest running, the digests compared after);
- the snapshot evicted from the page cache, then `migrate-cli restore --lazy --direct-io`:
  milliseconds from the command's start to the guest's first completed
  access to its memory, and to every page loaded.
Needs a disk file system under --dir.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

from precopy import CLI, ROOT, last_json, size, timed_sender


def evict(path):
    """Drops the snapshot's pages from the page cache (and nothing else: the
    binaries stay cached, as they would on a host that restores often)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def dd(args):
    started = time.monotonic()
    subprocess.run(["dd", "status=none"] + args, check=True)
    return time.monotonic() - started


def save(mem, path, channels):
    report, seconds = timed_sender(
        [CLI, "save", "--mapped-ram", "--to", path, "--mem-size", str(mem), "--content", "random", "--direct-io",
         "--channels", str(channels), "--json"], timeout=600)
    assert report["status"] == "completed" and report["verified"], report
    return seconds


def restore(path, channels, mode):
    """Restores with O_DIRECT, `mode` being --prealloc or --lazy; returns the JSON report."""
    out = subprocess.run(
        [CLI, "restore", "--from", path, mode, "--direct-io", "--channels", str(channels),
         "--json", "--quiet", "--run-for", "0s"],
        capture_output=True, text=True, timeout=600)
    report = last_json(out.stdout)
    assert report["status"] == "completed" and report["verified"], report
    return report


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mem-size", default="2G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--dir", default="/var/tmp")
    args = parser.parse_args()
    mem = size(args.mem_size)
    subprocess.run(["cargo", "build", "--release", "-p", "migrate-cli"], cwd=ROOT, check=True)
    tag = os.getpid()
    random_src = f"/dev/shm/snapshot-bench-{tag}.rand"
    dd_out = os.path.join(args.dir, f"snapshot-bench-{tag}.dd")
    snap = os.path.join(args.dir, f"snapshot-bench-{tag}.snap")
    count = mem // (4 << 20)
    results = {k: [] for k in ["dd write", "save", "dd read", "restore"]}
    lazy = {"first": [], "all": [], "faults": []}
    try:
        dd([f"if=/dev/urandom", f"of={random_src}", "bs=4M", f"count={count}"])
        for rep in range(args.reps):
            results["dd write"].append(mem / dd([f"if={random_src}", f"of={dd_out}", "bs=4M", f"count={count}",
                                                 "oflag=direct", "conv=fdatasync"]))
            os.remove(dd_out)
            results["save"].append(mem / save(mem, snap, args.channels))
            evict(snap)
            results["dd read"].append(os.path.getsize(snap) / dd([f"if={snap}", "of=/dev/null", "bs=4M",
                                                                  "iflag=direct"]))
            evict(snap)
            results["restore"].append(mem / (restore(snap, args.channels, "--prealloc")["total_ms"] / 1e3))
            evict(snap)
            report = restore(snap, args.channels, "--lazy")["lazy"]
            lazy["first"].append(report["first_access_ms"])
            lazy["all"].append(report["all_loaded_ms"])
            lazy["faults"].append(report["faults"])
            os.remove(snap)
            print(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1] / 1e9:.2f} GB/s" for k, v in results.items()),
                  file=sys.stderr)
    finally:
        for path in [random_src, dd_out, snap]:
            if os.path.exists(path):
                os.remove(path)
    med = {k: statistics.median(v) for k, v in results.items()}
    # Ratios are taken within each repetition (the disk's speed drifts
    # between them), then the median of those.
    save_ratio = statistics.median(s / d for s, d in zip(results["save"], results["dd write"]))
    restore_ratio = statistics.median(r / d for r, d in zip(results["restore"], results["dd read"]))
    print(f"| case ({args.mem_size} random guest, {args.channels} channels, median of {args.reps}) | GB/s | ratio to dd (median of per-repetition ratios) |")
    print("| --- | --- | --- |")
    print(f"| dd write, oflag=direct bs=4M, fdatasync | {med['dd write'] / 1e9:.2f} | 1.00 |")
    print(f"| save --direct-io (outside: handshake to exit) | {med['save'] / 1e9:.2f} | {save_ratio:.2f} |")
    print(f"| dd read, iflag=direct bs=4M, snapshot evicted | {med['dd read'] / 1e9:.2f} | 1.00 |")
    print(f"| restore --direct-io --prealloc (JSON), snapshot evicted | {med['restore'] / 1e9:.2f} | {restore_ratio:.2f} |")
    print()
    print(f"restore --lazy --direct-io, snapshot evicted: first guest access {statistics.median(lazy['first']):.1f} ms "
          f"(runs: {', '.join(f'{x:.1f}' for x in lazy['first'])}), every page loaded "
          f"{statistics.median(lazy['all']):.0f} ms, faults served {statistics.median(lazy['faults']):.0f}")


if __name__ == "__main__":
    main()
