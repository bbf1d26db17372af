"""The lab's intruder: a process on a host of the lab that is not a member of the run.

It follows the run's log (as an attacker would follow the schedule: group names are
predictable) and, for every training phase and evaluation group, tries to
- join the gossip store and claim a rank (a forged claim, row of W and Gloo address);
- connect to the members' Gloo ports and send them a block of bytes;
- replay captured payloads: (a) a member's authenticated store entries (claim, row of W)
  from the group before, copied into the next group before that member joins it; (b) the
  largest TCP payload it captured between two sites in an earlier group (sealed block
  bytes: the lab's bridge floods every frame to every port, so the intruder's link sees the
  sites' Gloo traffic), sent to the receiving site's Gloo port in the later group.
Each attempt is a line of `--out` (JSONL), and at the end one line says what it
eavesdropped. The members' rejections come back to the coordinator as
`{"type": "security"}` records in the run's metrics.jsonl; :func:`summary_lines` says what
each attempt met, for the lab's summary.md.

    python -m deca_flower.lab.intruder_process --run-log run.log --run-id 7 \\
        --store-host 10.99.0.1 --world 3 --out intrusions.jsonl --me 10.99.0.99
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from deca_flower.intruder import (
    WireSniffer,
    claim_rank,
    gloo_addresses,
    replay_store_entries,
    send_raw,
)

_PORT = re.compile(r"gossip store on port (\d+)")
_DONE = re.compile(r"phase (\d+)/(\d+)")
REPLAY = "replay a captured payload"


class Intruder:
    """One pass over the run's groups; ``stages`` are the groups in the order they started."""

    def __init__(self, args: argparse.Namespace, port: int) -> None:
        self.args, self.port = args, port
        self.out = args.out.open("a")
        self.stages: list[str] = []
        self.tried: set[Any] = set()
        self.victim = args.world - 1  # whose store entries are replayed (rank 0 is forged)
        self.sniffer = self._sniffer()

    def record(self, attempt: dict[str, Any]) -> None:
        self.out.write(json.dumps({**attempt, "from": self.args.me}) + "\n")
        self.out.flush()

    def _sniffer(self) -> WireSniffer | None:
        try:
            ignore = {self.args.store_host, self.args.me}
            return WireSniffer(self.args.interface, ignore).start()
        except OSError as err:  # no AF_PACKET (not root, no such interface): say so, go on
            self.record(_failed("eavesdrop on the links between sites", err))
            return None

    def group(self, tag: str) -> str:
        return f"run{self.args.run_id}/{tag}"

    def poll(self, text: str) -> None:
        done = [(int(m.group(1)), int(m.group(2))) for m in _DONE.finditer(text)]
        d, total = max(done, default=(0, 0))
        # The groups that come next (deployment: one phase per round, eval<t> after round t).
        tags = [f"phase{d}/epoch0/attempt0"] if not total or d < total else []
        tags += [f"eval{e}" for e in (d, d + 1) if 1 <= e <= (total or e)]
        for group in map(self.group, tags):
            self._before_join(group)
            self._maybe_started(group)
        if self.stages:
            self._at_gloo_ports(self.stages[-1])

    def _before_join(self, group: str) -> None:
        """Forge a claim, and replay the previous group's entries, before members join."""
        if group in self.stages:
            return
        if (group, "claim") not in self.tried:
            self.tried.add((group, "claim"))
            host, world = self.args.store_host, self.args.world
            self.record(_safely(claim_rank, host, self.port, group, 0, world))
        if self.stages and (group, "replay") not in self.tried:
            attempt = _safely(
                replay_store_entries,
                self.args.store_host, self.port, self.stages[-1], group, self.victim,
            )  # fmt: skip
            if attempt.get("captured") or "error" in attempt:
                self.tried.add((group, "replay"))
                self.record(attempt)

    def _maybe_started(self, group: str) -> None:
        if group not in self.stages and self._addresses(group, members_only=True):
            self.stages.append(group)
            if self.sniffer is not None:
                self.sniffer.stage = len(self.stages) - 1

    def _addresses(self, group: str, members_only: bool = False) -> dict[int, tuple[str, int]]:
        try:
            found = gloo_addresses(self.args.store_host, self.port, group, self.args.world, 2)
        except Exception:  # noqa: BLE001 - the group may not exist yet
            return {}
        return {r: a for r, a in found.items() if r != 0} if members_only else found

    def _at_gloo_ports(self, group: str) -> None:
        """Raw bytes to every member's Gloo port, then a captured payload of an earlier group."""
        stage = self.stages.index(group)
        for rank, (host, gloo_port) in self._addresses(group).items():
            if (group, rank) in self.tried:
                continue
            self.tried.add((group, rank))
            self.record(send_raw(host, gloo_port, os.urandom(4096), group=group, rank=rank))
            segment = self.sniffer.pick(host, stage) if self.sniffer else None
            if segment is not None:
                self.record(
                    send_raw(
                        host, gloo_port, segment.payload, what=REPLAY, group=group, rank=rank,
                        content="sealed block bytes captured on the wire between two sites",
                        captured=segment.flow, captured_in=self.stages[segment.stage],
                    )
                )  # fmt: skip

    def close(self) -> None:
        if self.sniffer is not None:
            self.sniffer.stop()
            flows = self.sniffer.flows()
            self.record(
                {
                    "type": "intrusion",
                    "what": "eavesdrop on the links between sites",
                    "target": self.args.interface,
                    "bytes": self.sniffer.bytes,
                    "flows": flows,
                }
            )
        self.out.close()


