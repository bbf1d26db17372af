"""Everything a run builds from its config, shared by the in-process engine and the Flower app.

All of it is a pure function of the config (and seed), so every Flower node
computes the same graph and the same data split for its rank without any
coordination, and the engine builds exactly what the Flower simulation builds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import datasets
import networkx as nx
import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.adapters import AdapterPartition
from deca_flower.blocks import BlockPartition
from deca_flower.compression import Codec, make_codec
from deca_flower.data import (
    BatchStream,
    ClientData,
    TaskSpec,
    client_splits,
    encode_dataset,
    load_task_dataset,
    split_train_test,
)
from deca_flower.generation import (
    InstructionTask,
    encode_instructions,
    iid_shards,
    is_generation_task,
    load_instruction_dataset,
)
from deca_flower.methods import make_partition as method_partition
from deca_flower.methods import prepare_model
from deca_flower.models import load_model
from deca_flower.topology import build_graph, mixing_matrix, validate_mixing_matrix

# Progress bars from every `ds.map` in every Ray actor drown the run's own progress lines.
datasets.disable_progress_bars()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RunData:
    task: TaskSpec | InstructionTask
    clients: list[ClientData] | dict[int, ClientData]  # by rank; a site holds only its own

    def eval_slice(self, rank: int, max_examples: int) -> tuple[list[str], list[int]]:
        """The first `max_examples` rows of a client's local test split."""
        test = self.clients[rank].test
        rows = test.select(range(min(max_examples, len(test))))
        return list(rows["text"]), [int(x) for x in rows["label"]]


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


def load_base_model(
    cfg: DictConfig, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
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
    data = cfg.data
    if is_generation_task(data.name):
        return _prepare_instruction_data(cfg)
    task, pooled = load_task_dataset(
        data.name, data.path, text_column=data.text_column, label_column=data.label_column
    )
    if data.max_examples is not None and len(pooled) > data.max_examples:
        pooled = pooled.shuffle(seed=cfg.seed).select(range(data.max_examples))
    clients = client_splits(
        pooled,
        cfg.num_clients,
        data.alpha,
        cfg.seed,
        test_fraction=data.test_fraction,
        min_partition_size=data.min_partition_size,
    )
    return RunData(task, clients)


def _prepare_instruction_data(cfg: DictConfig) -> RunData:
    """Instruction tuning: IID shards (no labels to skew), each split into train/test."""
    data = cfg.data
    task, pooled = load_instruction_dataset(data.name, data.path)
    if data.max_examples is not None and len(pooled) > data.max_examples:
        pooled = pooled.shuffle(seed=cfg.seed).select(range(data.max_examples))
    shards = iid_shards(pooled, cfg.num_clients, cfg.seed)
    clients = [
        ClientData(*split_train_test(shard, data.test_fraction, seed=[cfg.seed, i]))
        for i, shard in enumerate(shards)
    ]
    return RunData(task, clients)


def prepare_local_data(cfg: DictConfig, rank: int, path: str) -> RunData:
    """A deployed site's own data file: all of it is this node's shard (no Dirichlet split)."""
    data = cfg.data
    if is_generation_task(data.name):
        task, local = load_instruction_dataset(data.name, path)
    else:
        task, local = load_task_dataset(
            data.name, path, text_column=data.text_column, label_column=data.label_column
        )
    train, test = split_train_test(local, data.test_fraction, seed=[cfg.seed, rank])
    return RunData(task, {rank: ClientData(train, test)})


def make_stream(
    cfg: DictConfig, rank: int, run_data: RunData, tokenizer: PreTrainedTokenizerBase
) -> BatchStream:
    return BatchStream(
        _encode_train(cfg, run_data, run_data.clients[rank].train, tokenizer),
        cfg.data.batch_size,
        seed=cfg.seed * 100_003 + rank,
        pad_token_id=tokenizer.pad_token_id,
    )


def _encode_train(
    cfg: DictConfig, run_data: RunData, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
) -> datasets.Dataset:
    if is_generation_task(cfg.data.name):
        return encode_instructions(rows, tokenizer, cfg.data.max_length)
    return encode_dataset(rows, tokenizer, run_data.task, cfg.data.max_length)


def make_pooled_stream(
    cfg: DictConfig, run_data: RunData, tokenizer: PreTrainedTokenizerBase
) -> BatchStream:
    """The centralized reference: all clients' training data, n x the batch per step.

    One step then sees as many examples as one step of the whole network.
    """
    pooled = datasets.concatenate_datasets([c.train for c in run_data.clients])
    return BatchStream(
        _encode_train(cfg, run_data, pooled, tokenizer),
        cfg.data.batch_size * cfg.num_clients,
        seed=cfg.seed * 100_003,
        pad_token_id=tokenizer.pad_token_id,
    )


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
