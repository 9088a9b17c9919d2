"""The experiment runner end to end on a tiny random model: every stage, resume, table and report."""

from __future__ import annotations

import json

import pytest
import yaml

from mixsd.experiment import Experiment, aggregate, load_experiment, run_experiment
from mixsd.files import InputError


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
        assert rows[name]["train_loose"] is not None and rows[name]["kl_per_token"] is not None
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
    import mixsd.train

    monkeypatch.setattr(mixsd.train, "train", lambda *a, **k: pytest.fail("trained again"))
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
    from mixsd.experiment import PACKAGED_CONFIGS

    names = sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml"))
    assert "demo.yaml" in names
    for path in PACKAGED_CONFIGS.glob("*.yaml"):
        experiment = load_experiment(path)
        assert experiment.cells, path
    demo = load_experiment(PACKAGED_CONFIGS / "demo.yaml")
    assert {c.method for c in demo.cells} >= {"base", "sft", "mixsd"}
    assert json.dumps(demo.raw)
