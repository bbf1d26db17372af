"""Everything a run builds from its config, shared by the in-process engine and the Flower app.

All of it is a pure function of the config (and seed), so every Flower node
computes the same graph and the same data split for its rank without any
coordination, and the engine builds exactly what the Flower simulation builds.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import networkx as nx
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.adapters import AdapterPartition
from deca_flower.blocks import BlockPartition
from deca_flower.compression import Codec, make_codec
from deca_flower.console import note, set_verbose
from deca_flower.data import (
    CUSTOM,
    BatchStream,
    ClientData,
    TaskSpec,
    check_every_label_seen,
    split_train_test,
    stratified_holdout,
)
from deca_flower.generation import InstructionTask
from deca_flower.methods import make_partition as method_partition
from deca_flower.methods import prepare_model
from deca_flower.models import load_model
from deca_flower.partitioning import SplitSettings, partition_dataset, site_names
from deca_flower.task_kinds import make_task
from deca_flower.topology import build_graph, mixing_matrix, validate_mixing_matrix

# Progress bars from every `ds.map` in every Ray actor drown the run's own progress lines.
datasets.disable_progress_bars()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunData:
    task: TaskSpec | InstructionTask
    clients: list[ClientData] | dict[int, ClientData]  # by rank; a site holds only its own
    split: dict | None = None  # how the clients were made (logged with the data record)
    # One unskewed test split for every model (eval.global_test_size / data.test_path).
    global_test: datasets.Dataset | None = None
    # Per rank, a validation split carved from the client's training data (lr selection).
    validation: list[datasets.Dataset] | dict[int, datasets.Dataset] | None = None

    def test_rows(self, rank: int, max_examples: int) -> datasets.Dataset:
        """The first `max_examples` rows of a client's local test split."""
        return _first(self.clients[rank].test, max_examples)

    def validation_rows(self, rank: int, max_examples: int) -> datasets.Dataset:
        return _first(self.validation[rank], max_examples)


def _first(ds: datasets.Dataset, max_examples: int) -> datasets.Dataset:
    return ds.select(range(min(max_examples, len(ds))))


def resolve_device(setting: str, rank: int = 0) -> torch.device:
    """`auto`: this process's GPU if it has one (Ray pins one per actor), else CPU."""
    if setting != "auto":
        return torch.device(setting)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def model_dtype(cfg: DictConfig) -> torch.dtype:
    return DTYPES[cfg.model.dtype]


def wire_dtype(cfg: DictConfig) -> torch.dtype:
    return torch.float32 if cfg.algorithm.wire_dtype == "float32" else model_dtype(cfg)


def gossip_codec(cfg: DictConfig) -> Codec:
    """The wire codec of `gossip.compression` (`none`: the `algorithm.wire_dtype` cast)."""
    g = cfg.gossip
    return make_codec(
        g.compression, wire_dtype(cfg), chunk_size=g.chunk_size, topk_fraction=g.topk_fraction
    )


def compression_codec(cfg: DictConfig) -> Codec | None:
    """The codec `Method.mixer` mixes over: None for `gossip.compression=none` (eq (7) as
    without compression, the in-process engine's product path)."""
    return None if cfg.gossip.compression == "none" else gossip_codec(cfg)


