"""The accounting of a cell's targets (issue 19 §4): verified, faithful, fallback, dropped, NLL > 5."""

from __future__ import annotations

import json

import pytest

from mixsd.core.files import InputError
from mixsd.core.metrics import rate
from mixsd.method.target_accounting import account_targets, read_target_accounting


def mixed(id, correct=True, low=0, logprob_naive=(-0.1, -6.0, None), source="mixsd"):
    return {
        "id": id,
        "generation": 0,
        "correct": correct,
        "source": source,
        "low_expert_tokens": low,
        "logprob_naive": list(logprob_naive),
    }


def fallback(id):
    return {
        "id": id,
        "generation": 0,
        "correct": False,
        "source": "answer_fallback",
        "low_expert_tokens": None,
        "logprob_naive": None,
    }


ROWS = [
    mixed("a", logprob_naive=(-0.1, -6.0, None)),  # verified, faithful, one token above 5 nats
    mixed("b", low=2, logprob_naive=(-0.2, -0.3)),  # verified, a naive token the expert rejects
    mixed("c", correct=False, logprob_naive=(-7.0, -8.0)),  # kept although it failed (--on-failure keep)
    fallback("d"),  # the ground truth written instead (--on-failure answer)
]


def test_shares_over_the_records_drawn():
    result = account_targets(ROWS, records=5)  # one record dropped: 5 drawn, 4 written
    assert result["records"] == 5 and result["written"] == 4
    assert result["verified"] == rate(2, 5) and result["fallback"] == rate(1, 5)
    assert result["kept_unverified"] == rate(1, 5) and result["dropped"] == rate(1, 5)
    assert result["faithful"] == rate(1, 5) and result["faithful_of_verified"] == rate(1, 2)
    # without the summary the rows are all there is: nothing counts as dropped
    assert account_targets(ROWS)["dropped"] == rate(0, 4)
    with pytest.raises(ValueError, match="4 rows but only 3 records"):
        account_targets(ROWS, records=3)
    # targets written before the fidelity score: no faithful share rather than a wrong one
    old = [{k: v for k, v in row.items() if k != "low_expert_tokens"} for row in ROWS]
    assert account_targets(old)["faithful"] is None


def test_high_nll_among_verified_targets_per_token_and_per_target():
    # from the stored naive log-probs (no nll.json): a: 1 of 2 tokens, b: 0 of 2 (the None end token left out)
    result = account_targets(ROWS)
    high = result["high_nll"]
    assert high["source"] == "logprob_naive" and high["threshold"] == 5.0
    assert high["verified"]["per_token"] == rate(1, 4) and high["verified"]["per_target"] == rate(1, 2)
    assert high["written"] is None  # the fallback row has no stored log-probs: no share over part of it
    # from nll.json's per-record counts (every token, the end token included), joined by id and generation
    nll = {
        "per_record": [
            {"id": "d", "generation": 0, "tokens": 5, "high_nll_tokens": 4},
            {"id": "a", "generation": 0, "tokens": 3, "high_nll_tokens": 2},
            {"id": "b", "generation": 0, "tokens": 2, "high_nll_tokens": 0},
            {"id": "c", "generation": 0, "tokens": 2, "high_nll_tokens": 2},
        ]
    }
    high = account_targets(ROWS, nll=nll)["high_nll"]
    assert high["source"] == "nll.json"
    assert high["verified"]["per_token"] == rate(2, 5) and high["verified"]["per_target"] == rate(1, 2)
    assert high["written"]["per_token"] == rate(8, 12) and high["written"]["per_target"] == rate(3, 4)
    # an nll.json from before the per-record count: the stored log-probs again
    old = {"per_record": [{k: v for k, v in r.items() if k != "high_nll_tokens"} for r in nll["per_record"]]}
    assert account_targets(ROWS, nll=old)["high_nll"]["source"] == "logprob_naive"


def test_read_target_accounting_reads_the_files(tmp_path):
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    summary = tmp_path / "targets.summary.json"
    summary.write_text(json.dumps({"records": 6}))
    result = read_target_accounting(targets, summary)
    assert result["dropped"] == rate(2, 6) and result["verified"] == rate(2, 6)
    summary.write_text(json.dumps({"records": 2}))
    with pytest.raises(InputError, match=r"targets.summary.json, field 'records': expected the number"):
        read_target_accounting(targets, summary)
    with pytest.raises(InputError, match="nll.json: file not found"):
        read_target_accounting(targets, None, tmp_path / "nll.json")
