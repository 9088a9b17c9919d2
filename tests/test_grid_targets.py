"""Target options in a grid's method entries (issue 19 §3-4): SFT on statements, mixsd entries with their own
`mix` options; their cell names, families and shared targets; and the accounting and forgetting of a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixsd.core.files import InputError
from mixsd.evaluation.forgetting import read_forgetting
from mixsd.experiments.experiment import PACKAGED_CONFIGS, Runner, load_experiment, run_experiment
from mixsd.experiments.grid_methods import plan_mix_targets
from mixsd.method.target_accounting import read_target_accounting
from test_experiment import tiny_grid

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# Every shipped config's cells, named as before target options existed: finished grids stay addressable.
CONFIG_CELLS = {
    "demo.yaml": ["base", "sft-s0", "mixsd-lam0.3-s0", "opsd-s0"],
    "kgfact-small-20ep.yaml": [
        "base",
        "sft-lr0.0001-s0",
        "sft-lr3e-05-s0",
        "mixsd-lam0.3-lr0.0001-s0",
        "mixsd-lam0.3-lr3e-05-s0",
    ],
    "kgfact-small-guard.yaml": ["base", "mixsd-lam0.3-lr0.0001-s0"],
    "kgfact-small-long.yaml": ["base", "sft-lr0.0001-s0", "mixsd-lam0.3-lr0.0001-s0"],
}

# A mix section as the KGFact grids have it: verification by the corpus's scorer, fallback to the answer.
MIX = {"retries": 0, "max_new_tokens": 8, "on_failure": "answer"}


def test_shipped_configs_keep_their_cell_names():
    for name, cells in CONFIG_CELLS.items():
        for folder in (REPO_CONFIGS, PACKAGED_CONFIGS):
            experiment = load_experiment(folder / name)
            assert [c.name for c in experiment.cells] == cells, (folder, name)
            assert all(not c.target_options for c in experiment.cells)
    # the bigger grids: a cell name carries a target option only in the controls that ask for one
    controls = {
        "kgfact-small-20ep-step2.yaml": {
            "sft-statement-lr3e-05-s0",
            "sft-statement-lr3e-05-s1",
            "sft-statement-lr3e-05-s2",
            "mixsd-lam1-verifynone-lr3e-05-ep12-s0",  # the no-injection floor
            "mixsd-lam0.3-guardtopp0.9-lr3e-05-s0",  # our guarded mixing, 3 seeds
            "mixsd-lam0.3-guardtopp0.9-lr3e-05-s1",
            "mixsd-lam0.3-guardtopp0.9-lr3e-05-s2",
            "mixsd-lam0.3-paper-lr3e-05-s0",  # the paper's expert template
            *(  # the λ accounting: retries 30, both failure policies
                f"mixsd-lam{lam}-retries30{policy}-lr3e-05-ep12-s0"
                for lam in ("0", "0.3", "0.5", "0.7")
                for policy in ("", "-drop")
            ),
        }
    }
    for path in REPO_CONFIGS.glob("*.yaml"):
        named = {c.name for c in load_experiment(path).cells if c.target_options}
        assert named == controls.get(path.name, set()), path


def test_target_options_name_cells_and_families(tmp_path, tiny_model_dir):
    experiment = tiny_grid(
        tmp_path,
        tiny_model_dir,
        mix=MIX,
        methods=[
            "base",
            {"sft": {"target": "statement", "lr": 1e-4}},
            {"sft": {"target": "answer", "lr": 1e-4}},  # the default: the plain SFT cell
            {"mixsd": {"lam": 1, "verify": "none"}},
            {"mixsd": {"lam": 0.3, "on_failure": ["answer", "drop"], "lr": 1e-4}},
            {"mixsd": {"lam": 0.3, "expert_template": "paper"}},
            {"mixsd": {"lam": 0.5, "retries": 30, "seeds": [0, 1]}},
        ],
    )
    cells = {c.name: c for c in experiment.cells}
    assert list(cells) == [
        "base",
        "sft-statement-lr0.0001-s0",
        "sft-lr0.0001-s0",
        "mixsd-lam1-verifynone-s0",
        "mixsd-lam0.3-lr0.0001-s0",  # on_failure answer is the mix section's: no name part
        "mixsd-lam0.3-drop-lr0.0001-s0",
        "mixsd-lam0.3-paper-s0",
        "mixsd-lam0.5-retries30-s0",
        "mixsd-lam0.5-retries30-s1",
    ]
    statement = cells["sft-statement-lr0.0001-s0"]
    assert statement.family == "SFT statement" and statement.group == "SFT statement lr=0.0001"
    assert statement.targets_cell.name == "sft-statement-s0"
    assert cells["mixsd-lam1-verifynone-s0"].family == "MixSD λ=1 verify=none"
    assert cells["mixsd-lam0.3-drop-lr0.0001-s0"].group == "MixSD λ=0.3 on_failure=drop lr=0.0001"
    assert cells["mixsd-lam0.3-paper-s0"].family == "MixSD λ=0.3 template=paper"

    # the entry's options win over the mix section and are part of the targets' fingerprint; the targets
    # are shared only by cells with the same target options (their bare cell's folder)
    runner = Runner(experiment)
    out = tmp_path / "run" / "cells"

    def targets(name):
        stage = runner.plan(cells[name])["targets"][0]
        return stage.outputs[0], stage.description()["settings"]

    plain_file, plain = targets("mixsd-lam0.3-lr0.0001-s0")
    drop_file, drop = targets("mixsd-lam0.3-drop-lr0.0001-s0")
    assert plain_file == out / "mixsd-lam0.3-s0" / "targets.jsonl"
    assert drop_file == out / "mixsd-lam0.3-drop-s0" / "targets.jsonl"
    assert plain["on_failure"] == "answer" and drop["on_failure"] == "drop"
    assert {k for k in plain if plain[k] != drop[k]} == {"on_failure", "output"}

    # cells that differ only in the failure policy draw the same targets: the later takes the first's draws
    def draws_from(name):
        return plan_mix_targets(runner, cells[name])[1].draws_from

    assert draws_from("mixsd-lam0.3-drop-lr0.0001-s0") == str(out / "mixsd-lam0.3-s0" / "targets.draws.jsonl")
    assert draws_from("mixsd-lam0.3-lr0.0001-s0") is None
    assert draws_from("mixsd-lam0.5-retries30-s1") is None  # another seed draws its own
    assert targets("mixsd-lam0.3-paper-s0")[1]["expert_template"] == "paper"
    assert targets("mixsd-lam0.5-retries30-s1")[1]["retries"] == 30
    assert targets("mixsd-lam1-verifynone-s0")[1]["verify"] == "none"
    statement_file, statement_settings = targets("sft-statement-lr0.0001-s0")
    assert statement_file == out / "sft-statement-s0" / "targets.jsonl"
    assert statement_settings == {"method": "sft", "model": str(tiny_model_dir), "target": "statement"}
    assert targets("sft-lr0.0001-s0")[1] == {"method": "sft", "model": str(tiny_model_dir)}

    # an entry that repeats the section names the same cell as one without the option
    again = tiny_grid(
        tmp_path, tiny_model_dir, mix={**MIX, "retries": 30}, methods=[{"mixsd": {"lam": 0.5, "retries": 30}}]
    )
    assert [c.name for c in again.cells] == ["mixsd-lam0.5-s0"]


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ([{"sft": {"target": "poem"}}], r"field 'methods\[0\].target': expected one of answer, statement"),
        ([{"mixsd": {"verify": "fuzzy"}}], r"field 'methods\[0\].verify': expected one of"),
        ([{"mixsd": {"retries": "many"}}], r"field 'methods\[0\].retries': expected an integer"),
        ([{"mixsd": {"retries": -1}}], r"field 'methods\[0\].retries': must be >= 0"),
        (
            [{"mixsd": {"on_failure": []}}],
            r"field 'methods\[0\].on_failure': expected a value or a non-empty",
        ),
        ([{"opsd": {"target": "statement"}}], r"field 'methods\[0\].target': unknown method option"),
        ([{"sft": {"retries": 3}}], r"field 'methods\[0\].retries': unknown method option"),
        ([{"mixsd": {"lam": 0.3, "seed": 3}}], r"field 'methods\[0\].seed'"),
        # the files and the model a stage names are the runner's (each config's IO_FIELDS)
        ([{"mixsd": {"model": "other"}}], r"field 'methods\[0\].model': unknown method option"),
        ([{"sft": {"targets": "mine.jsonl"}}], r"field 'methods\[0\].targets': unknown method option"),
        ([{"opsd": {"corpus": "mine.jsonl"}}], r"field 'methods\[0\].corpus': unknown method option"),
        (["sft", {"sft": {"target": "answer"}}], r"cell sft-s0 is declared twice"),
    ],
)
def test_bad_target_options_are_refused_at_load(tmp_path, tiny_model_dir, methods, message):
    with pytest.raises(InputError, match=message):
        tiny_grid(tmp_path, tiny_model_dir, mix=MIX, methods=methods)
    assert not (tmp_path / "run").exists()


def test_a_grid_with_target_options_runs_and_is_accounted_for(tmp_path, tiny_model_dir):
    """SFT on statements and the λ=1-style floor with verification off, end to end on the tiny model; then
    each cell's targets accounting and forgetting read from the run's files."""
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "manifest.json").write_text("{}")
    questions = [("Arizona", "Phoenix"), ("Austria", "Vienna"), ("France", "Paris")]
    (probes / "known_facts.jsonl").write_text(
        "".join(
            json.dumps(
                {"id": f"k{i}", "prompt": f"What is the capital of {c}?", "check": [a], "max_new_tokens": 12}
            )
            + "\n"
            for i, (c, a) in enumerate(questions)
        )
    )
    experiment = tiny_grid(
        tmp_path,
        tiny_model_dir,
        mix=MIX,
        methods=["base", {"sft": {"target": "statement"}}, {"mixsd": {"lam": 0.5, "verify": "none"}}],
        retention={"limit": 4, "max_new_tokens": 8, "data": str(probes)},
    )
    result = run_experiment(experiment, show_progress=False)
    rows = {r["cell"]: r for r in result["rows"]}
    assert set(rows) == {"base", "sft-statement-s0", "mixsd-lam0.5-verifynone-s0"}
    assert rows["sft-statement-s0"]["family"] == "SFT statement"
    assert rows["sft-statement-s0"]["target_options"] == {"target": "statement"}
    assert rows["mixsd-lam0.5-verifynone-s0"]["verify_mode"] == "none"
    out = tmp_path / "run"
    corpus = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    statements = [
        json.loads(line) for line in (out / "cells/sft-statement-s0/targets.jsonl").read_text().splitlines()
    ]
    assert [t["text"] for t in statements] == [r["context"] for r in corpus]  # KGFact's statements

    cell = out / "cells" / "mixsd-lam0.5-verifynone-s0"
    accounting = read_target_accounting(
        cell / "targets.jsonl", cell / "targets.summary.json", cell / "nll.json"
    )
    assert accounting["verified"]["correct"] == accounting["records"] == 12  # verification off: all pass
    assert accounting["dropped"]["correct"] == accounting["fallback"]["correct"] == 0
    high = accounting["high_nll"]
    assert high["source"] == "nll.json" and high["verified"]["per_target"]["n"] == 12
    # the NLL the base model's naive conditional gave each token while mixing is the NLL `analyze nll`
    # measures: without nll.json the stored log-probs give the same counts (the chat format has no S token)
    stored = read_target_accounting(cell / "targets.jsonl", cell / "targets.summary.json")["high_nll"]
    assert stored["source"] == "logprob_naive"
    assert stored["verified"] == high["verified"]
    # and not only at the cut (no token of this tiny model is above 5 nats): token by token the same NLLs
    nll = json.loads((cell / "nll.json").read_text())["per_record"]
    mixed = [json.loads(line) for line in (cell / "targets.jsonl").read_text().splitlines()]
    for record, row in zip(nll, mixed, strict=True):
        assert record["id"] == row["id"] and record["tokens"] == len(row["logprob_naive"])
        assert record["sum_nll"] == pytest.approx(-sum(row["logprob_naive"]), abs=1e-3)

    for name in ("sft-statement-s0", "mixsd-lam0.5-verifynone-s0"):
        measured = read_forgetting(
            out / "cells" / name, out / "data" / "train.jsonl", out / "cells" / name / "targets.jsonl"
        )
        transfer = measured["format_transfer"]
        assert transfer["target_shapes"] >= 1
        assert transfer["known_facts"]["model"]["n"] == transfer["known_facts"]["base"]["n"] == 3
        assert measured["leakage"]["known_facts"]["model"]["n"] == 3
        assert measured["erased_knowledge"]["facts_lost"]["known_facts"]["n"] >= 0
        assert measured["erased_knowledge"]["kl_per_token"] is not None
    base = read_forgetting(out / "cells" / "base", out / "data" / "train.jsonl")
    assert base["format_transfer"] is None and base["leakage"]["all"]["model"]["correct"] == 0
