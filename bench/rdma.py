#!/usr/bin/env python3
"""Simulated RDMA benchmark: guest RAM moved per second by the same-host
memfd NIC (`--transport rdma-sim --rdma-nic memfd`) for a populated random
guest, as a ratio of `memcpy` bandwidth and beside TCP multifd, all measured
in the same repetition.

    cargo build --release -p migrate-cli -p migration-bench
    python3 bench/rdma.py [--mem-size 2G] [--channels 2] [--reps 3]

Cases, interleaved per repetition so drift hits them alike (medians):
- rdma-memfd: the destination allocates and registers its RAM after the
  handshake, and the NIC's writes allocate its pages as they reach them
  (on-demand registration); registering and connecting count in the time;
- rdma-memfd pin-all: registration populates every page first
  (`recv --rdma-pin-all`), counted in the time;
- rdma-memfd prealloc: the destination's RAM is a memfd preallocated before
  it listens (`recv --prealloc`, as a VMM allocates guest RAM at start);
- rdma-tcp: the TCP NIC (NIC threads writing into registered memory);
- tcp: plain TCP multifd, the same channels, fresh destination RAM;
- tcp prealloc: the same into preallocated RAM.
Rates are guest RAM / total_ms (handshake to handover) from the source's
JSON. memcpy: one thread between two populated buffers (`warm`), and into a
fresh memfd (`fresh`, first touch included; `fresh_2` with two threads).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from precopy import CLI, ROOT, last_json, listen, size  # noqa: E402

MEMCPY = os.path.join(ROOT, "target", "release", "memcpy-baseline")


def migrate(mem, channels, transport, memory):
    recv_extra = {"": [], "prealloc": ["--prealloc", str(mem)], "pin-all": ["--rdma-pin-all"]}[memory]
    send_extra = []
    if transport != "tcp":
        nic = transport.split("-")[1]
        recv_extra += ["--transport", "rdma-sim", "--rdma-nic", nic]
        send_extra += ["--transport", "rdma-sim", "--rdma-nic", nic]
    recv, addr = listen([CLI, "recv", "--listen", "127.0.0.1:0", "--json", "--quiet", "--run-for", "0s"]
                        + recv_extra)
    send = subprocess.run([CLI, "send", "--to", addr, "--mem-size", str(mem), "--content", "random",
                           "--json", "--channels", str(channels)] + send_extra,
                          capture_output=True, text=True, timeout=900)
    out, _ = recv.communicate(timeout=300)
    sent, received = last_json(send.stdout), last_json(out)
    if sent["status"] != "completed" or not sent["verified"] or not received["verified"]:
        raise RuntimeError(f"migration failed: {sent} {received}")
    rdma_s, rdma_r = sent.get("rdma") or {}, received.get("rdma") or {}
    if transport != "tcp":
        assert rdma_s["one_sided_bytes"] == sent["plain_pages"] * 4096, sent
    return {
        "rate": sent["ram_bytes"] / (sent["total_ms"] / 1000.0),
        "total_ms": sent["total_ms"],
        "register_ms": rdma_r.get("register_ms"),
        "connect_ms": rdma_s.get("connect_ms"),
        "downtime_ms": sent["downtime_ms"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem-size", default="2G")
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    mem = size(args.mem_size)
    cases = [("rdma-memfd", ""), ("rdma-memfd", "pin-all"), ("rdma-memfd", "prealloc"), ("rdma-tcp", ""),
             ("tcp", ""), ("tcp", "prealloc")]
    results = {case: [] for case in cases}
    copies = []
    for rep in range(args.reps):
        copy = json.loads(subprocess.run([MEMCPY, "--bytes", str(mem)], check=True, capture_output=True,
                                         text=True).stdout)
        copies.append(copy)
        for case in cases:
            run = migrate(mem, args.channels, *case)
            results[case].append(run)
            print(f"rep {rep} {case[0]} {case[1]}: {run['total_ms']:.0f} ms "
                  f"(register {run['register_ms']}, connect {run['connect_ms']}), "
                  f"{run['rate'] / 1e9:.2f} GB/s; memcpy warm {copy['warm'] / 1e9:.2f}, "
                  f"fresh {copy['fresh'] / 1e9:.2f} GB/s", file=sys.stderr)
    med = lambda key: statistics.median(c[key] for c in copies)  # noqa: E731
    warm, fresh, fresh_2 = med("warm"), med("fresh"), med("fresh_2")
    print(json.dumps({"memcpy_warm_gbps": round(warm / 1e9, 2), "memcpy_fresh_gbps": round(fresh / 1e9, 2),
                      "memcpy_fresh_2_threads_gbps": round(fresh_2 / 1e9, 2)}))
    tcp = statistics.median(r["rate"] for r in results[("tcp", "")])
    tcp_pre = statistics.median(r["rate"] for r in results[("tcp", "prealloc")])
    for (transport, memory), runs in results.items():
        rate = statistics.median(r["rate"] for r in runs)
        pick = lambda key: (statistics.median(r[key] for r in runs)  # noqa: E731
                            if runs[0][key] is not None else None)
        print(json.dumps({
            "case": f"{transport} {memory}".strip(),
            "total_ms": round(pick("total_ms")),
            "ram_gbps": round(rate / 1e9, 2),
            "over_memcpy_warm": round(rate / warm, 2),
            "over_memcpy_fresh": round(rate / fresh, 2),
            "over_tcp_multifd": round(rate / (tcp_pre if memory == "prealloc" else tcp), 2),
            "register_ms": pick("register_ms") and round(pick("register_ms")),
            "connect_ms": pick("connect_ms") and round(pick("connect_ms")),
            "downtime_ms": round(pick("downtime_ms"), 1),
        }))


if __name__ == "__main__":
    main()