def follow(args: argparse.Namespace) -> None:
    # Stopped by the lab: still write the last record (what it eavesdropped).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    deadline = time.monotonic() + args.timeout
    intruder = None
    try:
        while time.monotonic() < deadline:
            text = args.run_log.read_text(errors="replace") if args.run_log.exists() else ""
            if "done:" in text or "CoordinatorError" in text:
                return  # the store is gone with the run: polling it would only time out
            if intruder is None and (m := _PORT.search(text)):
                intruder = Intruder(args, int(m.group(1)))
            if intruder is not None:
                intruder.poll(text)
            time.sleep(0.3)
    finally:
        if intruder is not None:
            intruder.close()


def _failed(what: str, err: BaseException) -> dict[str, Any]:
    return {"type": "intrusion", "what": what, "error": f"{type(err).__name__}: {err}"}


def _safely(fn, *args) -> dict:
    try:
        return fn(*args, timeout_s=5)
    except Exception as err:  # noqa: BLE001 - an attempt that fails is still an attempt
        return _failed(fn.__name__, err)


def summary_lines(intrusions: list[dict[str, Any]], security: list[dict[str, Any]]) -> list[str]:
    """One line per attempt of the intruder: what it tried and what stopped it.

    ``security`` are the run's ``{"type": "security"}`` records (the members' rejections).
    """
    rejected = {r.get("key") for r in security}
    lines = []
    for i in intrusions:
        what, target = i.get("what"), i.get("target", "")
        if "bytes" in i and what != "eavesdrop on the links between sites":
            lines.append(_gloo_line(i))
        elif "error" in i:
            lines.append(f"- {what} {target}: failed ({i['error']})")
        elif what == "claim rank":
            hits = [k for k in i["keys"] if k in rejected]
            lines.append(
                f"- claim rank {target}: {len(i['keys'])} forged store values, "
                f"{len(hits)} read and rejected by members (store-hmac), all replaced by the "
                "members' own"
            )
        elif what == REPLAY and "written" in i:
            hits = [k for k in i["written"] if k in rejected]
            lines.append(
                f"- replay of a member's store entries into {target}: {len(i['written'])} of "
                f"{len(i['captured'])} written before the member, {len(hits)} read and rejected "
                "by members (store-hmac)"
            )
        elif what == "eavesdrop on the links between sites":
            lines.append(
                f"- eavesdropped {i['bytes']:,} payload bytes on {len(i['flows'])} site-to-site "
                f"TCP flows ({target})"
            )
    return lines


def _gloo_line(i: dict[str, Any]) -> str:
    """Bytes sent to a Gloo port: Gloo pairs only the connections of its own rendezvous."""
    if not i.get("connected"):
        outcome = f"refused ({i.get('error', 'no connection')})"
    else:
        outcome = "closed by the peer" if i.get("peer_closed") else "accepted, never paired"
    source = f" (captured on {i['captured']} in {i['captured_in']})" if "captured_in" in i else ""
    return f"- {i['what']}: {i['bytes']:,} bytes{source} to {i['target']}: {outcome}"


def main() -> None:
    parser = argparse.ArgumentParser(description="the lab's intruder")
    parser.add_argument("--run-log", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store-host", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--me", default="intruder")
    parser.add_argument("--interface", default="eth0", help="where to capture (AF_PACKET)")
    parser.add_argument("--timeout", type=float, default=3600)
    follow(parser.parse_args())


if __name__ == "__main__":
    main()
