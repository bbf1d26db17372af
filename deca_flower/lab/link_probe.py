"""Measure a lab link's TCP throughput: one side sends for a while, the other counts.

The lab runs one end on the hub (in a thread) and the other on a site, in the site's
network namespace:

    python -m deca_flower.lab.link_probe send HOST PORT SECONDS
    python -m deca_flower.lab.link_probe sink ADDRESS PORT     # prints {"bytes", "seconds"}

The sink times from the first byte to the last, so connection setup is not counted; the
rate includes TCP/IP overhead below it (tc's rate counts whole frames).
"""

from __future__ import annotations

import json
import socket
import sys
import time

CHUNK = 64 * 1024


def send(host: str, port: int, seconds: float) -> int:
    """Send zeros to host:port for `seconds`; the bytes sent."""
    payload = bytes(CHUNK)
    sent = 0
    with socket.create_connection((host, port), timeout=30) as conn:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            conn.sendall(payload)
            sent += len(payload)
    return sent


def listen(address: str, port: int) -> socket.socket:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, port))
    server.listen(1)
    server.settimeout(60)
    return server


def sink(server: socket.socket) -> dict[str, float]:
    """Accept one connection and read it to the end: bytes, and seconds first to last."""
    conn, _ = server.accept()
    received, first, last = 0, None, None
    with conn:
        conn.settimeout(60)
        while data := conn.recv(CHUNK):
            now = time.perf_counter()
            first = now if first is None else first
            last = now
            received += len(data)
    server.close()
    seconds = (last - first) if first is not None and last is not None else 0.0
    return {"bytes": received, "seconds": seconds}


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "send":
        send(argv[1], int(argv[2]), float(argv[3]))
        return 0
    if len(argv) == 3 and argv[0] == "sink":
        server = listen(argv[1], int(argv[2]))
        print("listening", flush=True)  # the hub starts sending once it reads this line
        print(json.dumps(sink(server)), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
