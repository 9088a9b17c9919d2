"""Target fidelity: the score on hand-made targets, the separation measures, and `mix --min-expert-logprob`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixsd.fidelity import (
    LOW_EXPERT_LOGPROB,
    Fidelity,
    flag_rates,
    passes,
    roc_auc,
    summarize_fidelity,
    target_fidelity,
)
from mixsd.files import InputError
from mixsd.targets import MixConfig, mix

LABELS = Path(__file__).resolve().parents[1] / "data" / "fidelity_labels.jsonl"


# ---------------------------------------------------------------------------------------------------
# the score
# ---------------------------------------------------------------------------------------------------
def test_score_reads_only_naive_tokens_and_skips_the_appended_end():
    # the expert's -9.0 on its own token and the None of the appended end token ("S") do not count
    branch = ["E", "N", "E", "N", "N", "S"]
    expert = [-9.0, -0.2, -0.1, -7.5, -5.0, None]
    score = target_fidelity(branch, expert)
    assert score == Fidelity(min_expert_logprob=-7.5, low_expert_tokens=1, naive_tokens=3)
    # -5.0 itself is not below the cut; a stricter cut counts it
    assert target_fidelity(branch, expert, low=-4.0).low_expert_tokens == 2


def test_target_without_naive_tokens_has_no_score_and_always_passes():
    score = target_fidelity("EEES", [-0.1, -12.0, -0.3, None])
    assert score == Fidelity(min_expert_logprob=None, low_expert_tokens=0, naive_tokens=0)
    assert passes(score, -1.0)


def test_pass_rule_is_every_naive_token_at_or_above_the_threshold():
    score = target_fidelity("NNE", [-2.0, -6.0, -0.5])
    assert passes(score, None)  # no threshold: the check is off
    assert passes(score, -6.0) and not passes(score, -5.9)


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="3 letters"):
        target_fidelity("ENN", [-1.0, -2.0])


def test_summary_counts_targets_with_a_rejected_naive_token():
    summary = summarize_fidelity([-1.0, None, -8.0, -3.0], [0, 0, 2, 0], -6.0)
    assert summary["targets"] == 4 and summary["without_naive_tokens"] == 1
    assert summary["min_expert_logprob_median"] == -3.0
    assert summary["min_expert_logprob_lowest"] == -8.0
    assert summary["with_low_expert_tokens"] == 1
    assert (
        summary["low_expert_logprob"] == LOW_EXPERT_LOGPROB
        and summary["min_expert_logprob_threshold"] == -6.0
    )
    assert summarize_fidelity([], [], None)["min_expert_logprob_median"] is None


# ---------------------------------------------------------------------------------------------------
# separation against labels
# ---------------------------------------------------------------------------------------------------
def test_roc_auc_on_hand_computed_cases():
    labels = [True, True, False, False]
    assert roc_auc([-1.0, -2.0, -5.0, -6.0], labels) == 1.0
    assert roc_auc([-5.0, -6.0, -1.0, -2.0], labels) == 0.0
    assert roc_auc([-3.0, -3.0, -3.0, -3.0], labels) == 0.5
    # pairs (faithful, unfaithful): (-1,-2) win, (-1,-4) win, (-3,-2) loss, (-3,-4) win -> 3/4
    assert roc_auc([-1.0, -3.0, -2.0, -4.0], labels) == 0.75
    # a tie counts one half: (-2,-2) half, (-2,-5) win -> 1.5/2
    assert roc_auc([-2.0, -2.0, -5.0], [True, False, False]) == 0.75
    # no naive token (None) ranks above every number
    assert roc_auc([None, -9.0], [True, False]) == 1.0
    assert roc_auc([-9.0, None], [True, False]) == 0.0


def test_roc_auc_needs_both_classes_and_matching_lengths():
    with pytest.raises(ValueError, match="both|one faithful"):
        roc_auc([-1.0, -2.0], [True, True])
    with pytest.raises(ValueError, match="labels"):
        roc_auc([-1.0], [True, False])


def test_flag_rates_on_a_hand_computed_case():
    scores = [-1.0, -7.0, None, -8.0, -2.0, -9.0]
    faithful = [True, True, True, False, False, False]
    rates = flag_rates(scores, faithful, -6.0)  # flags -7, -8, -9
    assert (rates.flagged, rates.unfaithful_flagged, rates.faithful_flagged) == (3, 2, 1)
    assert rates.precision == pytest.approx(2 / 3) and rates.recall == pytest.approx(2 / 3)
    nothing = flag_rates(scores, faithful, -100.0)
    assert nothing.flagged == 0 and nothing.precision is None and nothing.recall == 0.0
    assert flag_rates([-1.0], [True], -6.0).recall is None


def test_labelled_sample_is_well_formed_and_large_enough():
    """The hand-labelled validation sample kept in the repo (docs/results.md, "Target fidelity")."""
    rows = [json.loads(line) for line in LABELS.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 50
    for row in rows:
        assert isinstance(row["faithful"], bool) and row["reason"].strip()
        assert row["text"] and row["context"] and row["check"]
        assert len(row["branch"]) == len(row["logprob_expert"])
        # the stored score is the one the module computes from the stored log-probs
        assert (
            row["min_expert_logprob"]
            == target_fidelity(row["branch"], row["logprob_expert"]).min_expert_logprob
        )
    assert {row["faithful"] for row in rows} == {True, False}  # both classes, or the AUC is undefined
    assert len({(row["id"], row["lam"]) for row in rows}) == len(rows)


# ---------------------------------------------------------------------------------------------------
# `mix --min-expert-logprob`
# ---------------------------------------------------------------------------------------------------
def _mix(model_dir, corpus, out, **overrides):
    config = MixConfig(
        model=str(model_dir), input=str(corpus), output=str(out), lam=0.5, max_new_tokens=12, verify="none",
        **overrides,
    )  # fmt: skip
    return mix(config, progress=False)


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_mix_writes_the_score_and_the_threshold_redraws_low_fidelity_targets(
    tiny_model_dir, tiny_corpus, tmp_path
):
    free = _mix(tiny_model_dir, tiny_corpus, tmp_path / "free.jsonl")
    free_rows = _rows(tmp_path / "free.jsonl")
    for row in free_rows:  # every row carries the score computed from its own log-probs
        expected = target_fidelity(row["branch"], row["logprob_expert"])
        assert row["min_expert_logprob"] == pytest.approx(expected.min_expert_logprob, abs=1e-4)
        assert row["low_expert_tokens"] == expected.low_expert_tokens
    assert "min_expert_logprob" not in free["settings"]  # off: the fingerprint of older outputs is unchanged
    assert free["fidelity"]["targets"] == len(free_rows)
    assert free["fidelity"]["rejected_attempts_this_run"] == 0

    # a threshold in the middle of the unguarded scores: about half the first attempts must be redrawn
    scores = sorted(r["min_expert_logprob"] for r in free_rows if r["min_expert_logprob"] is not None)
    # (just under a stored score: stored scores are rounded to 5 decimals, verification sees them unrounded)
    threshold = scores[len(scores) // 2] - 1e-3
    guarded = _mix(
        tiny_model_dir,
        tiny_corpus,
        tmp_path / "guarded.jsonl",
        min_expert_logprob=threshold,
        on_failure="keep",
    )
    assert guarded["settings"]["min_expert_logprob"] == threshold
    assert guarded["fidelity"]["rejected_attempts_this_run"] > 0
    first = {row["id"]: row for row in free_rows}
    for row in _rows(tmp_path / "guarded.jsonl"):
        old = first[row["id"]]
        if old["min_expert_logprob"] is None or old["min_expert_logprob"] >= threshold:
            # the first attempt passed: same coins, same target, no redraw
            assert row["attempts"] == 1 and row["target_ids"] == old["target_ids"] and row["correct"]
        else:
            assert row["attempts"] > 1  # refused and drawn again with fresh coins
        if row["correct"]:
            assert row["min_expert_logprob"] is None or row["min_expert_logprob"] >= threshold - 1e-4
        else:  # every attempt failed: the last one's score is still below the threshold
            assert row["min_expert_logprob"] < threshold


def test_threshold_must_be_a_log_probability(tmp_path):
    with pytest.raises(InputError, match="min_expert_logprob"):
        MixConfig(model="m", input="a.jsonl", output=str(tmp_path / "b.jsonl"), min_expert_logprob=0.5)
