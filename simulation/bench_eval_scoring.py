"""Evaluation time: both scorings from one forward per prompt vs the two separate passes.

An evaluation scores every example twice, by generated label and by likelihood. Run
separately (`evaluation.predict_labels`, then `likelihood.likelihood_labels`) that is one
prompt forward for `generate` plus one per verbalizer; `evaluation.score_labels` runs each
prompt once and reuses its cache (`deca_flower.prompt_scoring`). Both are timed side by
side in one process, alternating, on the same texts, and their labels are compared.

    python simulation/bench_eval_scoring.py                       # embedded SmolLM2-135M
    python simulation/bench_eval_scoring.py --examples 32 --repeats 2 model.device=cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from deca_flower.cli import split_args
from deca_flower.config import load_config
from deca_flower.data import load_task_dataset
from deca_flower.evaluation import predict_labels, score_labels
from deca_flower.likelihood import likelihood_labels
from deca_flower.task import load_base_model, resolve_device


def separate(model, tokenizer, task, texts, cfg) -> tuple[list[int], list[int]]:
    kwargs = {"batch_size": cfg.eval.batch_size, "max_length": cfg.data.max_length}
    return (
        predict_labels(model, tokenizer, task, texts, **kwargs),
        likelihood_labels(model, tokenizer, task, texts, **kwargs),
    )


def timed(fn, *args) -> tuple[float, tuple[list[int], list[int]]]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args, rest = parser.parse_known_args(argv)
    presets, overrides = split_args(rest)
    cfg = load_config(presets, overrides)
    model, tokenizer = load_base_model(cfg, resolve_device(cfg.model.device))
    task, rows = load_task_dataset(cfg.data.name, cfg.data.path)
    texts = list(rows["text"][: args.examples])
    times: dict[str, list[float]] = {"separate": [], "one forward": []}
    labels = {}
    for _ in range(args.repeats):
        for name, fn in (("separate", separate), ("one forward", score_labels)):
            seconds, labels[name] = timed(fn, model, tokenizer, task, texts, cfg)
            times[name].append(seconds)
            print(f"[bench] {name}: {seconds:.2f} s", flush=True)
    agree = [
        sum(a == b for a, b in zip(labels["separate"][k], labels["one forward"][k], strict=True))
        for k in range(2)
    ]
    sep, one = (statistics.median(times[k]) for k in ("separate", "one forward"))
    print(
        f"\nmodel {cfg.model.name} on {next(model.parameters()).device}, {len(texts)} examples of "
        f"{cfg.data.name}, batch {cfg.eval.batch_size}, max length {cfg.data.max_length}; "
        f"medians of {args.repeats}\n\n"
        "| scoring | s | ms / example | vs separate |\n|---|---|---|---|\n"
        f"| separate (generate + likelihood) | {sep:.2f} | {1e3 * sep / len(texts):.1f} | 1.00 |\n"
        f"| one forward per prompt | {one:.2f} | {1e3 * one / len(texts):.1f} "
        f"| {one / sep:.2f} |\n\n"
        f"labels equal: generated {agree[0]}/{len(texts)}, likelihood {agree[1]}/{len(texts)}"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
