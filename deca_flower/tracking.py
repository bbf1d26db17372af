"""Optional experiment tracking (`tracking=none|tensorboard|mlflow|wandb`).

`metrics.jsonl` stays the source of truth: `RunDir.log` hands every record it
writes to `RunTracking`, which turns it into metrics (`metrics_of`, one pure
function for all backends) and passes them to one `Tracker` implementation.
The backends only differ in four calls: params, metrics, an artifact, close.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# tracking -> (module that must be importable, how to get it)
REQUIREMENTS = {
    "tensorboard": ("tensorboard", 'pip install -e ".[tensorboard]"'),
    "mlflow": ("mlflow", 'pip install -e ".[mlflow]"'),
    "wandb": ("wandb", "pip install wandb"),
}


def missing_requirement(kind: str) -> str | None:
    """The install hint when `tracking=kind` cannot be imported here, else None."""
    module, hint = REQUIREMENTS.get(kind, (None, ""))
    if module is None or importlib.util.find_spec(module) is not None:
        return None
    return f"tracking={kind} needs the {module} package: {hint} (or set tracking=none)"


# ---------------------------------------------------------------------- records -> metrics


def metrics_of(record: dict[str, Any], phase_index: int) -> tuple[str, int, dict[str, float]]:
    """(step axis, step, metrics) of one metrics.jsonl record; no metrics for other types.

    step: every client's loss at the global step. phase: bytes summed over clients,
    time split averaged over them, at the phase index. eval: each metric group at
    round + 1 (0 = zero-shot).
    """
    kind = record.get("type")
    if kind == "step":
        losses = {f"loss/client_{i}": v for i, v in enumerate(record["loss"])}
        return "global_step", int(record["global_step"]), _numbers(losses)
    if kind == "phase":
        out: dict[str, Any] = {}
        for key, values in record.items():
            if not isinstance(values, list):
                continue
            values = [v for v in values if isinstance(v, (int, float))]  # None: a lost site
            if not values:
                continue
            if key.startswith("bytes_"):
                out[f"phase/{key}"] = sum(values)
            elif key.endswith("_s"):
                out[f"phase/{key}"] = sum(values) / len(values)
        return "phase", phase_index, _numbers(out)
    if kind == "eval":
        out = {"eval/consensus_distance": record.get("consensus_distance")}
        for group in ("client_mean", "global", "average"):
            for key, value in (record.get(group) or {}).items():
                out[f"eval/{group}/{key}"] = value
        return "eval_round", int(record["round"]) + 1, _numbers(out)
    return "", 0, {}


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as `a.b: value` strings."""

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix[:-1], str(node)

    return dict(walk(OmegaConf.to_container(cfg, resolve=True), ""))


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v
    }


# ---------------------------------------------------------------------- backends


class Tracker:
    """What every backend implements; the base class is `tracking=none`."""

    def log_params(self, params: dict[str, str]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    def __init__(self, cfg: DictConfig, run_path: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))

    def log_params(self, params: dict[str, str]) -> None:
        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n|---|---|\n" + table)

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_artifact(self, path: Path) -> None:
        from matplotlib.image import imread

        image = imread(path)[..., :3]  # RGBA floats in [0, 1] -> RGB
        self.writer.add_image(f"plots/{path.stem}", image, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MlflowTracker(Tracker):
    """`MLFLOW_TRACKING_URI` if set, else a file store in `<output_dir>/mlruns`."""

    def __init__(self, cfg: DictConfig, run_path: Path) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 refuses its file store unless asked; a local, server-free store
            # is what an offline run wants (`mlflow ui --backend-store-uri <it>` reads it).
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = mlflow_store_uri(cfg)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(cfg.run_name)
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment(cfg.run_name)
        )
        run = self.client.create_run(experiment_id, run_name=final_name(run_path))
        self.run_id = run.info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow's value limit
        for start in range(0, len(items), 100):  # and its batch limit
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path="plots")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def final_name(run_path: Path) -> str:
    """The run directory's name once finished (it is written as `<name>.incomplete`)."""
    return run_path.name.removesuffix(".incomplete")


def mlflow_store_uri(cfg: DictConfig) -> str:
    return (Path(cfg.output_dir).resolve() / "mlruns").as_uri()


class WandbTracker(Tracker):
    """Offline only: nothing leaves the machine until the user runs `wandb sync`."""

    def __init__(self, cfg: DictConfig, run_path: Path) -> None:
        import wandb

        self.run = wandb.init(
            project=cfg.run_name, name=final_name(run_path), dir=str(run_path), mode="offline"
        )
        for axis in ("global_step", "phase", "eval_round"):
            self.run.define_metric(axis)
        # Each namespace has its own step axis (wandb's own step must only grow).
        for prefix, axis in (("loss", "global_step"), ("phase", "phase"), ("eval", "eval_round")):
            self.run.define_metric(f"{prefix}/*", step_metric=axis)

    def log_params(self, params: dict[str, str]) -> None:
        self.run.config.update(params)

    def log_metrics(self, metrics: dict[str, float], step: int, axis: str) -> None:
        self.run.log({**metrics, axis: step})

    def log_artifact(self, path: Path) -> None:
        import wandb

        self.run.log({f"plots/{path.stem}": wandb.Image(str(path))})

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {
    "none": Tracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
    "wandb": WandbTracker,
}


class RunTracking:
    """Feeds one tracker from the run's records, then its PNGs, then closes it."""

    def __init__(self, cfg: DictConfig, run_path: Path) -> None:
        kind = TRACKERS[cfg.tracking]
        self.tracker = kind() if kind is Tracker else kind(cfg, run_path)
        self.phases = 0
        self.tracker.log_params(flat_params(cfg))

    def on_record(self, record: dict[str, Any]) -> None:
        axis, step, metrics = metrics_of(record, self.phases)
        if record.get("type") == "phase":
            self.phases += 1
        if metrics:
            self.tracker.log_metrics(metrics, step, axis)

    def finish(self, run_path: Path) -> None:
        for png in sorted(run_path.glob("*.png")):
            self.tracker.log_artifact(png)
        self.tracker.close()
