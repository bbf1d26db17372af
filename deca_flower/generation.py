"""Instruction tuning (Alpaca-style): data, training rows and generation metrics.

- Data: `instruction` / `input` / `output` rows (the Alpaca schema), from the hub
  (`tatsu-lab/alpaca`) or a local CSV/JSONL/parquet file. There are no labels to
  skew, so clients get IID shards (Flower Datasets' `IidPartitioner`).
- Training rows: the Alpaca prompt, then the response + eos; the loss covers the
  response only.
- Metrics: held-out perplexity of the reference responses, and ROUGE-L F1 of the
  greedy generation against them. `eval.judge` names an optional
  `module:function` scorer (an LLM judge on MT-Bench/Vicuna-style prompts where
  the user has one), called as `judge(prompts, answers) -> list[float]`.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import datasets
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.data import (
    GROUP,
    IGNORE_INDEX,
    DataError,
    _load_hub,
    _load_local,
    check_columns,
    group_column,
)

PROMPT = "prompt"
RESPONSE = "response"


@dataclass(frozen=True)
class InstructionTask:
    name: str
    hub_id: str | None
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    hub_config: str | None = None
    split_aliases: tuple[tuple[str, str], ...] = ()

    def prompt(self, instruction: str, context: str) -> str:
        """The Stanford Alpaca template (with or without an input)."""
        if context:
            return (
                "Below is an instruction that describes a task, paired with an input that "
                "provides further context. Write a response that appropriately completes "
                f"the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{context}"
                "\n\n### Response:\n"
            )
        return (
            "Below is an instruction that describes a task. Write a response that "
            f"appropriately completes the request.\n\n### Instruction:\n{instruction}"
            "\n\n### Response:\n"
        )


CUSTOM_INSTRUCTION = "custom-instruction"  # your own prompt/response file, by config alone

INSTRUCTION_TASKS = {
    "alpaca": InstructionTask("alpaca", hub_id="tatsu-lab/alpaca"),
    # No hub copy and no context column: data.prompt_column / data.response_column name them.
    CUSTOM_INSTRUCTION: InstructionTask(
        CUSTOM_INSTRUCTION,
        hub_id=None,
        instruction_column="prompt",
        input_column="",
        output_column="response",
    ),  # fmt: skip
}


def is_generation_task(name: str) -> bool:
    return name.strip().lower() in INSTRUCTION_TASKS


def instruction_task_from_config(data: Any) -> InstructionTask:
    """The run's instruction task, with ``data.prompt_column`` / ``data.response_column``
    naming the instruction and answer columns of the file."""
    task = INSTRUCTION_TASKS[str(data.name).strip().lower()]
    columns = {
        "instruction_column": data.get("prompt_column"),
        "output_column": data.get("response_column"),
    }
    return replace(task, **{k: v for k, v in columns.items() if v})


def load_instruction_dataset(
    name: str, path: str | None = None, split: str = "train"
) -> tuple[InstructionTask, datasets.Dataset]:
    """(task, Dataset with `prompt` and `response` columns)."""
    return load_instruction(INSTRUCTION_TASKS[name.strip().lower()], path, split)


def load_instruction(
    task: InstructionTask, path: str | None, split: str = "train", partition_by: str | None = None
) -> tuple[InstructionTask, datasets.Dataset]:
    """(task, Dataset with `prompt` and `response` columns, and `group` for partition_by)."""
    if not path and task.hub_id is None:
        raise DataError(f"data.name={task.name} reads your file: set data.path")
    raw = _load_local(path, split) if path else _load_hub(task, split)
    needed = {
        "data.prompt_column": task.instruction_column,
        "data.response_column": task.output_column,
        "data.partition_by": partition_by,
    }
    check_columns(raw, needed, task.name)
    contexts = raw[task.input_column] if task.input_column in raw.column_names else None
    groups = group_column(raw, partition_by).get(GROUP)
    kept: list[int] = []
    prompts, responses = [], []
    for i, (instruction, output) in enumerate(
        zip(raw[task.instruction_column], raw[task.output_column], strict=True)
    ):
        context = "" if contexts is None or contexts[i] is None else str(contexts[i]).strip()
        if instruction is None or output is None or not str(output).strip():
            continue
        prompts.append(task.prompt(str(instruction).strip(), context))
        responses.append(str(output).strip())
        kept.append(i)
    if not prompts:
        raise DataError(
            f"data.name={task.name!r}: no row has both a prompt (data.prompt_column="
            f"{task.instruction_column!r}) and a response (data.response_column="
            f"{task.output_column!r}); found {len(raw)} rows with columns {raw.column_names}"
        )
    columns = {PROMPT: prompts, RESPONSE: responses}
    if groups is not None:
        columns[GROUP] = [groups[i] for i in kept]
    return task, datasets.Dataset.from_dict(columns)


def iid_shards(ds: datasets.Dataset, num_clients: int, seed: int) -> list[datasets.Dataset]:
    from flwr_datasets.partitioner import IidPartitioner

    if num_clients > len(ds):
        raise DataError(f"num_clients={num_clients} is more than the {len(ds)} examples")
    partitioner = IidPartitioner(num_partitions=num_clients)
    partitioner.dataset = ds.shuffle(seed=seed)
    return [partitioner.load_partition(i) for i in range(num_clients)]


# ---------------------------------------------------------------------- training rows


def encode_instructions(
    ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Prompt + response + eos, labels -100 on the prompt; long rows lose the response tail."""
    if tokenizer.eos_token_id is None:
        raise DataError("model.name: the tokenizer has no eos token; cannot end responses")

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        prompts = tokenizer(batch[PROMPT], add_special_tokens=True)["input_ids"]
        answers = tokenizer(batch[RESPONSE], add_special_tokens=False)["input_ids"]
        out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, answer in zip(prompts, answers, strict=True):
            prompt = prompt[: max_length // 2] if len(prompt) > max_length // 2 else prompt
            answer = (list(answer) + [tokenizer.eos_token_id])[: max_length - len(prompt)]
            out["input_ids"].append(prompt + answer)
            out["attention_mask"].append([1] * (len(prompt) + len(answer)))
            out["labels"].append([IGNORE_INDEX] * len(prompt) + answer)
        return out

    return ds.map(encode, batched=True, remove_columns=ds.column_names, load_from_cache_file=False)


# ---------------------------------------------------------------------- metrics


def _words(text: str) -> list[str]:
    # rouge-score's default tokenizer: lowercase, runs of [a-z0-9] are the tokens.
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1: longest common subsequence of word tokens."""
    a, b = _words(candidate), _words(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def response_nll(
    model: PreTrainedModel, rows: datasets.Dataset, pad_token_id: int, batch_size: int = 8
) -> tuple[float, int]:
    """(summed NLL, number) of the response tokens of encoded rows (labels -100 elsewhere)."""
    from deca_flower.data import pad_batch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch(chunk, pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return total_nll, total_tokens


@torch.no_grad()
def response_perplexity(
    model: PreTrainedModel, rows: datasets.Dataset, pad_token_id: int, batch_size: int = 8
) -> float:
    """exp(mean NLL per response token) over encoded rows (labels -100 elsewhere)."""
    total_nll, total_tokens = response_nll(model, rows, pad_token_id, batch_size)
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def generate_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 256,
) -> list[str]:
    """Greedy continuations of left-padded prompts, decoded without special tokens."""
    device = next(model.parameters()).device
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[start : start + batch_size]))["input_ids"]
        ids = [p[-max_prompt_tokens:] for p in ids]
        width = max(len(p) for p in ids)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in ids], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids], device=device)
        output = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
        )
        answers += tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
    model.train(was_training)
    return [a.strip() for a in answers]


def load_judge(spec: str | None) -> Callable[[list[str], list[str]], list[float]] | None:
    """`eval.judge=package.module:function` -> the function (None when unset)."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        judge = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise DataError(
            f"eval.judge={spec!r} is not an importable `module:function` ({err})"
        ) from None
    return judge


