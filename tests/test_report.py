"""Learning curves at matched memorization and the tuning rule on hand-made curves (no models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from mixsd.core.files import InputError
from mixsd.experiments.report import write_report
from mixsd.experiments.report_data import write_report_data
from mixsd.experiments.report_sections import matched_cell, tuning_markdown
from mixsd.experiments.results import COMPARISONS_FILE, REPORT_DATA_FILES
from mixsd.experiments.tuning import (
    SelectionRule,
    add_retention,
    curve_groups,
    interpolate_at,
    matched_retention,
    mean_curve,
    pareto_frontier,
    retention_at_memorization,
    select_setting,
    summarize_setting,
    tuning_results,
    within,
)


def curve(*points: tuple[float, float, float]) -> list[dict]:
    """(epoch, memorization, retention) points."""
    return [{"epoch": e, "memorization": m, "retention": r} for e, m, r in points]


# --------------------------------------------------------------------------------------------------
# Interpolation
# --------------------------------------------------------------------------------------------------
def test_interpolation_between_the_epochs_around_the_crossing():
    c = curve((0, 0.0, 1.0), (1, 0.5, 0.9), (2, 0.9, 0.7), (3, 1.0, 0.6))
    # 0.9 is reached exactly at epoch 2: no interpolation needed
    assert retention_at_memorization(c, 0.9) == pytest.approx(0.7)
    # 0.95 lies halfway between epoch 2 (0.9) and epoch 3 (1.0)
    point = interpolate_at(c, 0.95)
    assert point["epoch"] == pytest.approx(2.5) and point["retention"] == pytest.approx(0.65)
    assert point["memorization"] == 0.95 and point["weight"] == pytest.approx(0.5)
    assert point["between"] == [2, 3]
    # 0.7 between epoch 1 (0.5) and 2 (0.9): weight 0.5 -> retention 0.8, epoch 1.5
    assert retention_at_memorization(c, 0.7) == pytest.approx(0.8)
    assert interpolate_at(c, 0.7)["epoch"] == pytest.approx(1.5)
    # a quarter of the way: 0.6 = 0.5 + 0.25 * 0.4
    assert retention_at_memorization(c, 0.6) == pytest.approx(0.9 - 0.25 * 0.2)


def test_the_first_crossing_counts_and_not_reached_is_none():
    dips = curve((1, 0.92, 0.8), (2, 0.85, 0.7), (3, 0.97, 0.5))
    assert retention_at_memorization(dips, 0.9) == pytest.approx(0.8)  # first point already above
    assert interpolate_at(dips, 0.9)["between"] == [None, 1]
    point = interpolate_at(dips, 0.95)  # between epoch 2 (0.85) and 3 (0.97)
    assert point["epoch"] == pytest.approx(2 + 0.10 / 0.12)
    assert point["retention"] == pytest.approx(0.7 - (0.10 / 0.12) * 0.2)
    assert interpolate_at(curve((1, 0.5, 0.9), (2, 0.89, 0.8)), 0.9) is None
    assert retention_at_memorization([], 0.9) is None


def test_kl_is_interpolated_like_any_score_and_missing_scores_stay_unknown():
    c = [
        {"epoch": 0, "memorization": 0.0, "kl": 0.0, "x_acc": 0.5},
        {"epoch": 1, "memorization": 1.0, "kl": 0.4, "x_acc": None},
    ]
    point = interpolate_at(c, 0.9)
    assert point["kl"] == pytest.approx(0.36) and point["x_acc"] is None
    assert retention_at_memorization(c, 0.9, retention="kl") == pytest.approx(0.36)


def test_add_retention_is_the_mean_probe_ratio_to_the_base():
    base = {"epoch": 0.0, "memorization": 0.0, "a_acc": 0.8, "b_acc": 0.5, "zero_acc": 0.0, "kl": 0.0}
    rows = [{"epoch": 1.0, "memorization": 0.6, "a_acc": 0.4, "b_acc": 0.5, "zero_acc": 0.1}]
    points = add_retention(rows, base)
    assert [p["epoch"] for p in points] == [0.0, 1.0]
    assert points[0]["retention"] == 1.0
    assert points[1]["retention"] == pytest.approx((0.5 + 1.0) / 2)  # zero_acc: base at 0, left out
    assert add_retention(rows, None)[0]["retention"] is None


def test_mean_curve_keeps_the_epochs_every_seed_has():
    a = curve((0, 0.0, 1.0), (1, 0.4, 0.8), (2, 0.8, 0.6))
    b = curve((0, 0.0, 1.0), (1, 0.6, 0.6))
    mean = mean_curve([a, b])
    assert [p["epoch"] for p in mean] == [0, 1]
    assert mean[1]["memorization"] == pytest.approx(0.5) and mean[1]["retention"] == pytest.approx(0.7)
    assert within(a, 1) == a[:2] and within(a, None) == a


# --------------------------------------------------------------------------------------------------
# Matched memorization over seeds
# --------------------------------------------------------------------------------------------------
def test_several_seeds_interpolate_the_mean_curve_with_a_bootstrap_over_seeds():
    seeds = [
        curve((0, 0.0, 1.0), (1, 0.8, 0.8), (2, 1.0, 0.6)),
        curve((0, 0.0, 1.0), (1, 0.6, 0.9), (2, 1.0, 0.7)),
        curve((0, 0.0, 1.0), (1, 0.7, 0.7), (2, 1.0, 0.5)),
    ]
    entry = matched_retention(seeds, 0.9, resamples=400, seed=1)
    # mean curve: epoch 1 (0.7, 0.8), epoch 2 (1.0, 0.6); 0.9 at weight 2/3 -> 0.8 - 2/3 * 0.2
    assert entry["reached"] and entry["value"] == pytest.approx(0.8 - 0.2 * 2 / 3)
    assert entry["epoch"] == pytest.approx(1 + 2 / 3)
    assert entry["seeds"] == entry["seeds_reached"] == 3
    assert entry["interval"] == "bootstrap over seeds"
    low, high = entry["ci95"]
    assert low <= entry["value"] <= high and low < high
    # every seed reaches it by epoch 2 at retention 0.5..0.7: the interval cannot leave [0.5, 0.9]
    assert low >= 0.5 and high <= 0.9
    again = matched_retention(seeds, 0.9, resamples=400, seed=1)
    assert again["ci95"] == entry["ci95"]  # seeded


def test_not_reached_is_a_result_with_how_far_it_got():
    seeds = [curve((0, 0.0, 1.0), (1, 0.5, 0.9)), curve((0, 0.0, 1.0), (1, 0.95, 0.8))]
    entry = matched_retention(seeds, 0.9)
    assert not entry["reached"] and entry["value"] is None
    assert entry["best"] == pytest.approx(0.725) and entry["seeds_reached"] == 1
    assert matched_cell(entry) == "not reached (best 0.725; 1/2 seeds reach it)"


def test_one_seed_gets_a_wilson_interval_from_the_probe_items():
    base = {"epoch": 0.0, "memorization": 0.0, "p_acc": 0.8, "p_n": 50}
    rows = [
        {"epoch": 1.0, "memorization": 0.8, "p_acc": 0.8, "p_n": 50},
        {"epoch": 2.0, "memorization": 1.0, "p_acc": 0.4, "p_n": 50},
    ]
    (points,) = [add_retention(rows, base)]
    entry = matched_retention([points], 0.9, base=base)
    # halfway between the epochs: p_acc 0.6 -> 30/50 right -> retention 0.75
    assert entry["value"] == pytest.approx(0.75) and entry["interval"] == "Wilson"
    from mixsd.core.metrics import wilson_interval

    low, high = wilson_interval(30, 50)
    assert entry["ci95"] == [pytest.approx(low / 0.8, abs=1e-6), pytest.approx(high / 0.8, abs=1e-6)]
    kl_only = matched_retention([[{**p, "retention": None} for p in points]], 0.9, base=base)
    assert kl_only["reached"] and kl_only["ci95"] is None  # no retention score, no interval


# --------------------------------------------------------------------------------------------------
# Frontier and the selection rule
# --------------------------------------------------------------------------------------------------
def test_pareto_frontier():
    points = [(0.9, 0.2), (0.8, 0.6), (0.7, 0.5), (0.5, 0.9), (0.4, 0.9), (0.9, 0.1)]
    assert pareto_frontier(points) == [(0.5, 0.9), (0.8, 0.6), (0.9, 0.2)]
    # KL: lower is better
    assert pareto_frontier([(0.1, 0.3), (0.2, 0.9), (0.3, 0.8)], x_higher_is_better=False) == [
        (0.1, 0.3),
        (0.2, 0.9),
    ]


SETTINGS = {
    # reaches 95% at epoch 2 with retention 0.6
    "lr=3e-05": [curve((0, 0.0, 1.0), (1, 0.5, 0.9), (2, 0.95, 0.6), (3, 1.0, 0.5))],
    # reaches 95% at epoch 1.5 with retention 0.8 (interpolated): the best among those reaching it
    "lr=0.0001": [curve((0, 0.0, 1.0), (1, 0.9, 0.9), (2, 1.0, 0.7), (3, 1.0, 0.4))],
    # never reaches 95%; the highest retention of all
    "LoRA r=16 lr=0.001": [curve((0, 0.0, 1.0), (1, 0.3, 0.99), (2, 0.6, 0.98), (3, 0.9, 0.97))],
}


def test_the_rule_picks_the_best_retention_among_settings_reaching_the_threshold():
    rule = SelectionRule(memorization=0.95)
    summaries = {name: summarize_setting(curves, rule) for name, curves in SETTINGS.items()}
    assert summaries["lr=0.0001"]["retention_at_threshold"] == pytest.approx(0.8)
    assert not summaries["LoRA r=16 lr=0.001"]["reached"]
    chosen, why = select_setting(summaries, rule)
    assert chosen == "lr=0.0001"
    assert "highest of the 2 setting(s) reaching it" in why and "epoch 1.50" in why
    # the final-retention variant of the rule ranks by the last epoch instead (0.5 beats 0.4)
    final = SelectionRule(memorization=0.95, retention_at="final")
    assert (
        select_setting({n: summarize_setting(c, final) for n, c in SETTINGS.items()}, final)[0] == "lr=3e-05"
    )


def test_within_epochs_limits_what_counts_as_reaching():
    rule = SelectionRule(memorization=0.95, within_epochs=1)
    summaries = {name: summarize_setting(curves, rule) for name, curves in SETTINGS.items()}
    assert not any(s["reached"] for s in summaries.values())
    chosen, why = select_setting(summaries, rule)
    assert chosen == "lr=0.0001"  # the highest memorization after epoch 1 (0.9)
    assert why.startswith("no setting reaches 95% memorization within 1 epochs")


def test_when_none_reach_the_threshold_the_highest_memorization_wins_ties_by_retention():
    rule = SelectionRule(memorization=0.99)
    settings = {
        "a": [curve((0, 0.0, 1.0), (1, 0.7, 0.5))],
        "b": [curve((0, 0.0, 1.0), (1, 0.8, 0.4))],
        "c": [curve((0, 0.0, 1.0), (1, 0.8, 0.6))],
    }
    chosen, why = select_setting({n: summarize_setting(c, rule) for n, c in settings.items()}, rule)
    assert chosen == "c" and "highest memorization (0.8)" in why
    # with KL (lower is better) the tie goes to the lower KL
    kl = {n: [[{**p, "kl": p["retention"]} for p in c[0]]] for n, c in settings.items()}
    summaries = {n: summarize_setting(c, rule, "kl") for n, c in kl.items()}
    assert select_setting(summaries, rule, higher_is_better=False)[0] == "b"


def test_rule_text_says_what_it_does():
    text = SelectionRule(memorization=0.95, within_epochs=6).text()
    assert "≥ 95% memorization within 6 epochs" in text and "highest retention" in text
    assert "if none reaches it, the one with the highest memorization" in text


# --------------------------------------------------------------------------------------------------
# The report's tables from rows and curves
# --------------------------------------------------------------------------------------------------
def test_tuning_results_from_rows_and_curves():
    base = {"epoch": 0.0, "step": 0, "memorization": 0.0, "p_acc": 0.5, "p_n": 20, "kl": 0.0}
    rows, curves = [{"cell": "base", "group": "Base", "method": "base", "lam": None, "seed": 0}], {}
    for setting, final in (("lr=0.0001", (1.0, 0.25)), ("lr=0.001", (1.0, 0.4))):
        for seed in (0, 1):
            cell = f"sft-{setting}-s{seed}"
            rows.append(
                {"cell": cell, "group": f"SFT {setting}", "family": "SFT", "setting": setting,
                 "method": "sft", "lam": None, "seed": seed}
            )  # fmt: skip
            curves[cell] = [
                {"epoch": 1.0, "step": 2, "memorization": 0.5, "p_acc": 0.45, "p_n": 20, "kl": 0.1},
                {"epoch": 2.0, "step": 4, "memorization": final[0], "p_acc": final[1], "p_n": 20, "kl": 0.2},
            ]
    results = tuning_results(rows, curves, base, SelectionRule(memorization=0.95))
    assert results["source"] == "curves" and results["retention"] == "retention"
    assert results["levels"] == [0.5, 0.7, 0.9, 0.95]
    # SFT lr=0.001 at 95%: between epoch 1 (0.5, 0.9) and 2 (1.0, 0.8): weight 0.9 -> 0.81
    (at50, _, at90, at95) = results["matched"]["SFT lr=0.001"]
    assert at95["value"] == pytest.approx(0.9 - 0.9 * 0.1) and at95["epoch"] == pytest.approx(1.9)
    assert at50["epoch"] == pytest.approx(1.0)  # reached exactly at a logged epoch: no interpolation
    assert at90["value"] == pytest.approx(0.9 - 0.8 * 0.1) and at90["interval"] == "bootstrap over seeds"
    assert results["selection"]["SFT"]["chosen"] == "lr=0.001"
    md = "\n".join(tuning_markdown(results))
    assert "## Retention at matched memorization" in md and "## Tuning: one declared rule" in md
    assert "| lr=0.001 | 2 | 1.90 |" in md and "✓" in md


def test_without_curves_the_rule_reads_the_final_rows():
    rows = [
        {"cell": f"sft-lr{lr}-s0", "group": f"SFT lr={lr}", "family": "SFT", "setting": f"lr={lr}",
         "method": "sft", "lam": None, "seed": 0, "train_acc": acc, "retention_mean": kept, "train_epochs": 3.0}
        for lr, acc, kept in (("1e-4", 0.96, 0.7), ("1e-3", 1.0, 0.5), ("1e-5", 0.4, 0.99))
    ]  # fmt: skip
    groups, source = curve_groups(rows, {}, None)
    assert source == "final" and len(groups) == 3
    results = tuning_results(rows, {}, None, SelectionRule())
    assert results["matched"] == {}  # no curves: no matched-memorization table
    assert results["selection"]["SFT"]["chosen"] == "lr=1e-4"


def test_the_rule_reads_only_its_seeds():
    """Settings are compared on the same seeds, also after the chosen one ran with more."""
    base = {"epoch": 0.0, "memorization": 0.0, "p_acc": 0.5, "p_n": 20}
    rows, curves = [], {}
    # epoch 1 retention: lr=a seed 0: 0.8; lr=b seed 0: 0.6, seed 1: 1.1 (mean over both 0.85)
    for setting, seed, kept in (("lr=a", 0, 0.4), ("lr=b", 0, 0.3), ("lr=b", 1, 0.55)):
        cell = f"sft-{setting}-s{seed}"
        rows.append(
            {"cell": cell, "group": f"SFT {setting}", "family": "SFT", "setting": setting, "method": "sft",
             "lam": None, "seed": seed}
        )  # fmt: skip
        curves[cell] = [{"epoch": 1.0, "memorization": 1.0, "p_acc": kept, "p_n": 20}]
    on_all = tuning_results(rows, curves, base, SelectionRule(memorization=0.95))["selection"]["SFT"]
    # at 95% memorization (interpolated from the base, 1.0 at epoch 0): a 0.81, b over seeds 0-1 0.8575
    assert on_all["chosen"] == "lr=b"
    assert on_all["settings"]["lr=b"]["retention_at_threshold"] == pytest.approx(1 - 0.95 * 0.15)
    on_seed0 = tuning_results(rows, curves, base, SelectionRule(memorization=0.95, seeds=(0,)))
    entry = on_seed0["selection"]["SFT"]
    assert entry["chosen"] == "lr=a" and entry["settings"]["lr=b"]["seeds"] == 1  # seed 0: a 0.81, b 0.62
    on_seed1 = tuning_results(rows, curves, base, SelectionRule(memorization=0.95, seeds=(1,)))
    assert list(on_seed1["selection"]["SFT"]["settings"]) == ["lr=b"]  # lr=a has no seed 1
    assert "seed(s) 1" in on_seed1["rule"]["text"]


# --------------------------------------------------------------------------------------------------
# The report draws from the files the results side writes, and from nothing under cells/
# --------------------------------------------------------------------------------------------------
def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def _small_grid(out: Path) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """A base cell and two SFT settings (one seed each) with the files the results side reads."""
    base_curve = {"epoch": 0.0, "memorization": 0.0, "p_acc": 0.5, "p_n": 20, "kl": 0.0}
    rows = [
        {"cell": "base", "group": "Base", "method": "base", "lam": None, "seed": 0, "retention_mean": 1.0}
    ]
    curves = {}
    answers = [{"split": "train", "id": f"q{i}", "correct": i < 2} for i in range(6)]
    (out / "cells" / "base").mkdir(parents=True)
    write_jsonl(out / "cells" / "base" / "eval.predictions.jsonl", answers)
    for k, (setting, kept) in enumerate((("lr=a", 0.45), ("lr=b", 0.3))):
        cell = f"sft-{setting}-s0"
        rows.append(
            {"cell": cell, "group": f"SFT {setting}", "family": "SFT", "setting": setting, "method": "sft",
             "lam": None, "seed": 0, "settings": {"lr": setting}, "train_acc": 1.0,
             "retention_mean": kept / 0.5, "fisher_ratio": 0.1 * (k + 1), "delta_norm_sq": 2.0 + k}
        )  # fmt: skip
        curves[cell] = [
            {"epoch": 1.0, "memorization": 0.6, "p_acc": 0.5, "p_n": 20, "kl": 0.1},
            {"epoch": 2.0, "memorization": 1.0, "p_acc": kept, "p_n": 20, "kl": 0.2},
        ]
        folder = out / "cells" / cell
        answers = [{"split": "train", "id": f"q{i}", "correct": i < 5 - k} for i in range(6)]
        (folder / "train").mkdir(parents=True)
        write_jsonl(folder / "eval.predictions.jsonl", answers)
        high = {"count": 3 + k, "n": 40}
        histogram = {"edges": [0, 1, 5, "inf"], "counts": [30, 7, 3 + k]}
        overall = {"mean": 1.2, "high_nll": high, "histogram": histogram}
        _write_json(folder / "nll.json", {"overall": overall, "by_branch": {"G": {"high_nll": high}}})
        history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0 - 0.1 * k}]
        _write_json(folder / "train" / "summary.json", {"history": history})
    return rows, curves, base_curve


META = {
    "name": "small",
    "model": "tiny",
    "mixsd": "0",
    "torch": "0",
    "transformers": "0",
    "python": "3",
    "finished": "now",
    "command": "mixsd experiment small.yaml",
    "config_file": "small.yaml",
    "config": {"name": "small"},
}


def test_the_report_draws_from_the_results_files_alone(tmp_path):
    rows, curves, base_curve = _small_grid(tmp_path)
    written = write_report_data(tmp_path, rows, curves=curves, curve_base=base_curve, rule=SelectionRule())
    assert sorted(p.name for p in written.values()) == sorted(REPORT_DATA_FILES)
    comparisons = json.loads((tmp_path / COMPARISONS_FILE).read_text())
    assert [(c["before_cell"], c["after_cell"], c["right_to_wrong"]) for c in comparisons] == [
        ("base", "sft-lr=a-s0", 0),
        ("base", "sft-lr=b-s0", 0),
    ]
    (tmp_path / "cells").rename(tmp_path / "elsewhere")  # what the report shows must not come from there
    write_report(tmp_path, rows, META)
    md = (tmp_path / "report.md").read_text()
    assert "| base → sft-lr=a-s0 | train | 6 | 0.333 | 0.833 | +0.500" in md  # comparisons.json
    assert "| SFT lr=a | 1 | 3/40 = 7.5% [" in md  # target-nll.json's pooled counts
    assert "### Parameter displacement vs retention drop" in md  # correlations.json
    assert "## Retention at matched memorization" in md and "Chosen: lr=a" in md  # tuning.json
    for figure in ("trajectories", "frontier", "nll", "curves", "pareto"):
        assert f"report/{figure}.png" in md, figure


def test_the_report_says_which_results_file_is_missing(tmp_path):
    rows, curves, base_curve = _small_grid(tmp_path)
    write_report_data(tmp_path, rows, curves=curves, curve_base=base_curve)
    (tmp_path / COMPARISONS_FILE).unlink()
    with pytest.raises(InputError, match="no comparisons.json"):
        write_report(tmp_path, rows, META)
