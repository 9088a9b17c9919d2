"""Statistics of metrics.py against hand-computed values: Wilson, McNemar, chance normalization, bootstrap."""

from __future__ import annotations

import json
import math

import pytest

from mixsd.core.metrics import (
    bootstrap_interval,
    chance_normalized,
    chance_normalized_interval,
    mcnemar_exact,
    pair_rows,
    paired_comparison,
    paired_counts,
    perplexity_ratio_interval,
    probe_columns,
    rate,
    ratio_interval,
    well_above_chance,
    wilson_interval,
)


def test_wilson_interval_hand_computed():
    # p = 0.8, n = 10, z = 1.96: centre (0.8 + z²/20) / (1 + z²/10), half z·sqrt(0.016 + z²/400) / (1 + z²/10)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert rate(8, 10) == {"value": 0.8, "correct": 8, "n": 10, "ci95": [round(low, 6), round(high, 6)]}


@pytest.mark.parametrize(
    ("right_to_wrong", "wrong_to_right", "p"),
    [
        (1, 5, 2 * (1 + 6) / 64),  # n = 6, k = 1
        (0, 6, 2 * 1 / 64),
        (2, 10, 2 * (1 + 12 + 66) / 4096),  # n = 12, k = 2
        (10, 2, 2 * (1 + 12 + 66) / 4096),  # symmetric
        (3, 3, 1.0),  # capped at 1
        (0, 0, 1.0),  # no discordant items: no evidence
    ],
)
def test_mcnemar_exact_hand_computed(right_to_wrong, wrong_to_right, p):
    assert mcnemar_exact(right_to_wrong, wrong_to_right) == pytest.approx(p)


def test_chance_normalized_retention():
    # 4 choices: chance 0.25; base 0.7 is 0.45 above chance, model 0.5 keeps 0.25 of it
    assert chance_normalized(0.5, 0.7, 0.25) == pytest.approx(0.25 / 0.45)
    assert chance_normalized(0.25, 0.7, 0.25) == 0.0  # down to guessing
    assert chance_normalized(0.7, 0.7, 0.25) == 1.0
    assert chance_normalized(0.5, 0.25, 0.25) is None  # a base at chance has nothing to keep
    assert chance_normalized(None, 0.7, 0.25) is None


def test_paired_counts_and_comparison():
    before = [True, True, True, False, False, True, False, True]
    after = [True, False, False, True, False, True, False, False]
    assert paired_counts(before, after) == {
        "both_right": 2,
        "right_to_wrong": 3,
        "wrong_to_right": 1,
        "both_wrong": 2,
    }
    result = paired_comparison(before, after, resamples=500, seed=1)
    assert result["n"] == 8 and result["before"] == 5 / 8 and result["after"] == 3 / 8
    assert result["difference"] == pytest.approx(-2 / 8)
    assert result["mcnemar_p"] == pytest.approx(2 * (1 + 4) / 16)  # n = 4 discordant, k = 1
    low, high = result["difference_ci95"]
    assert low <= -2 / 8 <= high and low >= -1 and high <= 1
    with pytest.raises(ValueError, match="same items"):
        paired_counts([True], [True, False])


def test_identical_scorings_have_a_zero_width_difference_interval():
    same = [True, False, True, True, False] * 4
    assert paired_comparison(same, same)["difference_ci95"] == [0.0, 0.0]


def test_bootstrap_is_reproducible_with_a_seed_and_covers_the_estimate():
    values = [float(i % 7 == 0) for i in range(300)]
    first = bootstrap_interval(lambda v: float(v.mean()), values, seed=3)
    assert first == bootstrap_interval(lambda v: float(v.mean()), values, seed=3)
    spread = [((i * 37) % 101) / 7 for i in range(300)]  # continuous: another seed moves the quantiles
    assert bootstrap_interval(lambda v: float(v.mean()), spread, seed=3) != bootstrap_interval(
        lambda v: float(v.mean()), spread, seed=4
    )
    mean = sum(values) / len(values)
    assert first[0] < mean < first[1]
    # a bootstrap interval of a rate is close to the Wilson one at this size
    wilson = wilson_interval(int(sum(values)), len(values))
    assert first[0] == pytest.approx(wilson[0], abs=0.02) and first[1] == pytest.approx(wilson[1], abs=0.02)
    assert bootstrap_interval(lambda v: float(v.mean()), []) is None


def test_ratio_intervals():
    base = [True] * 80 + [False] * 20
    model = [True] * 60 + [False] * 40  # same items: the model lost 20 of the base's right answers
    low, high = ratio_interval(model, base, seed=0)
    assert low < 0.75 < high and high < 1.0  # a clear loss: the interval excludes 1
    normed = chance_normalized_interval(model, base, [0.5] * 100, seed=0)
    assert normed[0] < chance_normalized(0.6, 0.8, 0.5) < normed[1]
    # perplexity: base 1 nat/token, model 1.1 nats/token over the same texts -> retention exp(-0.1)
    interval = perplexity_ratio_interval([11.0] * 20, [10.0] * 20, [10] * 20)
    assert interval == pytest.approx([math.exp(-0.1)] * 2, abs=1e-6)
    assert ratio_interval([1.0], [0.0]) is None  # an undefined ratio has no interval