def load_base_model(
    cfg: DictConfig, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    set_verbose(cfg.verbose)  # before the first load: its "Loading weights" bar
    model, tokenizer = load_model(
        cfg.model.name,
        dtype=model_dtype(cfg),
        device=device,
        num_layers=cfg.model.num_layers,
        seed=cfg.seed,
    )
    return prepare_model(cfg, model), tokenizer


def build_topology(cfg: DictConfig) -> tuple[nx.Graph, torch.Tensor]:
    topo = cfg.topology
    graph = build_graph(topo.name, cfg.num_clients, p=topo.p, seed=cfg.seed, path=topo.path)
    weights = mixing_matrix(graph, topo.mixing)
    validate_mixing_matrix(weights, graph)
    return graph, weights


def prepare_data(cfg: DictConfig) -> RunData:
    """The pooled data, subsampled and split over the clients by `data.partitioner`."""
    data = cfg.data
    task, pooled = load_run_dataset(cfg, data.path, keep_groups=True)
    if isinstance(task, TaskSpec) and task.name == CUSTOM:
        check_every_label_seen(pooled, task)  # on the whole file: a site may lack a label
    if data.max_examples is not None and len(pooled) > data.max_examples:
        pooled = pooled.shuffle(seed=cfg.seed).select(range(data.max_examples))
    labelled = make_task(cfg, scoring=False).labelled
    global_test = _load_test_split(cfg) if labelled else None
    if labelled and global_test is None and cfg.eval.global_test_size > 0:
        pooled, global_test = stratified_holdout(pooled, cfg.eval.global_test_size, cfg.seed)
    settings = SplitSettings.from_config(data, labelled=labelled)
    shards = partition_dataset(pooled, cfg.num_clients, settings, cfg.seed)
    # Seed each client's split by (seed, client) so shards do not share a permutation.
    clients = {
        i: ClientData(*split_train_test(shard, data.test_fraction, seed=[cfg.seed, i]))
        for i, shard in enumerate(shards)
    }
    split = {"partitioner": settings.name}
    if settings.name == "natural":
        split["sites"] = site_names(pooled)
    if not labelled:
        return RunData(task, list(clients.values()), split)
    clients, validation = _carve_validation(cfg, clients)
    validation = None if validation is None else list(validation.values())
    return RunData(task, list(clients.values()), split, global_test, validation)


def _load_test_split(cfg: DictConfig) -> datasets.Dataset | None:
    """The dataset's own test split (data.test_path), capped at eval.global_test_size."""
    data = cfg.data
    if not data.test_path:
        return None
    _, test = load_run_dataset(cfg, data.test_path)
    size = cfg.eval.global_test_size
    if 0 < size < len(test):
        _, test = stratified_holdout(test, size, cfg.seed)
    return test


def _carve_validation(
    cfg: DictConfig, clients: dict[int, ClientData]
) -> tuple[dict[int, ClientData], dict[int, datasets.Dataset] | None]:
    """Split data.validation_fraction of every client's training rows off for validation."""
    fraction = cfg.data.validation_fraction
    if not fraction:
        return clients, None
    kept, validation = {}, {}
    for rank, c in clients.items():
        train, val = split_train_test(c.train, fraction, seed=[cfg.seed, rank, 1])
        kept[rank], validation[rank] = ClientData(train, c.test), val
    return kept, validation


def load_run_dataset(
    cfg: DictConfig, path: str | None, keep_groups: bool = False
) -> tuple[TaskSpec | InstructionTask, datasets.Dataset]:
    """The run's task and its normalised rows (with `group` if a natural split needs it)."""
    data = cfg.data
    by = data.partition_by if keep_groups and data.partitioner == "natural" else None
    return make_task(cfg, scoring=False).load(path, partition_by=by)


def prepare_local_data(cfg: DictConfig, rank: int, path: str) -> RunData:
    """A deployed site's own data file: all of it is this node's shard (no simulated split)."""
    task, local = load_run_dataset(cfg, path)
    train, test = split_train_test(local, cfg.data.test_fraction, seed=[cfg.seed, rank])
    split = {"partitioner": "site file"}
    if not make_task(cfg, scoring=False).labelled:
        return RunData(task, {rank: ClientData(train, test)}, split)
    clients, validation = _carve_validation(cfg, {rank: ClientData(train, test)})
    return RunData(task, clients, split, _load_test_split(cfg), validation)


def make_stream(
    cfg: DictConfig,
    rank: int,
    run_data: RunData,
    tokenizer: PreTrainedTokenizerBase,
    clients: Sequence[int] | None = None,
) -> BatchStream:
    """The batches of model `rank`: its own client's training rows, or (`clients`, the
    centralized reference) those clients' rows pooled, len(clients) x the batch per step,
    so that one step sees as many examples as one step of the whole network."""
    trains = [run_data.clients[c].train for c in ([rank] if clients is None else clients)]
    rows = trains[0] if len(trains) == 1 else datasets.concatenate_datasets(trains)
    return BatchStream(
        _encode_train(cfg, rows, tokenizer),
        cfg.data.batch_size * len(trains),
        seed=cfg.seed * 100_003 + rank,
        pad_token_id=tokenizer.pad_token_id,
    )


# Encoding this many rows takes seconds: say so (smaller client shards stay silent).
ENCODING_NOTE_ROWS = 1000


def _encode_train(
    cfg: DictConfig, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
) -> datasets.Dataset:
    loud = len(rows) >= ENCODING_NOTE_ROWS
    if loud:
        note(f"encoding {len(rows)} training rows (max_length {cfg.data.max_length})")
    start = time.perf_counter()
    encoded = make_task(cfg, scoring=False).encode(rows, tokenizer)
    if loud:
        note(f"encoded {len(rows)} rows in {time.perf_counter() - start:.1f} s")
    return encoded


def make_partition(cfg: DictConfig, model: PreTrainedModel) -> BlockPartition | AdapterPartition:
    """The sets of parameters the run's method trains, one after the other."""
    return method_partition(cfg, model)


def clone_sharing_frozen(model: PreTrainedModel, partition: BlockPartition) -> PreTrainedModel:
    """A copy of `model` whose decoder layers are its own and whose frozen parts are shared.

    Embeddings, final norm and LM head never change, so n virtual clients can
    point at one copy of them; the trainable layers must never be shared.
    """
    trainable = {id(p) for k in range(partition.num_blocks) for p in partition.parameters(k)}
    memo = {id(p): p for p in model.parameters() if id(p) not in trainable}
    return copy.deepcopy(model, memo)
