"""One data file per site from a column: rehearse a deployment's natural split in the lab.

    deca-flower split-by-column reviews.csv hospital sites/
    # -> sites/<value>.csv for every distinct value of `hospital`, in file order

Each deployed SuperNode then reads its own file (`--node-config data-path=...`),
exactly as `data.partitioner=natural data.partition_by=hospital` splits the
pooled file in simulation (client i = the i-th value in sorted order).
"""

from __future__ import annotations

import re
from pathlib import Path

from deca_flower.data import DataError, _load_local, _resolve_local_file

_WRITERS = {".csv": "to_csv", ".json": "to_json", ".jsonl": "to_json", ".parquet": "to_parquet"}


def site_file_name(value: str) -> str:
    """A file-system-safe stem for a site value (`St. Mary's/ICU` -> `St._Mary_s_ICU`)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._")
    return stem or "site"


def split_by_column(file: str | Path, column: str, out_dir: str | Path) -> dict[str, Path]:
    """Write `<out_dir>/<value><ext>` per distinct `column` value; rows keep their order.

    Returns {site value: file}, sorted by value (the natural split's client order).
    """
    source = _resolve_local_file(str(file), "train")
    ds = _load_local(str(file), "train")
    if column not in ds.column_names:
        raise DataError(f"column {column!r} not found in {source}; it has {ds.column_names}")
    values = ["" if v is None else str(v) for v in ds[column]]
    sites = sorted(set(values))
    stems = [site_file_name(site) for site in sites]
    if len(set(stems)) != len(stems):
        raise DataError(f"site values {sites} map to clashing file names {stems}; rename them")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = source.suffix.lower()
    written: dict[str, Path] = {}
    for site, stem in zip(sites, stems, strict=True):
        rows = ds.select([i for i, v in enumerate(values) if v == site])
        target = out / f"{stem}{suffix}"
        kwargs = {"lines": True} if suffix in (".json", ".jsonl") else {}
        getattr(rows, _WRITERS[suffix])(str(target), **kwargs)
        written[site] = target
    return written
