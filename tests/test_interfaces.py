"""One task interface and one method interface: the engine, the node and the coordinator
call them and never ask which task or method they run (issue 14, item 4)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import datasets
import pytest
import torch

from deca_flower.compression import CastCodec, Int8Codec, TopKCodec
from deca_flower.data import TaskSpec, label_counts
from deca_flower.evaluation import eval_record, global_test_record, pooled_metrics
from deca_flower.generation import pool_generation_metrics
from deca_flower.methods import METHODS, MethodError
from deca_flower.mixing import (
    CastAverage,
    ChocoGossip,
    NoMixing,
    TsvdConsensus,
    WeightedAverage,
)
from deca_flower.task_kinds import ClassificationTask, GenerationTask, make_task

PACKAGE = Path(__file__).resolve().parents[1] / "deca_flower"
CALLERS = ("engine.py", "node.py", "server_app.py")

# Names and strings that tell the task kinds or the methods apart.
SWITCH_NAMES = {"is_generation_task", "GENERATION_METRICS", "TaskSpec", "InstructionTask"}
SWITCH_ATTRIBUTES = {"pooled_data", "mixing", "trains"}
KIND_STRINGS = {"generation", "classification", "alpaca", "custom", "custom-instruction"}
KIND_STRINGS |= set(METHODS) | {m.mixing for m in METHODS.values()}
KIND_STRINGS |= {m.trains for m in METHODS.values()}
# The modules whose functions are the kinds' own code: callers go through the interfaces.
KIND_MODULES = {"deca_flower.generation", "deca_flower.evaluation", "deca_flower.likelihood",
                "deca_flower.decaf"}  # fmt: skip


def kind_switches(source: str) -> list[str]:
    """Every place in `source` that names a task or method kind, or reads a method's kind."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", "?")
        if isinstance(node, ast.Name) and node.id in SWITCH_NAMES:
            found.append(f"{line}: {node.id}")
        elif isinstance(node, ast.alias) and node.name in SWITCH_NAMES:
            found.append(f"{line}: import {node.name}")
        elif isinstance(node, ast.ImportFrom) and node.module in KIND_MODULES:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Attribute) and node.attr in SWITCH_ATTRIBUTES:
            if _is_method_or_cfg_algorithm(node.value):
                found.append(f"{line}: .{node.attr}")
        elif isinstance(node, ast.Compare):
            for part in [node.left, *node.comparators]:
                if isinstance(part, ast.Constant) and part.value in KIND_STRINGS:
                    found.append(f"{line}: comparison with {part.value!r}")
    return found


def _is_method_or_cfg_algorithm(value: ast.expr) -> bool:
    # `self.method.mixing`, `method.pooled_data`, `METHODS[...].trains`; not
    # `cfg.topology.mixing` (the rule that builds W, which every method shares).
    text = ast.unparse(value)
    return "method" in text.lower() or "METHODS" in text


@pytest.mark.parametrize("module", CALLERS)
def test_callers_hold_no_task_or_method_switch(module):
    source = (PACKAGE / module).read_text()
    assert kind_switches(source) == []


@pytest.mark.parametrize(
    "snippet",
    [
        "if is_generation_task(cfg.data.name):\n    pass",
        "from deca_flower.generation import GENERATION_METRICS",
        "from deca_flower.evaluation import score_labels",
        "if self.method.mixing == 'tsvd':\n    pass",
        "x = [0] if self.method.pooled_data else members",
        "if METHODS[cfg.algorithm.method].pooled_data:\n    pass",
        "if record.get('task') == 'generation':\n    pass",
        "if cfg.algorithm.method != 'centralized':\n    pass",
        "if isinstance(task, TaskSpec):\n    pass",
    ],
)
def test_the_check_finds_the_old_switches(snippet):
    assert kind_switches(snippet), snippet


def test_the_check_leaves_other_comparisons_alone():
    source = "w = mixing_matrix(g, cfg.topology.mixing)\nok = r['type'] == 'eval'"
    assert kind_switches(source) == []


