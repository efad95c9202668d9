#!/usr/bin/env python3
"""Postcopy benchmark: a busy guest between two processes on loopback.

    python3 bench/postcopy.py [--mem-size 2G] [--dirty-rate 1G] [--reps 3]

Cases, interleaved in each repetition so drift in the machine's speed hits
all alike:

- "precopy gives up": plain precopy of a guest dirtying faster than it
  converges, with `--on-limit fail` (30 passes): the time until it fails.
- "postcopy": the same guest with `--postcopy`: precopy until the engine
  sees it will not converge, then the guest runs on the destination.
- "postcopy at once": `--postcopy-after 0`: no precopy pass, every page
  comes after the guest runs there (the most faults).

For the postcopy cases it reports the total time (first handshake byte to
the destination holding every page, from the sender's report), the
passes, the guest's blackout at the switch (source paused to the
destination guest's first completed access, wall clock of both processes on
this host), and the fault latency as the destination guest's own threads
timed it (accesses that found their page absent: p50, p99, max), next to the
runtime's view (fault read to page placed). A raw userfaultfd round trip on
this machine takes about 7 us. Figures are medians over the repetitions.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from precopy import migrate_pair  # noqa: E402


def migrate(mem, dirty, extra_send):
    """One migration; returns (send report, recv report, seconds outside)."""
    return migrate_pair(["--mem-size", mem, "--dirty-rate", dirty] + extra_send)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem-size", default="2G")
    parser.add_argument("--dirty-rate", default="1G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="precopy gives up;postcopy;postcopy at once")
    args = parser.parse_args()
    cases = {
        "precopy gives up": ["--on-limit", "fail"],
        "postcopy": ["--postcopy"],
        "postcopy at once": ["--postcopy", "--postcopy-after", "0"],
    }
    wanted = [c.strip() for c in args.cases.split(";")]
    results = {case: [] for case in wanted}
    for rep in range(args.reps):
        for case in wanted:
            send, recv, outside = migrate(args.mem_size, args.dirty_rate, cases[case])
            total = send["total_ms"]
            if send.get("postcopy") and send["postcopy"].get("completed_ms"):
                total = send["postcopy"]["completed_ms"]
            row = {"status": send["status"], "total_s": total / 1e3, "outside_s": outside,
                   "passes": send["iterations"]}
            post = recv.get("postcopy")
            if post:
                blackout = None
                if send.get("paused_unix_us") and recv.get("first_access_unix_us"):
                    blackout = (recv["first_access_unix_us"] - send["paused_unix_us"]) / 1e3
                row.update({
                    "verified": recv["verified"],
                    "guest_check": recv.get("guest_check"),
                    "blackout_ms": blackout,
                    "faults": post["faults"],
                    "p50_us": post["fault_p50_us"],
                    "p99_us": post["fault_p99_us"],
                    "max_us": post["fault_max_us"],
                    "service_p50_us": post.get("service_p50_us"),
                    "service_p99_us": post.get("service_p99_us"),
                    "requested": post["requested_pages"],
                    "streamed": post["streamed_pages"],
                })
            print(f"rep {rep} {case}: {row}", file=sys.stderr)
            results[case].append(row)
    print(f"\n{args.mem_size} guest dirtying {args.dirty_rate}/s, median of {args.reps}:")
    for case, rows in results.items():
        def med(key):
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else float("nan")
        statuses = ",".join(sorted({r["status"] for r in rows}))
        line = f"  {case:18} {statuses:10} total {med('total_s'):7.2f} s, {med('passes'):.0f} passes"
        if any("faults" in r for r in rows):
            line += (f", blackout {med('blackout_ms'):.1f} ms, guest faults {med('faults'):.0f}: "
                     f"p50 {med('p50_us'):.0f} us, p99 {med('p99_us'):.0f} us, max {med('max_us'):.0f} us; "
                     f"runtime p50 {med('service_p50_us'):.0f} us p99 {med('service_p99_us'):.0f} us; "
                     f"pages requested {med('requested'):.0f}, streamed {med('streamed'):.0f}")
        print(line)


if __name__ == "__main__":
    main()
