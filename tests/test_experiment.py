"""The experiment runner end to end on a tiny random model: every stage, resume, table and report."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from mixsd.core.files import InputError
from mixsd.experiments.experiment import (
    Experiment,
    Runner,
    aggregate,
    grid_status,
    load_experiment,
    run_experiment,
)


def tiny_grid(tmp_path, model_dir, **extra) -> Experiment:
    config = {
        "name": "tiny",
        "model": str(model_dir),
        "out": str(tmp_path / "run"),
        "corpus": {"generator": "kgfact", "size": "small", "seed": 0, "train_limit": 12},
        "seeds": [0],
        "methods": ["base", "sft", {"mixsd": {"lam": [0.5]}}],
        "mix": {"retries": 0, "max_new_tokens": 8, "verify": "none"},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": False},
        "eval": {"limit": 4, "max_new_tokens": 8},
        "retention": {"limit": 4, "max_new_tokens": 8, "probes": False},
        "analyses": {"fisher_samples": 4},
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_experiment(path)


def test_grid_runs_every_stage_and_resumes(tmp_path, tiny_model_dir, monkeypatch):
    experiment = tiny_grid(tmp_path, tiny_model_dir)
    assert [c.name for c in experiment.cells] == ["base", "sft-s0", "mixsd-lam0.5-s0"]
    result = run_experiment(experiment, show_progress=False)
    out = tmp_path / "run"
    rows = {r["cell"]: r for r in result["rows"]}
    assert set(rows) == {"base", "sft-s0", "mixsd-lam0.5-s0"}
    for name in ("sft-s0", "mixsd-lam0.5-s0"):
        cell = out / "cells" / name
        for stage in (
            "targets.jsonl",
            "train/summary.json",
            "eval.json",
            "retention.json",
            "nll.json",
            "fisher.json",
            "cell.json",
        ):
            assert (cell / stage).exists(), (name, stage)
        assert rows[name]["target_nll_mean"] > 0 and rows[name]["fisher_displacement"] >= 0
        # training checkpointed (the default) to resume a kill; the finished cell keeps only its model
        assert (cell / "train" / "model").is_dir() and not list((cell / "train").glob("checkpoint-*"))
        assert rows[name]["train_acc"] is not None and rows[name]["kl_per_token"] is not None
        assert rows[name]["train_match"] == "entity"  # KGFact's manifest names its matcher
    assert rows["mixsd-lam0.5-s0"]["verified_rate"] == 1.0
    assert (out / "results.csv").read_text().startswith("cell,")
    # train_limit: the runner trains and evaluates on a derived copy, the generated corpus stays whole
    assert len((out / "data" / "train.jsonl").read_text().splitlines()) == 12
    assert len((out / "corpus" / "train.jsonl").read_text().splitlines()) == 100
    kept = {json.loads(line)["fact"] for line in (out / "data" / "train.jsonl").read_text().splitlines()}
    assert {
        json.loads(line)["fact"] for line in (out / "data" / "paraphrase.jsonl").read_text().splitlines()
    } == kept
    assert len((out / "cells" / "sft-s0" / "targets.jsonl").read_text().splitlines()) == 12
    assert len((out / "results.jsonl").read_text().splitlines()) == 3
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "MixSD λ=0.5" in html
    assert "report/pareto.png" in (out / "report.md").read_text()

    # A second run redoes nothing: every stage's file is there.
    import mixsd.experiments.experiment
    from mixsd.training.train import TrainConfig

    monkeypatch.setitem(
        mixsd.experiments.experiment.COMMANDS, TrainConfig, lambda *a, **k: pytest.fail("trained again")
    )
    again = run_experiment(experiment, show_progress=False)
    assert [r["cell"] for r in again["rows"]] == [r["cell"] for r in result["rows"]]


def test_aggregate_over_seeds():
    rows = [
        {"group": "SFT", "method": "sft", "lam": None, "x": 0.5},
        {"group": "SFT", "method": "sft", "lam": None, "x": 0.7},
    ]
    (entry,) = aggregate(rows, ["x"])
    assert entry["x"] == pytest.approx(0.6) and entry["x_sd"] == pytest.approx(0.1414, abs=1e-3)
    assert entry["seeds"] == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": ["sft", "magic"]}, r"field 'methods\[1\]'"),
        ({"train": {"learning_rate_typo": 1}}, r"field 'train.learning_rate_typo'"),
        ({"mix": {"lam": 0.2}}, r"field 'mix.lam'"),
        ({"seeds": "0"}, r"field 'seeds'"),
        ({"colour": 1}, r"field 'colour'"),
        ({"methods": [{"mixsd": {"lam": [1.5]}}]}, r"lam must be in \[0, 1\]"),
    ],
)
def test_bad_experiment_files_name_the_field(tmp_path, tiny_model_dir, change, message):
    with pytest.raises(InputError, match=message):
        experiment = tiny_grid(tmp_path, tiny_model_dir, **change)
        run_experiment(experiment, show_progress=False)


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmethods: [sft\n")
    with pytest.raises(InputError, match=r"bad.yaml, line \d"):
        load_experiment(path)


def test_shipped_configs_parse():
    from mixsd.experiments.experiment import PACKAGED_CONFIGS

    names = sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml"))
    assert "demo.yaml" in names
    for path in PACKAGED_CONFIGS.glob("*.yaml"):
        experiment = load_experiment(path)
        assert experiment.cells, path
    demo = load_experiment(PACKAGED_CONFIGS / "demo.yaml")
    assert {c.method for c in demo.cells} >= {"base", "sft", "mixsd"}
    assert json.dumps(demo.raw)


# --------------------------------------------------------------------------------------------------
# Results follow their config (issue 9): a changed setting redoes its stage and everything downstream
# --------------------------------------------------------------------------------------------------
def stage_log(out, since: int = 0) -> dict[tuple[str | None, str], str]:
    """{(cell, stage): 'ran' | 'reused'} of the decisions logged after the first `since` lines."""
    lines = (out / "stage-log.jsonl").read_text().splitlines()[since:]
    return {(e["cell"], e["stage"]): e["action"] for e in map(json.loads, lines)}


def log_length(out) -> int:
    return len((out / "stage-log.jsonl").read_text().splitlines())


def test_results_follow_their_config(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    grid = {"methods": ["base", "sft"]}
    first = run_experiment(tiny_grid(tmp_path, tiny_model_dir, **grid), show_progress=False)
    cell_stages = ["targets", "train", "eval", "retention", "nll", "fisher", "row"]
    assert stage_log(out) == {
        (None, "corpus"): "ran",
        (None, "data"): "ran",
        **{("base", s): "ran" for s in ("eval", "retention", "row")},
        **{("sft-s0", s): "ran" for s in cell_stages},
    }
    files = [p for p in (out / "cells").rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}

    # An unchanged rerun redoes nothing: every stage reused, no file rewritten.
    since = log_length(out)
    again = run_experiment(tiny_grid(tmp_path, tiny_model_dir, **grid), show_progress=False)
    assert set(stage_log(out, since).values()) == {"reused"}
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    assert again["rows"] == first["rows"]

    # Only an eval option changed: only evaluation (and the rows built from it) is redone.
    since = log_length(out)
    eval_only = run_experiment(
        tiny_grid(tmp_path, tiny_model_dir, eval={"limit": 2, "max_new_tokens": 8}, **grid),
        show_progress=False,
    )
    ran = {key for key, action in stage_log(out, since).items() if action == "ran"}
    assert ran == {(cell, s) for cell in ("base", "sft-s0") for s in ("eval", "row")}
    assert (out / "cells/sft-s0/train/summary.json").stat().st_mtime_ns == mtimes[
        out / "cells/sft-s0/train/summary.json"
    ]
    evaluated = json.loads((out / "cells/sft-s0/eval.json").read_text())
    assert evaluated["config"]["limit"] == 2
    rows = {r["cell"]: r for r in eval_only["rows"]}
    assert (
        rows["sft-s0"]["fisher_displacement"]
        == {r["cell"]: r for r in first["rows"]}["sft-s0"]["fisher_displacement"]
    )

    # train.lr changed: training and every later stage of the trained cell are redone, the base cell and
    # the targets are not, and the table shows the new numbers.
    changed = {"train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "progress": False, "lr": 0.05}}
    config = tiny_grid(tmp_path, tiny_model_dir, eval={"limit": 2, "max_new_tokens": 8}, **grid, **changed)

    # A partial run (--only base) leaves the out-of-date sft cell out of the table instead of showing it.
    partial = run_experiment(config, only="base", show_progress=False)
    assert [r["cell"] for r in partial["rows"]] == ["base"]

    since = log_length(out)
    result = run_experiment(config, show_progress=False)
    log = stage_log(out, since)
    assert {s for (cell, s), action in log.items() if cell == "sft-s0" and action == "ran"} == {
        "train",
        "eval",
        "retention",
        "fisher",
        "row",
    }
    assert log[("sft-s0", "targets")] == log[("sft-s0", "nll")] == "reused"
    assert {action for (cell, _), action in log.items() if cell == "base"} == {"reused"}
    summary = json.loads((out / "cells/sft-s0/train/summary.json").read_text())
    assert summary["config"]["learning_rate"] == 0.05
    new = {r["cell"]: r for r in result["rows"]}["sft-s0"]
    fisher = json.loads((out / "cells/sft-s0/fisher.json").read_text())
    assert new["fisher_displacement"] == fisher["totals"]["displacement"]
    assert new["fisher_displacement"] != rows["sft-s0"]["fisher_displacement"]
    table = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["cell"]: r for r in table}["sft-s0"]["fisher_displacement"] == new["fisher_displacement"]

    # Another corpus: the corpus, its cut and every stage that reads it are redone (all but the base
    # model's retention, which reads no corpus file).
    corpus = {"generator": "kgfact", "size": "small", "seed": 1, "train_limit": 12}
    since = log_length(out)
    run_experiment(
        tiny_grid(
            tmp_path, tiny_model_dir, corpus=corpus, eval={"limit": 2, "max_new_tokens": 8}, **grid, **changed
        ),
        show_progress=False,
    )
    reused = {key for key, action in stage_log(out, since).items() if action == "reused"}
    assert reused == {("base", "retention")}


# --------------------------------------------------------------------------------------------------
# The experiment file is checked whole at load (issue 10)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"corpus": {"generator": "kgfact", "size": "huge"}}, r"field 'corpus.size': expected one of"),
        ({"mix": {"retries": -3}}, r"field 'mix.retries': must be >= 0; got -3"),
        ({"train": {"epochs": "one"}}, r"field 'train.epochs': expected a number.*; got 'one'"),
        ({"train": {"batch_size": 2.5}}, r"field 'train.batch_size': expected an integer"),
        ({"eval": {"limit": 0}}, r"field 'eval.limit': must be >= 1"),
        ({"retention": {"probes": "no"}}, r"field 'retention.probes': expected true or false"),
        ({"analyses": {"fisher_samples": "many"}}, r"field 'analyses.fisher_samples'"),
        ({"corpus": {"generator": "kgfact", "train_limit": 0}}, r"field 'corpus.train_limit'"),
        (
            {"corpus": {"generator": "kgfunc", "size": "small"}},
            r"field 'corpus.size': 'size' is not an option",
        ),
        ({"opsd": {"opsd_rollouts": 0}, "methods": ["opsd"]}, r"field 'opsd.opsd_rollouts'"),
    ],
)
def test_every_section_is_checked_at_load_before_any_work(tmp_path, tiny_model_dir, change, message):
    with pytest.raises(InputError, match=message) as caught:
        tiny_grid(tmp_path, tiny_model_dir, **change)
    assert str(tmp_path / "grid.yaml") in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()  # refused at load: no corpus generated, nothing written


def test_yaml_number_quirks_are_read_as_numbers(tmp_path, tiny_model_dir):
    """YAML 1.1 reads `1e-4` (no dot) as text and `1` as an int: a float option takes both as numbers."""
    experiment = tiny_grid(
        tmp_path, tiny_model_dir, train={"lr": "1e-4", "epochs": 1}, mix={"temperature": 1, "top_k": 5}
    )
    plan = Runner(experiment).plan(experiment.cells[2])  # mixsd-lam0.5-s0
    train_settings = plan["train"][0].description()["settings"]
    assert (
        train_settings["learning_rate"] == pytest.approx(1e-4) and train_settings["num_train_epochs"] == 1.0
    )
    mix_settings = plan["targets"][0].description()["settings"]
    assert mix_settings["temperature"] == 1.0 and mix_settings["lam"] == 0.5
    assert "batch_size" not in mix_settings  # speed only: changing it redoes nothing


# --------------------------------------------------------------------------------------------------
# Learning curves and a swept setting chosen by the declared rule (issue 11)
# --------------------------------------------------------------------------------------------------
def test_a_swept_grid_with_curves_reports_trajectories_matched_memorization_and_the_choice(
    tmp_path, tiny_model_dir
):
    experiment = tiny_grid(
        tmp_path,
        tiny_model_dir,
        methods=["base", {"sft": {"lr": [1e-2, "5e-2"]}}],
        train={"epochs": 2, "batch_size": 4, "progress": False, "save_every": -1},
        curves={"limit": 4, "kl_limit": 2, "max_new_tokens": 4, "capability": True, "probe_limit": 2},
        select={"memorization": 0.5, "within_epochs": 2},
    )
    assert [c.name for c in experiment.cells] == ["base", "sft-lr0.01-s0", "sft-lr0.05-s0"]
    result = run_experiment(experiment, show_progress=False)
    out = tmp_path / "run"
    rows = {r["cell"]: r for r in result["rows"]}
    assert rows["sft-lr0.05-s0"]["group"] == "SFT lr=0.05" and rows["sft-lr0.05-s0"]["family"] == "SFT"
    for name, lr in (("sft-lr0.01-s0", 1e-2), ("sft-lr0.05-s0", 5e-2)):
        summary = json.loads((out / "cells" / name / "train" / "summary.json").read_text())
        assert summary["config"]["learning_rate"] == lr  # the setting wins over train.lr
        curve = [
            json.loads(line) for line in (out / "cells" / name / "train/curve.jsonl").read_text().splitlines()
        ]
        assert [r["epoch"] for r in curve] == [1.0, 2.0]
        assert {"memorization", "kl", "in_context_acc", "instructions_acc", "in_context_n"} <= set(curve[0])
    # both settings train on one set of targets, made once in the bare cell's folder
    log = [json.loads(line) for line in (out / "stage-log.jsonl").read_text().splitlines()]
    assert [(e["cell"], e["action"]) for e in log if e["stage"] == "targets"] == [
        ("sft-lr0.01-s0", "ran"),
        ("sft-lr0.05-s0", "reused"),
    ]
    assert (out / "cells" / "sft-s0" / "targets.jsonl").is_file()
    base = json.loads((out / "curve-base.json").read_text())
    assert base["epoch"] == 0.0 and base["kl"] == pytest.approx(0.0, abs=1e-6)
    points = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert [(p["cell"], p["epoch"]) for p in points if p["cell"] == "sft-lr0.01-s0"] == [
        ("sft-lr0.01-s0", 0.0),
        ("sft-lr0.01-s0", 1.0),
        ("sft-lr0.01-s0", 2.0),
    ]
    tuning = json.loads((out / "tuning.json").read_text())
    assert tuning["selection"]["SFT"]["chosen"] in ("lr=0.01", "lr=0.05")
    assert set(tuning["matched"]) == {"SFT lr=0.01", "SFT lr=0.05"}
    md = (out / "report.md").read_text()
    assert "report/trajectories.png" in md and "report/frontier.png" in md
    assert "## Retention at matched memorization" in md and "at 90% memorization" in md
    assert "## Tuning: one declared rule" in md and "≥ 50% memorization within 2 epochs" in md
    assert "Chosen: lr=" in md
    html = (out / "report.html").read_text()
    assert "Retention at matched memorization" in html and "Learning trajectories" in html

    # an unchanged rerun redoes nothing, the base curve included
    since = log_length(out)
    run_experiment(experiment, show_progress=False)
    assert set(stage_log(out, since).values()) == {"reused"}
    assert (None, "curve-base") in stage_log(out, since)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"methods": [{"sft": {"lr": ["fast"]}}]}, r"field 'methods\[0\].lr': expected a number"),
        ({"methods": [{"sft": {"colour": [1]}}]}, r"field 'methods\[0\].colour': unknown method option"),
        ({"methods": [{"sft": {"out": "x"}}]}, r"field 'methods\[0\].out'"),
        ({"methods": ["sft", {"sft": {"seeds": [0]}}]}, r"cell sft-s0 is declared twice"),
        ({"methods": [{"sft": {"lr": [-1.0]}}]}, r"field 'methods\[0\].lr'"),  # as the file writes it
        ({"curves": {"colour": 1}}, r"field 'curves.colour'"),
        ({"curves": {"limit": "many"}}, r"field 'curves.limit'"),
        ({"train": {"eval_limit": 3}, "curves": True}, r"field 'train.eval_limit': the learning curve"),
        ({"select": {"memorization": 1.5}}, r"field 'select.memorization'"),
        ({"select": {"retention_at": "best"}}, r"field 'select.retention_at'"),
    ],
)
def test_sweeps_curves_and_the_rule_are_checked_at_load(tmp_path, tiny_model_dir, change, message):
    with pytest.raises(InputError, match=message):
        tiny_grid(tmp_path, tiny_model_dir, **change)
    assert not (tmp_path / "run").exists()


def test_sweep_cells_names_groups_and_settings(tmp_path, tiny_model_dir):
    experiment = tiny_grid(
        tmp_path,
        tiny_model_dir,
        seeds=[0, 1],
        methods=[
            {"sft": {"lr": [3e-5, 1e-4]}},
            {"sft": {"lora_rank": 16, "lr": [3e-4], "seeds": [0]}},
            {"mixsd": {"lam": [0.3], "learning_rate": 1e-4, "seeds": [0]}},
        ],
        train={"epochs": 1, "lr": 2e-4},
    )
    cells = {c.name: c for c in experiment.cells}
    assert list(cells) == [
        "sft-lr3e-05-s0",
        "sft-lr3e-05-s1",
        "sft-lr0.0001-s0",
        "sft-lr0.0001-s1",
        "sft-lora16-lr0.0003-s0",
        "mixsd-lam0.3-lr0.0001-s0",
    ]
    lora = cells["sft-lora16-lr0.0003-s0"]
    assert lora.group == "SFT LoRA r=16 lr=0.0003" and lora.family == "SFT"
    assert lora.targets_cell.name == "sft-s0"
    runner = Runner(experiment)
    runner.plan(lora)
    config = runner.train_configs[lora.name]
    assert config.lora_rank == 16 and config.learning_rate == pytest.approx(3e-4)
    # `learning_rate` in the entry wins over the train section's `lr` (an alias TrainConfig lets win)
    runner.plan(cells["mixsd-lam0.3-lr0.0001-s0"])
    assert runner.train_configs["mixsd-lam0.3-lr0.0001-s0"].learning_rate == pytest.approx(1e-4)
    plan = runner.plan(cells["sft-lr3e-05-s1"])
    assert plan["targets"][0].outputs[0] == tmp_path / "run" / "cells" / "sft-s1" / "targets.jsonl"


def test_memit_is_a_method_of_the_grid(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    stats = tmp_path / "stats.txt"
    stats.write_text("\n\n".join(f"Ordinary text {i} about places and people." for i in range(30)))
    memit = {"layers": "0", "steps": 2, "stats": str(stats), "stats_tokens": 300}
    experiment = tiny_grid(tmp_path, tiny_model_dir, methods=["base", "memit"], memit=memit)
    assert [c.name for c in experiment.cells] == ["base", "memit-s0"]
    rows = {r["cell"]: r for r in run_experiment(experiment, show_progress=False)["rows"]}
    cell = tmp_path / "run" / "cells" / "memit-s0"
    assert json.loads((cell / "train" / "run_config.json").read_text())["method"] == "memit"
    assert rows["memit-s0"]["train_acc"] is not None and rows["memit-s0"]["fisher_displacement"] >= 0
    assert not (cell / "nll.json").exists()  # no targets: nothing for the NLL analysis

    with pytest.raises(InputError, match=r"field 'memit.steps'"):
        tiny_grid(tmp_path, tiny_model_dir, methods=["base", "memit"], memit={"steps": 0})
    with pytest.raises(InputError, match="memit takes only seeds"):
        tiny_grid(tmp_path, tiny_model_dir, methods=["base", {"memit": {"lr": 1.0}}])


def test_a_memit_cell_gets_a_one_point_curve_scored_as_the_base_row(tmp_path, tiny_model_dir, monkeypatch):
    """With curves, memit's edited model is scored by the grid's curve config (the base row's and the
    trained cells' epochs'), KL against the unedited base: one row with the base row's keys and items plus
    the edit's mark, made by a stage of its own that a rerun reuses and a redone edit redoes."""
    from mixsd.experiments.grid_summary import read_grid, summarize

    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    stats = tmp_path / "stats.txt"
    stats.write_text("\n\n".join(f"Ordinary text {i} about places and people." for i in range(30)))
    memit = {"layers": "0", "steps": 2, "stats": str(stats), "stats_tokens": 300}
    grid = {
        "methods": ["base", "sft", "memit"],
        "memit": memit,
        "curves": {"limit": 4, "kl_limit": 2, "max_new_tokens": 4, "capability": True, "probe_limit": 2},
        "analyses": {"nll": False, "fisher": False},
    }
    run_experiment(tiny_grid(tmp_path, tiny_model_dir, **grid), show_progress=False)
    out = tmp_path / "run"
    base = json.loads((out / "curve-base.json").read_text())
    curve_file = out / "cells" / "memit-s0" / "train" / "curve.jsonl"
    (row,) = [json.loads(line) for line in curve_file.read_text().splitlines()]
    assert (row["epoch"], row["step"], row["edit"]) == (1.0, 0, "memit")
    assert set(row) == set(base) | {"edit"} and "in_context_acc" in row
    assert {k: len(v) for k, v in row["items"].items()} == {k: len(v) for k, v in base["items"].items()}
    assert base["kl"] == pytest.approx(0.0, abs=1e-6) and row["kl"] > 0  # the edited model, not the base
    # the report draws the edit as its one point: no line from the base row to interpolate along
    points = [json.loads(line) for line in (out / "curves.jsonl").read_text().splitlines()]
    assert [p["epoch"] for p in points if p["cell"] == "memit-s0"] == [1.0]
    assert [p["epoch"] for p in points if p["cell"] == "sft-s0"][0] == 0.0  # a trained curve: base first
    # the summary of the committed results takes the edit in as a group of its own, matched by its point
    groups = summarize(read_grid(out))["groups"]
    assert groups["MEMIT"]["final_epoch"] == [1.0] and groups["MEMIT"]["cells"] == ["memit-s0"]

    def curve_actions() -> list[str]:
        log = [json.loads(line) for line in (out / "stage-log.jsonl").read_text().splitlines()]
        return [e["action"] for e in log if e["cell"] == "memit-s0" and e["stage"] == "curve"]

    written = curve_file.read_text()
    run_experiment(tiny_grid(tmp_path, tiny_model_dir, **grid), show_progress=False)
    assert curve_actions() == ["ran", "reused"] and curve_file.read_text() == written
    grid["memit"] = {**memit, "steps": 3}  # another edit: its curve point is scored again
    run_experiment(tiny_grid(tmp_path, tiny_model_dir, **grid), only="memit", show_progress=False)
    assert curve_actions() == ["ran", "reused", "ran"]

    # an edit alone has no trained epochs whose scoring its point could share
    with pytest.raises(InputError, match=r"field 'curves'.*trained by `mixsd train`"):
        tiny_grid(tmp_path, tiny_model_dir, methods=["base", "memit"], memit=memit, curves={"limit": 4})


