"""Committed results: mixsd.experiments.grid_summary computes what docs/results.md's tables show from a grid's files,
scripts/results.py collects a grid, renders the tables and checks them (`make results-check`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mixsd.core.metrics import hierarchical_bootstrap
from mixsd.experiments.grid_summary import first_at, kept_items, primary, read_grid, summarize

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "results.py"


def load_script():
    spec = importlib.util.spec_from_file_location("results_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def point(epoch: int, memo: str, facts: str, known: str) -> dict:
    """A curve row: per-item outcomes of 4 training questions and two generative probes."""
    return {
        "epoch": float(epoch),
        "step": epoch * 2,
        "memorization": memo.count("1") / len(memo),
        "memorized": memo.count("1"),
        "questions": len(memo),
        "kl": 0.1 * epoch,
        "items": {
            "memorization": memo,
            "facts": facts,
            "facts_collapse": "0" * len(facts),
            "known": known,
            "known_collapse": "0" * len(known),
        },
    }


BASE = point(0, "0000", "1110", "11")


def write_grid(folder: Path, cells: dict[str, tuple[dict, list[dict]]], select: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    config = {"name": folder.name, "select": select or {"memorization": 0.75, "seeds": [0]}}
    (folder / "experiment.yaml").write_text(yaml.safe_dump(config))
    (folder / "curve-base.json").write_text(json.dumps(BASE))
    rows = [{"cell": "base", "group": "base", "method": "base", "seed": 0}]
    for name, (row, curve) in cells.items():
        rows.append({"cell": name, **row})
        train = folder / "cells" / name / "train"
        train.mkdir(parents=True)
        (train / "curve.jsonl").write_text("".join(json.dumps(p) + "\n" for p in curve))
        (train / "model").mkdir()
        (train / "model" / "model.safetensors").write_bytes(b"weights")
        (folder / "cells" / name / "eval.json").write_text("{}")
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def sft(seed: int, lr: str, curve: list[dict]) -> tuple[dict, list[dict]]:
    row = {"group": f"SFT lr={lr}", "family": "SFT", "setting": f"lr={lr}", "method": "sft", "seed": seed}
    displacement = {"fisher_ratio": 0.1 * (seed + 1), "delta_norm_sq": float(lr[-1]) + seed}
    return {**row, "settings": {"lr": float(lr)}, **displacement}, curve


def mixsd(seed: int, curve: list[dict]) -> tuple[dict, list[dict]]:
    row = {"group": "MixSD λ=0.3 lr=1e-4", "family": "MixSD λ=0.3", "setting": "lr=1e-4"}
    displacement = {"fisher_ratio": 0.05 * (seed + 1), "delta_norm_sq": 2.0 + seed}
    return {
        **row,
        "settings": {"lr": 1e-4},
        "method": "mixsd",
        "lam": 0.3,
        "seed": seed,
        **displacement,
    }, curve


@pytest.fixture()
def grid(tmp_path: Path) -> Path:
    # SFT at lr 1e-4 reaches 75% at epoch 2 keeping 1 of 3 base-right facts and 1 of 2 known facts;
    # SFT at lr 3e-5 reaches it at epoch 4 keeping everything; MixSD reaches 100% at epoch 4 keeping more
    return write_grid(
        tmp_path / "toy",
        {
            "sft-lr1e-4-s0": sft(0, "1e-4", [point(2, "1110", "1000", "10"), point(4, "1111", "0000", "00")]),
            "sft-lr3e-5-s0": sft(0, "3e-5", [point(2, "1000", "1110", "11"), point(4, "1110", "1110", "11")]),
            "sft-lr1e-4-s1": sft(1, "1e-4", [point(2, "1111", "0100", "01"), point(4, "1111", "0000", "00")]),
            "mixsd-s0": mixsd(0, [point(2, "1100", "1111", "11"), point(4, "1111", "1101", "11")]),
            "mixsd-s1": mixsd(1, [point(2, "1110", "1100", "11"), point(4, "1111", "1100", "11")]),
        },
    )


def test_primary_retention_counts_base_right_items_kept():
    after = point(
        2, "1110", "1001", "10"
    )  # facts: base-right items 0,1,2 -> kept 1,0,0; the gain at 3 ignored
    assert kept_items(after, BASE, ["facts", "known"]) == {"facts": [1, 0, 0], "known": [1, 0]}
    assert primary(after, BASE, ["facts", "known"]) == pytest.approx((1 / 3 + 1 / 2) / 2)
    curve = [point(2, "1000", "1", "1"), point(4, "1110", "1", "1"), point(6, "1111", "1", "1")]
    assert first_at(curve, 0.75)["epoch"] == 4.0 and first_at(curve, 0.75, within=3) is None
    assert first_at(curve, 1.0)["epoch"] == 6.0


def test_hierarchical_bootstrap_widens_with_fewer_items_and_pairs_items():
    few = [{"p": [1, 0, 1, 0]}, {"p": [1, 1, 0, 0]}]
    many = [{"p": [1, 0, 1, 0] * 10}, {"p": [1, 1, 0, 0] * 10}]
    a, b = hierarchical_bootstrap(few), hierarchical_bootstrap(many)
    assert a["value"] == b["value"] == 0.5
    assert a["ci95"][1] - a["ci95"][0] > b["ci95"][1] - b["ci95"][0]
    # the same items in both methods: a paired difference of identical seeds is exactly zero every time
    same = hierarchical_bootstrap(many, many)
    assert same["value"] == 0 and same["ci95"][0] <= 0 <= same["ci95"][1]
    shifted = hierarchical_bootstrap([{"p": [1] * 40}] * 2, many)
    assert shifted["value"] == 0.5 and shifted["ci95"][0] > 0
    with pytest.raises(ValueError, match="same items"):
        hierarchical_bootstrap([{"p": [1, 0]}, {"p": [1]}])


def test_summary_of_a_grid(grid):
    summary = summarize(read_grid(grid))
    assert summary["probes"] == {
        "facts": {"items": 4, "base_right": 3},
        "known": {"items": 2, "base_right": 2},
    }
    sft_fast = summary["groups"]["SFT lr=1e-4"]
    assert sft_fast["seeds"] == [0, 1] and sft_fast["first_epoch"]["0.9"] == [4.0, 2.0]
    matched = sft_fast["matched"]["0.9"]
    # seed 0 at epoch 4 keeps nothing; seed 1 at epoch 2 keeps fact 1 of 3 and known 1 of 2
    assert matched["primary"]["value"] == pytest.approx(((0 + 1 / 3) / 2 + (0 + 1 / 2) / 2) / 2, abs=1e-6)
    assert matched["flips"] == [
        {"right_to_wrong": 5, "wrong_to_right": 0},
        {"right_to_wrong": 3, "wrong_to_right": 0},
    ]
    assert summary["groups"]["SFT lr=3e-5"]["matched"]["0.9"] == {"seeds_reached": 0, "seeds": 1}
    # the rule (75% on seed 0): both SFT settings reach it; lr 3e-5 keeps more there
    choice = summary["choices"]["SFT"]
    assert choice["chosen"] == "SFT lr=3e-5" and choice["candidates"]["SFT lr=1e-4"]["epoch"] == 2.0
    assert "highest primary retention" in choice["why"]
    compared = summary["comparisons"]["MixSD λ=0.3 lr=1e-4 vs SFT lr=1e-4"]
    assert set(compared) == {"0.9", "0.95"}  # SFT lr=3e-5 never reaches 90%: no comparison with it
    mixsd_kept = ((2 / 3 + 2 / 3) / 2 + 1) / 2
    assert compared["0.9"]["value"] == pytest.approx(mixsd_kept - matched["primary"]["value"], abs=1e-5)


def test_fisher_correlations_are_raw_and_partial_with_clusters_by_setting(grid):
    fisher = summarize(read_grid(grid))["fisher"]
    assert [c["cell"] for c in fisher["cells"]] == [
        "sft-lr1e-4-s0", "sft-lr3e-5-s0", "sft-lr1e-4-s1", "mixsd-s0", "mixsd-s1"
    ]  # fmt: skip
    # drop = 1 - primary retention at the last epoch: SFT lr 1e-4 seed 0 keeps nothing
    assert fisher["cells"][0]["drop"] == 1.0 and fisher["cells"][1]["drop"] == 0.0
    ratio = fisher["measures"]["fisher_ratio"]
    assert ratio["raw"]["n"] == 5 and ratio["raw"]["clusters"] == 3 and ratio["controls"] == ["log10 lr"]
    assert ratio["partial"]["r"] is not None
    assert fisher["measures"]["fisher_displacement_norm"]["raw"]["note"].startswith("not enough cells")


def test_collect_render_and_check(grid, tmp_path):
    script = load_script()
    results = tmp_path / "results"
    target = script.collect(grid, results=results)
    assert (target / "cells" / "mixsd-s0" / "train" / "curve.jsonl").is_file()
    assert not (target / "cells" / "mixsd-s0" / "train" / "model").exists()  # no weights
    assert json.loads((target / "PROVENANCE.json").read_text())["files"] > 0
    doc = tmp_path / "results.md"
    doc.write_text("Intro.\n<!-- results toy groups -->\nstale\n<!-- /results -->\nEnd.\n")
    assert script.render(True, doc, results) == 1  # stale table, no summary yet
    assert script.render(False, doc, results) == 0
    text = doc.read_text()
    assert (
        "stale" not in text and "| SFT lr=1e-4 | 2 |" in text and text.endswith("<!-- /results -->\nEnd.\n")
    )
    assert (target / "summary.json").is_file()
    assert script.render(True, doc, results) == 0
    doc.write_text(text.replace("| SFT lr=1e-4 | 2 |", "| SFT lr=1e-4 | 3 |"))  # a hand-typed figure
    assert script.render(True, doc, results) == 1
    doc.write_text("<!-- results toy nosuch -->\n<!-- /results -->\n")
    with pytest.raises(Exception, match="unknown table 'nosuch'"):
        script.render(True, doc, results)


def test_the_trajectory_figure_is_drawn_from_the_summary_and_its_points_checked(grid, tmp_path):
    """`trajectories` blocks: each group's per-seed memorization and primary retention at every epoch all
    its seeds scored (in summary.json, so `render --check` compares the plotted points), drawn into
    docs/figures/GRID-trajectories.png for the groups with several seeds; a check with the PNG gone fails."""
    script = load_script()
    results = tmp_path / "results"
    script.collect(grid, results=results)
    summary = summarize(read_grid(results / "toy"))
    # MixSD seed 0 at epoch 2: facts 1111 keeps the base's 3 right ones; seed 1 (1100) keeps 2 of 3
    assert summary["groups"]["MixSD λ=0.3 lr=1e-4"]["trajectory"][0] == {
        "epoch": 2.0,
        "memorization": [0.5, 0.75],
        "primary": [1.0, pytest.approx((2 / 3 + 1) / 2)],
    }
    assert [p["epoch"] for p in summary["groups"]["SFT lr=3e-5"]["trajectory"]] == [2.0, 4.0]
    # the groups with several seeds (SFT lr=3e-5 has one)
    assert script.trajectory_groups(summary) == ["MixSD λ=0.3 lr=1e-4", "SFT lr=1e-4"]
    doc = tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("<!-- results toy trajectories -->\n<!-- /results -->\n")
    assert script.render(False, doc, results) == 0
    figure = tmp_path / "docs" / "figures" / "toy-trajectories.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "](figures/toy-trajectories.png)" in doc.read_text()
        and "SFT lr=1e-4; mean over seeds" in doc.read_text()
    )
    assert script.render(True, doc, results) == 0
    figure.unlink()
    assert script.render(True, doc, results) == 1  # the block now says the figure is missing


def test_collect_records_the_commit_and_probes_of_a_worktree_whose_runs_folder_is_a_link(grid, tmp_path):
    """A grid run from a worktree whose `runs` links to another disk: the provenance names the worktree's
    commit (git run in the resolved folder would find no repository), and a committed probe folder the
    retention read is copied beside the results."""
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    git = ["git", "-C", str(worktree), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "grid"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout
    (worktree / "runs").symlink_to(grid.parent, target_is_directory=True)
    # its retention probes are a folder of the checkout: collect copies their items beside the results
    (worktree / "probes").mkdir()
    (worktree / "probes" / "known_facts.jsonl").write_text('{"id": 0, "answers": ["Paris"]}\n')
    config = yaml.safe_load((grid / "experiment.yaml").read_text())
    (grid / "experiment.yaml").write_text(yaml.safe_dump({**config, "retention": {"data": "probes"}}))
    target = load_script().collect(worktree / "runs" / grid.name, results=tmp_path / "results")
    assert json.loads((target / "PROVENANCE.json").read_text())["commit"] == head.strip()
    assert (target / "retention-data" / "known_facts.jsonl").read_text().startswith('{"id": 0')


def test_merge_adds_a_later_runs_cells_and_refuses_another_base(grid, tmp_path):
    script = load_script()
    results = tmp_path / "results"
    target = script.collect(grid, results=results)
    (target / "cells" / "mixsd-s1" / "stale.json").write_text("{}")  # a file of the older run of mixsd-s1
    # a later run of the same study (run with --only): seed 2 of SFT, mixsd-s1 again, shared targets
    later = write_grid(
        tmp_path / "later",
        {
            "sft-lr3e-5-s2": sft(2, "3e-5", [point(2, "1000", "1110", "11"), point(4, "1111", "1110", "11")]),
            "mixsd-s1": mixsd(1, [point(2, "1110", "1100", "11"), point(4, "1111", "1111", "11")]),
        },
    )
    shared = later / "cells" / "mixsd-lam0.3-s0"
    shared.mkdir()
    (shared / "targets.jsonl").write_text("{}\n")
    (shared / "targets.jsonl.stage.json").write_text(json.dumps({"state": "done"}))
    sft_targets = later / "cells" / "sft-s2"  # SFT's shared targets: only the stage's own record
    (sft_targets / "stages").mkdir(parents=True)
    (sft_targets / "targets.jsonl").write_text("{}\n")
    (sft_targets / "stages" / "targets.json").write_text(json.dumps({"state": "done"}))
    mixing = later / "cells" / "mixsd-lam0.5-s0"  # targets still being made: not merged
    mixing.mkdir()
    (mixing / "targets.jsonl").write_text("")
    (mixing / "targets.jsonl.stage.json").write_text(json.dumps({"state": "running"}))
    (later / "report.md").write_text("a report of the later run's cells only")
    # the later run scored its own base (another probe suite, another machine): the committed base stays
    (target / "cells" / "base").mkdir(parents=True, exist_ok=True)
    (target / "cells" / "base" / "retention.json").write_text('{"probes": ["known", "general"]}')
    (later / "cells" / "base").mkdir(parents=True, exist_ok=True)
    (later / "cells" / "base" / "retention.json").write_text('{"probes": ["known"]}')
    later_rows = [json.loads(line) for line in (later / "results.jsonl").read_text().splitlines()]
    (later / "results.jsonl").write_text(
        "".join(json.dumps({**r, "later": True} if r["cell"] == "base" else r) + "\n" for r in later_rows)
    )
    first_log = ['{"stage":"train","cell":"mixsd-s1","time":"2026-12-01 10:00:00"}']
    later_log = ['{"stage":"train","cell":"sft-lr3e-5-s2","time":"2026-12-02 09:00:00"}']
    (target / "stage-log.jsonl").write_text(first_log[0] + "\n")
    (later / "stage-log.jsonl").write_text(later_log[0] + "\n" + first_log[0] + "\n")
    script.merge(later, "toy", results=results)
    assert (target / "stage-log.jsonl").read_text().splitlines() == first_log + later_log  # both runs', once
    rows = {json.loads(line)["cell"] for line in (target / "results.jsonl").read_text().splitlines()}
    assert rows == {
        "base",
        "sft-lr1e-4-s0",
        "sft-lr3e-5-s0",
        "sft-lr1e-4-s1",
        "mixsd-s0",
        "mixsd-s1",
        "sft-lr3e-5-s2",
    }
    assert (target / "cells" / "sft-lr3e-5-s2" / "train" / "curve.jsonl").is_file()
    assert not (target / "cells" / "sft-lr3e-5-s2" / "train" / "model").exists()  # no weights
    assert not (target / "cells" / "mixsd-s1" / "stale.json").exists()  # the cell is the later run's, whole
    assert (target / "cells" / "mixsd-lam0.3-s0" / "targets.jsonl").is_file()
    assert not (target / "cells" / "mixsd-lam0.5-s0").exists()
    assert (target / "cells" / "sft-s2" / "targets.jsonl").is_file()
    assert not (target / "cells" / "sft-s2" / "stages").exists()  # stage records are not results
    # mixed again by a later run (another machine: the same tokens, log-probabilities off in the last digit):
    # the committed targets stay; other tokens are refused, since that run's cells trained on other targets
    committed_targets = target / "cells" / "mixsd-lam0.3-s0" / "targets.jsonl"
    committed_targets.write_text(
        json.dumps({"id": "a", "target_ids": [1, 2], "logprob_expert": [-0.12345]}) + "\n"
    )
    (shared / "targets.jsonl").write_text(
        json.dumps({"id": "a", "target_ids": [1, 2], "logprob_expert": [-0.12346]}) + "\n"
    )
    script.merge(later, "toy", results=results)
    assert "-0.12345" in committed_targets.read_text()
    assert json.loads((target / "PROVENANCE.json").read_text())["runs"][-1]["shared_targets_kept"] == [
        "mixsd-lam0.3-s0"
    ]
    (shared / "targets.jsonl").write_text(json.dumps({"id": "a", "target_ids": [1, 3]}) + "\n")
    with pytest.raises(Exception, match="the shared targets mixsd-lam0.3-s0 differ from the committed ones"):
        script.merge(later, "toy", results=results)
    assert not (target / "report.md").exists()  # derived from one run's cells: left out
    assert "sft-lr3e-5-s2" in (target / "results.csv").read_text()
    runs = json.loads((target / "PROVENANCE.json").read_text())["runs"]
    assert len(runs) == 3 and runs[1]["cells"] == ["mixsd-s1", "sft-lr3e-5-s2"]
    # the same runs folder merged again: its cells are committed byte for byte, so the entry claims none
    assert runs[2]["cells"] == [] and runs[2]["cells_unchanged"] == ["mixsd-s1", "sft-lr3e-5-s2"]
    assert json.loads((target / "cells" / "base" / "retention.json").read_text())["probes"] == [
        "known",
        "general",
    ]
    base_rows = [
        r for r in map(json.loads, (target / "results.jsonl").read_text().splitlines()) if r["cell"] == "base"
    ]
    assert len(base_rows) == 1 and "later" not in base_rows[0]
    grid_read = read_grid(target)
    assert grid_read["curves"]["mixsd-s1"][-1]["items"]["facts"] == "1111"  # the later run's curve
    other = tmp_path / "other"
    write_grid(other, {"sft-lr3e-5-s3": sft(3, "3e-5", [point(2, "1000", "1110", "11")])})
    moved = {**BASE, "items": {**BASE["items"], "facts": "1111"}}  # another base: other items scored
    (other / "curve-base.json").write_text(json.dumps(moved))
    with pytest.raises(Exception, match=r"differ from the committed ones on \{'facts': 1\} items"):
        script.merge(other, "toy", results=results)
    assert "sft-lr3e-5-s3" not in (target / "results.jsonl").read_text()  # nothing merged
    # one greedy outcome flipped (another machine's arithmetic): accepted within a tolerance, and recorded
    script.merge(other, "toy", results=results, base_tolerance=1)
    assert "sft-lr3e-5-s3" in (target / "results.jsonl").read_text()
    provenance = json.loads((target / "PROVENANCE.json").read_text())["runs"]
    assert (
        provenance[-1]["base_items_differing"] == {"facts": 1} and provenance[1]["base_items_differing"] == {}
    )
    assert json.loads((target / "curve-base.json").read_text())["items"]["facts"] == BASE["items"]["facts"]
    other_items = tmp_path / "other-items"
    write_grid(other_items, {"sft-lr3e-5-s4": sft(4, "3e-5", [point(2, "1000", "1110", "11")])})
    (other_items / "curve-base.json").write_text(
        json.dumps({**BASE, "items": {**BASE["items"], "facts": "11"}})
    )
    with pytest.raises(Exception, match="did not score the same items"):  # never, whatever the tolerance
        script.merge(other_items, "toy", results=results, base_tolerance=100)


def test_forgetting_and_target_accounting_come_from_each_cells_own_files(grid, tmp_path):
    # SFT seed 0 trained on "The answer is X." targets, MixSD seed 0 on its own wording; both answer two
    # known facts. Format transfer is judged by each cell's own targets; leakage by the corpus's names.
    (grid / "corpus").mkdir()
    (grid / "corpus" / "train.jsonl").write_text(
        json.dumps({"check": "Shiboshend", "subject": "Vedux Vudratrox"}) + "\n"
    )
    (grid / "known-facts").mkdir()
    (grid / "known-facts" / "known.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"Capital {i}?", "check": ["Phoenix"]}) + "\n" for i in ("a", "b")
        )
    )
    targets = {
        "sft-s0": [{"id": "f1", "text": "The answer is Shiboshend. \\boxed{Shiboshend}"}],
        "mixsd-lam0.3-s0": [
            {
                "id": "f1",
                "text": "He lives in Shiboshend.",
                "correct": True,
                "source": "mixsd",
                "low_expert_tokens": 0,
            },
            {"id": "f2", "text": "The answer is Questebeil.", "correct": False, "source": "answer_fallback"},
        ],
    }
    answers = {
        "sft-lr1e-4-s0": ("sft-s0", {"a": "The answer is Phoenix. \\boxed{Phoenix}", "b": "Shiboshend."}),
        "mixsd-s0": ("mixsd-lam0.3-s0", {"a": "Phoenix is the capital.", "b": "The answer is Phoenix."}),
    }
    for folder, rows in targets.items():
        (grid / "cells" / folder).mkdir()
        (grid / "cells" / folder / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (grid / "cells" / "mixsd-lam0.3-s0" / "targets.summary.json").write_text(json.dumps({"records": 3}))
    for cell, (folder, outputs) in answers.items():
        record = {"description": {"settings": {"targets": f"runs/toy/cells/{folder}/targets.jsonl"}}}
        (grid / "cells" / cell / "train" / "stage.json").write_text(json.dumps(record))
        (grid / "cells" / cell / "retention.json").write_text(json.dumps({"probes": {}}))
        rows = [
            {"who": "model", "split": "known", "id": i, "kind": "gen", "output": o}
            for i, o in outputs.items()
        ]
        rows += [
            {"who": "base", "split": "known", "id": i, "kind": "gen", "output": "Phoenix."} for i in outputs
        ]
        (grid / "cells" / cell / "retention.predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    summary = summarize(read_grid(grid))
    sft_forgetting = summary["forgetting"]["SFT lr=1e-4"]
    assert sft_forgetting["cells"] == ["sft-lr1e-4-s0"]  # seed 1 has no retention answers: left out
    assert sft_forgetting["format_transfer"]["model"]["correct"] == 1  # "The answer is Phoenix." only
    assert sft_forgetting["leakage"]["model"]["correct"] == 1  # "Shiboshend." names an invented place
    assert sft_forgetting["names_leaked"] == {"shiboshend": 1}
    mixsd_forgetting = summary["forgetting"]["MixSD λ=0.3 lr=1e-4"]
    # MixSD's own targets have two shapes ("he lives in E", "the answer is E"): one answer takes one
    assert mixsd_forgetting["format_transfer"]["model"]["correct"] == 1
    assert mixsd_forgetting["leakage"]["model"]["correct"] == 0
    (accounting,) = summary["targets"]["MixSD λ=0.3 lr=1e-4"]
    assert accounting["targets"] == "mixsd-lam0.3-s0" and accounting["records"] == 3
    assert accounting["verified"]["correct"] == 1 and accounting["fallback"]["correct"] == 1
    assert accounting["dropped"]["correct"] == 1  # 3 records drawn, 2 written
    assert "SFT lr=1e-4" not in summary["targets"]  # SFT's targets are the ground truth: nothing to account
    script = load_script()
    assert "0.500 (1/2)" in script.forgetting_table(json.loads(json.dumps(summary)))
    assert "mixsd-lam0.3-s0" in script.targets_table(json.loads(json.dumps(summary)))


def test_make_results_check_passes_on_the_committed_results():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "render", "--check"], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr


def test_verdicts_follow_the_declared_rules(grid):
    verdicts = {v["claim"]: v for v in summarize(read_grid(grid))["verdicts"]}
    # MixSD (2 seeds, both reach 95%): holds, but fewer than 3 seeds
    assert verdicts["memorization"]["verdict"] == "cannot tell yet (2 seeds; provisional: holds)"
    # the rule chose SFT lr=3e-5 (75% rule), which never reaches 90%: no common level
    assert verdicts["retention"]["verdict"].startswith("cannot tell yet (1 seed; provisional: cannot tell")
    assert verdicts["fisher"]["verdict"].startswith(("holds", "does not hold", "cannot tell"))
    assert "nll" not in verdicts  # no NLL counts in the toy rows


def test_verdicts_table_keeps_what_is_measured_apart_from_its_value(grid):
    """A claim judged on several numbers (Fisher's two partial correlations) names them in the figure column
    and gives them in the value column, as the bootstrapped claims do."""
    summary = summarize(read_grid(grid))
    fisher_row = next(line for line in load_script().verdicts_table(summary).splitlines() if "Fisher" in line)
    cells = [c.strip() for c in fisher_row.strip("|").split("|")]
    assert cells[2] == "partial r with the retention drop: Fisher ratio, raw displacement"
    assert cells[3].startswith(("ratio ", "–"))


def test_mixsd_is_compared_with_the_self_rewrite_baseline_under_the_retention_rule(tmp_path):
    """With the self-rewrite baseline (SDFT) in the grid, MixSD's chosen setting is compared with it on the
    same matched-memorization footing as with SFT, and the verdicts table gets its row."""

    def rewrite(seed: int, curve: list[dict]) -> tuple[dict, list[dict]]:
        row = {"group": "Self-rewrite", "family": "Self-rewrite", "method": "rewrite", "seed": seed}
        return {**row, "fisher_ratio": 0.2, "delta_norm_sq": 1.0 + seed}, curve

    keeps_all = [point(2, "1100", "1111", "11"), point(4, "1111", "1111", "11")]
    keeps_none = [point(2, "1111", "0000", "00"), point(4, "1111", "0000", "00")]
    cells = {f"mixsd-s{s}": mixsd(s, keeps_all) for s in range(3)}
    cells |= {f"rewrite-s{s}": rewrite(s, keeps_none) for s in range(3)}
    cells |= {f"sft-lr1e-4-s{s}": sft(s, "1e-4", keeps_none) for s in range(3)}
    summary = summarize(read_grid(write_grid(tmp_path / "toy", cells)))
    mixsd_group = "MixSD λ=0.3 lr=1e-4"
    assert set(summary["comparisons"]) == {
        f"{mixsd_group} vs SFT lr=1e-4",
        f"{mixsd_group} vs Self-rewrite",
        "Self-rewrite vs SFT lr=1e-4",
    }
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert verdicts["retention_rewrite"]["verdict"] == "holds"
    assert verdicts["retention_rewrite"]["figure"] == f"{mixsd_group} − Self-rewrite at 95%"
    assert verdicts["retention_rewrite"]["seeds"] == "3 vs 3"
    assert verdicts["retention"]["verdict"] == "holds"
    assert "than the self-rewrite baseline (SDFT" in load_script().verdicts_table(summary)


def test_guarded_mixing_is_judged_against_plain_mixsd_and_against_its_aim_of_no_loss(tmp_path):
    """Our extension (guarded mixing) is compared with the paper's MixSD λ=0.3 by the retention rule, and
    judged against its aim: at 95% memorization, a primary retention whose interval reaches 1."""

    def guard(seed: int, curve: list[dict]) -> tuple[dict, list[dict]]:
        row, curve = mixsd(seed, curve)
        family = "MixSD λ=0.3 guard_top_p=0.9"
        return {**row, "group": f"{family} lr=1e-4", "family": family, "guard_top_p": 0.9}, curve

    keeps_all = [point(2, "1100", "1111", "11"), point(4, "1111", "1111", "11")]
    keeps_some = [point(2, "1100", "1111", "11"), point(4, "1111", "1000", "10")]
    cells = {f"mixsd-s{s}": mixsd(s, keeps_some) for s in range(3)}
    cells |= {f"guard-s{s}": guard(s, keeps_all) for s in range(3)}
    summary = summarize(read_grid(write_grid(tmp_path / "toy", cells)))
    assert set(summary["comparisons"]) == {"MixSD λ=0.3 guard_top_p=0.9 lr=1e-4 vs MixSD λ=0.3 lr=1e-4"}
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert verdicts["retention_guard"]["verdict"] == "holds"  # keeps every item where plain MixSD loses some
    assert verdicts["retention_guard"]["seeds"] == "3 vs 3"
    assert verdicts["guard_no_loss"]["verdict"] == "holds"  # nothing lost: the interval reaches 1
    # the same extension losing items at 95% does not meet its aim, whatever plain MixSD does
    cells |= {f"guard-s{s}": guard(s, keeps_some) for s in range(3)}
    summary = summarize(read_grid(write_grid(tmp_path / "toy2", cells)))
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert verdicts["guard_no_loss"]["verdict"] == "does not hold"
    assert verdicts["retention_guard"]["verdict"] == "cannot tell"  # the same items kept by both
    assert "Guarded mixing (ours" in load_script().verdicts_table(summary)
    # a seed that never reaches 95% fails the aim too: no matched point to read a retention at
    cells["guard-s2"] = guard(2, [point(2, "1100", "1111", "11"), point(4, "1110", "1111", "11")])
    summary = summarize(read_grid(write_grid(tmp_path / "toy3", cells)))
    verdict = {v["claim"]: v for v in summary["verdicts"]}["guard_no_loss"]
    assert verdict["verdict"] == "does not hold" and verdict["figure"].endswith("2/3 seeds reach 95%")


def test_an_opsd_baseline_that_never_learns_is_named_and_its_diagnostics_tabled(tmp_path):
    """OPSD enters the verdicts by the retention rule; when it reaches no memorization level the verdict
    names it with its best final memorization, and the opsd table shows each epoch's diagnostics beside
    the curve's memorization (– at an epoch the curve did not score)."""

    def opsd(seed: int) -> tuple[dict, list[dict]]:
        row = {"group": "OPSD", "family": "OPSD", "method": "opsd", "seed": seed}
        return {**row, "fisher_ratio": 0.2, "delta_norm_sq": 1.0 + seed}, [point(2, "0000", "1110", "11")]

    keeps_all = [point(2, "1100", "1111", "11"), point(4, "1111", "1111", "11")]
    cells = {f"mixsd-s{s}": mixsd(s, keeps_all) for s in range(3)} | {f"opsd-s{s}": opsd(s) for s in range(3)}
    folder = write_grid(tmp_path / "toy", cells)
    diagnostics = [
        {"epoch": 0.0, "step": 0, "student_gold_logprob": -64.7, "teacher_gold_logprob": -31.2},
        {"epoch": 1.0, "step": 5, "rollout_tokens": 51.0, "answer_in_rollouts": 0.0, "kl_per_token": 0.27},
        {"epoch": 2.0, "step": 10, "rollout_tokens": 50.1, "answer_in_rollouts": 0.0, "kl_per_token": 0.21},
    ]
    for seed in range(3):
        path = folder / "cells" / f"opsd-s{seed}" / "train" / "opsd-diagnostics.jsonl"
        path.write_text("".join(json.dumps(d) + "\n" for d in diagnostics))
    summary = summarize(read_grid(folder))
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert (
        verdicts["retention_opsd"]["verdict"]
        == "cannot tell: OPSD reaches no level (best final memorization 0.00; compared at its own level only from 50%)"
    )
    rows = summary["opsd"]["opsd-s0"]
    assert [r["epoch"] for r in rows] == [0.0, 1.0, 2.0]
    assert [r["memorization"] for r in rows] == [None, None, 0.0]  # the curve scored epoch 2 only
    assert rows[2]["kl_per_token"] == 0.21 and rows[0]["student_gold_logprob"] == -64.7
    table = load_script().opsd_table(summary).splitlines()
    assert len(table) == 2 + 9 and table[2].startswith("| opsd-s0 | 0 | – |")
    assert "| opsd-s0 | 2 | 0.00 | 50.1 |" in table[4]
    assert "than on-policy self-distillation (OPSD)" in load_script().verdicts_table(summary)


def test_an_opsd_sweep_alone_says_whether_opsd_learns_from_the_items_interval(tmp_path):
    """A grid of OPSD alone (its lr sweep, one seed per rate): "does not hold" only when even the best
    scored epoch of every setting is below 95% by its Wilson interval over the questions; a setting whose
    seeds all reach 95% holds (with 3 seeds); anything between cannot be told."""

    def opsd(lr: str, seed: int, curve: list[dict]) -> tuple[dict, list[dict]]:
        row = {"group": f"OPSD lr={lr}", "family": "OPSD", "setting": f"lr={lr}", "method": "opsd"}
        return {**row, "settings": {"lr": float(lr)}, "seed": seed}, curve

    def verdict(name: str, cells: dict) -> dict:
        summary = summarize(read_grid(write_grid(tmp_path / name, cells, {"memorization": 0.95})))
        return {v["claim"]: v for v in summary["verdicts"]}

    never = [point(2, "0" * 20, "1110", "11"), point(4, "1" + "0" * 19, "1110", "11")]
    verdicts = verdict(
        "never", {"opsd-lr1e-3-s0": opsd("1e-3", 0, never), "opsd-lr3e-4-s0": opsd("3e-4", 0, never)}
    )
    assert set(verdicts) == {"opsd_learns"}  # no MixSD, no Fisher measured: nothing else to judge
    learns = verdicts["opsd_learns"]
    assert learns["verdict"] == "does not hold at this scale" and learns["seeds"] == "2 settings × 1 seed"
    assert learns["boot"]["value"] == 0.05 and learns["boot"]["ci95"][1] < 0.95
    assert learns["figure"].startswith("best scored epoch of any setting: 1/20 (opsd-lr1e-3-s0, epoch 4")
    # 4 questions, 3 of 4 right at best: the interval reaches past 95%, so one seed cannot tell
    close = [point(2, "1110", "1110", "11")]
    assert (
        verdict("close", {"opsd-lr1e-3-s0": opsd("1e-3", 0, close)})["opsd_learns"]["verdict"]
        == "cannot tell"
    )
    learned = [point(2, "1111", "1110", "11")]
    cells = {f"opsd-lr1e-3-s{s}": opsd("1e-3", s, learned) for s in range(3)}
    assert verdict("learned", cells)["opsd_learns"]["verdict"] == "holds"
    assert "OPSD at the paper's settings learns the facts" in load_script().verdicts_table(
        summarize(read_grid(tmp_path / "never"))
    )


def test_mixsd_is_compared_with_memit_editing_by_its_one_point_curve(tmp_path):
    """A MEMIT cell's curve is one point, the edited model (`edit`): MixSD is compared with it by the
    retention rule at the levels both reach; a MEMIT that reaches none is compared at its own level when
    every seed memorizes at least half of the facts, else named in the verdict; and the edit stays out of the
    Fisher correlations (no training, no learning rate)."""

    def memit(seed: int, memo: str, facts: str) -> tuple[dict, list[dict]]:
        row = {"group": "MEMIT", "family": "MEMIT", "method": "memit", "seed": seed}
        edit = {**point(1, memo, facts, "10"), "step": 0, "edit": "memit"}
        return {**row, "fisher_ratio": 0.3, "delta_norm_sq": 5.0 + seed}, [edit]

    keeps_all = [point(2, "1100", "1111", "11"), point(4, "1111", "1111", "11")]
    cells = {f"mixsd-s{s}": mixsd(s, keeps_all) for s in range(3)}
    cells |= {f"sft-lr1e-4-s{s}": sft(s, "1e-4", keeps_all) for s in range(3)}
    summary = summarize(
        read_grid(write_grid(tmp_path / "toy", cells | {"memit-s0": memit(0, "1111", "0000")}))
    )
    assert {"MixSD λ=0.3 lr=1e-4 vs MEMIT", "MEMIT vs SFT lr=1e-4"} <= set(summary["comparisons"])
    assert summary["groups"]["MEMIT"]["first_epoch"]["0.95"] == [1.0]
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    # MEMIT is deterministic: its one seed is enough; MixSD's three make the verdict final
    assert verdicts["retention_memit"]["verdict"] == "holds"
    assert verdicts["retention_memit"]["seeds"] == "3 vs 1"
    assert verdicts["retention_memit"]["figure"] == "MixSD λ=0.3 lr=1e-4 − MEMIT at 95%"
    assert not [c for c in summary["fisher"]["cells"] if c["cell"].startswith("memit")]
    assert "than MEMIT editing, at matched memorization" in load_script().verdicts_table(summary)

    assert summary["own_level_comparisons"] == {}  # MEMIT reaches 95%: the declared levels decide

    # MEMIT at 50%, under every declared level but at the floor: MixSD is compared at MEMIT's own level,
    # each seed at the first point reaching it (epoch 2), paired items: facts kept 3/3 by both, known facts
    # 2/2 by MixSD and 1/2 by MEMIT, so the difference is (0 + 0.5) / 2 = 0.25, and two known items leave
    # its interval touching 0
    half = {f"memit-s{s}": memit(s, "1100", "1110") for s in range(3)}
    summary = summarize(read_grid(write_grid(tmp_path / "toy2", cells | half)))
    own = summary["own_level_comparisons"]["MixSD λ=0.3 lr=1e-4 vs MEMIT"]
    assert own["level"] == 0.5 and own["epochs"] == [2.0, 2.0, 2.0] and own["baseline_epochs"] == [1.0] * 3
    assert own["value"] == pytest.approx(0.25) and own["ci95"][0] == 0.0
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert verdicts["retention_memit"]["verdict"] == "cannot tell"
    assert verdicts["retention_memit"]["boot"] == own
    assert verdicts["retention_memit"]["figure"] == (
        "MixSD λ=0.3 lr=1e-4 − MEMIT at 50% (MEMIT's own level: it reaches no declared level)"
    )
    # the own level is the highest every seed reaches: one seed at 25% puts it under the floor
    low = half | {"memit-s2": memit(2, "1000", "1110")}
    summary = summarize(read_grid(write_grid(tmp_path / "toy3", cells | low)))
    assert summary["own_level_comparisons"] == {}
    verdicts = {v["claim"]: v for v in summary["verdicts"]}
    assert verdicts["retention_memit"]["verdict"] == (
        "cannot tell: MEMIT reaches no level (best final memorization 0.50; compared at its own level only "
        "from 50%)"
    )


def test_a_documents_grid_reports_squad_scores_per_group_split_and_against_the_base(tmp_path):
    """The closed-book summary: per group and split, SQuAD's EM, F1 and answer-contained rate over seeds
    and items, and F1 minus the base model's paired over the same gold questions; item order is by id, so
    cells that wrote their predictions in another order are still paired item by item."""

    def predictions(f1s: list[float], split: str = "gold") -> list[dict]:
        return [
            {
                "who": "model",
                "split": split,
                "id": f"q{i}",
                "squad_em": float(f == 1.0),
                "squad_f1": f,
                "contained": float(f > 0),
            }
            for i, f in enumerate(f1s)
        ]

    curve = [point(2, "1111", "1110", "11")]
    cells = {f"sft-lr1e-4-s{s}": sft(s, "1e-4", curve) for s in range(2)}
    folder = write_grid(tmp_path / "docs", cells)
    files = {
        "base": predictions([0.0, 0.5, 0.0, 0.0]) + predictions([1.0, 1.0, 0.0, 1.0], "gold_open"),
        "sft-lr1e-4-s0": predictions([1.0, 0.5, 0.0, 0.0])[::-1] + predictions([1.0], "heldout"),
        "sft-lr1e-4-s1": predictions([1.0, 1.0, 0.0, 0.0]) + predictions([0.0], "heldout"),
    }
    for cell, rows in files.items():
        (folder / "cells" / cell).mkdir(parents=True, exist_ok=True)
        (folder / "cells" / cell / "eval.predictions.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    book = summarize(read_grid(folder))["closed_book"]
    assert set(book) == {"base", "SFT lr=1e-4"}
    assert set(book["base"]["splits"]) == {"gold", "gold_open"}
    gold = book["SFT lr=1e-4"]["splits"]["gold"]
    assert gold["items"] == 4 and book["SFT lr=1e-4"]["seeds"] == [0, 1]
    assert gold["squad_f1"]["value"] == pytest.approx((1.5 + 2.0) / 8)
    assert gold["squad_em"]["value"] == pytest.approx(3 / 8)
    # paired over items: seed means 0.375 and 0.5 against the base's 0.125
    assert gold["squad_f1_vs_base"]["value"] == pytest.approx((1.5 + 2.0) / 8 - 0.5 / 4)
    assert "squad_f1_vs_base" not in book["SFT lr=1e-4"]["splits"]["heldout"]  # the base has no such split
    assert "gold_trained" not in book["base"]["splits"]  # no corpus folder at hand: that split is left out
    # with the corpus folder: the gold questions about passages that have a training pair (q0, q2)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.jsonl").write_text(json.dumps({"id": "t0", "passage": "p-a"}) + "\n")
    (corpus / "gold.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "passage": p}) + "\n" for i, p in enumerate("abab"))
        .replace('"a"', '"p-a"')
        .replace('"b"', '"p-b"')
    )
    grid = read_grid(folder)
    grid["config"]["corpus"] = {"generator": "folder", "path": str(corpus)}
    trained = summarize(grid)["closed_book"]["SFT lr=1e-4"]["splits"]["gold_trained"]
    assert trained["items"] == 2 and trained["squad_f1"]["value"] == pytest.approx((1.0 + 1.0) / 4)
    table = load_script().closed_book_table(summarize(read_grid(folder)))
    assert "| SFT lr=1e-4 | gold | 4 | 2 | 0.375 [" in table
    assert "| base | gold_open | 4 | 1 | 0.750 [0.250, 1.000] |" in table
    assert "No cell with SQuAD-scored predictions" in load_script().closed_book_table({"closed_book": {}})


def test_prose_figures_must_come_from_a_generated_table_or_name_their_source():
    """`render --check` fails on a figure typed by hand: each decimal figure of the prose must be held by a
    generated table (to at least its decimals, sign aside) or listed, with its source, in the doc's comment."""
    untraced = load_script().untraced_figures
    doc = (
        "MixSD keeps 0.51 (.5) of it, 0.087 less than SFT, and 0.6 of nothing.\n"
        "<!-- results g groups -->\n| a | 0.513 | −0.087 |\n<!-- /results -->\n"
        "Typed by hand: 0.52 and −0.249; in code `0.777` it is not prose.\n"
        "```\n0.999\n```\n"
        "<!-- prose figures not from a table: −0.249 (an old verdict table) -->\n"
    )
    assert untraced(doc) == [(1, "0.6"), (5, "0.52")]
    assert untraced(doc.replace("0.52 and ", "")) == [(1, "0.6")]
