"""Simulated client splits: `data.partitioner` -> one of Flower Datasets' partitioners.

Each entry is a thin mapping of our `data.*` keys onto a `flwr_datasets.partitioner`
class; the sampling is theirs. What we add is the same contract for all of them:
seeded (partitioners without a seed see the rows in a seeded random order),
checked (disjoint and, where the partitioner promises it, covering), and errors
that name the setting to change. `dirichlet` is built exactly as before this
module existed (unshuffled input, the seed passed through), so default runs are
bit-for-bit unchanged.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

from deca_flower.data import GROUP, LABEL, DataError, dirichlet_partition


@dataclass(frozen=True)
class SplitSettings:
    """The `data.*` keys a partitioner reads (see conf/base.yaml and docs/data.md)."""

    name: str = "dirichlet"
    alpha: float = 0.5
    min_partition_size: int = 10
    partition_by: str | None = None
    classes_per_client: int = 2
    class_assignment: str = "random"
    shards_per_client: int = 2
    shard_size: int | None = None

    @classmethod
    def from_config(cls, data: Any, labelled: bool = True) -> SplitSettings:
        """`data.partitioner=null` is the task kind's default: label skew where there are labels."""
        return cls(
            name=data.partitioner or ("dirichlet" if labelled else "iid"),
            alpha=data.alpha,
            min_partition_size=data.min_partition_size,
            partition_by=data.partition_by,
            classes_per_client=data.classes_per_client,
            class_assignment=data.class_assignment,
            shards_per_client=data.shards_per_client,
            shard_size=data.shard_size,
        )


Builder = Callable[[int, SplitSettings, int, datasets.Dataset], Any]


@dataclass(frozen=True)
class PartitionerKind:
    build: Builder | None  # (num_clients, settings, seed, dataset) -> a flwr-datasets partitioner
    needs_labels: bool  # label-skew partitioners cannot split instruction data
    covering: bool  # every row lands in some client (shard/pathological may drop rows)
    shuffle: bool  # no seed of its own: shuffle the rows with ours first


