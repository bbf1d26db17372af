"""Classification by likelihood: the label whose answer the model finds most probable.

Generated-label accuracy counts a malformed answer as wrong, so before training it
mostly measures the answer format. Scoring sum_t log p(answer_t | prompt, answer_<t)
of every verbalizer (its tokens and the eos that training appends) separates
learning the classes from learning the format. Prompts are truncated exactly as in
training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from deca_flower.data import TaskSpec, scoring_ids


@torch.no_grad()
def answer_log_likelihoods(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[list[float]]:
    """scores[i][c] = sum of log p(answer c's tokens | prompt i), in float32."""
    pairs = [(i, c) for i in range(len(prompts)) for c in range(len(answers))]
    scores = [[0.0] * len(answers) for _ in prompts]
    device = next(model.parameters()).device
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = [list(prompts[i]) + list(answers[c]) for i, c in chunk]
        ids, mask = _left_pad(rows, pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # positions as without padding
        keep = max(len(answers[c]) for _, c in chunk) + 1
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep
        ).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        for row, (i, c) in enumerate(chunk):
            answer = torch.tensor(answers[c], device=device)
            n = len(answer)
            # logits[:, j] predicts the token after position T - keep + j; the answer
            # occupies the last n positions, predicted by logits at keep-1-n .. keep-2.
            predicted = log_probs[row, keep - 1 - n : keep - 1]
            scores[i][c] = float(predicted.gather(-1, answer[:, None]).sum())
    return scores


def likelihood_labels(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: TaskSpec,
    texts: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 128,
) -> list[int]:
    """For each text, the label id whose answer has the highest log-likelihood."""
    if not texts:
        return []
    was_training = model.training
    model.eval()
    prompts, answers = scoring_ids(texts, tokenizer, task, max_length)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    scores = answer_log_likelihoods(
        model, prompts, answers, pad_token_id=pad, batch_size=batch_size
    )
    model.train(was_training)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding puts every row's answer at the end, so one logits slice serves all."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, width - len(r) :] = torch.tensor(r)
        mask[k, width - len(r) :] = 1
    return ids, mask
