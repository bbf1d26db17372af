"""The two kinds of task a run learns, behind one small interface.

Label classification and instruction tuning differ in their data, their training rows and
their metrics. The engine, the nodes and the coordinator never ask which one they run: they
call a `Task`, which

- loads the rows (`load`) and encodes them for training (`encode`);
- scores one model on one test slice (`score`, with the slice's reference answers from
  `truth`);
- pools the per-client scores into the run's eval record (`pool`).

The scoring and metric code itself lives in evaluation.py / likelihood.py (classification)
and generation.py (instruction tuning); this module maps the interface onto it. `make_task`
is the one place that tells the kinds apart.

Scores are what a node sends back for one slice, so they stay small and flat: per-example
label lists for classification, a dict of metrics (with the sums behind them) for
instruction tuning.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.data import (
    LABEL,
    TEXT,
    TaskSpec,
    encode_dataset,
    label_counts,
    load_task,
    plot_label_distribution,
    task_from_config,
)
from deca_flower.evaluation import eval_record, global_test_record, pooled_metrics, score_labels
from deca_flower.generation import (
    GENERATION_METRICS,
    InstructionTask,
    encode_instructions,
    generation_metrics,
    instruction_task_from_config,
    is_generation_task,
    load_instruction,
    load_judge,
    pool_generation_metrics,
)

Scores = dict[str, Any]  # one model on one slice: reply-ready values (lists, or a dict)
Judge = Callable[[list[str], list[str]], list[float]]


class Task(ABC):
    """What a run does that depends on its kind of data."""

    spec: TaskSpec | InstructionTask
    labelled: bool  # rows carry a label: global test, validation and label splits apply
    score_keys: tuple[str, ...]  # the keys of `score`'s result
    truth_keys: tuple[str, ...] = ()  # the keys of `truth`'s result

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    # ------------------------------------------------------------------ data

    @abstractmethod
    def load(
        self, path: str | None, partition_by: str | None = None
    ) -> tuple[TaskSpec | InstructionTask, datasets.Dataset]:
        """(the task's spec, its normalised rows) from `path` (or the hub)."""

    @abstractmethod
    def encode(
        self, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
    ) -> datasets.Dataset:
        """Training rows: `input_ids`, `attention_mask`, `labels` (-100 off the answer)."""

    @abstractmethod
    def label_counts(self, rows: datasets.Dataset) -> list[int]:
        """How many rows of each label (none for unlabelled data)."""

    @property
    def label_names(self) -> list[str] | None:
        """The labels' names for the plots (None: no labels)."""
        return None

    @abstractmethod
    def plot_label_distribution(
        self, partitions: Sequence[datasets.Dataset], path: Path, split: dict | None
    ) -> None:
        """The label-distribution PNG of the clients' training rows (unlabelled: none)."""

    # ------------------------------------------------------------------ evaluation

    @abstractmethod
    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset
    ) -> Scores:
        """One model's scores on one test slice."""

    def truth(self, rows: datasets.Dataset) -> dict[str, Any]:
        """The slice's reference answers that `pool` needs beside the scores."""
        return {}

    def score_union(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        slices: Sequence[datasets.Dataset],
    ) -> list[Scores]:
        """One model (the parameter average) on every client's slice, in process: `pool`'s
        `average` argument."""
        return [self.score(model, tokenizer, rows) for rows in slices]

    @abstractmethod
    def pool(
        self,
        round_idx: int,
        clients: Sequence[dict[str, Any]],
        average: Sequence[Scores] | None,
        train_counts: list[list[int]],
    ) -> dict[str, Any]:
        """The eval record: each client's model on its slice (`clients`: scores and truth),
        their mean, and the parameter average's scores on the slices pooled."""

    def join_shards(self, parts: Sequence[Scores]) -> Scores:
        """One model's scores on a test set from its shards rows g::m (g = part index)."""
        raise NotImplementedError(f"{type(self).__name__} has no global test split")

    def global_record(
        self,
        truth: dict[str, Any],
        clients: Sequence[Scores],
        average: Scores | None,
        train_counts: list[list[int]],
    ) -> dict[str, Any]:
        """Every client's model (and the average) on the one unskewed global test split."""
        raise NotImplementedError(f"{type(self).__name__} has no global test split")


