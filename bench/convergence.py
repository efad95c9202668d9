#!/usr/bin/env python3
"""Convergence benchmark: busy guests between two processes on loopback, with
and without XBZRLE and auto-converge, under two downtime limits.

    python3 bench/convergence.py [--mem-size 2G] [--reps 3] [--workloads ...] [--modes ...]

Workloads (the guest writes 64 bytes and its header per page write,
`--content sparse`, so a page sent again differs from its last copy in
little; 2 writer threads):

- "hot 256M at 1G/s": a 256 MiB hot set rewritten at 1 GiB/s;
- "hot 1G at 500MB/s": a 1 GiB hot set rewritten at 500 MB/s.

Modes: "plain" precopy, "xbzrle" (`--xbzrle-cache` as large as the hot
set), "auto-converge" (`--auto-converge`, default steps), and "both".
Every run gives precopy 30 s and no pass limit (`--max-iterations 0
--max-time 30s --on-limit fail`, as QEMU has no pass limit): a run that
does not converge fails and its guest stays on the source, rather than
being forced over. `--link RATE` caps the wire bytes per second
(`--max-bandwidth`), to stand for a slower network than loopback.

For each run: status, total time (first handshake byte to the handover),
passes, the downtime the engine expected at the switchover, the downtime
measured by the source (from asking its guest to pause to the
destination's word that its guest runs) and the guest's own gap (its pause
on the source to its first access on the destination, wall clock of both
processes on this host), and the highest throttle applied. Every case runs
in each repetition, interleaved, next to a raw single-stream TCP baseline
(1 MiB writes) measured in the same repetition; figures are medians.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from precopy import baseline, migrate_pair, size  # noqa: E402

WORKLOADS = {
    "hot 256M at 1G/s": ["--pattern", "hotset", "--hot-set", "256M", "--dirty-rate", "1G"],
    "hot 1G at 500MB/s": ["--pattern", "hotset", "--hot-set", "1G", "--dirty-rate", "500000000"],
}
CACHE = {"hot 256M at 1G/s": "256M", "hot 1G at 500MB/s": "1G"}
MODES = ["plain", "xbzrle", "auto-converge", "both"]


def mode_args(mode, workload):
    args = []
    if mode in ("xbzrle", "both"):
        args += ["--xbzrle-cache", CACHE[workload]]
    if mode in ("auto-converge", "both"):
        args += ["--auto-converge"]
    return args


def migrate(mem, extra_send):
    """One migration; returns (send report, recv report, seconds outside)."""
    return migrate_pair(["--mem-size", mem, "--content", "sparse", "--max-iterations", "0", "--max-time", "30s",
                         "--on-limit", "fail"] + extra_send)


def row_of(send, recv):
    gap = None
    if send.get("paused_unix_us") and recv.get("first_access_unix_us"):
        gap = (recv["first_access_unix_us"] - send["paused_unix_us"]) / 1e3
    xbzrle = send.get("xbzrle") or {}
    return {
        "status": send["status"],
        "total_s": (send.get("total_ms") or 0) / 1e3,
        "passes": send.get("iterations"),
        "expected_ms": send.get("expected_downtime_ms"),
        "downtime_ms": send.get("downtime_ms"),
        "gap_ms": gap,
        "throttle": send.get("throttle_percent"),
        "delta_pages": xbzrle.get("pages"),
        "encoding_rate": xbzrle.get("encoding_rate"),
        "final_mb": ((send.get("downtime_parts") or {}).get("final_bytes") or 0) / 1e6 or None,
        "verified": recv.get("verified"),
        "guest_check": recv.get("guest_check"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem-size", default="2G")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workloads", default=";".join(WORKLOADS))
    parser.add_argument("--modes", default=";".join(MODES))
    parser.add_argument("--limits", default="300;50")
    parser.add_argument("--link", help="cap on wire bytes per second (e.g. 1250M for 10 Gbit/s)")
    args = parser.parse_args()
    workloads = [w.strip() for w in args.workloads.split(";")]
    modes = [m.strip() for m in args.modes.split(";")]
    limits = [int(x) for x in args.limits.split(";")]
    cases = [(w, limit, m) for w in workloads for limit in limits for m in modes]
    results = {case: [] for case in cases}
    tcp = []
    for rep in range(args.reps):
        tcp.append(baseline(size("1G"), 1))
        print(f"rep {rep} tcp: {tcp[-1] / 1e9:.2f} GB/s", file=sys.stderr)
        for case in cases:
            workload, limit, mode = case
            link = ["--max-bandwidth", args.link] if args.link else []
            send, recv, _ = migrate(
                args.mem_size, WORKLOADS[workload] + ["--downtime-ms", str(limit)] + mode_args(mode, workload) + link
            )
            row = row_of(send, recv)
            print(f"rep {rep} {workload} / {limit} ms / {mode}: {row}", file=sys.stderr)
            results[case].append(row)

    link = f", link capped at {args.link}B/s" if args.link else ", loopback uncapped"
    print(f"\n{args.mem_size} guest, sparse writes{link}, median of {args.reps} "
          f"(raw TCP {statistics.median(tcp) / 1e9:.2f} GB/s):")
    print("| workload | limit ms | mode | converged | total s | passes | expected ms | downtime ms "
          "| guest gap ms | throttle % | delta pages | encoding rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, rows in results.items():
        def med(key, rows=rows):
            values = [r[key] for r in rows if r.get(key) is not None]
            return statistics.median(values) if values else None

        def fmt(value, spec):
            return "-" if value is None else format(value, spec)
        done = sum(r["status"] == "completed" for r in rows)
        ok = [r for r in rows if r["status"] == "completed"]
        workload, limit, mode = case
        print(f"| {workload} | {limit} | {mode} | {done}/{len(rows)} | {fmt(med('total_s', ok), '.1f')} "
              f"| {fmt(med('passes', ok), '.0f')} | {fmt(med('expected_ms', ok), '.1f')} "
              f"| {fmt(med('downtime_ms', ok), '.1f')} | {fmt(med('gap_ms', ok), '.1f')} "
              f"| {fmt(med('throttle'), '.0f')} | {fmt(med('delta_pages', ok), '.0f')} "
              f"| {fmt(med('encoding_rate', ok), '.1f')} |")
        over = [r for r in ok if r["downtime_ms"] is not None and r["downtime_ms"] > limit]
        if over:
            print(f"  (!) {len(over)} run(s) of {workload} / {mode} over the {limit} ms limit: "
                  f"{[round(r['downtime_ms'], 1) for r in over]}")


if __name__ == "__main__":
    main()
