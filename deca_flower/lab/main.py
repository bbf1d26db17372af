"""`deca-flower lab`: the command line of the deployment lab."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from deca_flower.lab.deployment import Lab, LabError, LabSpec
from deca_flower.lab.hosts import (
    INSIDE_ENV,
    LabHostError,
    namespace_support,
    reexec_in_private_namespace,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sites", type=int, default=3, help="number of sites (SuperNodes)")
    parser.add_argument(
        "--run-config",
        action="append",
        default=[],
        help="passed to `flwr run` unchanged (repeatable), e.g. 'preset-model=\"tiny\"'",
    )
    parser.add_argument(
        "--loopback", action="store_true", help="all sites on 127.0.0.1, no namespaces"
    )
    parser.add_argument("--app", type=Path, default=Path.cwd(), help="the app directory")
    parser.add_argument("--work-dir", type=Path, help="keep the lab's files here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the run")
    parser.add_argument("--bandwidth", help="shape every site's link, e.g. 100mbit (tc tbf)")
    parser.add_argument(
        "--measure-links",
        type=float,
        default=None,
        metavar="SECONDS",
        help="measure every site's link both ways before the run (default: 3 s when "
        "--bandwidth is set, else not)",
    )
    parser.add_argument(
        "--links-only",
        action="store_true",
        help="set up the hosts (and --bandwidth), measure the links, print links.json, stop",
    )
    parser.add_argument(
        "--kill",
        action="append",
        default=[],
        metavar="SITE@PHASE",
        help="SIGKILL site SITE (1-based) as phase PHASE (1-based) starts: rehearse a lost site",
    )
    parser.add_argument(
        "--restart-after",
        type=float,
        metavar="SECONDS",
        help="start a killed site again after SECONDS (same key and state dir)",
    )
    parser.add_argument(
        "--stop-coordinator-at",
        type=int,
        metavar="PHASE",
        help="SIGKILL the whole deployment (SuperLink with the coordinator, every SuperNode) as "
        "phase PHASE (1-based) starts, bring it back up and resume the run from its directory",
    )
    parser.add_argument(
        "--intruder",
        action="store_true",
        help="add a host that is not a member and attacks the data plane during the run",
    )
    parser.add_argument(
        "--site-config",
        action="append",
        default=[],
        metavar="SITE=NODE_CONFIG",
        help="extra --node-config for one site (1-based), e.g. 2='data-path=\"/x.csv\"': "
        "rehearse a misconfigured site",
    )


def lab_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    import os

    if not args.loopback and os.environ.get(INSIDE_ENV) != "1":
        ok, reason = namespace_support()
        if ok:
            print(f"[lab] mode: namespaces, every site its own host ({reason})", flush=True)
            return reexec_in_private_namespace(
                [sys.executable, "-m", "deca_flower.cli", "lab", *argv]
            )
        print(f"[lab] mode: loopback, distinct ports ({reason})", flush=True)
        args.loopback = True
    elif args.loopback:
        print("[lab] mode: loopback, distinct ports (--loopback)", flush=True)
    spec = LabSpec(
        sites=args.sites,
        run_config=args.run_config,
        loopback=args.loopback,
        app_dir=args.app,
        work_dir=args.work_dir,
        timeout_s=args.timeout,
        bandwidth=args.bandwidth,
        node_config=_site_configs(args.site_config),
        kills=_kills(args.kill),
        restart_after_s=args.restart_after,
        stop_coordinator_at=args.stop_coordinator_at,
        intruder=args.intruder,
        measure_links_s=_measure_links_s(args),
        links_only=args.links_only,
    )
    try:
        out = Lab(spec).run()
    except (LabError, LabHostError) as err:
        print(f"lab error: {err}", file=sys.stderr, flush=True)
        return 1
    print(out, flush=True)
    return 0


def _measure_links_s(args: argparse.Namespace) -> float:
    if args.measure_links is not None:
        return args.measure_links
    return 3.0 if args.bandwidth or args.links_only else 0.0


def _site_configs(items: list[str]) -> dict[int, str]:
    out = {}
    for item in items:
        site, sep, config = item.partition("=")
        if not sep or not site.isdigit():
            raise SystemExit(f"--site-config {item!r}: expected SITE=NODE_CONFIG, e.g. 2='a=1'")
        out[int(site)] = config
    return out


def _kills(items: list[str]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for item in items:
        site, sep, phase = item.partition("@")
        if not sep or not site.isdigit() or not phase.isdigit() or int(phase) < 1:
            raise SystemExit(f"--kill {item!r}: expected SITE@PHASE, e.g. 3@2 (both 1-based)")
        out.setdefault(int(phase), []).append(int(site))
    return out
