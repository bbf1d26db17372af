"""Classification-as-generation evaluation: greedy decode the label word, score it.

A prediction is the verbalizer that the greedy continuation starts with
(case-insensitive, longest match first); anything else counts as invalid
(label -1), i.e. always wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.data import TaskSpec, encode_prompts

INVALID = -1


def parse_label(text: str, verbalizers: Sequence[str]) -> int:
    answer = text.strip().lower()
    by_length = sorted(range(len(verbalizers)), key=lambda i: -len(verbalizers[i]))
    for label in by_length:
        if answer.startswith(verbalizers[label].lower()):
            return label
    return INVALID


def max_label_tokens(tokenizer: PreTrainedTokenizerBase, verbalizers: Sequence[str]) -> int:
    return max(len(tokenizer(" " + v, add_special_tokens=False)["input_ids"]) for v in verbalizers)


@torch.no_grad()
def predict_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[int]:
    """Greedy-generate the answer for each text and map it to a label id."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    new_tokens = max_label_tokens(tokenizer, task.verbalizers) + 1
    predictions: list[int] = []
    for start in range(0, len(texts), batch_size):
        batch = encode_prompts(texts[start : start + batch_size], tokenizer, task, max_length)
        batch = {k: v.to(device) for k, v in batch.items()}
        output = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )
        continuations = tokenizer.batch_decode(
            output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        predictions.extend(parse_label(c, task.verbalizers) for c in continuations)
    model.train(was_training)
    return predictions


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy and support-weighted F1 over the true classes; invalid predictions are wrong."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        return {"accuracy": float("nan"), "f1_weighted": float("nan"), "invalid_rate": 0.0}
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    f1_sum = 0.0
    for label in range(num_labels):
        support = sum(t == label for t in y_true)
        if support == 0:
            continue
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        predicted = sum(p == label for p in y_pred)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        f1_sum += support * f1
    return {
        "accuracy": correct / len(y_true),
        "f1_weighted": f1_sum / len(y_true),
        "invalid_rate": sum(p == INVALID for p in y_pred) / len(y_pred),
    }


def eval_record(
    round_idx: int, labels: list[list[int]], preds: list[list[int]], num_labels: int
) -> dict[str, Any]:
    """Per-client metrics on local test sets, their mean, and pooled metrics."""
    per_client = [classification_metrics(y, p, num_labels) for y, p in zip(labels, preds)]
    mean = {
        key: sum(m[key] for m in per_client) / len(per_client)
        for key in ("accuracy", "f1_weighted")
    }
    return {
        "type": "eval",
        "round": round_idx,
        "clients": per_client,
        "client_mean": mean,
        "global": pooled_metrics(labels, preds, num_labels),
        "predictions": preds,
        "labels": labels,
    }


def pooled_metrics(labels: list[list[int]], preds: list[list[int]], num_labels: int) -> dict:
    flat_y = [y for ys in labels for y in ys]
    flat_p = [p for ps in preds for p in ps]
    return classification_metrics(flat_y, flat_p, num_labels)


def confusion_matrix(
    labels: Sequence[int], preds: Sequence[int], num_labels: int
) -> list[list[int]]:
    """counts[true][predicted]; the last column counts answers that named no label."""
    counts = [[0] * (num_labels + 1) for _ in range(num_labels)]
    for y, p in zip(labels, preds, strict=True):
        counts[y][p if 0 <= p < num_labels else num_labels] += 1
    return counts
