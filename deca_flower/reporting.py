"""Run outputs a person reads: JSONL metrics, console progress, summary.md and PNG plots.

A run writes into `<output_dir>/<run>.incomplete/` and is renamed to
`<output_dir>/<run>/` only when it finishes, so a crashed or rejected run
never looks like a result.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from deca_flower.evaluation import confusion_matrix
from deca_flower.secure_channel import describe_data_plane
from deca_flower.tracking import RunTracking

INCOMPLETE = ".incomplete"


class RunDir:
    def __init__(self, output_dir: str | Path, run_name: str, cfg: Any = None) -> None:
        """`cfg` (the run's config) turns on its `tracking` backend, fed from `log`."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.final = Path(output_dir).resolve() / f"{run_name}-{stamp}"
        self.path = self.final.with_name(self.final.name + INCOMPLETE)
        self.path.mkdir(parents=True, exist_ok=False)
        self.metrics_path = self.path / "metrics.jsonl"
        self.tracking = RunTracking(cfg, self.path) if cfg is not None else None

    @classmethod
    def reopen(cls, path: str | Path, cfg: Any = None) -> RunDir:
        """A stopped run's directory (`.incomplete`), to append to when the run resumes."""
        run = cls.__new__(cls)
        run.path = Path(path).resolve()
        name = run.path.name
        run.final = run.path.with_name(name[: -len(INCOMPLETE)] if name.endswith(INCOMPLETE)
                                       else name)  # fmt: skip
        run.metrics_path = run.path / "metrics.jsonl"
        run.tracking = RunTracking(cfg, run.path) if cfg is not None else None
        return run

    def log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")
        if self.tracking is not None:  # the same record, after it is safely in the JSONL
            self.tracking.on_record(json.loads(json.dumps(record, default=_jsonable)))

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        return target

    def finish(self) -> Path:
        if self.tracking is not None:  # PNGs as artifacts; files closed before the rename
            self.tracking.finish(self.path)
            self.tracking = None
        if self.final.exists():
            shutil.rmtree(self.final)
        self.path.rename(self.final)
        self.path = self.final
        self.metrics_path = self.final / "metrics.jsonl"
        return self.final


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One console line per phase: phase i of N, mean loss, elapsed and estimated time left."""

    def __init__(self, total_phases: int, stream=None, done: int = 0) -> None:
        """`done`: phases a resumed run has behind it (numbering goes on from there)."""
        self.total = total_phases
        self.done = self.first = done
        self.start = time.perf_counter()
        self.stream = stream  # None: sys.stdout at print time (a redirect or capture applies)

    def phase_done(self, label: str, mean_loss: float) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        left = elapsed / (self.done - self.first) * (self.total - self.done)
        print(
            f"[deca] phase {self.done}/{self.total} {label} loss={mean_loss:.4f} "
            f"elapsed={_hms(elapsed)} left~{_hms(left)}",
            file=self.stream or sys.stdout,
            flush=True,
        )

    def note(self, message: str) -> None:
        print(f"[deca] {message}", file=self.stream or sys.stdout, flush=True)

    def evaluating(self, round_idx: int, num_clients: int, per_client: int, average: bool) -> None:
        """Announce an evaluation: generating answers takes a while, and no bar shows it."""
        tag = "zero-shot" if round_idx == -1 else f"after round {round_idx + 1}"
        plus = " and the parameter average" if average and round_idx >= 0 else ""
        self.note(
            f"evaluating {tag}: {num_clients} clients' models{plus} on up to {per_client} "
            "test examples each"
        )


def summary_markdown(records: list[dict[str, Any]], config_yaml: str) -> str:
    """Before/after accuracy table plus the run's key facts."""
    evals = [r for r in records if r["type"] == "eval"]
    lines = ["# DECA run summary", ""]
    topo = next((r for r in records if r["type"] == "topology"), None)
    if topo:
        lines += [
            f"- graph: {topo['name']} with {topo['num_clients']} clients, {topo['num_edges']} "
            f"edges, spectral gap {topo['spectral_gap']:.4f}",
        ]
    steps = [r for r in records if r["type"] == "step"]
    if steps:
        first, last = _mean(steps[0]["loss"]), _mean(steps[-1]["loss"])
        lines.append(f"- training loss (mean over clients): {first:.4f} -> {last:.4f}")
    phases = [r for r in records if r["type"] == "phase"]
    if phases:
        sent = sum(sum(r["bytes_sent"]) for r in phases)
        lines.append(f"- bytes sent by all clients: {sent / 2**20:.1f} MiB")
        if any(r["type"] == "coordinator" for r in records):  # a Flower run: peers gossiped
            lines.append(f"- {_data_plane(config_yaml)}")
    if evals and evals[0].get("task") == "generation":
        lines += ["", "| model | eval set | perplexity | ROUGE-L F1 |", "|---|---|---|---|"]
        for r in evals:
            tag = "zero-shot" if r["round"] == -1 else f"after round {r['round'] + 1}"
            m = r["client_mean"]
            lines.append(f"| clients, {tag} | mean of local tests | {m['perplexity']:.3f} | "
                         f"{m['rouge_l']:.3f} |")  # fmt: skip
            if r.get("average"):
                a = r["average"]
                lines.append(f"| parameter average, {tag} | all clients' test | "
                             f"{a['perplexity']:.3f} | {a['rouge_l']:.3f} |")  # fmt: skip
        lines += _timeline(records)
        lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
        return "\n".join(lines)
    lines += [
        "",
        "Accuracy and F1 of the generated label; *likelihood*: the label whose answer the model "
        "finds most probable; *majority*: always answering the client's most frequent "
        "training label (the pooled one for all clients' and the global test).",
        "",
        "| model | eval set | accuracy | likelihood acc. | majority acc. | weighted F1 | "
        "macro-F1 | likelihood macro-F1 | majority macro-F1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in evals:
        lines += _classification_rows(r)
    lines += _timeline(records)
    lines += ["", "## Config", "", "```yaml", config_yaml.rstrip(), "```", ""]
    return "\n".join(lines)


def _timeline(records: list[dict[str, Any]]) -> list[str]:
    """Faults, membership changes, waits and rejoins, in order (empty for a clean run)."""
    lines = []
    for r in records:
        phase = f"phase {r.get('phase', -1) + 1}"
        if r["type"] == "fault":
            lines.append(
                f"- {phase}, attempt {r['attempt']}: failed; lost rank(s) "
                f"{r['lost_ranks'] or 'none'}"
            )
        elif r["type"] == "membership":
            lines.append(
                f"- {phase}: membership epoch {r['epoch']}, ranks {r['members']} "
                f"(lost {r['lost']}), spectral gap {r['spectral_gap']:.3f}"
            )
        elif r["type"] == "waiting":
            lines.append(f"- {phase}: waiting for rank(s) {r['lost_ranks']}: {r['reason']}")
        elif r["type"] == "rejoined":
            lines.append(f"- {phase}: rank(s) {r['ranks']} are back")
        elif r["type"] == "heal":
            lines.append(f"- {phase}: rank {r['rank']} healed block(s) {r['blocks']} from rank "
                         f"{r['from']} (hashes {', '.join(r['hashes']) or '-'})")  # fmt: skip
        elif r["type"] == "rejoin_refused":
            lines.append(f"- {phase}: rank {r['rank']} came back but stays out: {r['differs']}")
        elif r["type"] == "stopped":
            lines.append(f"- {phase}: the coordinator stopped (faults.stop_coordinator_at)")
        elif r["type"] == "resume":
            lines.append(f"- {phase}: resumed as run {r['run_id']} (state of run "
                         f"{r['state_id']})")  # fmt: skip
        elif r["type"] == "security":
            lines.append(
                f"- security: rejected {r.get('what')} from {r.get('from')} "
                f"({r.get('check')}), seen by {r.get('seen_by')}"
            )
    return ["", "## Timeline", "", *lines] if lines else []


def _classification_rows(r: dict[str, Any]) -> list[str]:
    if r["round"] == -1:
        tag = "zero-shot (before training)"
        rows = [
            _row(tag, "all clients' test", r["global"]),
            _row(tag, "mean of local tests", r["client_mean"]),
        ]
        if r.get("global_test"):
            rows.append(_row(tag, "global test", r["global_test"]["client_mean"]))
        return rows
    tag = f"after round {r['round'] + 1}"
    rows = []
    if r.get("average") is not None:
        rows.append(_row(f"parameter average, {tag}", "all clients' test", r["average"]))
    rows.append(_row(f"clients, {tag}", "mean of local tests", r["client_mean"]))
    glob = r.get("global_test")
    if glob:
        if glob.get("average"):
            rows.append(_row(f"parameter average, {tag}", "global test", glob["average"]))
        rows.append(_row(f"clients, {tag}", "global test (mean over clients)",
                         glob["client_mean"]))  # fmt: skip
    return rows


def plot_run(
    records: list[dict[str, Any]], out_dir: str | Path, label_names: list[str] | None = None
) -> list[Path]:
    """Training loss per client, accuracy per round, consensus distance, confusion: PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    steps = [r for r in records if r["type"] == "step"]
    if steps:
        fig, ax = plt.subplots(figsize=(7, 4))
        losses = list(zip(*[r["loss"] for r in steps]))
        x = [r["global_step"] for r in steps]
        for i, series in enumerate(losses):
            series = [float("nan") if v is None else v for v in series]  # lost: a gap
            ax.plot(x, series, lw=1, label=f"client {i}")
        ax.set(xlabel="inner step", ylabel="training loss", title="Training loss per client")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out_dir / "loss.png"))
    evals = [r for r in records if r["type"] == "eval" and r.get("task") != "generation"]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [r["round"] + 1 for r in evals]
        ax.plot(rounds, [r["client_mean"]["accuracy"] for r in evals], "o-", label="mean client")
        if all("ll_accuracy" in r["client_mean"] for r in evals):
            ll = [r["client_mean"]["ll_accuracy"] for r in evals]
            ax.plot(rounds, ll, "o:", label="mean client, by likelihood")
        avg = [(r["round"] + 1, r["average"]["accuracy"]) for r in evals if r.get("average")]
        if avg:
            ax.plot(*zip(*avg), "s--", label="parameter average")
        ax.set(xlabel="round (0 = zero-shot)", ylabel="accuracy", title="Accuracy per round")
        ax.legend()
        written.append(_save(fig, out_dir / "accuracy.png"))
        cons = [
            (r["round"] + 1, r["consensus_distance"])
            for r in evals
            if r["round"] >= 0 and "consensus_distance" in r
        ]  # eval.average_model=false: none
        if cons:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(*zip(*cons), "o-")
            ax.set(xlabel="round", ylabel="RMS distance to mean", title="Consensus distance")
            written.append(_save(fig, out_dir / "consensus.png"))
        if label_names:
            written.append(plot_confusion(evals[-1], label_names, out_dir / "confusion.png"))
    participation = plot_participation(records, out_dir / "participation.png")
    return [*written, participation] if participation else written


def plot_participation(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Which sites took part in each committed phase (drawn when the membership changed)."""
    import matplotlib.pyplot as plt

    phases = [r for r in records if r["type"] == "phase" and "members" in r]
    if not any(r["type"] in ("membership", "fault") for r in records) or not phases:
        return None
    n = len(phases[0]["bytes_sent"])
    grid = [[1.0 if rank in p["members"] else 0.0 for p in phases] for rank in range(n)]
    fig, ax = plt.subplots(figsize=(max(4, len(phases) * 0.5), 1 + n * 0.4))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1)
    ax.set(xlabel="phase", ylabel="rank", title="Sites that took part in each phase")
    ax.set_yticks(range(n))
    return _save(fig, path)


def plot_confusion(record: dict[str, Any], label_names: list[str], path: Path) -> Path:
    """Confusion matrix of the last evaluation, pooled over clients (and the average model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flat_y = [y for ys in record["labels"] for y in ys]
    panels = [("clients' own models", record["predictions"])]
    if record.get("average_predictions"):
        panels.append(("parameter average", record["average_predictions"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (title, preds) in zip(axes[0], panels):
        flat_p = [p for ps in preds for p in ps]
        counts = confusion_matrix(flat_y, flat_p, len(label_names))
        ax.imshow(counts, cmap="Blues")
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(label_names) + 1), [*label_names, "(none)"], rotation=30)
        ax.set_yticks(range(len(label_names)), label_names)
        ax.set(xlabel="generated label", ylabel="true label", title=title)
    return _save(fig, Path(path))


def plot_label_counts(counts: list[list[int]], path: str | Path) -> Path:
    """Stacked bars: how many training examples of each label every client holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0] * len(counts)
    for label in range(len(counts[0])):
        heights = [c[label] for c in counts]
        ax.bar(range(len(counts)), heights, bottom=bottom, label=f"label {label}")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(xlabel="client", ylabel="training examples", title="Label distribution per client")
    ax.legend()
    return _save(fig, Path(path))