# ---------------------------------------------------------------------- tasks


@pytest.fixture
def classification(make_config):
    return make_task(make_config(), scoring=False)


def test_make_task_picks_the_kind(make_config, tmp_path):
    assert isinstance(make_task(make_config()), ClassificationTask)
    generation = make_task(make_config(**{"data.name": "alpaca", "data.path": str(tmp_path)}))
    assert isinstance(generation, GenerationTask)
    assert generation.label_names is None and generation.label_counts(_rows([0, 1])) == []


def _rows(labels: list[int], texts: list[str] | None = None) -> datasets.Dataset:
    texts = texts or [f"text {i}" for i in range(len(labels))]
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def test_classification_pools_as_eval_record_and_pooled_metrics(classification):
    assert isinstance(classification.spec, TaskSpec) and classification.num_labels == 2
    labels = [[0, 1, 1, 0], [1, 1, 0], [0, 0, 1, 1]]
    preds = [[0, 1, -1, 0], [1, 0, 0], [1, 1, 1, 1]]
    ll = [[0, 1, 1, 1], [1, 1, 1], [0, 0, 1, 0]]
    avg, avg_ll = [[0, 0, 1, 0], [1, 1, 1], [0, 1, 1, 1]], [[1, 1, 1, 0], [0, 1, 0], [0, 0, 0, 1]]
    counts = [[5, 3], [1, 7], [4, 4]]
    clients = [{"predictions": p, "ll_predictions": q, **classification.truth(_rows(y))}
               for p, q, y in zip(preds, ll, labels)]  # fmt: skip
    average = [{"predictions": p, "ll_predictions": q} for p, q in zip(avg, avg_ll)]
    got = classification.pool(2, clients, average, counts)
    expected = eval_record(2, labels, preds, 2, ll, counts)
    expected["average"] = pooled_metrics(labels, avg, 2, avg_ll, counts)
    expected["average_predictions"], expected["average_ll_predictions"] = avg, avg_ll
    assert got == expected
    assert classification.pool(-1, clients, None, counts) == eval_record(-1, labels, preds, 2,
                                                                        ll, counts)  # fmt: skip


def test_classification_global_record_rejoins_the_shards(classification):
    labels = [0, 1, 1, 0, 1, 0, 0]
    base = {"predictions": [0, 1, 0, 0, 1, 1, 0], "ll_predictions": [1, 1, 1, 0, 0, 0, 0]}
    # Node g scored rows g::3 of the global test.
    shards = [{k: v[g::3] for k, v in base.items()} for g in range(3)]
    assert classification.join_shards(shards) == base
    clients = [{"predictions": [1] * 7, "ll_predictions": [0] * 7}, base]
    counts = [[3, 1], [0, 2]]
    got = classification.global_record({"labels": labels}, clients, base, counts)
    assert got == global_test_record(
        labels, [c["predictions"] for c in clients], [c["ll_predictions"] for c in clients],
        (base["predictions"], base["ll_predictions"]), 2, counts,
    )  # fmt: skip


def test_classification_counts_labels_as_before(classification):
    rows = _rows([1, 0, 1, 1, 1])
    assert classification.label_counts(rows) == label_counts([rows], "label", 2)[0] == [1, 4]
    assert classification.truth(rows) == {"labels": [1, 0, 1, 1, 1]}


def _metrics(ppl_nll: float, tokens: int, rouge: float, n: int) -> dict[str, float]:
    return {"perplexity": math.exp(ppl_nll / tokens), "rouge_l": rouge, "num_examples": n,
            "response_tokens": tokens, "response_nll": ppl_nll}  # fmt: skip


