"""tracking=tensorboard / mlflow: the logged values equal metrics.jsonl's (read back offline)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from deca_flower.config import ConfigError
from deca_flower.engine import Engine
from deca_flower.tracking import flat_params, metrics_of, mlflow_store_uri

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
RUN = {"train.rounds": 1, "eval.zero_shot": True, "eval.max_examples_per_client": 2}


def expected_series(records) -> dict[str, dict[int, float]]:
    """key -> {step: value}, computed from the JSONL records independently of tracking.py."""
    out: dict[str, dict[int, float]] = {}
    phases = [r for r in records if r["type"] == "phase"]
    for r in records:
        if r["type"] == "step":
            for i, loss in enumerate(r["loss"]):
                out.setdefault(f"loss/client_{i}", {})[r["global_step"]] = loss
        if r["type"] == "eval":
            for group in ("client_mean", "global", "average"):
                for key, value in (r.get(group) or {}).items():
                    out.setdefault(f"eval/{group}/{key}", {})[r["round"] + 1] = value
            if "consensus_distance" in r:
                out.setdefault("eval/consensus_distance", {})[r["round"] + 1] = r[
                    "consensus_distance"
                ]
    for index, phase in enumerate(phases):
        out.setdefault("phase/bytes_sent", {})[index] = sum(phase["bytes_sent"])
        out.setdefault("phase/bytes_received", {})[index] = sum(phase["bytes_received"])
        for key in ("forward_s", "backward_s", "optimizer_s", "communication_s"):
            out.setdefault(f"phase/{key}", {})[index] = float(np.mean(phase[key]))
    return out


def test_metrics_of_covers_losses_bytes_time_split_and_eval():
    axis, step, metrics = metrics_of({"type": "step", "global_step": 7, "loss": [1.5, 2.5]}, 0)
    assert (axis, step, metrics) == ("global_step", 7, {"loss/client_0": 1.5, "loss/client_1": 2.5})
    phase = {"type": "phase", "bytes_sent": [4, 6], "forward_s": [1.0, 3.0], "round": 0}
    assert metrics_of(phase, 3) == (
        "phase",
        3,
        {"phase/bytes_sent": 10.0, "phase/forward_s": 2.0},
    )
    record = {"type": "eval", "round": -1, "client_mean": {"accuracy": 0.5}, "global": None}
    assert metrics_of(record, 0) == ("eval_round", 0, {"eval/client_mean/accuracy": 0.5})
    assert metrics_of({"type": "topology"}, 0)[2] == {}


@pytest.mark.skipif(
    not HAS_TB, reason="tensorboard not installed (pip install -e '.[tensorboard]')"
)
def test_tensorboard_event_file_equals_jsonl(make_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(tracking="tensorboard", **RUN)
    result = Engine(cfg).run()
    events = EventAccumulator(str(result.out_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    expected = expected_series(result.records)
    assert set(events.Tags()["scalars"]) == set(expected)
    for key, by_step in expected.items():
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == {s: np.float32(v) for s, v in by_step.items()}, key  # TB stores float32
    assert {"plots/loss", "plots/accuracy", "plots/label_distribution"} <= set(
        events.Tags()["images"]
    )
    assert "config/text_summary" in events.Tags()["tensors"]


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow not installed (pip install -e '.[mlflow]')")
def test_mlflow_file_store_equals_jsonl(make_config, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # what the tracker sets, undone after
    cfg = make_config(tracking="mlflow", **RUN)
    result = Engine(cfg).run()
    client = MlflowClient(tracking_uri=mlflow_store_uri(cfg))
    experiment = client.get_experiment_by_name(cfg.run_name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == result.out_dir.name and run.info.status == "FINISHED"
    expected = expected_series(result.records)
    assert set(run.data.metrics) == set(expected)
    for key, by_step in expected.items():
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        assert logged == by_step, key
    assert run.data.params == flat_params(cfg)
    assert run.data.params["data.alpha"] == str(cfg.data.alpha)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss.png", "plots/accuracy.png", "plots/label_distribution.png"} <= plots


def test_missing_tracking_package_is_a_config_error(make_config, monkeypatch):
    import deca_flower.tracking as tracking

    monkeypatch.setitem(tracking.REQUIREMENTS, "mlflow", ("no_such_module_xyz", "pip install x"))
    with pytest.raises(ConfigError, match="tracking=mlflow needs the no_such_module_xyz package"):
        make_config(tracking="mlflow")


@pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="wandb not installed (pip install wandb)"
)
def test_wandb_offline_run_gets_the_plots(make_config, monkeypatch):
    # Offline wandb keeps values in a binary .wandb log; the plots show the hook ran end to end.
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = Engine(make_config(tracking="wandb", **RUN)).run()
    (run_dir,) = (result.out_dir / "wandb").glob("offline-run-*")
    images = {p.name.split("_")[0] for p in (run_dir / "files/media/images/plots").glob("*.png")}
    assert {"loss", "accuracy", "label"} <= images
    assert list(run_dir.glob("*.wandb"))