HOLD_LOCKS = """
import sys, time
from contextlib import ExitStack
from pathlib import Path
from mixsd.core.files import output_lock
cell, targets, release_targets_after = sys.argv[1], sys.argv[2], float(sys.argv[3])
with ExitStack() as held:
    held.enter_context(output_lock(cell))
    with output_lock(targets):
        print("ready", flush=True)
        time.sleep(release_targets_after)
    while not Path(cell + ".done").exists():
        time.sleep(0.05)
"""


def test_a_worker_that_dies_mid_grid_leaves_the_table_of_finished_cells(
    tmp_path, tiny_model_dir, monkeypatch
):
    """The table is rewritten after every cell: a session that ends in a kill still has rows to collect."""
    import mixsd.experiments.experiment as module

    experiment = tiny_grid(tmp_path, tiny_model_dir)
    run_cell = module.Runner.run_cell

    def killed_at_the_third_cell(self, cell, progress):
        if cell.name == "mixsd-lam0.5-s0":
            raise KeyboardInterrupt  # no report is written: the loop never ends
        return run_cell(self, cell, progress)

    monkeypatch.setattr(module.Runner, "run_cell", killed_at_the_third_cell)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(experiment, show_progress=False)
    out = tmp_path / "run"
    rows = [json.loads(line)["cell"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows == ["base", "sft-s0"] and not (out / "report.md").exists()


def test_two_workers_share_one_folder(tmp_path, tiny_model_dir):
    """Another worker (a process holding a cell's lock, and for a moment a sweep's shared targets) makes
    this one skip that cell and wait for the targets; the report leaves the unfinished cell out, and the
    next run does only that cell."""
    import subprocess
    import sys
    import time

    experiment = tiny_grid(tmp_path, tiny_model_dir)
    out = tmp_path / "run"
    cells = out / "cells"
    worker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD_LOCKS,
            str(cells / "sft-s0"),
            str(cells / "mixsd-lam0.5-s0" / "targets.jsonl"),
            "2",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout.readline().strip() == "ready"
        states = {s["cell"]: s["state"] for s in grid_status(experiment)}
        assert states["base"] == "not started" and states["sft-s0"].startswith("running: pid ")
        started = time.monotonic()
        result = run_experiment(experiment, show_progress=False)
        assert time.monotonic() - started > 1.5  # waited for the targets' holder
        assert [r["cell"] for r in result["rows"]] == ["base", "mixsd-lam0.5-s0"]
        assert not (cells / "sft-s0" / "cell.json").exists()
        assert [s["state"] for s in grid_status(experiment, only="base,mixsd")] == ["done", "done"]
    finally:
        (cells / "sft-s0.done").touch()
        worker.wait(timeout=30)
    since = log_length(out)
    result = run_experiment(experiment, show_progress=False)
    assert [r["cell"] for r in result["rows"]] == ["base", "sft-s0", "mixsd-lam0.5-s0"]
    assert {cell for (cell, _), action in stage_log(out, since).items() if action == "ran"} == {"sft-s0"}


def test_known_facts_join_the_retention_probes(tmp_path, tiny_model_dir, monkeypatch):
    """retention.known_facts: the base model filters the known facts once (OUT/known-facts), they join the
    probe files (OUT/retention-probes), every cell is scored on them, and a rerun reuses it all."""
    import mixsd.experiments.grid_data as grid_data
    from test_capability import _sdist

    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    build = grid_data.build_capability
    filtered = []

    def build_with_answers(config, answer=None):  # the tiny random model knows nothing: answer for it
        filtered.append(config.model)
        config.sdist = str(sdist)
        return build(config, answer=lambda items: ["Paris" for _ in items])

    monkeypatch.setattr(grid_data, "build_capability", build_with_answers)
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "manifest.json").write_text("{}")
    retention = {"limit": 4, "max_new_tokens": 8, "data": str(probes), "known_facts": True}
    experiment = tiny_grid(tmp_path, tiny_model_dir, methods=["base", "sft"], retention=retention)
    result = run_experiment(experiment, show_progress=False)
    out = tmp_path / "run"
    assert filtered == [str(tiny_model_dir)]
    assert (out / "retention-probes" / "known_facts.jsonl").read_bytes() == (
        out / "known-facts" / "known_facts.jsonl"
    ).read_bytes()
    for name in ("base", "sft-s0"):
        scored = json.loads((out / "cells" / name / "retention.json").read_text())
        assert scored["probes"]["known_facts"]["n"] == 1
    rows = {r["cell"]: r for r in result["rows"]}
    assert "known_facts_acc" in rows["sft-s0"]
    since = log_length(out)
    run_experiment(experiment, show_progress=False)
    assert set(stage_log(out, since).values()) == {"reused"} and filtered == [str(tiny_model_dir)]


def test_rewrite_is_a_method_of_the_grid(tmp_path, tiny_model_dir):
    """The self-rewrite baseline (SDFT): `mixsd rewrite` targets (greedy, the same for every seed), then the
    stages of any trained method; its row carries the verification counts, and the report pairs MixSD with it."""
    rewrite = {"max_new_tokens": 8, "verify": "none"}
    methods = ["base", "sft", "rewrite", {"mixsd": {"lam": [0.5]}}]
    experiment = tiny_grid(tmp_path, tiny_model_dir, methods=methods, rewrite=rewrite, seeds=[0, 1])
    assert [c.name for c in experiment.cells if c.method == "rewrite"] == ["rewrite-s0", "rewrite-s1"]
    only = [c for c in experiment.cells if c.name in ("base", "sft-s0", "rewrite-s0", "mixsd-lam0.5-s0")]
    experiment.cells = only
    rows = {r["cell"]: r for r in run_experiment(experiment, show_progress=False)["rows"]}
    cell = tmp_path / "run" / "cells" / "rewrite-s0"
    stages = ("targets.jsonl", "train/summary.json", "eval.json", "retention.json", "nll.json", "fisher.json")
    for stage in stages:
        assert (cell / stage).exists(), stage
    summary = json.loads((cell / "targets.summary.json").read_text())
    assert summary["config"]["lam"] == 0.0 and summary["config"]["expert_template"] == "rewrite"
    assert summary["config"]["max_new_tokens"] == 8
    assert rows["rewrite-s0"]["group"] == "Self-rewrite" and rows["rewrite-s0"]["verified_rate"] == 1.0
    assert rows["rewrite-s0"]["target_nll_mean"] > 0 and rows["rewrite-s0"]["train_acc"] is not None
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| sft-s0 → rewrite-s0 |" in report and "| rewrite-s0 → mixsd-lam0.5-s0 |" in report

    with pytest.raises(InputError, match=r"field 'rewrite.lam'"):
        tiny_grid(tmp_path, tiny_model_dir, methods=["rewrite"], rewrite={"lam": 0.3})
    with pytest.raises(InputError, match=r"field 'rewrite.expert_template'"):
        bad = {"expert_template": "{prompt} {context}"}
        tiny_grid(tmp_path, tiny_model_dir, methods=["rewrite"], rewrite=bad)


# --------------------------------------------------------------------------------------------------
# Stage fingerprints pinned: a refactor of the runner must leave every stage's description as it was,
# or every finished grid folder would be redone. Regenerate (only for an intended change) with
# MIXSD_REGENERATE_PINS=1.
# --------------------------------------------------------------------------------------------------
PINNED_PLAN = Path(__file__).parent / "data" / "grid-stage-descriptions.json"


def pinned_grid(tmp_path, model_dir) -> Experiment:
    """Every method, a sweep, target options and curves with both switches: each branch of the planner."""
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "manifest.json").write_text('{"probes": ["mmlu"]}\n')
    (probes / "mmlu.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    stats = tmp_path / "stats.txt"
    stats.write_text("Ordinary text about places and people.\n")
    return tiny_grid(
        tmp_path,
        model_dir,
        methods=[
            "base",
            {"sft": {"lr": [3e-5, 1e-4]}},
            {"sft": {"target": "statement"}},
            {"mixsd": {"lam": [0.3], "retries": 2}},
            "opsd",
            "cpt",
            "memit",
            "rewrite",
        ],
        memit={"layers": "0", "steps": 2, "stats": str(stats)},
        retention={"limit": 4, "max_new_tokens": 8, "data": str(probes), "known_facts": True},
        curves={"limit": 4, "capability": True, "known_facts": True},
    )


def plan_descriptions(experiment: Experiment, replacements: dict[str, str]) -> dict[str, Any]:
    """Each stage of each cell (and the shared ones) as its description, outputs and record, with the
    machine's paths and the mixsd version replaced by placeholders."""
    from mixsd import __version__

    def describe(stage) -> dict[str, Any]:
        described = stage.description()
        described["upstream"] = sorted(described["upstream"])  # their fingerprints are pinned as stages
        described["outputs"] = [str(p) for p in stage.outputs]
        described["record"] = str(stage.record)
        return described

    runner = Runner(experiment)
    plans: dict[str, Any] = {}
    for cell in experiment.cells:
        plans[cell.name] = {name: describe(stage) for name, (stage, _) in runner.plan(cell).items()}
    shared = {"capability": runner.capability_stage, "curve-base": runner.curve_base_stage()[0]}
    plans["shared"] = {name: describe(stage) for name, stage in shared.items()}
    text = json.dumps(plans, indent=1, sort_keys=True)
    for old, new in replacements.items():
        text = text.replace(old, new)
    return json.loads(text.replace(__version__, "<VERSION>"))


def test_stage_descriptions_are_pinned(tmp_path, tiny_model_dir):
    experiment = pinned_grid(tmp_path, tiny_model_dir)
    got = plan_descriptions(experiment, {str(tiny_model_dir): "<MODEL>", str(tmp_path): "<TMP>"})
    if os.environ.get("MIXSD_REGENERATE_PINS"):
        PINNED_PLAN.parent.mkdir(exist_ok=True)
        PINNED_PLAN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(PINNED_PLAN.read_text())
    assert sorted(got) == sorted(expected)
    for cell in expected:
        assert got[cell] == expected[cell], cell


def test_every_method_of_the_grid_is_planned_by_the_table():
    from mixsd.experiments.grid import METHOD_LABELS
    from mixsd.experiments.grid_methods import METHODS

    assert set(METHODS) == set(METHOD_LABELS)
    assert METHODS["base"].targets is None and METHODS["base"].training is None
