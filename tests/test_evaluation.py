"""Label parsing, accuracy and weighted F1 against scikit-learn, greedy prediction."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from deca_flower.data import get_task
from deca_flower.evaluation import INVALID, classification_metrics, parse_label, predict_labels
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