def phase_time_split(wall_s: float, phase: dict[str, Any]) -> dict[str, float]:
    """Where a phase's wall time went, averaged over the nodes.

    `startup_s` is the wall time outside the nodes' handlers: Flower messaging and polling,
    the ClientApp process start and the hop to a resident worker. `load_s` is building or
    refreshing the node inside the handler (imports, model and state load), `commit_s`
    writing the trained blocks to the state store. `non_training_share` is everything but
    the steps themselves (forward, backward, optimizer) and their gossip, over the wall time.
    """

    def mean(key: str) -> float:  # over the sites that took part (None: a lost site)
        values = [float(v or 0.0) for v in phase[key] if v is not None]
        return sum(values) / max(1, len(values))

    training = mean("forward_s") + mean("backward_s") + mean("optimizer_s")
    communication = mean("communication_s")
    handler = mean("handler_s")
    split = {
        "wall_s": wall_s,
        "startup_s": max(0.0, wall_s - handler),
        "load_s": mean("load_s"),
        "training_s": training,
        "communication_s": communication,
        "commit_s": mean("commit_s"),
    }
    split["other_s"] = max(
        0.0, handler - split["load_s"] - training - communication - split["commit_s"]
    )
    split["non_training_share"] = max(0.0, 1.0 - (training + communication) / wall_s)
    return split


