"""The learning study runner: lr chosen on validation, verdict rule, a tiny study resumed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "simulation"))

import learning_study as study_mod  # noqa: E402

STUDY = """
name: tiny-study
shared: [model=tiny, num_clients=3, topology=ring, data.max_examples=160,
         data.validation_fraction=0.2, train.steps_per_block=1, train.layers_per_block=2,
         eval.max_examples_per_client=3, eval.global_test_size=6, eval.zero_shot=false]
tune_seeds: [0]
arms:
  DECA exact: {settings: [algorithm=deca, algorithm.bias_correction=exact], lrs: [1.0e-3],
               zero_shot: true}
  local-only: {settings: [algorithm=local], lrs: [1.0e-3]}
orderings: [[DECA exact, local-only]]
"""


def _cell(arm, lr, seed, val, test, ll=0.5):
    cid = study_mod.sweep.Cell(study_mod.variant_name(arm, lr), (), seed).id
    return cid, {"cell": cid, "val_client_accuracy": val, "val_client_ll_accuracy": ll,
                 "client_accuracy": test}  # fmt: skip


def test_lr_is_chosen_on_validation_never_on_test():
    study = {"arms": {"A": {"lrs": [1e-4, 3e-4]}}, "tune_seeds": [0, 1],
             "select_by": "val_client_accuracy"}  # fmt: skip
    cells = dict([
        _cell("A", 1e-4, 0, val=0.6, test=0.9), _cell("A", 1e-4, 1, val=0.6, test=0.9),
        _cell("A", 3e-4, 0, val=0.8, test=0.1), _cell("A", 3e-4, 1, val=0.7, test=0.1),
    ])  # fmt: skip
    assert study_mod.choose_lrs(study, cells) == {"A": 3e-4}
    del cells[_cell("A", 3e-4, 1, 0, 0)[0]]  # a tuning cell missing: no choice yet
    assert study_mod.choose_lrs(study, cells) == {}


def test_a_choice_at_the_edge_of_the_grid_is_flagged():
    study = {"arms": {"A": {"lrs": [1e-4, 3e-4, 1e-3]}, "B": {"lrs": [1e-4, 3e-4, 1e-3]},
                      "C": {"lrs": [1e-4, 3e-4, 1e-3]}}}  # fmt: skip
    edges = study_mod.grid_edges(study, {"A": 1e-3, "B": 3e-4, "C": 1e-4})
    assert edges == {"A": ("the largest", 1e-3), "C": ("the smallest", 1e-4)}
    assert study_mod.grid_edges({"arms": {"A": {"lrs": [1e-3]}}}, {"A": 1e-3}) == {}


def test_equal_tuning_budget_is_enforced(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(STUDY.replace("lrs: [1.0e-3]}", "lrs: [1.0e-3, 1.0e-2]}"))
    with pytest.raises(SystemExit, match="same number of lrs"):
        study_mod.load_study(path)


def test_verdict_calls_small_differences_no_difference():
    def cells(values):
        return [{"client_accuracy": v} for v in values]

    judged = study_mod._judge(cells([0.80, 0.84, 0.82]), cells([0.70, 0.74, 0.72]),
                              "client_accuracy", "acc")  # fmt: skip
    assert judged.startswith("acc: holds (+10.0 points")  # 10 > 2 x 2.0
    judged = study_mod._judge(cells([0.80, 0.90, 0.70]), cells([0.78, 0.74, 0.76]),
                              "client_accuracy", "acc")  # fmt: skip
    assert judged.startswith("acc: no difference")  # 1 point vs 2 x 10
    judged = study_mod._judge(cells([0.60, 0.61]), cells([0.80, 0.81]), "client_accuracy", "a")
    assert judged.startswith("a: reversed")


def test_verdict_pairs_the_seeds_both_arms_ran():
    """Same seed = same split, graph and initial model: the per-seed differences are
    reported beside the unpaired call, over the seeds both arms have."""

    def cells(values):
        return [{"client_accuracy": v, "seed": s} for s, v in values.items()]

    # Wide unpaired spread (no difference), but A is ahead on every seed it shares with B.
    a = cells({0: 0.90, 1: 0.60, 2: 0.75})
    b = cells({0: 0.85, 1: 0.58, 2: 0.74, 3: 0.99})  # seed 3 has no partner in A
    judged = study_mod._judge(a, b, "client_accuracy", "acc")
    assert judged.startswith("acc: no difference")
    assert judged.endswith("; per seed +5.0/+2.0/+1.0, ahead on 3 of 3)")
    judged = study_mod._judge(b, a, "client_accuracy", "acc")
    assert judged.endswith("; per seed -5.0/-2.0/-1.0, ahead on 0 of 3)")
    # One shared seed is not a pairing.
    judged = study_mod._judge(cells({0: 0.9, 5: 0.8}), b, "client_accuracy", "acc")
    assert "per seed" not in judged


def test_a_one_seed_arm_is_compared_on_the_seed_both_ran():
    """An arm tuned on seed 0 only is set against the other arm's seed 0, not against
    its mean over seeds 0-2 (which mixes in other splits and graphs)."""

    def cells(values):
        return [{"client_accuracy": v, "seed": s} for s, v in values.items()]

    three = cells({0: 0.84, 1: 0.90, 2: 0.87})  # mean 0.87
    one = cells({0: 0.80})
    judged = study_mod._judge(three, one, "client_accuracy", "acc")
    assert judged == "acc: +4.0 points on seed 0, the one both ran (not judged)"  # 84 - 80
    judged = study_mod._judge(one, three, "client_accuracy", "acc")
    assert judged.startswith("acc: -4.0 points on seed 0,")
    judged = study_mod._judge(cells({5: 0.80}), three, "client_accuracy", "acc")
    assert judged == "acc: -7.0 points, no seed in common (one seed: not judged)"  # 80 - 87


def test_tiny_study_end_to_end_and_resumed_after_one_cell(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(STUDY)
    out = tmp_path / "learning"
    assert study_mod.main([str(path), "--out", str(out), "--max-cells", "1"]) == 0
    done = list((out / "cells").glob("*/cell.json"))
    assert len(done) == 1
    assert "Incomplete: 1 cell(s)" in (out / "results.md").read_text()
    stamp = done[0].stat().st_mtime_ns
    capsys.readouterr()
    assert study_mod.main([str(path), "--out", str(out)]) == 0
    assert done[0].stat().st_mtime_ns == stamp  # the finished cell was not rerun
    printed = capsys.readouterr().out
    assert printed.count("[study] start") == 1 and "2/2 cells done" in printed
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*/cell.json")]
    assert len(cells) == 2
    for c in cells:
        for key in ("val_client_accuracy", "client_ll_accuracy", "global_average_accuracy",
                    "client_majority_accuracy", "local_step", "update_grad_cosine"):  # fmt: skip
            assert key in c, key
    deca = next(c for c in cells if c["variant"].startswith("DECA"))
    assert "zero_client_accuracy" in deca and deca["effective_step"] > 0
    text = (out / "results.md").read_text()
    assert "Incomplete" not in text
    row = f"| DECA exact | 0.001 | {deca['client_accuracy'] * 100:.2f} |"
    assert row in text
    assert "- **DECA exact > local-only**: client accuracy:" in text and "(not judged)" in text
    for png in ("accuracy_vs_lr_deca-exact.png", "accuracy_vs_lr_local-only.png",
                "loss_curves.png", "effective_step.png"):  # fmt: skip
        assert (out / png).stat().st_size > 0