def generation_metrics(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    test: datasets.Dataset,
    *,
    max_length: int,
    max_new_tokens: int,
    batch_size: int,
    judge: Callable[[list[str], list[str]], list[float]] | None = None,
) -> dict[str, float]:
    """Perplexity of the references, ROUGE-L of greedy answers (and the judge's mean score)."""
    rows = encode_instructions(test, tokenizer, max_length)
    pad = _pad_id(tokenizer)
    answers = generate_responses(
        model, tokenizer, test[PROMPT], max_new_tokens, batch_size, max_length
    )
    nll, tokens = response_nll(model, rows, pad, batch_size)
    out = {
        "perplexity": math.exp(nll / max(tokens, 1)),
        "rouge_l": sum(rouge_l(a, r) for a, r in zip(answers, test[RESPONSE])) / len(answers),
    }
    if judge is not None:
        scores = list(judge(list(test[PROMPT]), answers))
        if len(scores) != len(answers):
            raise DataError(f"eval.judge returned {len(scores)} scores for {len(answers)} answers")
        out["judge_score"] = sum(scores) / len(scores)
    # The sums behind the means, so metrics of several test sets can be pooled exactly.
    out.update({"num_examples": len(answers), "response_tokens": tokens, "response_nll": nll})
    return out


GENERATION_METRICS = ("perplexity", "rouge_l", "judge_score")


def pool_generation_metrics(parts: Sequence[dict[str, float]]) -> dict[str, float]:
    """The metrics of the union of the test sets behind `parts` (generation_metrics outputs):
    perplexity over all response tokens, ROUGE-L and judge score over all examples."""
    examples = sum(p["num_examples"] for p in parts)
    tokens = sum(p["response_tokens"] for p in parts)
    nll = sum(p["response_nll"] for p in parts)
    out = {"perplexity": math.exp(nll / max(tokens, 1))}
    for key in ("rouge_l", "judge_score"):
        if key in parts[0]:
            out[key] = sum(p[key] * p["num_examples"] for p in parts) / examples
    out.update({"num_examples": examples, "response_tokens": tokens, "response_nll": nll})
    return out


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
