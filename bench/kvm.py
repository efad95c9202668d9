#!/usr/bin/env python3
"""KVM benchmark: a 512 MiB KVM micro-VM that keeps writing, migrated live
between two processes on loopback, next to the synthetic guest of the same
size and write rate and a raw single-stream TCP baseline (1 MiB writes),
all measured in the same repetition; then the dirty-log sync cost per GiB.

    cargo build --release -p migrate-cli -p migration-bench
    python3 bench/kvm.py [--mem-size 512M] [--dirty-rate 4M] [--reps 3]

The KVM guest (2 vCPUs) rewrites its pages in order and checks each one
before it does; this machine's KVM emulates its paging-off 32-bit program,
so it rewrites about a thousand pages a second per vCPU, and `--dirty-rate`
is a cap it stays under. The synthetic guest writes `--dirty-rate` in
sequential order too (2 writer threads). Reported per case (medians): total
time from the handshake to the handover, guest RAM moved per second as a
ratio of the baseline, passes, downtime, and the destination guest's own
check. `kvm-dirty-sync` then prints the cost of one KVM dirty-log sync per
GiB beside the kernel's write tracker.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from precopy import ROOT, baseline, migrate_pair, size  # noqa: E402

SYNC = os.path.join(ROOT, "target", "release", "kvm-dirty-sync")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem-size", default="512M")
    parser.add_argument("--dirty-rate", default="4M")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    mem = size(args.mem_size)
    guests = {
        "kvm": ["--guest", "kvm", "--vcpus", "2"],
        "synthetic": ["--pattern", "sequential"],
    }
    results = {name: [] for name in guests}
    bases = []
    for rep in range(args.reps):
        bases.append(baseline(mem, 1))
        for name, extra in guests.items():
            send, recv, _ = migrate_pair(["--mem-size", args.mem_size, "--dirty-rate", args.dirty_rate] + extra)
            assert send["status"] == "completed", send
            results[name].append((send, recv))
            print(f"rep {rep} {name}: {send['total_ms']:.0f} ms, {send['iterations']} passes, "
                  f"downtime {send['downtime_ms']:.1f} ms, guest check {recv.get('guest_check')}",
                  file=sys.stderr)
    base = statistics.median(bases)
    print(f"raw TCP baseline: {base / 1e9:.2f} GB/s (median of {len(bases)})")
    for name, runs in results.items():
        med = lambda key: statistics.median(s[key] for s, _ in runs)  # noqa: E731
        checks = sorted({r.get("guest_check") for _, r in runs})
        print(json.dumps({
            "guest": name,
            "total_ms": round(med("total_ms")),
            "ram_per_sec_over_tcp": round(med("ram_bytes_per_sec") / base, 2),
            "passes": med("iterations"),
            "downtime_ms": round(med("downtime_ms"), 1),
            "expected_downtime_ms": round(med("expected_downtime_ms"), 1),
            "verified": all(s["verified"] and r["verified"] for s, r in runs),
            "guest_check": checks,
        }))
    subprocess.run([SYNC, "--reps", "5"], check=True)


if __name__ == "__main__":
    main()
