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
from deca_flower.generation import is_generation_task
from deca_flower.methods import METHODS
from deca_flower.optim import BIAS_CORRECTIONS, DISCREPANCY_REFS, DISCREPANCY_SCALES
from deca_flower.partitioning import CLASS_ASSIGNMENTS, LABEL_FREE, PARTITIONERS
from deca_flower.secure_channel import ENCRYPTIONS
from deca_flower.topology import MIXING_RULES, TOPOLOGIES
from deca_flower.tracking import missing_requirement

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
    pair_column: str | None = None  # a second text column (sentence pairs)
    # name=custom: your own labels (verbalizers, in label-id order) and prompt.
    labels: list[str] = field(default_factory=list)
    instruction: str | None = None  # the prompt text, with a {choices} placeholder
    # Instruction data (alpaca, custom-instruction): the prompt and answer columns.
    prompt_column: str | None = None
    response_column: str | None = None
    max_examples: int | None = 2000  # subsample the pooled set before partitioning
    # The simulated split (flwr-datasets partitioners; docs/data.md).
    partitioner: str | None = None  # None: dirichlet (classification), iid (instruction data)
    alpha: float = 0.5  # dirichlet / inner-dirichlet concentration: smaller = more label skew
    min_partition_size: int = 10  # dirichlet
    partition_by: str | None = None  # natural: the column naming each row's site
    classes_per_client: int = 2  # pathological
    class_assignment: str = "random"  # pathological: random | deterministic | first-deterministic
    shards_per_client: int = 2  # shard
    shard_size: int | None = None  # shard: rows per shard (None: sized to use every row)
    test_fraction: float = 0.2  # each client's local held-out split
    # The dataset's own test split (a file): every model is also scored on it (global test)
    test_path: str | None = None
    # Fraction of each client's training rows kept out for validation (lr selection); 0 = none
    validation_fraction: float = 0.0
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
    # literal: eq (5); exact: divide by the tracked signal weight (docs/algorithm-notes.md)
    bias_correction: str = "exact"
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
    # Rows of a stratified pooled hold-out carved BEFORE partitioning (0 = none); every
    # client's model and the average are scored on it. Caps data.test_path's split too.
    global_test_size: int = 0
    max_new_tokens: int = 64  # generation tasks (alpaca): greedy answer length for ROUGE-L
    judge: str | None = None  # generation tasks: "module:function" scoring (prompts, answers)


@dataclass
class GossipConfig:
    backend: str = "auto"  # auto | gloo | nccl
    # Longest one exchange (or a group join) may block on a neighbour: a peer stuck on a
    # dead neighbour frees itself after this. First in the order of timeouts (FaultsConfig).
    timeout_s: float = 120.0
    store_port: int = 0  # 0 = pick a free port
    advertise_host: str = "127.0.0.1"  # address peers use to reach the coordinator's store
    # aes-256-gcm: every block sealed per edge, rendezvous authenticated (docs/security.md);
    # none: plaintext data plane, only for a trusted network (printed and recorded as such).
    # NCCL (gossip.backend=nccl) is always plaintext. Seals the wire tensor of any
    # gossip.compression format.
    encryption: str = "aes-256-gcm"
    # Wire format (deca_flower/compression.py): none = algorithm.wire_dtype as before;
    # float32 | bf16: a cast; int8 | topk: CHOCO-Gossip error feedback (Koloskova et al. 2019)
    compression: str = "none"
    chunk_size: int = 256  # int8: elements per fp32 scale (overhead 4 / chunk_size bytes each)
    topk_fraction: float = 0.01  # topk: share of the block's entries sent per step
    consensus_step: float = 1.0  # int8 | topk: CHOCO's gamma in (0, 1]; 1 = eq (7) if lossless
    overlap: bool = False  # next minibatch's frozen layers run while the exchange is in flight


@dataclass
class FlowerConfig:
    # One Flower message per phase. block: per (round, block); round: per round; auto: block in
    # simulation, round in deployment, where each message costs seconds of Flower polling.
    phase: str = "auto"
    min_nodes_wait_s: float = 120.0  # how long the coordinator waits for SuperNodes
    barrier_timeout_s: float = 120.0  # how long peers wait for each other at the handshake
    phase_timeout_s: float = 7200.0  # longest a phase (or an evaluation) may take
    run_timeout_s: float = 30 * 24 * 3600.0  # longest the whole run may take
    keep_state: bool = False  # keep simulated nodes' state stores after a finished run
    export_models: bool = False  # each node saves its final model (HF format) at the end


