#!/usr/bin/env python3
"""Probes `dynexec serve` as an operator would, printing what it measured:
shutdown with a client that sent half a header, and a 2 MB prompt's rejection (alone, and
eight at once) with /health's latency meanwhile. Standard library only.

    cargo build -p dynexec-cli && scripts/probe-serve.py [SERVE FLAGS...]
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

DYNEXEC = os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "debug", "dynexec")
EXTRA = sys.argv[1:]


def start(*args):
    """A server on a free loopback port; returns the process and its base URL."""
    p = subprocess.Popen([DYNEXEC, "--threads", "2", "--quiet", "serve", "--port", "0", *EXTRA, *args],
                         stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if "on http://" in line:
            url = "http://" + line.split("on http://")[1].split()[0]
            threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
            return p, url
    sys.exit("the server did not start")


def post(url, body):
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def stalled_shutdown(*args):
    p, url = start(*args)
    host, port = url[len("http://"):].rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    time.sleep(0.5)
    t = time.time()
    p.send_signal(signal.SIGTERM)
    p.wait()
    print(f"SIGTERM with a half-sent header, serve {' '.join(args)}: exited {p.returncode} after {time.time() - t:.2f} s")


stalled_shutdown("--shutdown-timeout", "10")
stalled_shutdown("--shutdown-timeout", "10", "--timeout", "3")

p, url = start()
huge = {"prompt": "word " * 400_000, "max_tokens": 4}
for _ in range(3):
    t = time.time()
    code = post(url, huge)
    print(f"a 2 MB prompt: HTTP {code} in {(time.time() - t) * 1000:.0f} ms")
codes, latencies, stop = [], [], threading.Event()


def health():
    while not stop.is_set():
        t = time.time()
        urllib.request.urlopen(url + "/health").read()
        latencies.append(time.time() - t)
        time.sleep(0.002)


watcher = threading.Thread(target=health)
watcher.start()
time.sleep(0.05)
t = time.time()
posts = [threading.Thread(target=lambda: codes.append(post(url, huge))) for _ in range(8)]
for th in posts:
    th.start()
for th in posts:
    th.join()
took = time.time() - t
stop.set()
watcher.join()
print(f"eight 2 MB prompts at once: {sorted(set(codes))} in {took * 1000:.0f} ms; /health meanwhile: "
      f"mean {sum(latencies) / len(latencies) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms ({len(latencies)} probes)")
with open(f"/proc/{p.pid}/status") as f:
    print("server " + " ".join(line.split()[0] + " " + line.split()[1] + " kB" for line in f if line.startswith(("VmRSS", "VmHWM"))))
p.send_signal(signal.SIGTERM)
p.wait()