def format_eval(record: dict[str, Any]) -> str:
    tag = "zero-shot" if record["round"] == -1 else f"after round {record['round'] + 1}"
    mean = record["client_mean"]
    if record.get("task") == "generation":
        text = f"eval {tag}: mean client perplexity {mean['perplexity']:.3f}, ROUGE-L "
        text += f"{mean['rouge_l']:.3f}"
        if record.get("average"):
            avg = record["average"]
            text += f"; parameter average perplexity {avg['perplexity']:.3f}, ROUGE-L "
            text += f"{avg['rouge_l']:.3f}"
    else:
        text = f"eval {tag}: mean client accuracy {_accuracies(mean)}, "
        text += f"F1 {mean['f1_weighted']:.3f}"
        if "f1_macro" in mean:
            text += f", macro-F1 {mean['f1_macro']:.3f}"
    if record.get("average") and "accuracy" in record["average"]:
        text += f"; parameter average accuracy {_accuracies(record['average'])}"
    glob = record.get("global_test")
    if glob:
        text += f"; global test ({glob['num_examples']}): "
        text += f"clients {_accuracies(glob['client_mean'])}"
        if glob.get("average"):
            text += f", parameter average {_accuracies(glob['average'])}"
    if "consensus_distance" in record:
        text += f"; consensus distance {record['consensus_distance']:.3e}"
    return text


