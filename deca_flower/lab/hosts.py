"""Where the lab's sites live: separate network namespaces on a private bridge, or loopback.

Namespace mode (root, and namespaces can be made): the whole lab runs inside a private
net + mount + PID namespace (`unshare`), so nothing it makes is visible on the host and
everything it made disappears when it exits, even when it is killed. In there, the hub
(SuperLink and coordinator) owns the bridge address 10.99.0.1 and every site gets its own
network namespace `site<i>` with one veth `eth0` at 10.99.0.<10+i>. Traffic never leaves
namespaces the lab made itself.

Loopback mode: every process on 127.0.0.1, each SuperNode on its own ports.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

from deca_flower.lab import link_probe

BRIDGE = "deca-br0"
SUBNET = "10.99.0"
HUB_ADDRESS = f"{SUBNET}.1"
INSIDE_ENV = "DECA_LAB_INSIDE_NAMESPACE"


class LabHostError(RuntimeError):
    pass


def namespace_support() -> tuple[bool, str]:
    """Whether this process may build private namespaces, and why not if it may not."""
    if os.geteuid() != 0:
        return False, "not running as root (network namespaces need CAP_NET_ADMIN)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` is not installed"
    probe = subprocess.run(
        ["unshare", "--net", "--mount", "--pid", "--fork", "true"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return False, f"`unshare --net --mount --pid` failed: {probe.stderr.strip()}"
    return True, "running as root and namespaces can be made"


def reexec_in_private_namespace(argv: list[str]) -> int:
    """Run `argv` (the lab itself) as PID 1 of a fresh net + mount + PID namespace.

    When that process ends, the kernel kills everything left in its PID namespace and the
    network namespace goes with it: teardown holds even if the lab is SIGKILLed.
    """
    cmd = [
        "unshare", "--net", "--mount", "--pid", "--fork", "--kill-child",
        "--propagation", "private", *argv,
    ]  # fmt: skip
    return subprocess.call(cmd, env={**os.environ, INSIDE_ENV: "1"})


@dataclass
class Site:
    index: int  # 1-based, as in site1, site2, ...
    address: str  # the address its peers and the hub see
    netns: str | None  # network namespace name, None on loopback
    clientappio_port: int  # the SuperNode's local ClientAppIo port

    @property
    def name(self) -> str:
        return f"site{self.index}"


class Hosts:
    """The lab's machines: one hub and N sites."""

    mode: str
    hub_address: str
    gloo_interface: str

    def __init__(self, num_sites: int) -> None:
        self.sites: list[Site] = []
        self.num_sites = num_sites

    def command(self, site: Site | None, argv: list[str]) -> list[str]:
        """argv as run on `site` (None = the hub)."""
        return argv

    def setup(self) -> None:
        pass

    def shape(self, rate: str) -> None:
        raise LabHostError(
            f"--bandwidth {rate} needs namespace mode (each site's own link to shape); the "
            "lab runs on loopback here. Run it as root, without --loopback."
        )

    def bytes_sent(self, site: Site) -> int | None:
        return None

    def measure_link(self, site: Site, seconds: float) -> dict[str, float]:
        raise LabHostError(
            "measuring a site's link needs namespace mode (the link to measure); the lab "
            "runs on loopback here. Run it as root, without --loopback."
        )

    def flood(self) -> None:
        pass  # loopback: nothing to tap

    def extra_host(self, name: str, index: int) -> Site:
        raise LabHostError(
            f"the lab's {name} needs a host of its own (namespace mode); the lab runs on "
            "loopback here. Run it as root, without --loopback."
        )


class LoopbackHosts(Hosts):
    mode = "loopback"
    hub_address = "127.0.0.1"
    gloo_interface = "lo"

    def setup(self) -> None:
        self.sites = [Site(i, "127.0.0.1", None, free_port()) for i in range(1, self.num_sites + 1)]