def _iid(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets.partitioner import IidPartitioner

    return IidPartitioner(num_partitions=n)


def _pathological(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets.partitioner import PathologicalPartitioner

    return PathologicalPartitioner(
        num_partitions=n,
        partition_by=LABEL,
        num_classes_per_partition=s.classes_per_client,
        class_assignment_mode=s.class_assignment,
        seed=seed,
    )


def _shard(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets.partitioner import ShardPartitioner

    # Without data.shard_size the shards are sized to use every row (keep the last, short one).
    return ShardPartitioner(
        num_partitions=n,
        partition_by=LABEL,
        num_shards_per_partition=s.shards_per_client,
        shard_size=s.shard_size,
        keep_incomplete_shard=s.shard_size is None,
        seed=seed,
    )


def _natural(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets.partitioner import NaturalIdPartitioner

    return NaturalIdPartitioner(partition_by=GROUP)


def _size(kind: str) -> Builder:
    def build(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
        from flwr_datasets import partitioner

        return getattr(partitioner, kind)(num_partitions=n)

    return build


def _inner_dirichlet(n: int, s: SplitSettings, seed: int, ds: datasets.Dataset) -> Any:
    from flwr_datasets.partitioner import InnerDirichletPartitioner

    # Equal sizes (the first len % n clients get one more); the label mix is Dirichlet(alpha).
    sizes = [len(part) for part in np.array_split(np.arange(len(ds)), n)]
    return InnerDirichletPartitioner(
        partition_sizes=sizes, partition_by=LABEL, alpha=s.alpha, seed=seed
    )


# name: (builder, needs labels, covering, shuffle first). dirichlet has no builder here:
# data.dirichlet_partition builds it, as it always did.
PARTITIONERS: dict[str, PartitionerKind] = {
    name: PartitionerKind(*row)
    for name, row in {
        "iid": (_iid, False, True, True),
        "dirichlet": (None, True, True, False),
        "pathological": (_pathological, True, False, False),
        "shard": (_shard, True, False, False),
        "natural": (_natural, False, True, False),
        "linear": (_size("LinearPartitioner"), False, True, True),
        "square": (_size("SquarePartitioner"), False, True, True),
        "exponential": (_size("ExponentialPartitioner"), False, True, True),
        "inner-dirichlet": (_inner_dirichlet, True, True, False),
    }.items()
}
LABEL_FREE = tuple(name for name, kind in PARTITIONERS.items() if not kind.needs_labels)
CLASS_ASSIGNMENTS = ("random", "deterministic", "first-deterministic")


def partition_dataset(
    ds: datasets.Dataset, num_clients: int, settings: SplitSettings, seed: int
) -> list[datasets.Dataset]:
    """`num_clients` disjoint shards of `ds` by the configured partitioner."""
    kind = PARTITIONERS[settings.name]
    if kind.needs_labels and LABEL not in ds.column_names:
        raise DataError(
            f"data.partitioner={settings.name} splits by label, and instruction data has none; "
            f"use one of {list(LABEL_FREE)}"
        )
    if num_clients > len(ds):
        raise DataError(f"num_clients={num_clients} is more than the {len(ds)} examples")
    if settings.name == "dirichlet":  # the pre-existing path, unchanged
        return dirichlet_partition(
            ds, num_clients, settings.alpha, seed, LABEL, settings.min_partition_size
        )
    if settings.name == "natural":
        _check_sites(ds, num_clients, settings.partition_by)
    rows = ds.shuffle(seed=seed) if kind.shuffle else ds
    try:
        partitioner = kind.build(num_clients, settings, seed, rows)
        partitioner.dataset = rows
        # Their warnings ("classes not assigned", pyarrow's sort deprecation) are checked
        # or irrelevant here, and NaturalIdPartitioner draws a tqdm bar on stderr.
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", FutureWarning)
            parts = [partitioner.load_partition(i) for i in range(num_clients)]
    except (ValueError, KeyError) as err:
        raise DataError(
            f"data.partitioner={settings.name} cannot split {len(ds)} rows over "
            f"num_clients={num_clients} with {_settings_text(settings)}: {err}"
        ) from err
    _check_split(parts, len(ds), settings.name, kind.covering)
    return parts


def site_names(ds: datasets.Dataset) -> list[str]:
    """Client i of a natural split holds the i-th site in sorted order (NaturalIdPartitioner)."""
    return sorted(set(ds[GROUP]))


def _check_sites(ds: datasets.Dataset, num_clients: int, column: str | None) -> None:
    if GROUP not in ds.column_names:
        raise DataError("data.partitioner=natural needs data.partition_by (the site column)")
    sites = Counter(ds[GROUP])
    if len(sites) != num_clients:
        raise DataError(
            f"data.partitioner=natural: data.partition_by={column!r} has {len(sites)} distinct "
            f"values {dict(sorted(sites.items()))} (rows each), so set num_clients={len(sites)}"
        )


def _check_split(parts: list[datasets.Dataset], total: int, name: str, covering: bool) -> None:
    sizes = [len(p) for p in parts]
    if min(sizes) == 0:
        raise DataError(
            f"data.partitioner={name} left client(s) {[i for i, s in enumerate(sizes) if s == 0]} "
            f"without examples (sizes {sizes}); use fewer num_clients or more data"
        )
    if covering and sum(sizes) != total:
        raise DataError(f"data.partitioner={name} used {sum(sizes)} of {total} rows")


def _settings_text(s: SplitSettings) -> str:
    keys = {
        "pathological": ("classes_per_client", "class_assignment"),
        "shard": ("shards_per_client", "shard_size"),
        "inner-dirichlet": ("alpha",),
        "natural": ("partition_by",),
    }.get(s.name, ())
    return ", ".join(f"data.{k}={getattr(s, k)!r}" for k in keys) or "no further settings"
