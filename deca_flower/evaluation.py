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

from deca_flower.data import TaskSpec, encode_prompts, scoring_ids
from deca_flower.prompt_scoring import score_prompts

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


def score_labels(
    model, tokenizer, task: TaskSpec, texts: Sequence[str], cfg
) -> tuple[list[int], list[int]]:
    """(generated labels, likelihood labels) with the run's eval batch size and max length,
    both from one forward pass per prompt (`prompt_scoring`). They equal `predict_labels`
    and `likelihood.likelihood_labels`, which run the prompts three times."""
    if not texts:
        return [], []
    was_training = model.training
    model.eval()
    prompts, answers = scoring_ids(texts, tokenizer, task, cfg.data.max_length)
    continuations, scores = score_prompts(
        model,
        prompts,
        answers,
        pad_token_id=_pad_id(tokenizer),
        eos_token_ids=eos_token_ids(model, tokenizer),
        new_tokens=max_label_tokens(tokenizer, task.verbalizers) + 1,
        batch_size=cfg.eval.batch_size,
    )
    model.train(was_training)
    texts_out = tokenizer.batch_decode(continuations, skip_special_tokens=True)
    generated = [parse_label(t, task.verbalizers) for t in texts_out]
    return generated, [max(range(len(s)), key=s.__getitem__) for s in scores]


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end greedy generation, as `generate` reads them."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def classification_metrics(
    y_true: Sequence[int], y_pred: Sequence[int], num_labels: int
) -> dict[str, float]:
    """Accuracy, support-weighted F1 and macro-F1 over the true classes present.

    Invalid predictions are wrong. Macro-F1 weighs every class that occurs in ``y_true``
    equally, so always answering the majority class scores low even on a skewed split.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} labels but {len(y_pred)} predictions")
    if not y_true:
        nan = float("nan")
        return {"accuracy": nan, "f1_weighted": nan, "f1_macro": nan, "invalid_rate": 0.0}
    correct = sum(t == p for t, p in zip(y_true, y_pred))
    f1_sum, f1_plain, present = 0.0, 0.0, 0
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
        f1_plain += f1
        present += 1
    return {
        "accuracy": correct / len(y_true),
        "f1_weighted": f1_sum / len(y_true),
        "f1_macro": f1_plain / present,
        "invalid_rate": sum(p == INVALID for p in y_pred) / len(y_pred),
    }


def majority_labels(train_counts: Sequence[Sequence[int]]) -> list[int]:
    """Each client's most frequent training label (lowest id on ties)."""
    return [max(range(len(c)), key=lambda k: (c[k], -k)) for c in train_counts]


def pooled_majority(train_counts: Sequence[Sequence[int]]) -> int:
    """The most frequent label of all clients' training data together."""
    totals = [sum(col) for col in zip(*train_counts)]
    return majority_labels([totals])[0]


def scored_metrics(
    y_true: Sequence[int],
    generated: Sequence[int],
    likelihood: Sequence[int] | None,
    num_labels: int,
    majority: int | None = None,
) -> dict[str, float]:
    """Generated-label metrics, the same by likelihood (``ll_``), and the constant
    majority-class predictor's (``majority_``) on the same examples."""
    out = classification_metrics(y_true, generated, num_labels)
    if likelihood is not None:
        ll = classification_metrics(y_true, likelihood, num_labels)
        out.update({f"ll_{k}": v for k, v in ll.items() if k != "invalid_rate"})
    if majority is not None:
        base = classification_metrics(y_true, [majority] * len(y_true), num_labels)
        out.update({f"majority_{k}": v for k, v in base.items() if k != "invalid_rate"})
    return out


def mean_metrics(per_client: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = [k for k in per_client[0] if k != "invalid_rate"]
    return {k: sum(m[k] for m in per_client) / len(per_client) for k in keys}


def eval_record(
    round_idx: int,
    labels: list[list[int]],
    preds: list[list[int]],
    num_labels: int,
    ll_preds: list[list[int]] | None = None,
    train_counts: list[list[int]] | None = None,
) -> dict[str, Any]:
    """Per-client metrics on local test sets, their mean, and pooled metrics.

    With ``ll_preds`` also the likelihood-scored metrics; with ``train_counts`` (each
    client's training label counts) the majority-class predictor's scores beside them.
    """
    majority = majority_labels(train_counts) if train_counts else [None] * len(labels)
    lls = ll_preds if ll_preds is not None else [None] * len(labels)
    per_client = [
        scored_metrics(y, p, q, num_labels, m) for y, p, q, m in zip(labels, preds, lls, majority)
    ]
    record = {
        "type": "eval",
        "round": round_idx,
        "clients": per_client,
        "client_mean": mean_metrics(per_client),
        "global": pooled_metrics(labels, preds, num_labels, ll_preds, train_counts),
        "predictions": preds,
        "labels": labels,
    }
    if ll_preds is not None:
        record["ll_predictions"] = ll_preds
    return record


def pooled_metrics(
    labels: list[list[int]],
    preds: list[list[int]],
    num_labels: int,
    ll_preds: list[list[int]] | None = None,
    train_counts: list[list[int]] | None = None,
) -> dict:
    """Metrics over all clients' examples together; majority = of the pooled training data."""
    flat_y = [y for ys in labels for y in ys]
    flat_p = [p for ps in preds for p in ps]
    flat_q = None if ll_preds is None else [q for qs in ll_preds for q in qs]
    majority = pooled_majority(train_counts) if train_counts else None
    return scored_metrics(flat_y, flat_p, flat_q, num_labels, majority)


def global_test_record(
    labels: list[int],
    client_preds: list[list[int]],
    client_ll: list[list[int]],
    average: tuple[list[int], list[int]] | None,
    num_labels: int,
    train_counts: list[list[int]],
) -> dict[str, Any]:
    """Every client's model, and the parameter average, on one unskewed test split.

    A client's majority baseline is its own training majority applied to this split.
    """
    majority = majority_labels(train_counts)
    clients = [
        scored_metrics(labels, p, q, num_labels, m)
        for p, q, m in zip(client_preds, client_ll, majority)
    ]
    out: dict[str, Any] = {
        "num_examples": len(labels),
        "clients": clients,
        "client_mean": mean_metrics(clients),
    }
    if average is not None:
        out["average"] = scored_metrics(
            labels, average[0], average[1], num_labels, pooled_majority(train_counts)
        )
    return out


def confusion_matrix(
    labels: Sequence[int], preds: Sequence[int], num_labels: int
) -> list[list[int]]:
    """counts[true][predicted]; the last column counts answers that named no label."""
    counts = [[0] * (num_labels + 1) for _ in range(num_labels)]
    for y, p in zip(labels, preds, strict=True):
        counts[y][p if 0 <= p < num_labels else num_labels] += 1
    return counts