def test_generation_pools_as_the_coordinator_did(make_config, tmp_path):
    task = make_task(make_config(**{"data.name": "alpaca", "data.path": str(tmp_path)}))
    clients = [{"metrics": _metrics(12.0, 10, 0.25, 4)}, {"metrics": _metrics(30.0, 14, 0.5, 3)}]
    average = [{"metrics": _metrics(9.0, 10, 0.75, 4)}, {"metrics": _metrics(21.0, 14, 0.1, 3)}]
    got = task.pool(0, clients, average, [[], []])
    per_client = [c["metrics"] for c in clients]
    assert got == {
        "type": "eval",
        "task": "generation",
        "round": 0,
        "clients": per_client,
        "client_mean": {
            "perplexity": (per_client[0]["perplexity"] + per_client[1]["perplexity"]) / 2,
            "rouge_l": (0.25 + 0.5) / 2,
        },
        "average": pool_generation_metrics([a["metrics"] for a in average]),
    }
    # The engine scores the union of the slices at once: its one part is the average.
    union = _metrics(30.0, 24, 0.4, 7)
    assert task.pool(0, clients, [{"metrics": union}], [[], []])["average"] is union
    assert "average" not in task.pool(-1, clients, None, [[], []])


# ---------------------------------------------------------------------- methods


def test_each_method_names_its_mixing_rule():
    rules = {name: type(m.mixer(_Layout())) for name, m in METHODS.items()}
    assert rules == {
        "deca": WeightedAverage, "dec-lora": WeightedAverage, "decaf": TsvdConsensus,
        "dec-adapter": WeightedAverage, "full-adam": WeightedAverage, "local": NoMixing,
        "centralized": NoMixing,
    }  # fmt: skip


class _Layout:
    """A partition with one LoRA pair (rank 1 on a 3 x 2 weight), for TsvdConsensus."""

    def named_parameters(self, k):
        return [("l.lora_A.weight", torch.zeros(1, 2)), ("l.lora_B.weight", torch.zeros(3, 1))]


def test_weighted_average_in_process_is_eq_7_over_the_members():
    w = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])  # rank 2 lost
    blocks = {0: torch.tensor([1.0, 2.0]), 1: torch.tensor([3.0, 6.0])}
    mixed = WeightedAverage(_Layout()).mix_in_process(w, blocks, torch.float32)
    assert mixed.keys() == {0, 1}
    for i in (0, 1):
        torch.testing.assert_close(mixed[i], torch.tensor([2.0, 4.0]))
    assert NoMixing(_Layout()).mix_in_process(w, blocks, torch.float32) == {}


def test_centralized_trains_one_model_on_every_clients_data_and_is_not_deployable():
    central, deca = METHODS["centralized"], METHODS["deca"]
    assert central.training_sets(3) == [[0, 1, 2]]
    assert deca.training_sets(3) == [[0], [1], [2]]
    assert central.faults_to_replay({(0, 1)}) == set()
    assert deca.faults_to_replay({(0, 1)}) == {(0, 1)}
    deca.check_deployable()
    with pytest.raises(MethodError, match="deca-flower engine algorithm=centralized"):
        central.check_deployable()


def test_tsvd_consensus_in_process_is_decaf_mix_of_each_members_row():
    from deca_flower.decaf import decaf_mix, lora_layout

    gen = torch.Generator().manual_seed(0)
    blocks = {r: torch.randn(5, generator=gen) for r in (0, 1, 3)}  # rank 2 lost
    w = torch.tensor([[0.5, 0.25, 0, 0.25], [0.25, 0.75, 0, 0], [0] * 4, [0.25, 0, 0, 0.75]])
    mixed = TsvdConsensus(_Layout()).mix_in_process(w, blocks, torch.bfloat16)
    layout = lora_layout([(n, p.shape) for n, p in _Layout().named_parameters(0)])
    for i in blocks:
        row = {j: float(w[i, j]) for j in blocks if w[i, j] > 0}
        # Neighbours' blocks arrive in the wire dtype; a member's own block does not.
        sent = {j: blocks[j] if j == i else blocks[j].bfloat16().float() for j in row}
        torch.testing.assert_close(mixed[i], decaf_mix(sent, row, layout), rtol=0, atol=0)


# ---------------------------------------------------------------------- compressed mixing


