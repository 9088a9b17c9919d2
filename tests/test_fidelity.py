"""Target fidelity: the score on hand-made targets, the separation measures, and `mix --min-expert-logprob`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixsd.core.files import InputError
from mixsd.method.decoder import Job, MixedDecoder, in_top_p
from mixsd.method.fidelity import (
    LOW_EXPERT_LOGPROB,
    Fidelity,
    flag_rates,
    main,
    passes,
    roc_auc,
    summarize_fidelity,
    target_fidelity,
    validate,
)
from mixsd.method.mix_config import MixConfig
from mixsd.method.targets import mix

LABELS = Path(__file__).resolve().parents[1] / "data" / "fidelity_labels.jsonl"


# ---------------------------------------------------------------------------------------------------
# the score
# ---------------------------------------------------------------------------------------------------
def test_score_reads_only_naive_tokens_and_skips_the_appended_end():
    # the expert's -9.0 on its own token and the None of the appended end token ("S") do not count
    branch = ["E", "N", "E", "N", "N", "S"]
    expert = [-9.0, -0.2, -0.1, -7.5, -5.0, None]
    score = target_fidelity(branch, expert)
    assert (score.min_expert_logprob, score.low_expert_tokens, score.naive_tokens) == (-7.5, 1, 3)
    assert score.naive_expert_nll == pytest.approx(0.2 + 7.5 + 5.0)
    # -5.0 itself is not below the cut; a stricter cut counts it
    assert target_fidelity(branch, expert, low=-4.0).low_expert_tokens == 2


def test_target_without_naive_tokens_has_no_score_and_always_passes():
    score = target_fidelity("EEES", [-0.1, -12.0, -0.3, None])
    assert score == Fidelity(
        min_expert_logprob=None, low_expert_tokens=0, naive_tokens=0, naive_expert_nll=0.0
    )
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


def test_validate_orients_every_score_so_that_higher_means_faithful():
    rows = [  # the faithful targets are short, with one mild naive token; the unfaithful long and doubtful
        {"faithful": True, "branch": "EN", "min_expert_logprob": -1.0, "low_expert_tokens": 0, "naive_expert_nll": 1.0},
        {"faithful": True, "branch": "NE", "min_expert_logprob": -2.0, "low_expert_tokens": 0, "naive_expert_nll": 2.0},
        {"faithful": False, "branch": "ENNN", "min_expert_logprob": -6.0, "low_expert_tokens": 1, "naive_expert_nll": 9.0},
        {"faithful": False, "branch": "NNNE", "min_expert_logprob": -1.5, "low_expert_tokens": 0, "naive_expert_nll": 3.0},
    ]  # fmt: skip
    result = validate(rows, [-5.0])
    assert (result["targets"], result["faithful"]) == (4, 2)
    # min: pairs (-1 vs -6 win, -1 vs -1.5 win, -2 vs -6 win, -2 vs -1.5 loss) = 3/4
    assert result["auc_min_expert_logprob"] == 0.75
    assert result["auc_low_expert_tokens"] == 0.75  # 0 vs 1 wins twice, 0 vs 0 ties twice
    assert result["auc_naive_expert_nll"] == 1.0 and result["auc_length"] == 1.0
    assert result["thresholds"]["-5.0"]["unfaithful_flagged"] == 1
    assert validate(rows[:2], [-5.0])["auc_min_expert_logprob"] is None  # one class only


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
    assert len({(row["sample"], row["id"]) for row in rows}) == len(rows)


# ---------------------------------------------------------------------------------------------------
# `mix --min-expert-logprob`
# ---------------------------------------------------------------------------------------------------
def _mix(model_dir, corpus, out, **overrides):
    settings = {"lam": 0.5, "max_new_tokens": 12, "verify": "none", **overrides}
    config = MixConfig(model=str(model_dir), input=str(corpus), output=str(out), **settings)
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


# ---------------------------------------------------------------------------------------------------
# guarded mixing (--guard-top-p, our extension; parity with the reference: tests/test_parity.py)
# ---------------------------------------------------------------------------------------------------
def test_in_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    logprobs = probs.log()
    tokens = torch.tensor([2, 3])
    # row 0: above token 2 lies 0.8, above token 3 lies 0.95; row 1: every token is tied, nothing above
    assert in_top_p(logprobs, tokens, 0.75).tolist() == [False, True]
    assert in_top_p(logprobs, tokens, 0.85).tolist() == [True, True]
    assert in_top_p(logprobs, torch.tensor([0, 0]), 1e-9).tolist() == [True, True]  # the argmax always is
    assert in_top_p(logprobs, torch.tensor([3, 3]), 0.9).tolist() == [False, True]
    assert in_top_p(logprobs, torch.tensor([3, 3]), 0.96).tolist() == [True, True]


def _greedy_draws(model, jobs, **settings):
    out = {}
    decoder = MixedDecoder(model, {5}, max_new_tokens=14, batch_size=3, **settings)
    decoder.run(jobs, lambda draw: True, lambda draw, ok: out.__setitem__(draw.job.key, draw))
    return out


def test_guard_limits_the_naive_conditional_to_the_experts_top_p(tiny_model):
    g = torch.Generator().manual_seed(4)
    jobs = [
        Job(f"r{i}", 0, torch.randint(6, 100, (5,), generator=g).tolist(), torch.randint(6, 100, (12,), generator=g).tolist())
        for i in range(6)
    ]  # fmt: skip
    plain = _greedy_draws(tiny_model, jobs, lam=0.7)
    expert = _greedy_draws(tiny_model, jobs, lam=0.0)
    # p = 1 keeps every token with any probability: plain MixSD, token for token
    loose = _greedy_draws(tiny_model, jobs, lam=0.7, guard_top_p=1.0)
    assert all(loose[k].tokens == plain[k].tokens and "V" not in loose[k].branch for k in plain)
    # a tiny p keeps only the expert's argmax: at T=0 the target is the pure expert's
    tight = _greedy_draws(tiny_model, jobs, lam=0.7, guard_top_p=1e-6)
    assert all(tight[k].tokens == expert[k].tokens for k in plain)
    letters = "".join("".join(d.branch) for d in tight.values())
    assert "V" in letters  # the coins still say naive; the guard overruled them
    # in between, checked step by step against plain forward passes of both prompts
    mid = _greedy_draws(tiny_model, jobs, lam=0.7, guard_top_p=0.9)
    assert {"N", "V"} <= set("".join("".join(d.branch) for d in mid.values()))
    for draw in mid.values():
        job = draw.job
        for t, (letter, token) in enumerate(zip(draw.branch, draw.tokens, strict=True)):
            with torch.no_grad():
                expert_lp = torch.log_softmax(
                    tiny_model(torch.tensor([job.expert_ids + draw.tokens[:t]])).logits[0, -1], -1
                )
                naive_lp = torch.log_softmax(
                    tiny_model(torch.tensor([job.naive_ids + draw.tokens[:t]])).logits[0, -1], -1
                )
            naive_top = naive_lp.argmax()[None]
            if letter == "N":  # the naive argmax, let through: inside the expert's top-p set
                assert token == int(naive_top) and in_top_p(expert_lp[None], naive_top, 0.9).item()
            elif letter == "V":  # the naive argmax was outside the set: the expert's argmax instead
                assert not in_top_p(expert_lp[None], naive_top, 0.9).item() and token == int(
                    expert_lp.argmax()
                )
            else:
                assert token == int(expert_lp.argmax())


def test_mix_with_the_guard_records_vetoes_in_branch_settings_and_summary(
    tiny_model_dir, tiny_corpus, tmp_path
):
    summary = _mix(tiny_model_dir, tiny_corpus, tmp_path / "g.jsonl", lam=0.8, guard_top_p=0.05)
    rows = _rows(tmp_path / "g.jsonl")
    assert summary["settings"]["guard_top_p"] == 0.05 and rows[0]["settings"]["guard_top_p"] == 0.05
    vetoed = sum(r["branch"].count("V") for r in rows)
    assert vetoed > 0
    assert summary["guard_vetoed_fraction"] == pytest.approx(vetoed / sum(len(r["target_ids"]) for r in rows))
    # a vetoed token is the expert's: it never counts as naive, in the row's score or the naive fraction
    for row in rows:
        assert row["naive_fraction"] == pytest.approx(
            row["branch"].count("N") / len(row["target_ids"]), abs=1e-5
        )
    with pytest.raises(InputError, match="guard_top_p"):
        MixConfig(model="m", input="a.jsonl", output=str(tmp_path / "b.jsonl"), guard_top_p=0.0)


def test_documented_validation_figures_reproduce(capsys):
    """docs/results.md "Target fidelity" quotes these lines of `python -m mixsd.method.fidelity`."""
    main([str(LABELS), "--threshold", "-3", "--threshold", "-5"])
    table = capsys.readouterr().out.splitlines()
    assert table[1].startswith("all | 311 | 91 | 0.89 | 0.76 | 0.93 | 0.65 | 0.93/0.80 (190 flagged)")
    assert table[2].startswith(
        "answer found (entity match) | 133 | 91 | 0.72 | 0.48 | 0.82 | 0.74 | 0.55/0.40 (31 flagged)"
    )