@dataclass
class FaultsConfig:
    """What the coordinator does when a site is lost mid-run.

    Waits are bounded, in this order (checked at load): gossip.timeout_s (one exchange) <
    flower.phase_timeout_s (one phase) < faults.rejoin_wait_s (waiting for a lost site) <
    flower.run_timeout_s (the run).
    """

    # continue: drop the lost site, rebuild W on the survivors, rerun the phase;
    # wait: keep W and wait (up to rejoin_wait_s) for the site to come back; stop: fail.
    on_peer_loss: str = "continue"
    min_peers: int = 2  # fewer survivors than this: wait for a site to come back, then stop
    rejoin_wait_s: float = 10800.0
    max_retries: int = 3  # reruns of one phase before the run stops
    # Simulation: "rank@phase[,rank@phase]" makes that rank fail that phase (a rehearsal).
    inject: str = ""
    # With inject: "rank@phase" brings that lost rank back as the phase starts (healed from a
    # live neighbour, as the coordinator does for a restarted site): a rehearsal.
    rejoin: str = ""
    # A rehearsal of a lost coordinator: it stops as this phase (0-based) starts, leaving the
    # run directory and the nodes' committed state for `resume`. -1: never.
    stop_coordinator_at: int = -1


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
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    tracking: str = "none"  # none | tensorboard | mlflow | wandb (besides metrics.jsonl)
    # A stopped Flower run's directory: continue it from its last committed phase
    # (deca_flower/resume.py). "": a new run.
    resume: str = ""
    verbose: bool = False  # also show transformers' / GGUF's own progress bars


CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "topology.name": TOPOLOGIES,
    "topology.mixing": MIXING_RULES,
    "train.block_order": BLOCK_ORDERS,
    "algorithm.discrepancy_ref": DISCREPANCY_REFS,
    "algorithm.discrepancy_scale": DISCREPANCY_SCALES,
    "algorithm.bias_correction": BIAS_CORRECTIONS,
    "algorithm.wire_dtype": ("float32", "model"),
    "algorithm.method": tuple(METHODS),
    "gossip.backend": ("auto", "gloo", "nccl"),
    "gossip.encryption": ENCRYPTIONS,
    "gossip.compression": FORMATS,
    "flower.phase": ("auto", "block", "round"),
    "faults.on_peer_loss": ("continue", "wait", "stop"),
    "data.partitioner": (None, *PARTITIONERS),
    "data.class_assignment": CLASS_ASSIGNMENTS,
    "tracking": ("none", "tensorboard", "mlflow", "wandb"),
}

# Every wait is bounded, and each bound must leave room for the one it sits in.
TIMEOUT_ORDER = (
    "gossip.timeout_s",
    "flower.phase_timeout_s",
    "faults.rejoin_wait_s",
    "flower.run_timeout_s",
)

