"""The lab's intruder: a process on a host of the lab that is not a member of the run.

It follows the run's log (as an attacker would follow the schedule: group names are
predictable) and, for every phase and evaluation group, tries to
- join the gossip store and claim a rank (a forged claim, row of W and Gloo address);
- connect to the members' Gloo ports and send them a block of bytes.
Each attempt is a line of `--out` (JSONL). The members' rejections come back to the
coordinator as `{"type": "security"}` records in the run's metrics.jsonl.

    python -m deca_flower.lab.intruder_process --run-log run.log --run-id 7 \\
        --store-host 10.99.0.1 --world 3 --out intrusions.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from deca_flower.intruder import claim_rank, gloo_addresses, send_raw

_PORT = re.compile(r"gossip store on port (\d+)")
_DONE = re.compile(r"phase (\d+)/(\d+)")


def follow(args: argparse.Namespace) -> None:
    out = args.out.open("a")

    def record(attempt: dict) -> None:
        out.write(json.dumps({**attempt, "from": args.me}) + "\n")
        out.flush()

    port, tried = None, set()
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        text = args.run_log.read_text(errors="replace") if args.run_log.exists() else ""
        if port is None and (m := _PORT.search(text)):
            port = int(m.group(1))
        if port is None:
            time.sleep(0.2)
            continue
        done = [int(m.group(1)) for m in _DONE.finditer(text)]
        upcoming = [f"phase{max(done, default=0)}/epoch0/attempt0", "eval0", "eval1"]
        for tag in upcoming:
            group = f"run{args.run_id}/{tag}"
            if group not in tried:  # claim before the members join
                tried.add(group)
                record(_safely(claim_rank, args.store_host, port, group, 0, args.world))
        current = f"run{args.run_id}/phase{max(done, default=0)}/epoch0/attempt0"
        for rank, (host, gloo_port) in _safely_dict(
            gloo_addresses, args.store_host, port, current, args.world
        ).items():
            if (current, rank) not in tried:
                tried.add((current, rank))
                record(send_raw(host, gloo_port, os.urandom(4096)))
        if "done:" in text or "CoordinatorError" in text:
            return
        time.sleep(0.5)


def _safely(fn, *args) -> dict:
    try:
        return fn(*args, timeout_s=5)
    except Exception as err:  # noqa: BLE001 - an attempt that fails is still an attempt
        return {"type": "intrusion", "what": fn.__name__, "error": f"{type(err).__name__}: {err}"}


def _safely_dict(fn, *args) -> dict:
    try:
        return fn(*args, timeout_s=5)
    except Exception:  # noqa: BLE001 - the group may not exist yet
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description="the lab's intruder")
    parser.add_argument("--run-log", type=Path, required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--store-host", required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--me", default="intruder")
    parser.add_argument("--timeout", type=float, default=3600)
    follow(parser.parse_args())


if __name__ == "__main__":
    main()
