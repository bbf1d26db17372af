"""A site's resident worker: keeps the node (model, data, optimizer state) loaded between
Flower messages.

In deployment a SuperNode starts a new `flwr-clientapp` process for every message. Without
this worker every phase would pay a torch import, a model load and a state restore before
training a single step. The ClientApp instead forwards each message to one long-lived worker
per (site, run), which it starts on the first message:

- the worker listens on an abstract Unix socket (scoped to the site's network namespace, no
  file to clean up) and accepts only clients that prove the key in `<state-dir>/.worker-key`
  (0600), via `multiprocessing.connection`'s HMAC challenge;
- it stays in the SuperNode's process group, so stopping or killing the site stops it;
- it exits after the run's `finish` message, or after `worker-idle-s` without a message;
- it commits to the node's state store exactly as the in-process path does, so a site that
  is restarted (worker gone) resumes from the store: the worker is a cache, never the truth.

This module's client half imports neither torch nor flwr, so the ClientApp stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

DEFAULT_IDLE_S = 1800.0
_CONNECT_TIMEOUT_S = 120.0  # the worker imports torch and loads the model before it listens


class ResidentWorkerError(RuntimeError):
    pass


def call(message: dict[str, Any], state_dir: Path, idle_s: float = DEFAULT_IDLE_S) -> dict:
    """Hand one message to the site's worker for this run (starting it if needed)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    address = _address(state_dir, message["run_id"])
    key = _authkey(state_dir)
    log = state_dir / f"worker-run-{message['run_id']}.log"
    conn = _connect(address, key)
    if conn is None:
        _spawn(address, state_dir, log, idle_s)
        conn = _wait_connect(address, key, log)
    with conn:
        conn.send(message)
        try:
            return conn.recv()
        except EOFError:
            raise ResidentWorkerError(
                f"the resident worker died while handling {message['kind']} (see {log}); the "
                "node's committed state is intact and the next message starts a new worker"
            ) from None


def _address(state_dir: Path, run_id: int) -> str:
    """One worker per site, run and code version (the FAB this ClientApp runs)."""
    code = Path(__file__).resolve().parent
    ident = f"{state_dir.resolve()}|{run_id}|{code}|{sys.executable}"
    return "\0deca-worker-" + hashlib.sha256(ident.encode()).hexdigest()[:24]


def _authkey(state_dir: Path) -> bytes:
    path = state_dir / ".worker-key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def _connect(address: str, key: bytes) -> Connection | None:
    try:
        return Client(address, family="AF_UNIX", authkey=key)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def _spawn(address: str, state_dir: Path, log: Path, idle_s: float) -> None:
    code_root = str(Path(__file__).resolve().parent.parent)  # the FAB holding deca_flower
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (code_root, os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    argv = [
        sys.executable, "-m", "deca_flower.resident",
        "--address-hex", address.encode().hex(),
        "--key-file", str(state_dir / ".worker-key"),
        "--idle-s", str(idle_s),
    ]  # fmt: skip
    with log.open("ab") as out:
        # Same process group as the SuperNode (no new session): killing the site kills it.
        subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


def _wait_connect(address: str, key: bytes, log: Path) -> Connection:
    deadline = time.monotonic() + _CONNECT_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = _connect(address, key)
        if conn is not None:
            return conn
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise ResidentWorkerError(
        f"the resident worker did not start within {_CONNECT_TIMEOUT_S:.0f} s; its log "
        f"({log}):\n{tail}"
    )


# ---------------------------------------------------------------------- the worker


class _Worker:
    def __init__(self, address: str, key: bytes, idle_s: float) -> None:
        from deca_flower import node_service  # torch and the model live here, not in clients

        self.node_service = node_service
        self.listener = Listener(address, family="AF_UNIX", authkey=key)
        self.idle_s = idle_s
        self.last_active = time.monotonic()
        self.busy = threading.Lock()

    def serve(self) -> None:
        threading.Thread(target=self._exit_when_idle, daemon=True).start()
        while True:
            try:
                conn = self.listener.accept()
            except Exception as err:  # noqa: BLE001 - a client that fails the key check
                print(f"[worker] refused a connection: {type(err).__name__}: {err}", flush=True)
                continue
            with conn, self.busy:
                message = conn.recv()
                reply = self.node_service.handle(self.node_service.NodeRequest(**message))
                conn.send(reply)
                self.last_active = time.monotonic()
            if message["kind"] == "finish":
                print("[worker] run finished: exiting", flush=True)
                return

    def _exit_when_idle(self) -> None:
        while True:
            time.sleep(min(30.0, self.idle_s / 4))
            with self.busy:
                if time.monotonic() - self.last_active > self.idle_s:
                    print(f"[worker] idle for {self.idle_s:.0f} s: exiting", flush=True)
                    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="a site's resident DECA node worker")
    parser.add_argument("--address-hex", required=True)
    parser.add_argument("--key-file", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, default=DEFAULT_IDLE_S)
    args = parser.parse_args(argv)
    address = bytes.fromhex(args.address_hex).decode()
    print(f"[worker] pid {os.getpid()} serving (idle exit after {args.idle_s:.0f} s)", flush=True)
    _Worker(address, args.key_file.read_bytes(), args.idle_s).serve()


if __name__ == "__main__":
    main()
