"""Command line: `deca-flower engine [group=preset ...] [key.path=value ...]`.

    deca-flower engine                              # embedded default, in-process
    deca-flower engine model=tiny topology=ring train.rounds=2
    deca-flower presets                             # list the presets of each group
    deca-flower lab --sites 3 --run-config 'preset-model="tiny"'   # rehearse a deployment
    deca-flower split-by-column FILE COLUMN OUTDIR  # one data file per site (docs/data.md)

Arguments `model=`, `data=`, `topology=` and `algorithm=` pick presets from
`conf/`; every other `key=value` overrides a config key (dotted path).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from deca_flower.config import PRESET_GROUPS, ConfigError, available_presets, load_config
from deca_flower.lab.main import add_arguments as add_lab_arguments
from deca_flower.lab.main import lab_main


def split_args(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    presets, overrides = {}, []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value")
        key, value = arg.split("=", 1)
        if key in PRESET_GROUPS:
            presets[key] = value
        else:
            overrides.append(arg)
    return presets, overrides


def engine_main(argv: Sequence[str] | None = None) -> None:
    from deca_flower.engine import run_engine

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        presets, overrides = split_args(args)
        cfg = load_config(presets, overrides)
    except ConfigError as err:
        raise SystemExit(f"config error: {err}") from None
    run_engine(cfg)


def split_main(file: str, column: str, out_dir: str) -> None:
    from deca_flower.data import DataError
    from deca_flower.site_files import split_by_column

    try:
        written = split_by_column(file, column, out_dir)
    except DataError as err:
        raise SystemExit(f"error: {err}") from None
    for rank, (site, path) in enumerate(written.items()):
        print(f"client {rank}: {column}={site!r} -> {path}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="deca-flower",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    engine = sub.add_parser("engine", help="run DECA in-process (n virtual clients)")
    engine.add_argument("settings", nargs="*", help="group=preset or key.path=value")
    sub.add_parser("presets", help="list the available presets")
    lab = sub.add_parser("lab", help="rehearse a deployment (SuperLink + N SuperNodes) here")
    add_lab_arguments(lab)
    split = sub.add_parser("split-by-column", help="one data file per distinct column value")
    split.add_argument("file", help="a CSV/JSONL/JSON/parquet file")
    split.add_argument("column", help="the site column, e.g. hospital")
    split.add_argument("out_dir", help="folder for <value>.<ext> files")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "lab":
        raise SystemExit(lab_main(args, argv[1:]))
    if args.command == "split-by-column":
        split_main(args.file, args.column, args.out_dir)
        return
    if args.command == "presets":
        for group in PRESET_GROUPS:
            print(f"{group}: {', '.join(available_presets(group))}")
        return
    engine_main(args.settings)


if __name__ == "__main__":
    main()
