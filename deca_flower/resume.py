"""Resuming a stopped run from its run directory (framework-free).

After every committed phase (and every evaluation) the coordinator writes
`<run dir>/coordinator.json`: where the schedule stands and which state the nodes hold.
Starting the run again with `resume=<run dir>` (e.g. `--run-config "resume='<dir>'"`)
reopens that directory, tells every node to use the state it committed under the
original run (`state_id`), and continues with the first phase not committed. Nodes that
committed that phase before the coordinator could record it roll it back first, as after
any failed phase, so the result is bit-identical to a run that never stopped.

Only settings that cannot change the result may differ on resume (timeouts, fault
handling, where outputs go, tracking); anything else is refused with the keys named.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from deca_flower.config import ConfigError

CHECKPOINT = "coordinator.json"
VERSION = 1

# Config keys (or prefixes ending in ".") a resumed run may change: none of them changes
# what any node computes. gossip.encryption seals the same bits it would send in clear.
RESULT_NEUTRAL = (
    "resume",
    "run_name",
    "output_dir",
    "tracking",
    "verbose",
    "flower.",
    "faults.",
    "gossip.timeout_s",
    "gossip.store_port",
    "gossip.advertise_host",
    "gossip.encryption",
)


@dataclass
class Checkpoint:
    """Where a run stands after its last committed phase."""

    state_id: str  # the run id the nodes' state stores are named after (run-<state_id>)
    next_phase: int = 0  # index of the first phase not committed by every member
    global_step: int = 0
    evaluated: list[int] = field(default_factory=list)  # rounds evaluated (-1: zero-shot)
    phase_blocks: dict[str, list[int]] = field(default_factory=dict)  # phase -> its blocks
    # Sites lost (faults.on_peer_loss=continue) and not yet back: rank -> the phase they were
    # lost in. On resume they are healed before they train again.
    lost_at: dict[str, int] = field(default_factory=dict)
    version: int = VERSION

    @property
    def committed_phase(self) -> int:
        return self.next_phase - 1

    def save(self, run_dir: Path) -> None:
        """Atomically (temp file + rename): a crash leaves the previous checkpoint."""
        target = Path(run_dir) / CHECKPOINT
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, target)


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    path = Path(run_dir) / CHECKPOINT
    if not Path(run_dir).is_dir():
        raise ConfigError(f"resume={str(run_dir)!r}: no such run directory")
    if not path.is_file():
        raise ConfigError(
            f"resume={str(run_dir)!r} has no {CHECKPOINT}: it is not a deca-flower run "
            "directory, or the run stopped before its handshake (start it afresh)"
        )
    values = json.loads(path.read_text())
    if values.get("version") != VERSION:
        raise ConfigError(
            f"resume={str(run_dir)!r}: {CHECKPOINT} has version {values.get('version')}, this "
            f"deca-flower writes version {VERSION}; resume it with the version that started it"
        )
    return Checkpoint(**values)


def check_resumable(original: DictConfig, current: DictConfig, run_dir: str | Path) -> None:
    """Refuse a resume whose config would change the result; the message names the keys."""
    before = _flat(OmegaConf.to_container(original, resolve=True))
    after = _flat(OmegaConf.to_container(current, resolve=True))
    differ = sorted(
        key
        for key in set(before) | set(after)
        if before.get(key) != after.get(key) and not _neutral(key)
    )
    if differ:
        details = ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in differ)
        raise ConfigError(
            f"resume={str(run_dir)!r}: the config differs from the run's config.yaml in "
            f"setting(s) that change the result ({details}). Resume with the original "
            "settings, or start a new run without `resume`"
        )


def _neutral(key: str) -> bool:
    return any(key == n or (n.endswith(".") and key.startswith(n)) for n in RESULT_NEUTRAL)


def _flat(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    out: dict[str, Any] = {}
    for key, value in values.items():
        out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
    return out
