#!/usr/bin/env python3
"""Precopy benchmark: guest RAM per second between two processes on loopback,
as a ratio to raw single-stream TCP (1 MiB writes) measured in the same run.

    python3 bench/precopy.py [--mem-size 2G] [--reps 5]

Each repetition runs the baselines, then a random-content guest, a zero-heavy
guest (half its pages zero), and a random guest into a destination whose RAM
is allocated before the migration (`recv --prealloc`), interleaved so
drift in the machine's speed hits all cases alike. Figures are medians. Migration rates come from
the JSON report (guest RAM / total_ms, first handshake byte to handover) and
from outside (the script's own clock from the sender's "handshake done" line
to the sender's exit, which includes hashing the frozen source RAM for the
verification after the handover). A second baseline writes the received
bytes into fresh memory, the cost any destination pays on this machine.
The "QEMU:" cases run QEMU (Debian's qemu-system-x86, 7.2; install it first)
on the same memory, in the same repetitions.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(ROOT, "target", "release", "migrate-cli")
BASE = os.path.join(ROOT, "target", "release", "tcp-baseline")


def size(text):
    units = {"K": 10, "M": 20, "G": 30}
    if text[-1].upper() in units:
        return int(float(text[:-1]) * (1 << units[text[-1].upper()]))
    return int(text)


def listen(cmd):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if line.startswith("listening on "):
            return proc, line.split()[-1]
    raise RuntimeError(f"{cmd[0]} did not listen: {proc.wait()}")


def last_json(text):
    """The last line of `text` (a report printed with --json), parsed."""
    return json.loads(text.strip().splitlines()[-1])


def migrate_pair(send_args):
    """One migration between a `recv` (its guest run for no time after) and
    a `send` with `send_args` (after `--to`); returns (send report, recv
    report, seconds outside)."""
    recv, addr = listen([CLI, "recv", "--listen", "127.0.0.1:0", "--json", "--quiet", "--run-for", "0s"])
    started = time.monotonic()
    send = subprocess.run([CLI, "send", "--to", addr, "--json"] + send_args, capture_output=True, text=True,
                          timeout=900)
    elapsed = time.monotonic() - started
    out, _ = recv.communicate(timeout=300)
    return last_json(send.stdout), last_json(out), elapsed


def timed_sender(cmd, timeout):
    """Runs a sender to its exit; returns its JSON report and the seconds from
    its "handshake done" stderr line to its exit."""
    send = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = None
    for line in send.stderr:
        if "handshake done" in line and started is None:
            started = time.monotonic()
    report = last_json(send.stdout.read())
    send.wait(timeout=timeout)
    return report, time.monotonic() - started


def baseline(nbytes, streams, fresh=False):
    extra = ["--into-memfd", str(nbytes)] if fresh else []
    streams = ["--streams", str(streams)]
    recv, addr = listen([BASE, "recv", "--listen", "127.0.0.1:0"] + extra + streams)
    subprocess.run([BASE, "send", "--to", addr, "--bytes", str(nbytes)] + streams, check=True, capture_output=True)
    out, _ = recv.communicate(timeout=300)
    received, _, secs = out.split()[1:4]
    assert int(received) == nbytes, out
    return nbytes / float(secs)


IO = ["--io", "uring"]


PKI = None


def tls_args(side):
    """--tls-* options for `side` from a throwaway PKI made once per run."""
    global PKI
    if PKI is None:
        PKI = f"/tmp/precopy-bench-pki-{os.getpid()}"
        subprocess.run([CLI, "gen-certs", PKI], check=True, capture_output=True)
    return ["--tls-cert", f"{PKI}/{side}-cert.pem", "--tls-key", f"{PKI}/{side}-key.pem",
            "--tls-ca", f"{PKI}/ca.pem"]


def migrate(mem, content, channels, populated=False, compress="none", tls=False):
    extra = []
    if populated:
        # A destination whose RAM is allocated before the migration, as when
        # a VMM preallocates guest memory (QEMU's prealloc=on).
        extra = ["--prealloc", str(mem)]
    recv_tls = tls_args("server") if tls else []
    send_tls = tls_args("client") if tls else []
    recv, addr = listen([CLI, "recv", "--listen", "127.0.0.1:0", "--json", "--quiet", "--run-for", "0s"]
                        + extra + IO + recv_tls)
    sent, seconds = timed_sender(
        [CLI, "send", "--to", addr, "--mem-size", str(mem), "--content", content, "--json",
         "--channels", str(channels), "--compress", compress] + IO + send_tls, timeout=300)
    recv_out, _ = recv.communicate(timeout=300)
    received = last_json(recv_out)
    if sent["status"] != "completed" or not sent["verified"] or not received["verified"]:
        raise RuntimeError(f"migration failed: {sent} {received}")
    return {
        "json": sent["ram_bytes"] / (sent["total_ms"] / 1000.0),
        "outside": sent["ram_bytes"] / seconds,
        "downtime_ms": sent["downtime_ms"],
        "wire": sent["transferred_bytes"],
        "setup_ms": sent["setup_ms"],
    }


def qmp(path):
    """A QMP client on a unix socket: returns a function that runs commands."""
    sock = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            sock.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    stream = sock.makefile("rw")
    json.loads(stream.readline())

    def run(name, **args):
        stream.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        stream.flush()
        while True:
            reply = json.loads(stream.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    run("qmp_capabilities")
    return run


def qemu_migrate(mem, content, channels, populated=False, compress="none"):
    """The same case with QEMU (7.2 from Debian): a paused guest whose RAM
    is a shared tmpfs file of random bytes, migrated to a second QEMU whose
    RAM is fresh anonymous memory, or preallocated when `populated`."""
    assert content == "random" and compress == "none", "QEMU runs the random cases only"
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    src_ram = f"/dev/shm/qemu-bench-{tag}.ram"
    with open(src_ram, "wb") as out:
        left = mem
        while left:
            n = min(left, 64 << 20)
            out.write(os.urandom(n))
            left -= n
    base = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-nodefaults", "-nographic", "-display", "none",
            "-S", "-m", str(mem >> 20), "-machine", "memory-backend=ram"]
    prealloc = ",prealloc=on" if populated else ""
    src = subprocess.Popen(base + ["-object", f"memory-backend-file,id=ram,size={mem},mem-path={src_ram},share=on",
                                   "-qmp", f"unix:/tmp/qemu-bench-{tag}-src.sock,server=on,wait=off"])
    dst = subprocess.Popen(base + ["-object", f"memory-backend-ram,id=ram,size={mem}{prealloc}",
                                   "-incoming", "defer",
                                   "-qmp", f"unix:/tmp/qemu-bench-{tag}-dst.sock,server=on,wait=off"])
    try:
        s = qmp(f"/tmp/qemu-bench-{tag}-src.sock")
        d = qmp(f"/tmp/qemu-bench-{tag}-dst.sock")
        if channels > 1:
            for side in (s, d):
                side("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                side("migrate-set-parameters", **{"multifd-channels": channels})
        s("migrate-set-parameters", **{"max-bandwidth": 1 << 40, "downtime-limit": 300})
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        d("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        started = time.monotonic()
        s("migrate", uri=f"tcp:127.0.0.1:{port}")
        while True:
            info = s("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.01)
        finished = time.monotonic()
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU migration {info['status']}: {info}")
        return {
            "json": mem / (info["total-time"] / 1000.0),
            "outside": mem / (finished - started),
            "downtime_ms": info["downtime"],
            "wire": info["ram"]["transferred"],
            "setup_ms": info.get("setup-time", 0),
        }
    finally:
        for proc in (src, dst):
            proc.kill()
            proc.wait()
        os.unlink(src_ram)


CASES = {
    # name: (content, populated destination, compression); ", TLS" cases
    # add mutual TLS to the case named before the comma.
    "random": ("random", False, "none"),
    "zero-heavy": ("zero-heavy", False, "none"),
    "random, populated destination": ("random", True, "none"),
    "zero-heavy, populated destination": ("zero-heavy", True, "none"),
    "text + lz4, populated destination": ("text", True, "lz4"),
    # QEMU's stop-and-copy of a paused guest (its RAM is never dirtied).
    "QEMU: random": ("qemu", False, "none"),
    "QEMU: random, populated destination": ("qemu", True, "none"),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--mem-size", default="2G")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--io", choices=["uring", "plain"], default="uring")
    parser.add_argument("--cold", type=float, default=0.0,
                        help="seconds to wait before each case, so memory freed by the previous one "
                             "has gone back to the host (fresh memory is then host-cold)")
    parser.add_argument("--cases", default="random;zero-heavy;random, populated destination",
                        help="names separated by ';', from: " + "; ".join(CASES)
                             + " (append ', TLS' for mutual TLS)")
    args = parser.parse_args()
    mem = size(args.mem_size)
    IO[1] = args.io
    cases = [c.strip() for c in args.cases.split(";")]
    unknown = [c for c in cases if c.removesuffix(", TLS") not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}")
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "migrate-cli", "-p", "migration-bench"],
                   cwd=ROOT, check=True)
    results = {"tcp": [], "tcp-fresh": []} | {case: [] for case in cases}
    for rep in range(args.reps):
        results["tcp"].append(baseline(mem, args.channels))
        results["tcp-fresh"].append(baseline(mem, args.channels, fresh=True))
        for case in cases:
            time.sleep(args.cold)
            tls = case.endswith(", TLS")
            content, populated, compress = CASES[case.removesuffix(", TLS")]
            if content == "qemu":
                assert not tls, "QEMU cases run without TLS"
                results[case].append(qemu_migrate(mem, "random", args.channels, populated=populated))
            else:
                results[case].append(migrate(mem, content, args.channels, populated=populated, compress=compress,
                                             tls=tls))
        print(f"rep {rep + 1}: tcp {results['tcp'][-1] / 1e9:.2f} GB/s, " + ", ".join(
            f"{case} {results[case][-1]['json'] / 1e9:.2f} GB/s" for case in cases), file=sys.stderr)
    tcp = statistics.median(results["tcp"])
    streams = f"{args.channels} stream" + ("s" if args.channels > 1 else "")
    print(f"| case ({args.mem_size} guest, {args.channels} channel(s), median of {args.reps}) | GB/s (JSON) | ratio to TCP | GB/s (outside) | ratio (outside) | downtime ms | wire bytes / RAM |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| raw TCP, {streams}, 1 MiB writes | {tcp / 1e9:.2f} | 1.00 | | | | |")
    fresh = statistics.median(results["tcp-fresh"])
    print(f"| raw TCP, {streams}, into fresh memory | {fresh / 1e9:.2f} | {fresh / tcp:.2f} | | | | |")
    for case in cases:
        runs = results[case]
        rate = statistics.median(r["json"] for r in runs)
        outside = statistics.median(r["outside"] for r in runs)
        downtime = statistics.median(r["downtime_ms"] for r in runs)
        wire = statistics.median(r["wire"] for r in runs) / mem
        print(f"| {case} | {rate / 1e9:.2f} | {rate / tcp:.2f} | {outside / 1e9:.2f} | {outside / tcp:.2f} | {downtime:.1f} | {wire:.3f} |")


if __name__ == "__main__":
    main()