def _accuracies(m: dict[str, float]) -> str:
    """Generated-label accuracy, then by likelihood and the majority predictor's, if known."""
    text = f"{m['accuracy']:.3f}"
    names = (("ll_accuracy", "likelihood"), ("majority_accuracy", "majority"))
    extra = [f"{name} {m[key]:.3f}" for key, name in names if key in m]
    return text + (f" ({', '.join(extra)})" if extra else "")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


_ROW_KEYS = ("accuracy", "ll_accuracy", "majority_accuracy", "f1_weighted", "f1_macro",
             "ll_f1_macro", "majority_f1_macro")  # fmt: skip


def _row(model: str, eval_set: str, metrics: dict[str, float]) -> str:
    cells = [f"{metrics[k]:.4f}" if metrics.get(k) is not None else "-" for k in _ROW_KEYS]
    return f"| {model} | {eval_set} | " + " | ".join(cells) + " |"


def _mean(values: list[float | None]) -> float:
    """Mean over the sites that took part (None: a site lost at that step)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60:d}m{seconds % 60:02d}s"


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def _data_plane(config_yaml: str) -> str:
    """Whether the gossip data plane was sealed (gossip.encryption, gossip.backend)."""
    gossip = (yaml.safe_load(config_yaml) or {}).get("gossip", {})
    return describe_data_plane(gossip.get("encryption", "none"), gossip.get("backend", "auto"))