class NamespaceHosts(Hosts):
    mode = "namespaces"
    hub_address = HUB_ADDRESS
    gloo_interface = "eth0"

    def setup(self) -> None:
        if os.environ.get(INSIDE_ENV) != "1":
            raise LabHostError("namespace mode must run inside reexec_in_private_namespace()")
        # `ip netns` keeps its handles under /run/netns: a private tmpfs keeps them ours.
        _run(["mount", "-t", "tmpfs", "tmpfs", "/run"])
        _run(["ip", "link", "set", "lo", "up"])
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{HUB_ADDRESS}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for i in range(1, self.num_sites + 1):
            site = Site(i, f"{SUBNET}.{10 + i}", f"site{i}", 9094)
            self._add_site(site)
            self.sites.append(site)

    def extra_host(self, name: str, index: int) -> Site:
        """A host on the lab's bridge that is not a site (e.g. the intruder)."""
        host = Site(index, f"{SUBNET}.{index}", name, 0)
        self._add_site(host)
        return host

    def flood(self) -> None:
        """Make the bridge forward every frame to every port, as a hub (or a switch's mirror
        port) does: a host on it then sees the sites' traffic to each other."""
        _run(["ip", "link", "set", BRIDGE, "type", "bridge", "ageing_time", "0"])

    def _add_site(self, site: Site) -> None:
        ns, veth = site.netns, _veth(site)
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
        _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{site.address}/24", "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        # The SuperNode and its ClientApps talk over the site's own 127.0.0.1.
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])

    def command(self, site: Site | None, argv: list[str]) -> list[str]:
        return argv if site is None else ["ip", "netns", "exec", site.netns, *argv]

    def shape(self, rate: str) -> None:
        """Token-bucket-shape both directions of every site's link to `rate` (tc tbf)."""
        for site in self.sites:
            tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
            _run(["ip", "netns", "exec", site.netns, "tc", "qdisc", "add", "dev", "eth0",
                  "root", *tbf])  # fmt: skip
            _run(["tc", "qdisc", "add", "dev", _veth(site), "root", *tbf])

    def measure_link(self, site: Site, seconds: float) -> dict[str, float]:
        """TCP throughput of the site's link, both ways (Mbit/s, `link_probe`)."""
        return {
            "up_mbit_s": self._upload(site, seconds),
            "down_mbit_s": self._download(site, seconds),
        }

    def _upload(self, site: Site, seconds: float) -> float:
        """The site sends, the hub counts."""
        server = link_probe.listen(HUB_ADDRESS, 0)
        port = server.getsockname()[1]
        result: dict[str, float] = {}
        counter = threading.Thread(target=lambda: result.update(link_probe.sink(server)))
        counter.start()
        probe = [sys.executable, "-m", "deca_flower.lab.link_probe", "send", HUB_ADDRESS]
        _run(self.command(site, [*probe, str(port), str(seconds)]))
        counter.join(timeout=60)
        return _mbit_s(result)

    def _download(self, site: Site, seconds: float) -> float:
        """The hub sends, the site counts."""
        port = 9095
        probe = [sys.executable, "-m", "deca_flower.lab.link_probe", "sink", site.address]
        with subprocess.Popen(
            self.command(site, [*probe, str(port)]), stdout=subprocess.PIPE, text=True
        ) as sinker:
            assert sinker.stdout is not None
            if sinker.stdout.readline().strip() != "listening":
                raise LabHostError(f"{site.name}: the link probe's sink did not start")
            link_probe.send(site.address, port, seconds)
            result = json.loads(sinker.stdout.readline())
        return _mbit_s(result)

    def bytes_sent(self, site: Site) -> int:
        """Bytes the site put on its link: what the hub side of its veth received."""
        # Not /sys/class/net: that sysfs belongs to the host's namespace, not the lab's.
        out = subprocess.run(
            ["ip", "-s", "-j", "link", "show", _veth(site)], capture_output=True, text=True
        )
        return int(json.loads(out.stdout)[0]["stats64"]["rx"]["bytes"])


def make_hosts(num_sites: int, loopback: bool) -> Hosts:
    return (LoopbackHosts if loopback else NamespaceHosts)(num_sites)


def _mbit_s(result: dict[str, float]) -> float:
    if not result.get("seconds"):
        raise LabHostError(f"the link probe measured nothing: {result}")
    return result["bytes"] * 8 / result["seconds"] / 1e6


def _veth(site: Site) -> str:
    return f"veth{site.index}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise LabHostError(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
