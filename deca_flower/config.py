"""Run configuration: OmegaConf structured schema, YAML presets under `conf/`, validation.

A config is built in layers, later layers winning:

    schema defaults  <  conf/base.yaml  <  presets (model, data, topology, algorithm)
                     <  overrides (dict or "a.b=value" strings)

Every key is checked against the schema (a typo is an error naming it), and
every enumerated value against its allowed set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from deca_flower.blocks import BLOCK_ORDERS
from deca_flower.compression import FORMATS
from deca_flower.methods import METHODS
from deca_flower.optim import DISCREPANCY_REFS, DISCREPANCY_SCALES
from deca_flower.topology import MIXING_RULES, TOPOLOGIES

PRESET_GROUPS = ("model", "data", "topology", "algorithm")
DEFAULT_PRESETS = {
    "model": "smollm2-135m",
    "data": "rotten-tomatoes",
    "topology": "er",
    "algorithm": "deca",
}


class ConfigError(ValueError):
    """A bad setting: the message names the key and the allowed values."""


@dataclass
class ModelConfig:
    name: str = "embedded:smollm2-135m-instruct"
    dtype: str = "float32"  # float32 | bfloat16 | float16: the model's (and wire's) dtype
    num_layers: int | None = None  # keep only the first N decoder layers (CPU-sized runs)
    layers_attr: str | None = None  # dotted path to the decoder layer list, if not found
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class DataConfig:
    name: str = "rotten-tomatoes"
    path: str | None = None  # local CSV/JSONL/parquet instead of the hub
    text_column: str | None = None
    label_column: str | None = None
    max_examples: int | None = 2000  # subsample the pooled set before partitioning
    alpha: float = 0.5  # Dirichlet concentration: smaller = more label skew
    min_partition_size: int = 10
    test_fraction: float = 0.2  # each client's local held-out split
    max_length: int = 128
    batch_size: int = 4


@dataclass
class TopologyConfig:
    name: str = "er"
    p: float = 0.5  # edge probability for er / random_bipartite
    path: str | None = None  # edge list for name=file
    mixing: str = "metropolis"  # metropolis | uniform


@dataclass
class TrainConfig:
    rounds: int = 1
    steps_per_block: int = 4
    layers_per_block: int = 1
    block_order: str = "ascending"  # ascending | descending | random
    final_average: bool = False  # average all clients' models once at the very end


@dataclass
class AlgorithmConfig:
    name: str = "deca"  # a label for tables and run names
    method: str = "deca"  # deca | dec-lora | decaf | dec-adapter | full-adam | local | centralized
    lr: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    bma: bool = True  # False = "w/o BMA" ablation
    mu1: float = 0.3
    mu2: float = 0.333
    discrepancy_ref: str = "pre"  # pre | half
    discrepancy_scale: str = "precond"  # lr | l2 | precond
    wire_dtype: str = "float32"  # float32 | model (send blocks in the model's dtype)
    lora_rank: int = 8  # dec-lora / decaf
    lora_alpha: float = 16.0
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    adapter_bottleneck: int = 16  # dec-adapter: hidden -> bottleneck -> hidden


@dataclass
class EvalConfig:
    max_examples_per_client: int = 32
    batch_size: int = 16
    every_rounds: int = 1
    average_model: bool = True  # also evaluate the parameter average of the clients
    zero_shot: bool = True  # evaluate the untrained model first
    max_new_tokens: int = 64  # generation tasks (alpaca): greedy answer length for ROUGE-L
    judge: str | None = None  # generation tasks: "module:function" scoring (prompts, answers)


@dataclass
class GossipConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 300.0
    store_port: int = 0  # 0 = pick a free port
    advertise_host: str = "127.0.0.1"  # address peers use to reach the coordinator's store
    # Wire format (deca_flower/compression.py): none = algorithm.wire_dtype as before;
    # float32 | bf16: a cast; int8 | topk: CHOCO-Gossip error feedback (Koloskova et al. 2019)
    compression: str = "none"
    chunk_size: int = 256  # int8: elements per fp32 scale (overhead 4 / chunk_size bytes each)
    topk_fraction: float = 0.01  # topk: share of the block's entries sent per step
    consensus_step: float = 1.0  # int8 | topk: CHOCO's gamma in (0, 1]; 1 = eq (7) if lossless
    overlap: bool = False  # next minibatch's frozen layers run while the exchange is in flight


@dataclass
class FlowerConfig:
    phase: str = "block"  # block: one message per (round, block); round: one per round
    min_nodes_wait_s: float = 120.0  # how long the coordinator waits for SuperNodes
    barrier_timeout_s: float = 120.0  # how long peers wait for each other at the handshake
    phase_timeout_s: float = 7200.0  # longest a phase (or an evaluation) may take
    keep_state: bool = False  # keep simulated nodes' state stores after a finished run
    export_models: bool = False  # each node saves its final model (HF format) at the end


@dataclass
class DecaConfig:
    run_name: str = "deca"
    output_dir: str = "outputs"
    seed: int = 0
    num_clients: int = 8
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "topology.name": TOPOLOGIES,
    "topology.mixing": MIXING_RULES,
    "train.block_order": BLOCK_ORDERS,
    "algorithm.discrepancy_ref": DISCREPANCY_REFS,
    "algorithm.discrepancy_scale": DISCREPANCY_SCALES,
    "algorithm.wire_dtype": ("float32", "model"),
    "algorithm.method": tuple(METHODS),
    "gossip.backend": ("auto", "gloo", "nccl"),
    "gossip.compression": FORMATS,
    "flower.phase": ("block", "round"),
}

POSITIVE = (
    "num_clients",
    "train.rounds",
    "train.steps_per_block",
    "train.layers_per_block",
    "algorithm.lr",
    "data.alpha",
    "data.batch_size",
    "data.max_length",
    "eval.batch_size",
    "eval.every_rounds",
    "gossip.timeout_s",
    "gossip.chunk_size",
    "algorithm.lora_rank",
    "algorithm.lora_alpha",
    "algorithm.adapter_bottleneck",
)


def conf_dir() -> Path:
    """`conf/` beside the package (repo checkout, editable install or Flower app bundle)."""
    override = os.environ.get("DECA_FLOWER_CONF")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "conf"


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def load_config(
    presets: dict[str, str] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> DictConfig:
    """Build, merge and validate a run config."""
    chosen = {**DEFAULT_PRESETS, **(presets or {})}
    unknown = set(chosen) - set(PRESET_GROUPS)
    if unknown:
        raise ConfigError(f"unknown preset group(s) {sorted(unknown)}; allowed: {PRESET_GROUPS}")
    layers = [OmegaConf.structured(DecaConfig), _load_yaml(conf_dir() / "base.yaml")]
    for group in PRESET_GROUPS:
        layers.append(_load_preset(group, chosen[group]))
    layers.append(_overrides_to_conf(overrides))
    try:
        cfg = OmegaConf.merge(*layers)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key)
        if not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
    if cfg.num_clients < 2:
        raise ConfigError(
            f"num_clients must be >= 2 for a decentralized run, got {cfg.num_clients}"
        )
    for key in ("algorithm.mu1", "algorithm.mu2", "data.test_fraction"):
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1], got {value}")
    for key in ("algorithm.beta1", "algorithm.beta2"):
        value = OmegaConf.select(cfg, key)
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {value}")
    method = METHODS[cfg.algorithm.method]
    if cfg.algorithm.bma and not method.uses_bma:
        raise ConfigError(
            f"algorithm.bma=true applies to algorithm.method=deca only; {method.name} is "
            f"plain Adam: set algorithm.bma=false (the preset algorithm={method.name} does)"
        )
    if cfg.model.gradient_checkpointing and method.trains in ("lora", "adapters"):
        raise ConfigError(
            f"model.gradient_checkpointing is not supported with algorithm.method={method.name} "
            "(adapter training keeps little activation memory anyway): set it to false"
        )
    _validate_compression(cfg, method)
    if cfg.topology.name == "file" and not cfg.topology.path:
        raise ConfigError("topology.name=file needs topology.path (an edge list file)")


def _validate_compression(cfg: DictConfig, method: Any) -> None:
    gossip = cfg.gossip
    for key in ("topk_fraction", "consensus_step"):
        value = gossip[key]
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"gossip.{key} must be in (0, 1], got {value}")
    if gossip.compression == "none":
        return
    if cfg.algorithm.wire_dtype != "float32":
        raise ConfigError(
            f"gossip.compression={gossip.compression} sets the wire format itself; leave "
            f"algorithm.wire_dtype at float32 (got {cfg.algorithm.wire_dtype!r}), or set "
            "gossip.compression=none to send the model dtype"
        )
    if method.mixing != "average":
        raise ConfigError(
            f"gossip.compression={gossip.compression} applies to averaging methods (eq 7); "
            f"algorithm.method={method.name} mixes with {method.mixing!r}: set "
            "gossip.compression=none"
        )


def bma_weights(cfg: DictConfig) -> tuple[float, float] | None:
    """(mu1, mu2) for BMAAdam, or None for the w/o-BMA ablation."""
    return (cfg.algorithm.mu1, cfg.algorithm.mu2) if cfg.algorithm.bma else None


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


# ---------------------------------------------------------------------- internals


def _load_yaml(path: Path) -> DictConfig:
    return OmegaConf.load(path) if path.exists() else OmegaConf.create({})


def _load_preset(group: str, name: str) -> DictConfig:
    path = conf_dir() / group / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(
            f"unknown {group} preset {name!r}; choose one of {available_presets(group)} "
            f"(files in {conf_dir() / group})"
        )
    return OmegaConf.load(path)


def _overrides_to_conf(overrides: dict[str, Any] | list[str] | None) -> DictConfig:
    if not overrides:
        return OmegaConf.create({})
    if isinstance(overrides, dict):
        dotted = [f"{k}={_yaml_value(v)}" for k, v in overrides.items()]
    else:
        dotted = list(overrides)
    try:
        return OmegaConf.from_dotlist(dotted)
    except OmegaConfBaseException as err:
        raise ConfigError(_explain(err)) from None


def _yaml_value(value: Any) -> str:
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    message = str(err).splitlines()[0]
    if "not in" in message and key:
        parent = key.rsplit(".", 1)[0] if "." in key else None
        allowed = _keys_of(parent)
        return f"unknown config key {key!r}; allowed keys here: {allowed}"
    return f"bad value for {key!r}: {message}" if key else message


def _keys_of(parent: str | None) -> list[str]:
    schema = OmegaConf.structured(DecaConfig)
    node = OmegaConf.select(schema, parent) if parent else schema
    return sorted(node.keys()) if isinstance(node, DictConfig) else []
