"""A quiet console: our own [deca] lines, no transformers bars unless verbose=true."""

from __future__ import annotations

import sys

from deca_flower.console import quiet_bars, set_verbose
from deca_flower.engine import Engine
from deca_flower.models import load_model


def test_loading_weights_bar_only_when_verbose(tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    model, _ = load_model("tiny-llama", num_layers=2)
    model.save_pretrained(tmp_path / "m")
    try:
        set_verbose(False)
        capfd.readouterr()
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        quiet = capfd.readouterr()
        set_verbose(True)
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
        loud = capfd.readouterr()
    finally:
        set_verbose(False)
    assert "Loading weights" in loud.err  # the bar exists, so its absence below means something
    assert "Loading weights" not in quiet.err + quiet.out


def test_quiet_bars_captures_stderr_unless_verbose(capfd):
    from tqdm.auto import tqdm

    set_verbose(False)
    with quiet_bars():
        list(tqdm(range(3), desc="third-party bar"))
    assert "third-party bar" not in capfd.readouterr().err
    set_verbose(True)
    try:
        with quiet_bars():
            list(tqdm(range(3), desc="third-party bar", file=sys.stderr))
        assert "third-party bar" in capfd.readouterr().err
    finally:
        set_verbose(False)


def test_engine_prints_its_own_progress_lines(make_config, capsys):
    Engine(make_config(**{"eval.zero_shot": True})).run()
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines and all(line.startswith("[deca] ") for line in lines), lines
    assert "it/s" not in out.err  # no tqdm bar of any library
    assert any(line.startswith("[deca] evaluating zero-shot: 4 clients") for line in lines)
    assert any("evaluating after round 1" in line and "parameter average" in line for line in lines)
    assert any(line.startswith("[deca] phase 1/") for line in lines)
