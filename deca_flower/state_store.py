"""Node-local state store: a DECA peer's trained layers and data position on disk.

Flower may serve a node from a different process for every message (Ray
actors are not pinned to nodes; a deployed SuperNode starts a fresh ClientApp
process per message), so everything a peer needs between phases lives here:

    <root>/block_0007.safetensors   # the layers of block 7 as this node last trained them,
                                    # plus (in its metadata) the phase that wrote it and
                                    # the node's data-stream position after that phase,
                                    # plus (with compressed gossip) the block's error-
                                    # feedback state under "gossip/..." names

One file per block, written atomically (temp file + rename), so a phase is
committed by a single rename and a crash never leaves a half-written block.
The store doubles as the node's checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn


class StateStoreError(RuntimeError):
    pass


# Tensors saved with a block that are not model parameters (e.g. CHOCO's public copy).
STATE_PREFIX = "gossip/"


class NodeStateStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def block_path(self, k: int) -> Path:
        return self.root / f"block_{k:04d}.safetensors"

    def save_block(
        self,
        k: int,
        named_params: list[tuple[str, torch.Tensor]],
        phase: int,
        extra: dict[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Commit block k after `phase`; `extra` (e.g. the data position) and `state` (the
        block's error-feedback tensors) are committed with it, by the same rename."""
        tensors = _block_tensors(named_params, state)
        metadata = {"phase": str(phase), "extra": json.dumps(extra or {})}
        target = self.block_path(k)
        tmp = target.with_suffix(".tmp")
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
        return target

    def stage_block(
        self,
        k: int,
        named_params: list[tuple[str, torch.Tensor]],
        phase: int,
        extra: dict[str, Any] | None = None,
        state: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Write block k beside the committed one; it counts only after commit_staged().

        `state` (the block's error-feedback tensors) lives in the same file, so it is
        committed, kept as history and rolled back together with the block's parameters."""
        tensors = _block_tensors(named_params, state)
        metadata = {"phase": str(phase), "extra": json.dumps(extra or {})}
        save_file(tensors, self._staged(k), metadata=metadata)

    def commit_staged(self) -> list[int]:
        """Make every staged block the committed one (one rename each): a phase's blocks are
        committed together, only once all of them are trained."""
        staged = sorted(self.root.glob("block_*.safetensors.staged"))
        for path in staged:
            committed = path.with_suffix("")
            if committed.exists():  # one level of history: a phase can still be rolled back
                os.replace(committed, self._previous(committed))
            os.replace(path, committed)
        return [int(p.name.split("_")[1].split(".")[0]) for p in staged]

    def rollback_to(self, phase: int) -> list[int]:
        """Undo commits of phases after `phase` (a phase some other member did not finish).

        Returns the blocks rolled back. A block with no earlier commit is removed: the node
        must then be rebuilt from its base model (the caller does that).
        """
        rolled = []
        for k, info in self.saved_blocks().items():
            if info["phase"] <= phase:
                continue
            committed = self.block_path(k)
            previous = self._previous(committed)
            if previous.exists() and _phase_of(previous) <= phase:
                os.replace(previous, committed)
            else:
                committed.unlink()
                previous.unlink(missing_ok=True)
            rolled.append(k)
        return rolled

    @staticmethod
    def _previous(committed: Path) -> Path:
        return committed.with_name(committed.name.replace(".safetensors", ".prev.safetensors"))

    def discard_staged(self) -> None:
        """Drop what a failed phase staged: the store stays at its last committed phase."""
        for path in self.root.glob("block_*.safetensors.staged"):
            path.unlink(missing_ok=True)

    def _staged(self, k: int) -> Path:
        return self.block_path(k).with_name(self.block_path(k).name + ".staged")

    def saved_blocks(self) -> dict[int, dict[str, Any]]:
        """{block: {"phase": int, "extra": dict}} for every committed block."""
        out = {}
        for path in sorted(self.root.glob("block_????.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            out[int(path.stem.split("_")[1])] = {
                "phase": int(meta.get("phase", -1)),
                "extra": json.loads(meta.get("extra", "{}")),
            }
        return out

    def latest(self) -> dict[str, Any] | None:
        """The most recently committed phase and its extra data, or None for a fresh node."""
        blocks = self.saved_blocks()
        if not blocks:
            return None
        # A phase commits all its blocks with the same extra data; any of them will do.
        k, info = max(blocks.items(), key=lambda item: (item[1]["phase"], item[0]))
        return {"block": k, **info}

    def block_state(self, k: int) -> dict[str, torch.Tensor] | None:
        """The `state` tensors committed with block k, or None if it has none (yet)."""
        path = self.block_path(k)
        if not path.exists():
            return None
        with safe_open(str(path), framework="pt") as f:
            names = [n for n in f.keys() if n.startswith(STATE_PREFIX)]
            state = {n.removeprefix(STATE_PREFIX): f.get_tensor(n) for n in names}
        return state or None

    @torch.no_grad()
    def restore_into(self, model: nn.Module) -> list[int]:
        """Copy every committed block into `model` (matched by parameter name)."""
        params = dict(model.named_parameters())
        restored = []
        for path in sorted(self.root.glob("block_????.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.startswith(STATE_PREFIX):
                        continue  # not a parameter: read by block_state
                    if name not in params:
                        raise StateStoreError(
                            f"{path} holds {name!r}, which the model does not have: the state "
                            "dir belongs to another model (change the node's state-dir)"
                        )
                    tensor = f.get_tensor(name)
                    target = params[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise StateStoreError(
                            f"{path}: {name} has shape {tuple(tensor.shape)}, the model "
                            f"expects {tuple(target.shape)} (change the node's state-dir)"
                        )
                    target.copy_(tensor.to(target.dtype))
            restored.append(int(path.stem.split("_")[1]))
        return restored


def _block_tensors(
    named_params: list[tuple[str, torch.Tensor]], state: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in named_params}
    for name, t in (state or {}).items():
        tensors[STATE_PREFIX + name] = t.detach().to("cpu").contiguous()
    return tensors


def _phase_of(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("phase", -1))
