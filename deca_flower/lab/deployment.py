"""One lab deployment, start to teardown: SuperLink, registered keys, SuperNodes, a run.

    lab = Lab(LabSpec(sites=3, run_config='preset-model="tiny"'))
    out_dir = lab.run()        # the run's output directory; everything torn down after

The lab writes its working files (certificates, keys, each host's FLWR_HOME, state dirs and
logs) under `work_dir`, and copies the logs and a `lab.json` (mode, node ids, interface
byte counters, every command run) into the run's output directory under `lab/`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deca_flower.lab.certs import make_node_key, make_server_certificates
from deca_flower.lab.flwr_cli import FlwrCli, FlwrCliError, log_command
from deca_flower.lab.hosts import Hosts, Site, free_port, make_hosts
from deca_flower.lab.processes import Processes

CONNECTION = "lab"
SUPERLINK_PORT = 8000
# A restarted SuperNode is refused while its old session still looks online.
NODE_ONLINE_TIMEOUT_S = 120.0


class LabError(RuntimeError):
    """The deployment could not be brought up or the run failed; the message says why."""


@dataclass
class LabSpec:
    sites: int = 3
    run_config: list[str] = field(default_factory=list)  # passed to `flwr run` unchanged
    loopback: bool = False
    app_dir: Path = field(default_factory=Path.cwd)
    work_dir: Path | None = None  # default: a fresh temporary directory, removed at the end
    timeout_s: float = 3600.0
    bandwidth: str | None = None  # e.g. "100mbit": shape every site's link (namespaces only)
    # Rehearsing mistakes (used by the tests, and by users who want to see the errors):
    node_config: dict[int, str] = field(default_factory=dict)  # site -> extra node config
    unregistered: set[int] = field(default_factory=set)  # sites whose key is not registered
    # Rehearsing faults: SIGKILL a site's process group when a phase (1-based) starts, and
    # optionally start it again (same key, same state dir) this many seconds later.
    kills: dict[int, list[int]] = field(default_factory=dict)  # phase -> sites
    restart_after_s: float | None = None
    # SIGKILL the whole deployment as this phase (1-based) starts, then bring it back and
    # resume the run from its directory (`resume=<run dir>`).
    stop_coordinator_at: int | None = None
    intruder: bool = False  # a non-member host that attacks the data plane during the run
    # Measure every site's link (both ways, this many seconds each) before the run, e.g.
    # to see a --bandwidth shaping hold; 0 = do not. `links_only`: measure, then stop.
    measure_links_s: float = 0.0
    links_only: bool = False
    quiet: bool = False


class Lab:
    def __init__(self, spec: LabSpec, hosts: Hosts | None = None) -> None:
        if spec.sites < 2:
            raise LabError(f"--sites {spec.sites}: a DECA deployment needs at least 2 sites")
        self.spec = spec
        self.hosts = hosts or make_hosts(spec.sites, spec.loopback)
        self.own_work_dir = spec.work_dir is None
        self.work = Path(spec.work_dir or tempfile.mkdtemp(prefix="deca-lab-")).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.processes = Processes()
        self.env = _base_env()
        self.node_ids: dict[int, int] = {}
        self.record: dict[str, Any] = {"mode": self.hosts.mode, "sites": spec.sites}
        self.deployment_killed = threading.Event()

    # ------------------------------------------------------------------ the whole lab

    def run(self) -> Path:
        """Bring the deployment up, run the spec's run config on it, tear everything down."""
        try:
            self.up()
            if self.spec.links_only:
                return self.work / "links.json"
            return self.execute(self.spec.run_config)
        finally:
            self.down()

    def execute(self, run_config: list[str]) -> Path:
        """Submit one run to the running deployment and wait for it; its output directory."""
        run_id = self.submit(run_config)
        status = self.wait(run_id)
        if self.deployment_killed.is_set():
            stopped = self._stopped_run_dir(run_id)
            self._bring_back_up()
            run_id = self.submit([*run_config, f'resume="{stopped}"'])
            status = self.wait(run_id)
        return self.collect(run_id, status)

    def restart_site(self, site: Site, node_config: str = "") -> None:
        """Stop a site's SuperNode (it deactivates itself at once) and start it again,
        optionally with extra node config; wait until it is online."""
        self.processes.stop(site.name)
        if node_config:
            self.spec.node_config[site.index] = node_config
        else:
            self.spec.node_config.pop(site.index, None)
        self.start_site(site)
        self.wait_online()

    def up(self) -> None:
        self.hosts.setup()
        if self.spec.bandwidth:
            self.hosts.shape(self.spec.bandwidth)
            self.say(f"every site's link shaped to {self.spec.bandwidth} (tc tbf)")
        if self.spec.measure_links_s > 0:
            self.measure_links()
        if self.spec.links_only:
            return
        self.port = SUPERLINK_PORT if self.hosts.mode == "namespaces" else free_port()
        self.address = f"{self.hosts.hub_address}:{self.port}"
        self.certs = make_server_certificates(
            self.work / "certs", ["localhost", "127.0.0.1", self.hosts.hub_address]
        )
        self.cli = FlwrCli(self.work / "cli", CONNECTION, self.env, self.work / "commands.log")
        self.cli.write_config(self.address, self.certs.ca_cert)
        self.keys = {s.index: make_node_key(self.work / "keys", s.name) for s in self.sites}
        self._start_flower()

    def measure_links(self) -> list[dict[str, Any]]:
        """Every site's link throughput, both ways (`links.json` in the work dir, and
        `lab.json`): what the run's exchanges can get at most."""
        links = []
        for site in self.sites:
            measured = self.hosts.measure_link(site, self.spec.measure_links_s)
            links.append({"site": site.index, "set": self.spec.bandwidth, **measured})
            self.say(
                f"{site.name}'s link: {measured['up_mbit_s']:.1f} Mbit/s up, "
                f"{measured['down_mbit_s']:.1f} Mbit/s down (shaped to "
                f"{self.spec.bandwidth or 'nothing'})"
            )
        self.record["links"] = links
        (self.work / "links.json").write_text(json.dumps(links, indent=1))
        return links

    def _start_flower(self) -> None:
        """The SuperLink, every site's key registered, every SuperNode online."""
        self.start_superlink()
        for site in self.sites:
            if site.index not in self.spec.unregistered:
                self.node_ids[site.index] = self.cli.register(self.keys[site.index].public)
        for site in self.sites:
            self.start_site(site)
        self.wait_online()

    def down(self) -> None:
        self.processes.stop_all()
        if self.own_work_dir:
            shutil.rmtree(self.work, ignore_errors=True)

    @property
    def sites(self) -> list[Site]:
        return self.hosts.sites

    # ------------------------------------------------------------------ hosts

    def start_superlink(self) -> None:
        host = "0.0.0.0" if self.hosts.mode == "namespaces" else "127.0.0.1"
        argv = [
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs.ca_cert),
            "--ssl-certfile", str(self.certs.server_cert),
            "--ssl-keyfile", str(self.certs.server_key),
            "--host", host, "--port", str(self.port),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        home = self.work / "superlink"
        home.mkdir(exist_ok=True)
        self._log_command(argv)
        self.processes.start(
            "superlink",
            self.hosts.command(None, argv),
            {**self.env, "FLWR_HOME": str(home)},
            self.work / "superlink.log",
        )
        self.say(f"SuperLink on https://{self.address} (TLS, SuperNode auth on)")
        self._wait_for(lambda: self._superlink_ready(), 60, "the SuperLink to accept requests")

    def _superlink_ready(self) -> bool:
        if not self.processes.alive("superlink"):
            raise LabError(f"flower-superlink exited:\n{_tail(self.work / 'superlink.log')}")
        try:
            self.cli.node_status()
            return True
        except FlwrCliError:
            return False

    def start_site(self, site: Site) -> None:
        home, state = self.work / site.name / "flwr", self.work / site.name / "state"
        home.mkdir(parents=True, exist_ok=True)
        state.mkdir(parents=True, exist_ok=True)
        node_config = {
            "partition-id": site.index - 1,
            "num-partitions": self.spec.sites,
            "state-dir": str(state),
            "store-host": self.hosts.hub_address,
        }
        # A rehearsed misconfiguration replaces the lab's values (TOML forbids repeats).
        node_config.update(_parsed([self.spec.node_config.get(site.index, "")]))
        argv = [
            "flower-supernode",
            "--superlink", self.address,
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(self.keys[site.index].private),
            "--host", "127.0.0.1", "--port", str(site.clientappio_port),
            "--max-retries", "0",
            "--node-config", _node_config_string(node_config),
        ]  # fmt: skip
        self._log_command(argv)
        env = {**self.env, "FLWR_HOME": str(home), "GLOO_SOCKET_IFNAME": self.hosts.gloo_interface}
        self.processes.start(
            site.name, self.hosts.command(site, argv), env, self.work / f"{site.name}.log"
        )

    def wait_online(self) -> None:
        deadline = time.monotonic() + NODE_ONLINE_TIMEOUT_S
        while True:
            for site in self.sites:
                if not self.processes.alive(site.name):
                    raise LabError(self._site_exit_reason(site))
            status = self.cli.node_status()
            online = [s for s in self.sites if status.get(self.node_ids.get(s.index)) == "online"]
            if len(online) == len(self.sites):
                break
            if time.monotonic() > deadline:
                waiting = [s.name for s in self.sites if s not in online]
                raise LabError(
                    f"SuperNodes of {waiting} did not come online within "
                    f"{NODE_ONLINE_TIMEOUT_S:.0f} s; see their logs in {self.work}"
                )
            time.sleep(1.5)
        self.say(
            f"{len(self.sites)} SuperNodes online ({self.hosts.mode}): "
            + ", ".join(f"{s.name}={s.address} node {self.node_ids[s.index]}" for s in self.sites)
        )

    def _site_exit_reason(self, site: Site) -> str:
        log = _tail(self.work / f"{site.name}.log")
        if site.index in self.spec.unregistered or "412" in log or "not registered" in log:
            return (
                f"{site.name} (partition-id={site.index - 1}): its SuperNode was refused by the "
                f"SuperLink because its public key {self.keys[site.index].public} is not "
                f"registered. Register it first: `flwr supernode register "
                f"{self.keys[site.index].public} {CONNECTION}`.\n{log}"
            )
        return f"{site.name}: flower-supernode exited before the run:\n{log}"

    # ------------------------------------------------------------------ the run

    def submit(self, user_run_config: list[str]) -> int:
        user = _parsed(user_run_config)
        if int(user.get("num-clients", self.spec.sites)) != self.spec.sites:
            raise LabError(
                f"--run-config sets num-clients={user['num-clients']} but the lab has "
                f"--sites {self.spec.sites}: drop num-clients or make them equal"
            )
        # The coordinator runs elsewhere (on the hub): give it the absolute output path.
        self.output_base = Path(str(user.get("output-dir", "outputs"))).resolve()
        self.existing_runs = set(self.output_base.glob("*"))
        run_config = [
            *user_run_config,
            f"num-clients={self.spec.sites}",
            f'output-dir="{self.output_base}"',
        ]
        run_id = self.cli.submit(self.spec.app_dir.resolve(), run_config)
        self.say(
            f"submitted run {run_id}: flwr run {self.spec.app_dir} {CONNECTION} "
            + " ".join(f"--run-config {shlex.quote(rc)}" for rc in run_config)
        )
        self.record["run_config"] = run_config
        self.bytes_before = {s.index: self.hosts.bytes_sent(s) for s in self.sites}
        return run_id

    def wait(self, run_id: int) -> str:
        streamer = self._stream_logs(run_id)
        if self.spec.intruder:
            self._start_intruder(run_id)
        deadline = time.monotonic() + self.spec.timeout_s
        status = ""
        while time.monotonic() < deadline:
            if self.deployment_killed.is_set():
                status = "stopped:deployment killed (--stop-coordinator-at)"
                break
            # Each `flwr ls` is a Python process of its own: poll gently, and at once when
            # the log stream ends (it ends with the run).
            try:
                status = self.cli.run_status(run_id)
            except FlwrCliError:
                # A rehearsed kill can land while `flwr ls` is talking to the SuperLink.
                if self.deployment_killed.is_set():
                    continue
                raise
            if status.startswith("finished"):
                break
            for _ in range(10):
                if not self.processes.alive("log-stream"):
                    break
                time.sleep(0.5)
        else:
            self.cli.run("stop", str(run_id), CONNECTION)
            raise LabError(
                f"run {run_id} did not finish within {self.spec.timeout_s:.0f} s "
                f"(--timeout); last status {status!r}"
            )
        time.sleep(1.5)  # let the log stream drain
        self.processes.stop("log-stream", grace_s=2.0)
        if self.spec.intruder:
            self._stop_intruder()
        streamer.join(timeout=5)
        self.say(f"run {run_id}: {status}")
        return status

    def _stream_logs(self, run_id: int) -> threading.Thread:
        log = self.work / "run.log"
        position = log.stat().st_size if log.exists() else 0
        argv = ["flwr", "log", str(run_id), CONNECTION, "--stream"]
        self._log_command(argv)
        started = self.processes.start(
            "log-stream",
            argv,
            self.cli.env,
            log,
        )
        thread = threading.Thread(target=self._echo, args=(log, started, position), daemon=True)
        thread.start()
        return thread

    def _echo(self, log: Path, started, position: int = 0) -> None:
        """Print the run's own progress lines as they arrive (the coordinator's log), from
        `position` on (the log may hold an earlier run's lines)."""
        while True:
            running = started.popen.poll() is None
            with log.open("rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                if line.strip() and not self.spec.quiet:
                    print(f"  | {line}", flush=True)
                self._inject_faults(line)
            if not running:
                return
            time.sleep(0.5)

    def _start_intruder(self, run_id: int) -> None:
        host = self.hosts.extra_host("intruder", 99)
        self.hosts.flood()  # the intruder's link sees the sites' traffic, as on a hub
        argv = [
            sys.executable, "-m", "deca_flower.lab.intruder_process",
            "--run-log", str(self.work / "run.log"), "--run-id", str(run_id),
            "--store-host", self.hosts.hub_address, "--world", str(self.spec.sites),
            "--out", str(self.work / "intrusions.jsonl"), "--me", host.address,
            "--interface", "eth0",
        ]  # fmt: skip
        self.processes.start(
            "intruder", self.hosts.command(host, argv), self.env, self.work / "intruder.log"
        )
        self.say(
            f"intruder on {host.address}: claims ranks, sends to Gloo ports, eavesdrops on the "
            "bridge (flooding every frame to every port) and replays what it captured"
        )

    def _stop_intruder(self) -> None:
        """Let the intruder write its last record (it stops when the run is done)."""
        popen = self.processes.started["intruder"].popen
        try:
            popen.wait(timeout=30)
        except Exception:  # noqa: BLE001 - still running: stop it
            self.processes.stop("intruder")
        self.record["intruder_returncode"] = popen.returncode
        if popen.returncode != 0:
            self.say(f"the intruder exited with {popen.returncode}; see lab/intruder.log")

    def _report_intrusions(self, out: Path) -> None:
        """The intruder's attempts and what stopped each, as a section of summary.md."""
        from deca_flower.lab.intruder_process import summary_lines
        from deca_flower.reporting import read_metrics

        path, summary = self.work / "intrusions.jsonl", out / "summary.md"
        if not path.exists() or not summary.exists():
            return
        intrusions = [json.loads(line) for line in path.read_text().splitlines() if line]
        security = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "security"]
        lines = summary_lines(intrusions, security)
        with summary.open("a") as f:
            f.write("\n## Intruder (lab)\n\n" + "\n".join(lines) + "\n")

    def _inject_faults(self, line: str) -> None:
        """`kills`: phase p starts when the coordinator reports phase p-1 done (phase 1: when
        it reports the peers' graph, right after the handshake)."""
        stop = self.spec.stop_coordinator_at
        if stop is not None and _phase_starts(line, stop):
            self.spec.stop_coordinator_at = None
            self._kill_deployment(stop)
        for phase, sites in list(self.spec.kills.items()):
            if not _phase_starts(line, phase):
                continue
            del self.spec.kills[phase]
            for index in sites:
                site = self.sites[index - 1]
                self.kill_site(site)
                self.record.setdefault("faults", []).append(
                    {"killed": site.name, "phase": phase, "time": time.time()}
                )
                self.say(
                    f"killed {site.name} (SIGKILL to its process group) as phase {phase} starts"
                )
                if self.spec.restart_after_s is not None:
                    threading.Thread(target=self._restart_later, args=(site,), daemon=True).start()

    def _kill_deployment(self, phase: int) -> None:
        """SIGKILL the SuperLink (and with it the ServerApp, the coordinator) and every
        SuperNode: the whole deployment is lost mid-run, as in a power cut. The event is
        set first, so a status poll that the kill cuts off is not taken for a failure."""
        self.deployment_killed.set()
        for name in ["superlink", *(s.name for s in self.sites)]:
            self.processes.signal(name, signal.SIGKILL)
        self.record.setdefault("faults", []).append(
            {"deployment_killed": True, "phase": phase, "time": time.time()}
        )
        self.say(f"killed the SuperLink and every SuperNode (SIGKILL) as phase {phase} starts")

    def _stopped_run_dir(self, run_id: int) -> Path:
        """The killed run's directory: the coordinator left it `.incomplete`."""
        time.sleep(1.0)
        self.processes.stop("log-stream", grace_s=2.0)
        new = sorted(set(self.output_base.glob("*.incomplete")) - self.existing_runs)
        if not new:
            raise LabError(
                f"run {run_id} was killed before its coordinator wrote a run directory under "
                f"{self.output_base}: nothing to resume (--stop-coordinator-at a later phase)"
            )
        (self.work / "run.log").rename(self.work / f"run-{run_id}-killed.log")
        return new[-1]

    def _bring_back_up(self) -> None:
        """Start the deployment again: a fresh SuperLink (its state was in memory), the same
        keys registered again, every site with its own key and state dir."""
        self.processes.stop_all(grace_s=2.0)
        self.deployment_killed.clear()
        self._start_flower()
        self.record["faults"].append({"deployment_restarted": True, "time": time.time()})
        self.say("the deployment is back up (same keys, same state dirs): resuming the run")

    def _restart_later(self, site: Site) -> None:
        """Start a killed site again with the same key and state dir. Flower refuses it while
        its old session still looks online (up to 60 s after a SIGKILL): wait for offline."""
        time.sleep(self.spec.restart_after_s or 0.0)
        node_id = self.node_ids[site.index]
        while self.cli.node_status().get(node_id) == "online":
            time.sleep(2.0)
        self.start_site(site)
        self.record.setdefault("faults", []).append({"restarted": site.name, "time": time.time()})
        self.say(f"restarted {site.name} (same key, same state dir)")

    def collect(self, run_id: int, status: str) -> Path:
        self.record.update(
            run_id=run_id,
            status=status,
            node_ids={str(i): n for i, n in self.node_ids.items()},
            site_addresses={s.name: s.address for s in self.sites},
            interface_bytes_sent=self._bytes_sent(),
            commands=(self.work / "commands.log").read_text().splitlines(),
        )
        out = self._run_dir(run_id, status)
        lab_dir = out / "lab"
        lab_dir.mkdir(parents=True, exist_ok=True)
        for log in [*self.work.glob("*.log"), *self.work.glob("intrusions.jsonl")]:
            shutil.copy(log, lab_dir / log.name)
        (lab_dir / "lab.json").write_text(json.dumps(self.record, indent=2))
        if self.spec.intruder:
            self._report_intrusions(out)
        if status != "finished:completed":
            raise LabError(
                f"run {run_id} ended {status}; outputs and logs in {out}\n"
                f"{_coordinator_error(self.work / 'run.log')}"
            )
        return out

    def _bytes_sent(self) -> dict[str, int] | None:
        if self.hosts.mode != "namespaces":
            return None
        return {s.name: self.hosts.bytes_sent(s) - self.bytes_before[s.index] for s in self.sites}

    def _run_dir(self, run_id: int, status: str) -> Path:
        """The directory this run's coordinator wrote (finished or `.incomplete`)."""
        new = sorted(set(self.output_base.glob("*")) - self.existing_runs)
        if new:
            return new[-1]
        fallback = self.output_base / f"lab-run-{run_id}-{status.replace(':', '-')}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback

    # ------------------------------------------------------------------ helpers

    def kill_site(self, site: Site, sig: int = signal.SIGKILL) -> None:
        self.processes.signal(site.name, sig)

    def say(self, line: str) -> None:
        if not self.spec.quiet:
            print(f"[lab] {line}", flush=True)

    def _log_command(self, argv: list[str]) -> None:
        log_command(self.work / "commands.log", argv)

    @staticmethod
    def _wait_for(ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise LabError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            time.sleep(0.3)


def _phase_starts(line: str, phase: int) -> bool:
    """Phase p (1-based) starts when the coordinator reports phase p-1 done (phase 1: when it
    reports the peers' graph, right after the handshake)."""
    return f"phase {phase - 1}/" in line if phase > 1 else "peers on a" in line


def _base_env() -> dict[str, str]:
    """What every lab process inherits: this venv first on PATH, offline, one thread."""
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "TOKENIZERS_PARALLELISM": "false",
    }


def _parsed(run_config: list[str]) -> dict[str, Any]:
    from flwr.common.config import parse_config_args

    run_config = [rc for rc in run_config if rc.strip()]
    return parse_config_args(run_config) if run_config else {}


def _node_config_string(values: dict[str, Any]) -> str:
    """`key=value` pairs as `--node-config` parses them (TOML values: strings quoted)."""
    return " ".join(
        f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}" for k, v in values.items()
    )


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _coordinator_error(run_log: Path) -> str:
    """The coordinator's own error from the run's log (what to fix), else the log's tail."""
    text = run_log.read_text(errors="replace") if run_log.exists() else ""
    at = text.rfind("CoordinatorError:")
    if at < 0:
        return _tail(run_log, 40)
    return "\n".join(text[at:].splitlines()[:80])
