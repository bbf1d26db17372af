"""Instruction tuning: Alpaca rows, ROUGE-L, perplexity, and an engine run on a local file."""

from __future__ import annotations

import functools
import json
import math

import datasets
import pytest
import torch

from deca_flower.data import DataError, pad_batch
from deca_flower.engine import run_engine
from deca_flower.generation import (
    encode_instructions,
    generation_metrics,
    load_instruction_dataset,
    pool_generation_metrics,
    response_perplexity,
    rouge_l,
)
from deca_flower.models import load_model

COLOURS = ["red", "green", "blue", "yellow", "black", "white"]


@pytest.fixture
def alpaca_file(tmp_path):
    rows = []
    for i in range(120):
        colour = COLOURS[i % len(COLOURS)]
        rows.append(
            {
                "instruction": f"Name colour number {i % len(COLOURS)}.",
                "input": "" if i % 2 else "Answer in one word.",
                "output": f"The colour is {colour}.",
            }
        )
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_rouge_l_is_the_lcs_f1_of_word_tokens():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat" (5 words)
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "x a y b") == pytest.approx(2 * 0.5 * 0.5 / (0.5 + 0.5))
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("identical words", "Identical, words!") == pytest.approx(1.0)


def test_alpaca_rows_become_prompt_and_response(alpaca_file):
    task, ds = load_instruction_dataset("alpaca", str(alpaca_file))
    assert len(ds) == 120
    assert "### Instruction:\nName colour number 0." in ds[0]["prompt"]
    assert "### Input:\nAnswer in one word." in ds[0]["prompt"]
    assert "### Input:" not in ds[1]["prompt"]
    assert ds[0]["prompt"].endswith("### Response:\n") and ds[0]["response"] == "The colour is red."


def test_missing_alpaca_columns_list_what_was_found(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}))
    with pytest.raises(DataError, match=r"instruction.*has columns \['question', 'answer'\]"):
        load_instruction_dataset("alpaca", str(path))


def test_perplexity_equals_exp_of_the_models_own_mean_loss(alpaca_file):
    model, tokenizer = load_model("tiny-llama")
    _, ds = load_instruction_dataset("alpaca", str(alpaca_file))
    rows = encode_instructions(ds.select(range(3)), tokenizer, max_length=192)
    assert all(label == -100 for label in rows[0]["labels"][:10])  # prompt not trained on
    ppl = response_perplexity(model, rows, tokenizer.pad_token_id, batch_size=2)
    # Independent: HF's loss per row (mean NLL over its response tokens), token-weighted.
    total, count = 0.0, 0
    for i in range(3):
        batch = pad_batch(rows[i : i + 1], tokenizer.pad_token_id)
        with torch.no_grad():
            loss = model(**batch).loss
        n = sum(1 for t in rows[i]["labels"][1:] if t != -100)
        total, count = total + float(loss) * n, count + n
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-4)


def test_metrics_pooled_over_test_sets_equal_the_metrics_of_their_union(alpaca_file):
    model, tokenizer = load_model("tiny-llama")
    _, ds = load_instruction_dataset("alpaca", str(alpaca_file))
    parts = [ds.select(range(0, 3)), ds.select(range(3, 8))]
    score = functools.partial(
        generation_metrics, model, tokenizer, max_length=192, max_new_tokens=4, batch_size=2
    )
    pooled = pool_generation_metrics([score(p) for p in parts])
    union = score(datasets.concatenate_datasets(parts))
    assert pooled["num_examples"] == union["num_examples"] == 8
    assert pooled["response_tokens"] == union["response_tokens"]
    assert pooled["perplexity"] == pytest.approx(union["perplexity"], rel=1e-5)
    assert pooled["rouge_l"] == pytest.approx(union["rouge_l"], abs=1e-9)
    # Example- and token-weighted by hand: 2 examples at 0.5 and 3 at 0.2; NLL 10+20 over 5+15.
    hand = pool_generation_metrics(
        [
            {"rouge_l": 0.5, "num_examples": 2, "response_tokens": 5, "response_nll": 10.0},
            {"rouge_l": 0.2, "num_examples": 3, "response_tokens": 15, "response_nll": 20.0},
        ]
    )
    assert hand["rouge_l"] == pytest.approx(0.32) and hand["perplexity"] == pytest.approx(
        math.exp(1.5)
    )


def test_engine_instruction_tuning_lowers_perplexity(make_config, alpaca_file):
    cfg = make_config(
        **{
            "data.name": "alpaca",
            "data.path": str(alpaca_file),
            "eval.zero_shot": True,
            "eval.max_new_tokens": 8,
            "train.steps_per_block": 4,
        }
    )
    result = run_engine(cfg)
    zero, trained = result.evals()
    assert zero["task"] == "generation"
    assert trained["client_mean"]["perplexity"] < zero["client_mean"]["perplexity"]
    assert 0.0 <= trained["client_mean"]["rouge_l"] <= 1.0
    assert "perplexity" in trained["average"]
    assert "ROUGE-L" in (result.out_dir / "summary.md").read_text()
