"""Custom tasks from config alone (data.name=custom / custom-instruction) and the natural split."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from conftest import tiny_config

from deca_flower.config import ConfigError
from deca_flower.data import DataError, task_from_config
from deca_flower.engine import Engine
from deca_flower.task import prepare_data

LABELS = ["low", "mid", "high"]
SITES = {"north": 0.6, "south": 0.3, "west": 0.1}  # site -> share of label 0 (skewed on purpose)


def write_custom_csv(path, rows_per_site: int = 40) -> list[dict[str, str]]:
    """A 3-label file with a site column; labels spelt as names in mixed case and as ids."""
    rows = []
    for s, (site, share) in enumerate(SITES.items()):
        for i in range(rows_per_site):
            label = 0 if i < share * rows_per_site else 1 + (i + s) % 2
            spelled = [LABELS[label].upper(), LABELS[label].capitalize(), str(label)][i % 3]
            rows.append({"site": site, "body": f"{site} report {i} about level", "y": spelled})
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["site", "body", "y"])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def custom_overrides(path, **extra):
    return {
        "data.name": "custom",
        "data.path": None if path is None else str(path),
        "data.labels": "[low,mid,high]",
        "data.instruction": "'How high is the level? Choose from {choices}.'",
        "data.text_column": "body",
        "data.label_column": "y",
        "data.max_examples": None,
        "num_clients": 3,
        **extra,
    }


def _label_id(spelled: str) -> int:
    return int(spelled) if spelled.isdigit() else LABELS.index(spelled.lower())


def test_custom_natural_split_matches_the_file_and_runs(tmp_path):
    path = tmp_path / "levels.csv"
    rows = write_custom_csv(path)
    cfg = tiny_config(
        tmp_path,
        **custom_overrides(
            path,
            **{"data.partitioner": "natural", "data.partition_by": "site", "data.test_fraction": 0},
        ),
    )
    run_data = prepare_data(cfg)
    assert run_data.task.verbalizers == tuple(LABELS)
    assert run_data.task.instruction == "How high is the level? Choose from {low/mid/high}."
    assert run_data.split == {"partitioner": "natural", "sites": sorted(SITES)}
    # Independent count straight from the CSV rows, per site (client i = i-th site, sorted).
    for rank, site in enumerate(sorted(SITES)):
        expected = Counter(_label_id(r["y"]) for r in rows if r["site"] == site)
        got = Counter(int(y) for y in run_data.clients[rank].train["label"])
        assert got == expected, site
        assert all(t.startswith(site) for t in run_data.clients[rank].train["text"])

    # A run trains and evaluates on it (with a held-out split this time).
    cfg = tiny_config(
        tmp_path,
        **custom_overrides(path, **{"data.partitioner": "natural", "data.partition_by": "site"}),
    )
    result = Engine(cfg).run()
    evals = result.evals()
    assert len(evals) == 1 and 0.0 <= evals[0]["client_mean"]["accuracy"] <= 1.0
    data_record = next(r for r in result.records if r["type"] == "data")
    assert data_record["partitioner"] == "natural"
    assert data_record["sites"] == sorted(SITES)
    assert (result.out_dir / "label_distribution.png").stat().st_size > 0
    steps = [r for r in result.records if r["type"] == "step"]
    assert steps and all(len(r["loss"]) == 3 for r in steps)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"data.labels": "[]"}, "data.name=custom needs data.labels"),
        ({"data.labels": "[low,LOW,high]"}, "duplicates: ['low']"),
        ({"data.labels": "[yes,no]"}, "quote the label words"),
        ({"data.instruction": "'no placeholder'"}, "{choices} placeholder"),
        ({"data.instruction": None}, "data.name=custom needs data.instruction"),
        ({"data.partitioner": "natural"}, "data.partition_by"),
        ({"data.partition_by": "site"}, "data.partitioner=natural only"),
        ({"data.partitioner": "random"}, "data.partitioner='random' is not allowed"),
        ({"data.prompt_column": "body"}, "data.prompt_column"),
        ({"data.class_assignment": "odd"}, "data.class_assignment"),
        ({"data.classes_per_client": 0}, "data.classes_per_client must be > 0"),
        ({"data.shard_size": 0}, "data.shard_size"),
    ],
)
def test_bad_custom_configs_name_the_key(tmp_path, extra, message):
    path = tmp_path / "levels.csv"
    write_custom_csv(path)
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **custom_overrides(path, **extra))
    assert message in str(err.value)


def test_labels_key_only_for_custom(tmp_path):
    with pytest.raises(ConfigError, match="data.labels is for data.name=custom"):
        tiny_config(tmp_path, **{"data.labels": "[a,b]"})


def _prepare(tmp_path, path, **extra):
    return prepare_data(tiny_config(tmp_path, **custom_overrides(path, **extra)))


def test_bad_custom_files_list_what_was_found(tmp_path):
    path = tmp_path / "levels.csv"
    write_custom_csv(path)
    with pytest.raises(DataError) as err:  # missing column
        _prepare(tmp_path, path, **{"data.text_column": "text"})
    assert "data.text_column='text'" in str(err.value)
    assert "['site', 'body', 'y']" in str(err.value)

    unknown = tmp_path / "unknown.csv"
    unknown.write_text("body,y\na,low\nb,mid\nc,HIGH\nd,very high\ne,7\n")
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, unknown)
    text = str(err.value)
    assert "'very high'" in text and "'7'" in text and "'HIGH'" in text  # unknown and found
    assert "data.labels" in text

    unseen = tmp_path / "unseen.csv"
    unseen.write_text("body,y\n" + "".join(f"r{i},{['low', 'high'][i % 2]}\n" for i in range(40)))
    with pytest.raises(DataError) as err:
        _prepare(tmp_path, unseen)
    assert "['mid'] never occur" in str(err.value) and "'low': 20" in str(err.value)

    with pytest.raises(DataError, match="data.name=custom reads your file: set data.path"):
        _prepare(tmp_path, None)

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        _prepare(tmp_path, empty)
    header_only = tmp_path / "header.csv"
    header_only.write_text("body,y\n")
    with pytest.raises(DataError, match=r"no rows \(found only the line 'body,y'\)"):
        _prepare(tmp_path, header_only)

    sites = tmp_path / "sites.csv"
    write_custom_csv(sites)
    with pytest.raises(DataError, match=r"3 distinct values .* set num_clients=3"):
        _prepare(
            tmp_path,
            sites,
            **{"num_clients": 4, "data.partitioner": "natural", "data.partition_by": "site"},
        )


def test_custom_pair_column_and_builtin_prompt_override(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"q": f"q{i}", "a": f"a{i}", "y": ["yes", "no"][i % 2]} for i in range(40)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(
        tmp_path,
        **custom_overrides(
            path,
            **{
                "data.labels": '["yes","no"]',  # quoted: bare yes/no are YAML booleans
                "data.text_column": "q",
                "data.pair_column": "a",
                "num_clients": 2,
                "data.partitioner": "iid",
            },
        ),
    )
    run_data = prepare_data(cfg)
    texts = [*run_data.clients[0].train["text"], *run_data.clients[0].test["text"]]
    assert all(t.startswith("Q: q") and "\nA: a" in t for t in texts)
    builtin = tiny_config(tmp_path, **{"data.instruction": "'Mood? {choices}'"})
    assert task_from_config(builtin.data).instruction == "Mood? {negative/positive}"


def test_custom_instruction_data_by_prompt_and_response_columns(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer", "site"])
        for i in range(30):
            writer.writerow([f"What is {i} plus one?", str(i + 1), f"s{i % 2}"])
    base = {
        "data.name": "custom-instruction",
        "data.path": str(path),
        "data.prompt_column": "question",
        "data.response_column": "answer",
        "num_clients": 2,
    }
    run_data = prepare_data(tiny_config(tmp_path, **base))  # default split: iid
    assert run_data.split == {"partitioner": "iid"}
    natural = {**base, "data.partitioner": "natural", "data.partition_by": "site"}
    run_data = prepare_data(tiny_config(tmp_path, **natural))
    for rank in range(2):
        rows = run_data.clients[rank].train
        assert set(rows["group"]) == {f"s{rank}"}
        assert all("### Instruction:\nWhat is" in p for p in rows["prompt"])
    with pytest.raises(ConfigError, match="has no labels; choose one of"):
        tiny_config(tmp_path, **{**base, "data.partitioner": "dirichlet"})
    with pytest.raises(ConfigError, match="needs data.prompt_column and data.response_column"):
        tiny_config(tmp_path, **{**base, "data.response_column": None})
    with pytest.raises(DataError, match="data.response_column='reply'.*'question', 'answer'"):
        prepare_data(tiny_config(tmp_path, **{**base, "data.response_column": "reply"}))


def test_split_by_column_command_writes_one_file_per_site(tmp_path, capsys):
    from deca_flower.cli import main
    from deca_flower.data import load_task
    from deca_flower.task import prepare_local_data

    path = tmp_path / "levels.csv"
    rows = write_custom_csv(path)
    main(["split-by-column", str(path), "site", str(tmp_path / "sites")])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"client 0: site='north' -> {tmp_path / 'sites' / 'north.csv'}"
    assert sorted(p.name for p in (tmp_path / "sites").iterdir()) == [
        "north.csv",
        "south.csv",
        "west.csv",
    ]
    cfg = tiny_config(tmp_path, **custom_overrides(path, **{"data.test_fraction": 0}))
    natural = prepare_data(
        tiny_config(
            tmp_path,
            **custom_overrides(
                path,
                **{
                    "data.partitioner": "natural",
                    "data.partition_by": "site",
                    "data.test_fraction": 0,
                },
            ),
        )
    )
    for rank, site in enumerate(sorted(SITES)):
        site_file = tmp_path / "sites" / f"{site}.csv"
        # A deployed site reads its own file: the same rows, in the same order, as the
        # natural split's client of that rank in simulation.
        local = prepare_local_data(cfg, rank, str(site_file)).clients[rank].train
        assert list(local["text"]) == list(natural.clients[rank].train["text"])
        assert list(local["label"]) == list(natural.clients[rank].train["label"])
        expected = [r["body"] for r in rows if r["site"] == site]
        _, raw = load_task(task_from_config(cfg.data), str(site_file))
        assert list(raw["text"]) == expected
    with pytest.raises(SystemExit, match="column 'region' not found"):
        main(["split-by-column", str(path), "region", str(tmp_path / "x")])


def test_ci_runs_the_readme_test_command_and_deps_free_installs_come_last():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    ci = [line for line in (root / ".ci/run").read_text().splitlines() if "pip install" in line]
    readme = (root / "README.md").read_text()
    assert len(ci) == 1 and ci[0] in readme
    for line in [ci[0], *(x for x in readme.splitlines() if "pip install torch" in x)]:
        steps = [s.strip() for s in line.split("&&") if "pip install" in s]
        # A resolver run after the --no-deps wheels prints "ERROR: pip's dependency resolver".
        no_deps = [i for i, s in enumerate(steps) if "--no-deps" in s]
        assert no_deps == [len(steps) - 1], line
