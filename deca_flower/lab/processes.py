"""The processes a lab starts: each in its own session (process group), killed only by group.

The lab never kills by name: it signals the process groups it made itself, so a site's
SuperNode, its SuperExec, its ClientApps and its resident worker go down together, and
nothing else on the machine is touched.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log: Path


class Processes:
    def __init__(self) -> None:
        self.started: dict[str, Started] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> Started:
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started[name] = Started(name, popen, log)
        return self.started[name]

    def alive(self, name: str) -> bool:
        return name in self.started and self.started[name].popen.poll() is None

    def signal(self, name: str, sig: int) -> None:
        """Signal every process in `name`'s group (its children included)."""
        try:
            os.killpg(self.started[name].popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, name: str, grace_s: float = 5.0) -> None:
        self.signal(name, signal.SIGTERM)
        self._reap([self.started[name]], grace_s)

    def stop_all(self, grace_s: float = 5.0) -> None:
        for name in reversed(list(self.started)):
            self.signal(name, signal.SIGTERM)
        self._reap(list(self.started.values()), grace_s)

    def _reap(self, started: list[Started], grace_s: float) -> None:
        deadline = time.monotonic() + grace_s
        for s in started:
            try:
                s.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # Children (SuperExec, ClientApps) may outlive the group leader: KILL the group.
            try:
                os.killpg(s.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            s.popen.wait()