def test_compression_picks_the_rule_in_the_method_interface():
    deca = METHODS["deca"]
    assert isinstance(deca.mixer(_Layout(), Int8Codec(4)), ChocoGossip)
    assert isinstance(deca.mixer(_Layout(), TopKCodec(0.5)), ChocoGossip)
    assert type(deca.mixer(_Layout(), CastCodec(torch.bfloat16))) is CastAverage
    assert type(deca.mixer(_Layout(), None)) is WeightedAverage
    for name in ("decaf", "local"):
        with pytest.raises(ValueError, match="gossip.compression=none"):
            METHODS[name].mixer(_Layout(), Int8Codec(4))


def test_cast_average_in_process_is_eq_7_over_a_cast_wire():
    gen = torch.Generator().manual_seed(1)
    blocks = {r: torch.randn(7, generator=gen) for r in (0, 1, 3)}  # rank 2 lost
    w = torch.tensor([[0.5, 0.25, 0, 0.25], [0.25, 0.75, 0, 0], [0] * 4, [0.25, 0, 0, 0.75]])
    mixed = CastAverage(CastCodec(torch.bfloat16)).mix_in_process(w, blocks, torch.float32)
    assert mixed.keys() == blocks.keys()
    for i in blocks:
        # Neighbours' blocks rounded to bf16 once, a member's own block exact.
        want = sum(w[i, j].item() * (x if j == i else x.bfloat16().float())
                   for j, x in blocks.items())  # fmt: skip
        torch.testing.assert_close(mixed[i], want, rtol=0, atol=1e-6)


def test_choco_gossip_in_process_follows_choco_and_keeps_its_state_per_block():
    codec = Int8Codec(3)
    gamma = 0.5
    w = torch.tensor([[0.5, 0.25, 0, 0.25], [0.25, 0.75, 0, 0], [0] * 4, [0.25, 0, 0, 0.75]])
    gen = torch.Generator().manual_seed(2)
    start = {r: torch.randn(8, generator=gen) for r in (0, 1, 3)}
    rule = ChocoGossip(codec, gamma)
    rule.begin_block(5, {r: x.clone() for r, x in start.items()})
    x_hat = {r: x.clone() for r, x in start.items()}  # the reference: CHOCO by hand
    c = {r: torch.zeros(8) for r in start}
    blocks = {r: x.clone() for r, x in start.items()}
    for _ in range(3):
        half = {r: x + 0.01 * torch.randn(8, generator=gen) for r, x in blocks.items()}
        q = {r: codec.decode(codec.encode(half[r] - x_hat[r]), 8) for r in half}
        for r in half:
            x_hat[r] += q[r]
            c[r] += sum(w[r, j].item() * q[j] for j in half) - q[r]
        mixed = rule.mix_in_process(w, half, torch.float32)
        for r in half:
            torch.testing.assert_close(mixed[r], half[r] + gamma * c[r], rtol=0, atol=1e-6)
        blocks = mixed
    # The engine keeps the state across the block's phases; a heal (forget) restarts it.
    rule.begin_block(5, blocks)
    torch.testing.assert_close(rule.block_state(0, 5)["x_hat"], x_hat[0], rtol=0, atol=1e-6)
    rule.forget(0, [5])
    rule.begin_block(5, blocks)
    assert torch.equal(rule.block_state(0, 5)["x_hat"], blocks[0])
    assert not rule.block_state(0, 5)["consensus"].any()


def test_choco_gossip_on_a_node_takes_its_state_from_the_store():
    rule = ChocoGossip(Int8Codec(3))
    saved = {"x_hat": torch.arange(4.0), "consensus": torch.ones(4)}
    rule.begin_block(1, {0: torch.zeros(4)}, lambda rank: saved)
    assert torch.equal(rule.block_state(0, 1)["x_hat"], saved["x_hat"])
    # The next block's first phase: a fresh state, and only the active block is held.
    rule.begin_block(2, {0: torch.full((4,), 3.0)}, lambda rank: None)
    assert torch.equal(rule.block_state(0, 2)["x_hat"], torch.full((4,), 3.0))
    assert (0, 1) not in rule.states
