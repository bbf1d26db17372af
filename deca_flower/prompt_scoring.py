"""Both classification scorings from one forward pass over each prompt.

Scoring a model by generated label (`evaluation.predict_labels`) and by likelihood
(`likelihood.likelihood_labels`) separately runs every prompt through the model once for
generation and once more per verbalizer: three prompt forwards per example for a two-class
task, most of an evaluation's time. Here each batch of prompts runs once; its key/value
cache then serves both the answers' log-likelihoods (a short forward over each answer's
tokens) and the greedy continuation (one token per step, as `generate` does greedily).
Both functions above stay as the independent references the tests compare against.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from deca_flower.likelihood import _left_pad

Ids = Sequence[Sequence[int]]


@torch.no_grad()
def score_prompts(
    model: PreTrainedModel,
    prompts: Ids,
    answers: Ids,
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    new_tokens: int,
    batch_size: int = 16,
) -> tuple[list[list[int]], list[list[float]]]:
    """(greedy continuation ids, scores) per prompt; scores[i][c] = sum of
    log p(answer c's tokens | prompt i) in float32, as `answer_log_likelihoods` computes.

    A continuation stops at the first eos (kept) and is at most `new_tokens` long."""
    continuations: list[list[int]] = []
    scores: list[list[float]] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        ids, mask = _left_pad([list(p) for p in prompts[start : start + batch_size]], pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),  # positions as without padding
            use_cache=True,
            logits_to_keep=1,
        )
        first = out.logits[:, -1].float()  # the distribution of the first answer token
        scores += _answer_scores(model, out.cache, mask, first, answers)
        continuations += _greedy(
            model, out.cache, mask, first, new_tokens, eos_token_ids, pad_token_id
        )
    return continuations, scores


def _answer_scores(model, cache, mask: torch.Tensor, first: torch.Tensor, answers: Ids):
    """Every answer after every prompt of the batch: row b*C + c is prompt b, answer c."""
    batch, n_answers = mask.shape[0], len(answers)
    device = mask.device
    log_first = torch.log_softmax(first, dim=-1)
    totals = torch.stack(
        [log_first[:, a[0]] for a in answers], dim=1
    )  # (batch, C): every answer's first token
    tail = max(len(a) for a in answers) - 1
    if tail > 0:
        # Feed each answer but its last token; right padding is harmless (causal), and
        # position p predicts answer token p+1.
        feed = torch.tensor([list(a[:-1]) + [0] * (tail - len(a) + 1) for a in answers])
        feed = feed.to(device).repeat(batch, 1)
        cache = copy.deepcopy(cache)  # the greedy continuation goes on from the original
        cache.batch_repeat_interleave(n_answers)
        prompt_mask = mask.repeat_interleave(n_answers, dim=0)
        full_mask = torch.cat([prompt_mask, torch.ones_like(feed)], dim=1)
        last = prompt_mask.sum(-1, keepdim=True) - 1
        positions = last + 1 + torch.arange(tail, device=device)
        logits = model(
            input_ids=feed, attention_mask=full_mask, position_ids=positions,
            cache=cache, use_cache=True,
        ).logits.float()  # fmt: skip
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, n_answers, tail, -1)
        for c, answer in enumerate(answers):
            rest = torch.tensor(answer[1:], device=device, dtype=torch.long)
            picked = log_probs[:, c, : len(rest)].gather(-1, rest.expand(batch, -1)[..., None])
            totals[:, c] += picked[..., 0].sum(-1)
    return totals.tolist()


def _greedy(model, cache, mask, first, new_tokens: int, eos_ids: Sequence[int], pad_id: int):
    """Greedy decoding from the prompt's cache, as `generate(do_sample=False)`: a finished
    row (it produced an eos) is padded; all stop when all are finished."""
    eos = torch.tensor(list(eos_ids), device=mask.device)
    position = mask.sum(-1, keepdim=True) - 1
    unfinished = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)
    tokens, logits = [], first
    pad = torch.tensor(pad_id, device=mask.device)
    for step in range(new_tokens):
        token = torch.where(unfinished, logits.argmax(-1), pad)
        tokens.append(token)
        unfinished &= ~torch.isin(token, eos)
        if step == new_tokens - 1 or not bool(unfinished.any()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        position = position + 1
        logits = model(
            input_ids=token[:, None], attention_mask=mask, position_ids=position,
            cache=cache, use_cache=True,
        ).logits[:, -1].float()  # fmt: skip
    rows = torch.stack(tokens, dim=1).tolist()
    return [_until_eos(row, set(eos_ids)) for row in rows]


def _until_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row