class ClassificationTask(Task):
    """Classification as generation: the label word, generated and by likelihood."""

    labelled = True
    score_keys = ("predictions", "ll_predictions")
    truth_keys = ("labels",)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)
        self.spec: TaskSpec = task_from_config(cfg.data)

    @property
    def num_labels(self) -> int:
        return len(self.spec.verbalizers)

    def load(
        self, path: str | None, partition_by: str | None = None
    ) -> tuple[TaskSpec, datasets.Dataset]:
        return load_task(self.spec, path, partition_by=partition_by)

    def encode(
        self, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
    ) -> datasets.Dataset:
        return encode_dataset(rows, tokenizer, self.spec, self.cfg.data.max_length)

    def label_counts(self, rows: datasets.Dataset) -> list[int]:
        return label_counts([rows], LABEL, self.num_labels)[0]

    @property
    def label_names(self) -> list[str]:
        return list(self.spec.verbalizers)

    def plot_label_distribution(
        self, partitions: Sequence[datasets.Dataset], path: Path, split: dict | None
    ) -> None:
        plot_label_distribution(partitions, path, label_names=self.label_names, split=split)

    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset
    ) -> Scores:
        generated, likelihood = score_labels(model, tokenizer, self.spec, list(rows[TEXT]),
                                             self.cfg)  # fmt: skip
        return {"predictions": generated, "ll_predictions": likelihood}

    def truth(self, rows: datasets.Dataset) -> dict[str, Any]:
        return {"labels": [int(y) for y in rows[LABEL]]}

    def pool(
        self,
        round_idx: int,
        clients: Sequence[dict[str, Any]],
        average: Sequence[Scores] | None,
        train_counts: list[list[int]],
    ) -> dict[str, Any]:
        labels = [c["labels"] for c in clients]
        preds, ll = [c["predictions"] for c in clients], [c["ll_predictions"] for c in clients]
        record = eval_record(round_idx, labels, preds, self.num_labels, ll, train_counts)
        if average is not None:
            avg = [a["predictions"] for a in average]
            avg_ll = [a["ll_predictions"] for a in average]
            record["average"] = pooled_metrics(labels, avg, self.num_labels, avg_ll, train_counts)
            record["average_predictions"] = avg
            record["average_ll_predictions"] = avg_ll
        return record

    def join_shards(self, parts: Sequence[Scores]) -> Scores:
        m = len(parts)
        joined: Scores = {}
        for key in self.score_keys:
            rows = [0] * sum(len(p[key]) for p in parts)
            for g, part in enumerate(parts):
                rows[g::m] = list(part[key])
            joined[key] = rows
        return joined

    def global_record(
        self,
        truth: dict[str, Any],
        clients: Sequence[Scores],
        average: Scores | None,
        train_counts: list[list[int]],
    ) -> dict[str, Any]:
        shared = None if average is None else (average["predictions"], average["ll_predictions"])
        return global_test_record(
            truth["labels"],
            [c["predictions"] for c in clients],
            [c["ll_predictions"] for c in clients],
            shared,
            self.num_labels,
            train_counts,
        )


class GenerationTask(Task):
    """Instruction tuning: perplexity of the references, ROUGE-L (and a judge) of answers."""

    labelled = False
    score_keys = ("metrics",)

    def __init__(self, cfg: DictConfig, judge: Judge | None = None) -> None:
        super().__init__(cfg)
        self.spec: InstructionTask = instruction_task_from_config(cfg.data)
        self.judge = judge

    def load(
        self, path: str | None, partition_by: str | None = None
    ) -> tuple[InstructionTask, datasets.Dataset]:
        return load_instruction(self.spec, path, partition_by=partition_by)

    def encode(
        self, rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase
    ) -> datasets.Dataset:
        return encode_instructions(rows, tokenizer, self.cfg.data.max_length)

    def label_counts(self, rows: datasets.Dataset) -> list[int]:
        return []  # instruction tuning: no labels

    def plot_label_distribution(
        self, partitions: Sequence[datasets.Dataset], path: Path, split: dict | None
    ) -> None:
        return None  # no labels to plot

    def score(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: datasets.Dataset
    ) -> Scores:
        metrics = generation_metrics(
            model,
            tokenizer,
            rows,
            max_length=self.cfg.data.max_length,
            max_new_tokens=self.cfg.eval.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
            judge=self.judge,
        )
        return {"metrics": metrics}

    def score_union(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        slices: Sequence[datasets.Dataset],
    ) -> list[Scores]:
        # In process the union of the slices is scored at once (one part: already pooled).
        return [self.score(model, tokenizer, datasets.concatenate_datasets(list(slices)))]

    def pool(
        self,
        round_idx: int,
        clients: Sequence[dict[str, Any]],
        average: Sequence[Scores] | None,
        train_counts: list[list[int]],
    ) -> dict[str, Any]:
        per_client = [c["metrics"] for c in clients]
        record: dict[str, Any] = {
            "type": "eval",
            "task": "generation",
            "round": round_idx,
            "clients": per_client,
            "client_mean": {
                k: sum(m[k] for m in per_client) / len(per_client)
                for k in GENERATION_METRICS
                if k in per_client[0]
            },
        }
        if average is not None:
            # Each part is the average model on some clients' slices; pooled, on their union.
            parts = [a["metrics"] for a in average]
            record["average"] = parts[0] if len(parts) == 1 else pool_generation_metrics(parts)
        return record


def make_task(cfg: DictConfig, scoring: bool = True) -> Task:
    """The run's task. `scoring`: it will score models, so `eval.judge` is loaded (a bad
    one fails here, whatever the task); the coordinator only pools and loads none."""
    judge = load_judge(cfg.eval.judge) if scoring else None
    if is_generation_task(cfg.data.name):
        return GenerationTask(cfg, judge)
    return ClassificationTask(cfg)
