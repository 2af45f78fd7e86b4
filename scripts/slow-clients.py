"""Slow and silent clients against a real `qtune serve`, run before releases beside
scripts/fuzz-api.sh: sockets that send nothing (or only HTTP/2's preface), uploads trickled a few
bytes a second, event streams and downloads that are never read, all at once and past the
connection limit -- while /healthz and a keyed request are timed every 50 ms. Prints each
phase's latency percentiles and fails when /healthz's p99 passes 50 ms or any health check is
refused.

    python3 scripts/slow-clients.py --qtune target/debug/qtune [--seconds 40]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

KEY = "slow-client-key-0001"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def timed_get(base, path, key=None):
    req = urllib.request.Request(base + path)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
            ok = r.status == 200
    except Exception:
        ok = False
    return ok, (time.perf_counter() - started) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--qtune", required=True)
    ap.add_argument("--seconds", type=float, default=40)
    opts = ap.parse_args()
    data = tempfile.mkdtemp(prefix="qtune-slow-")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [opts.qtune, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data,
         "--api-keys", KEY, "--max-connections", "64", "--header-timeout-secs", "5",
         "--idle-timeout-secs", "10", "--workers", "0"],
        stdout=open(os.path.join(data, "serve.log"), "w"), stderr=subprocess.STDOUT)
    for _ in range(200):
        if timed_get(base, "/healthz")[0]:
            break
        time.sleep(0.05)
    held = []
    stop = threading.Event()

    def silent(n, preface=False):
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                if preface:
                    s.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                held.append(s)
            except OSError:
                pass

    def trickle(n):
        socks = []
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall((f"POST /v1/files?filename=slow.jsonl HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           f"Authorization: Bearer {KEY}\r\nContent-Length: 10000000\r\n\r\n").encode())
                socks.append(s)
            except OSError:
                pass
        while not stop.is_set():
            for s in socks:
                try:
                    s.sendall(b"{")
                except OSError:
                    pass
            time.sleep(1)

    def unread(n):
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall((f"GET /openapi.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").encode() * 50)
                held.append(s)  # never read
            except OSError:
                pass

    phases = [
        ("idle sockets (100, limit 64)", lambda: silent(100)),
        ("HTTP/2 prefaces only (100)", lambda: silent(100, preface=True)),
        ("trickled uploads (16, one byte a second)", lambda: threading.Thread(target=trickle, args=(16,), daemon=True).start()),
        ("unread responses (50 connections)", lambda: unread(50)),
    ]
    failed = False
    per_phase = opts.seconds / len(phases)
    print(f"qtune slow clients: {per_phase:.0f} s per phase, /healthz and GET /v1/jobs (keyed) every 50 ms")
    for name, start in phases:
        start()
        health, keyed, refused = [], [], 0
        until = time.time() + per_phase
        while time.time() < until:
            ok, ms = timed_get(base, "/healthz")
            health.append(ms)
            refused += not ok
            ok, ms = timed_get(base, "/v1/jobs?limit=1", KEY)
            keyed.append(ms)
            refused += not ok
            time.sleep(0.05)
        p99 = statistics.quantiles(health, n=100)[98]
        kp99 = statistics.quantiles(keyed, n=100)[98]
        print(f"{name}: /healthz p50 {statistics.median(health):.1f} ms p99 {p99:.1f} ms; "
              f"keyed p99 {kp99:.1f} ms; {len(health)} checks, {refused} refused or failed")
        failed |= p99 > 50 or refused > 0
    stop.set()
    for s in held:
        s.close()
    server.terminate()
    server.wait()
    print("FAIL" if failed else "PASS")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
