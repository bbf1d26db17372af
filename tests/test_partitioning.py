"""Every data.partitioner key: a flwr-datasets partitioner, a disjoint, covering, seeded split."""

from __future__ import annotations

from collections import Counter

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import Partitioner

from deca_flower.data import GROUP, DataError, plot_label_distribution
from deca_flower.partitioning import (
    LABEL_FREE,
    PARTITIONERS,
    SplitSettings,
    partition_dataset,
    site_names,
)

NUM_CLIENTS = 4


def rows(num_rows: int = 600, labelled: bool = True) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    columns = {
        "uid": list(range(num_rows)),
        "text": [f"row {i}" for i in range(num_rows)],
        GROUP: [f"site{i % NUM_CLIENTS}" for i in rng.permutation(num_rows)],
    }
    if labelled:
        columns["label"] = rng.integers(0, 3, num_rows).tolist()
    return datasets.Dataset.from_dict(columns)


def settings(name: str) -> SplitSettings:
    return SplitSettings(name=name, partition_by="site", min_partition_size=5)


def split_uids(ds: datasets.Dataset, name: str, seed: int) -> list[list[int]]:
    return [list(p["uid"]) for p in partition_dataset(ds, NUM_CLIENTS, settings(name), seed)]


@pytest.mark.parametrize("name", list(PARTITIONERS))
def test_every_partitioner_is_disjoint_covering_and_seeded(name):
    ds = rows()
    parts = split_uids(ds, name, seed=3)
    flat = [u for part in parts for u in part]
    assert len(flat) == len(set(flat))  # disjoint
    assert sorted(flat) == list(range(len(ds)))  # covering (at these settings, all of them)
    assert all(parts)
    assert split_uids(ds, name, seed=3) == parts  # same seed, same split
    if name != "natural":  # natural is the data's own split: no randomness to seed
        assert split_uids(ds, name, seed=4) != parts
    # Rows keep their content: the partitioner selects, never edits.
    label_of = dict(zip(ds["uid"], ds["label"], strict=True))
    for part in partition_dataset(ds, NUM_CLIENTS, settings(name), 3):
        assert all(label_of[u] == y for u, y in zip(part["uid"], part["label"], strict=True))


@pytest.mark.parametrize("name", [n for n in PARTITIONERS if n != "dirichlet"])
def test_each_key_builds_a_flower_datasets_partitioner(name):
    kind = PARTITIONERS[name]
    built = kind.build(NUM_CLIENTS, settings(name), 0, rows())
    assert isinstance(built, Partitioner)
    assert type(built).__module__.startswith("flwr_datasets.partitioner")


def test_partitioners_shape_the_split_as_named():
    ds = rows()
    by_size = {n: sorted(len(p) for p in split_uids(ds, n, 0)) for n in ("iid", "linear", "square")}
    assert by_size["iid"] == [150] * 4
    assert by_size["linear"] == [60, 120, 180, 240]  # sizes proportional to 1:2:3:4
    assert by_size["square"] == [20, 80, 180, 320]  # 1:4:9:16
    parts = partition_dataset(ds, NUM_CLIENTS, settings("pathological"), 0)
    assert all(len(set(p["label"])) == 2 for p in parts)  # data.classes_per_client=2
    natural = partition_dataset(ds, NUM_CLIENTS, settings("natural"), 0)
    assert [set(p[GROUP]) for p in natural] == [{s} for s in site_names(ds)]
    assert [len(p) for p in natural] == [Counter(ds[GROUP])[s] for s in site_names(ds)]


def test_instruction_data_takes_label_free_partitioners_only():
    ds = rows(labelled=False)
    assert set(LABEL_FREE) == {"iid", "natural", "linear", "square", "exponential"}
    for name in PARTITIONERS:
        if name in LABEL_FREE:
            parts = split_uids(ds, name, 0)
            assert sorted(u for p in parts for u in p) == list(range(len(ds)))
        else:
            with pytest.raises(DataError, match="instruction data has none"):
                split_uids(ds, name, 0)


def test_impossible_splits_name_the_settings():
    ds = rows(40)
    with pytest.raises(DataError, match="data.shards_per_client"):
        partition_dataset(ds, NUM_CLIENTS, SplitSettings("shard", shard_size=30), 0)
    with pytest.raises(DataError, match="num_clients=50 is more than the 40"):
        partition_dataset(ds, 50, SplitSettings("iid"), 0)


def test_label_distribution_png_names_the_split(tmp_path):
    ds = rows()
    parts = partition_dataset(ds, NUM_CLIENTS, settings("natural"), 0)
    out = tmp_path / "labels.png"
    split = {"partitioner": "natural", "sites": site_names(ds)}
    plot_label_distribution(parts, out, ["a", "b", "c"], split=split)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