POSITIVE = (
    "num_clients",
    "train.rounds",
    "train.steps_per_block",
    "train.layers_per_block",
    "algorithm.lr",
    "data.alpha",
    "data.classes_per_client",
    "data.shards_per_client",
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
    if cfg.eval.global_test_size < 0:
        raise ConfigError(f"eval.global_test_size must be >= 0, got {cfg.eval.global_test_size}")
    if not 0.0 <= cfg.data.validation_fraction < 1.0:
        raise ConfigError(
            f"data.validation_fraction must be in [0, 1), got {cfg.data.validation_fraction}"
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
    _check_timeout_order(cfg)
    injected = parse_fault_injection(cfg.faults.inject)
    for rank, phase in parse_fault_injection(cfg.faults.rejoin, "faults.rejoin"):
        if not any(r == rank and p < phase for r, p in injected):
            raise ConfigError(
                f"faults.rejoin={cfg.faults.rejoin!r}: rank {rank} rejoins at phase {phase} but "
                "faults.inject does not lose it before that phase"
            )
    if cfg.faults.stop_coordinator_at < -1:
        raise ConfigError(
            f"faults.stop_coordinator_at={cfg.faults.stop_coordinator_at}: a phase index "
            "(0-based), or -1 for never"
        )
    validate_data(cfg.data)
    missing = missing_requirement(cfg.tracking)
    if missing:
        raise ConfigError(missing)


def _check_timeout_order(cfg: DictConfig) -> None:
    values = [(key, float(OmegaConf.select(cfg, key))) for key in TIMEOUT_ORDER]
    for (inner, a), (outer, b) in zip(values, values[1:]):
        if not a < b:
            raise ConfigError(
                f"{inner}={a:g} must be smaller than {outer}={b:g}: the waits nest as "
                f"{' < '.join(TIMEOUT_ORDER)}; lower {inner} or raise {outer}"
            )


def parse_fault_injection(spec: str, key: str = "faults.inject") -> set[tuple[int, int]]:
    """`faults.inject` (or `faults.rejoin`): "rank@phase,rank@phase" -> {(rank, phase)}."""
    out = set()
    for item in filter(None, (part.strip() for part in str(spec or "").split(","))):
        rank, sep, phase = item.partition("@")
        if not sep or not rank.isdigit() or not phase.isdigit():
            raise ConfigError(f"{key}={spec!r}: expected rank@phase[,rank@phase], e.g. 2@1")
        out.add((int(rank), int(phase)))
    return out


CUSTOM_KEYS = ("labels", "instruction", "text_column", "label_column", "pair_column")


def validate_data(data: DictConfig) -> None:
    """The data keys that depend on each other: custom tasks and the split's settings."""
    name = str(data.name).strip().lower()
    generation = is_generation_task(name)
    if name == "custom":
        _validate_custom_labels(data)
    elif data.labels:
        raise ConfigError(
            f"data.labels is for data.name=custom only (data.name={data.name!r} has its own "
            "labels); set data.name=custom to use your labels"
        )
    # data.path is checked where data is loaded: a deployed site reads its own data-path.
    if name == "custom-instruction" and not (data.prompt_column and data.response_column):
        raise ConfigError(
            "data.name=custom-instruction needs data.prompt_column and data.response_column "
            f"(got {data.prompt_column!r} and {data.response_column!r})"
        )
    if generation:
        for key in CUSTOM_KEYS[1:]:
            if data.get(key):
                raise ConfigError(
                    f"data.{key} is for classification; instruction data (data.name={name}) "
                    "uses data.prompt_column and data.response_column"
                )
        if data.partitioner is not None and data.partitioner not in LABEL_FREE:
            raise ConfigError(
                f"data.partitioner={data.partitioner} splits by label, and data.name={name} "
                f"has no labels; choose one of {list(LABEL_FREE)}"
            )
    elif data.prompt_column or data.response_column:
        raise ConfigError(
            "data.prompt_column / data.response_column are for instruction data "
            "(data.name=alpaca or custom-instruction); classification uses data.text_column "
            "and data.label_column"
        )
    if data.instruction is not None and "{choices}" not in data.instruction:
        raise ConfigError(
            f"data.instruction={data.instruction!r} needs a {{choices}} placeholder (filled "
            "with the labels, e.g. {negative/positive})"
        )
    _validate_split(data)


def _validate_custom_labels(data: DictConfig) -> None:
    labels = [str(word).strip() for word in data.labels]
    if len(labels) < 2:
        raise ConfigError(
            f"data.name=custom needs data.labels, at least two label words in label-id "
            f"order, e.g. data.labels=[negative,positive]; got {list(data.labels)}"
        )
    if {"True", "False"} & set(labels):
        raise ConfigError(
            f"data.labels={labels}: YAML read a bare yes/no/true/false as a boolean; quote "
            'the label words, e.g. data.labels=\'["yes","no"]\''
        )
    lowered = [word.lower() for word in labels]
    duplicates = sorted({w for w in lowered if lowered.count(w) > 1})
    if duplicates or "" in lowered or any(word.isdigit() for word in labels):
        raise ConfigError(
            f"data.labels={labels} must be distinct (case-insensitive), non-empty words that "
            f"are not numbers (ids 0..{len(labels) - 1} are read as ids); duplicates: {duplicates}"
        )
    if not data.instruction:
        raise ConfigError(
            "data.name=custom needs data.instruction, the prompt text with a {choices} "
            "placeholder, e.g. 'What is the sentiment of this review? Choose from {choices}.'"
        )


def _validate_split(data: DictConfig) -> None:
    if data.partitioner == "natural" and not data.partition_by:
        raise ConfigError(
            "data.partitioner=natural needs data.partition_by, the column naming each "
            "row's site (one client per distinct value)"
        )
    if data.partition_by and data.partitioner != "natural":  # a typo'd split must not pass
        raise ConfigError(
            f"data.partition_by is read by data.partitioner=natural only (got "
            f"data.partitioner={data.partitioner}); remove it or set data.partitioner=natural"
        )
    if data.shard_size is not None and data.shard_size < 1:
        raise ConfigError(f"data.shard_size must be >= 1 or null, got {data.shard_size}")


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