def test_pair_rows_aligns_by_id_and_keeps_only_common_items():
    before = [{"id": "a", "correct": True}, {"id": "b", "correct": False}, {"id": "c", "correct": True}]
    after = [{"id": "c", "correct": False}, {"id": "a", "correct": True}]
    assert pair_rows(before, after, "correct") == ([True, True], [True, False])


# --------------------------------------------------------------------------------------------------
# The report's table: intervals, single-seed marks, paired comparisons from the cells' predictions
# --------------------------------------------------------------------------------------------------
def _write_rows(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_table_cell_pools_counts_for_rates_and_uses_recorded_intervals_otherwise():
    from mixsd.experiments.report_sections import table_cell

    members = [{"train_correct": 8, "train_n": 10}, {"train_correct": 6, "train_n": 10}]
    entry = {"train_acc": 0.7, "train_acc_sd": 0.14}
    low, high = wilson_interval(14, 20)
    assert table_cell(entry, members, "train_acc") == f"0.7 [{low:.3g}, {high:.3g}] ± 0.14"
    single = [{"x_retention_ci95": [0.5, 0.9]}]
    assert table_cell({"x_retention": 0.7, "x_retention_sd": None}, single, "x_retention") == "0.7 [0.5, 0.9]"
    assert table_cell({"y": None}, [{}], "y") == "-"


def test_paired_comparisons_count_flips_per_split_and_probe(tmp_path):
    from mixsd.experiments.comparisons import paired_comparisons
    from mixsd.experiments.report_sections import comparison_rows

    cells = tmp_path / "cells"
    base_unseen = [True] * 10 + [False] * 10
    sft_unseen = [True] * 4 + [False] * 6 + [True] * 2 + [False] * 8  # 6 forgotten, 2 learned
    for cell, unseen in (("base", base_unseen), ("sft-s0", sft_unseen)):
        _write_rows(
            cells / cell / "eval.predictions.jsonl",
            [{"split": "unseen", "id": f"u{i}", "correct": c} for i, c in enumerate(unseen)],
        )
    _write_rows(
        cells / "sft-s0" / "retention.predictions.jsonl",
        [
            {
                "who": "model",
                "split": "social_iqa",
                "kind": "mc",
                "id": "q",
                "correct": False,
                "correct_norm": True,
            }
        ],
    )
    _write_rows(
        cells / "base" / "retention.predictions.jsonl",
        [
            {
                "who": "model",
                "split": "social_iqa",
                "kind": "mc",
                "id": "q",
                "correct": True,
                "correct_norm": False,
            }
        ],
    )
    rows = [
        {"cell": "base", "method": "base", "seed": 0},
        {"cell": "sft-s0", "method": "sft", "seed": 0},
    ]
    table = {(r[0], r[1]): r for r in comparison_rows(paired_comparisons(cells, rows))}
    unseen = table[("base → sft-s0", "unseen")]
    assert unseen[2:5] == ["20", "0.500", "0.300"]
    assert unseen[7:9] == ["6", "2"]
    assert float(unseen[9]) == pytest.approx(mcnemar_exact(6, 2), rel=1e-3)
    assert unseen[6].startswith("0.6 [")  # unseen retention 0.3 / 0.5 with its bootstrap interval
    probe = table[("base → sft-s0", "social_iqa (acc_norm)")]  # the probe's chosen metric decides
    assert probe[7:9] == ["0", "1"]


def test_a_probe_is_a_headline_retention_probe_only_when_its_base_is_well_above_chance():
    assert well_above_chance(22, 40, 0.147)  # general_knowledge: 0.55 vs chance 0.15
    assert not well_above_chance(14, 40, 1 / 3)  # social_iqa length-normalized: 0.35 vs chance 0.33
    assert not well_above_chance(0, 0, 0.25)

    def summary(base_correct: int, model_correct: int, n: int = 40, chance: float = 1 / 3) -> dict:
        return {
            "kind": "multiple_choice",
            "chance": chance,
            "acc": {"value": model_correct / n, "correct": model_correct, "n": n, "ci95": [0, 1]},
            "base": {"acc": {"value": base_correct / n, "correct": base_correct, "n": n}},
            "retention": {"acc": model_correct / base_correct},
            "retention_normalized": {"acc": chance_normalized(model_correct / n, base_correct / n, chance)},
        }

    near_chance = probe_columns("social_iqa", summary(14, 16), "acc")
    assert near_chance["social_iqa_retention"] is None  # would be (0.4 - 1/3) / (0.35 - 1/3) = 4.0
    assert near_chance["social_iqa_base_above_chance"] is False
    assert near_chance["social_iqa_retention_raw"] == pytest.approx(16 / 14)
    competent = probe_columns("qa_wikidata", summary(30, 27, chance=0.25), "acc")
    assert competent["qa_wikidata_retention"] == pytest.approx((27 / 40 - 0.25) / (30 / 40 - 0.25))
    assert competent["qa_wikidata_base_above_chance"] is True
