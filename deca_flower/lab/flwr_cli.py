"""The `flwr` command line against one SuperLink connection, with JSON parsed by Python.

Node ids are 64-bit integers: parse Flower's JSON with Python, never with jq (jq 1.6
rounds them). Every command run is appended to a log so the docs can be checked
against what the lab really ran.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any


class FlwrCliError(RuntimeError):
    pass


def log_command(log: Path, argv: list[str]) -> None:
    """Append a command line to the lab's command log, once (polls repeat themselves)."""
    line = shlex.join(argv)
    if not log.exists() or line not in log.read_text().splitlines():
        with log.open("a") as f:
            f.write(line + "\n")


class FlwrCli:
    def __init__(self, home: Path, connection: str, env: dict[str, str], log: Path) -> None:
        self.home, self.connection, self.log = home, connection, log
        self.env = {**env, "FLWR_HOME": str(home)}

    def write_config(self, address: str, root_certificates: Path) -> Path:
        """`$FLWR_HOME/config.toml` with one connection table, as an operator writes it."""
        self.home.mkdir(parents=True, exist_ok=True)
        path = self.home / "config.toml"
        path.write_text(
            "[superlink]\n"
            f'default = "{self.connection}"\n\n'
            f"[superlink.{self.connection}]\n"
            f'address = "{address}"\n'
            f'root-certificates = "{root_certificates}"\n'
        )
        return path

    def json(self, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        result = self.run(*args, "--format", "json", timeout=timeout)
        try:
            return json.loads(result.stdout)
        except json.JSONDecodeError:
            raise FlwrCliError(
                f"`flwr {' '.join(args)}` printed no JSON: {result.stdout[-2000:]}"
                f"{result.stderr[-2000:]}"
            ) from None

    def run(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        argv = ["flwr", *args]
        log_command(self.log, argv)
        result = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise FlwrCliError(
                f"`{shlex.join(argv)}` exited {result.returncode}: "
                f"{(result.stdout + result.stderr)[-3000:]}"
            )
        return result

    def register(self, public_key: Path, attempts: int = 5) -> int:
        """Register a SuperNode key; its node id. A SuperLink that has just started can
        answer `list` yet refuse a registration (its SuperExec still starting): retry."""
        for attempt in range(attempts):
            out = self.json("supernode", "register", str(public_key), self.connection)
            if "node-id" in out:
                return int(out["node-id"])
            time.sleep(2.0 * (attempt + 1))
        raise FlwrCliError(
            f"`flwr supernode register {public_key} {self.connection}` gave no node id after "
            f"{attempts} tries: {json.dumps(out)[-2000:]}"
        )

    def node_status(self) -> dict[int, str]:
        out = self.json("supernode", "list", self.connection)
        return {int(n["node-id"]): str(n["status"]) for n in out.get("nodes") or []}

    def submit(self, app: Path, run_config: list[str]) -> int:
        args = ["run", str(app), self.connection]
        for rc in run_config:
            args += ["--run-config", rc]
        return int(self.json(*args, timeout=600)["run-id"])

    def run_status(self, run_id: int) -> str:
        out = self.json("ls", self.connection, "--run-id", str(run_id))
        runs = out.get("runs") or []
        if not runs:
            raise FlwrCliError(
                f"`flwr ls {self.connection} --run-id {run_id}` listed no run: "
                f"{json.dumps(out)[-2000:]}"
            )
        return str(runs[0]["status"])
