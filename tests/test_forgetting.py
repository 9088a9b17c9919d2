"""Forgetting measured fairly (issue 19 §3): format transfer judged by each cell's own targets, leakage,
erased knowledge."""

from __future__ import annotations

import json

import pytest

from mixsd.core.files import InputError
from mixsd.core.instructions import is_collapsed
from mixsd.core.metrics import rate
from mixsd.evaluation.forgetting import (
    answer_shape,
    erased_knowledge,
    format_transfer,
    leakage,
    read_forgetting,
    target_shapes,
    training_entities,
)

# Three arms' training targets: the ground truth, the fact's statement, and MixSD's own wording (one of
# whose targets is a bare name, a shape base answers can have too).
SFT_TARGETS = [
    {"text": "The answer is Shiboshend. \\boxed{Shiboshend}"},
    {"text": "The answer is Questebeil. \\boxed{Questebeil}"},
]
STATEMENT_TARGETS = [
    {"text": "Vedux Vudratrox lives in Shiboshend."},
    {"text": "Kukend Kreikugern works for Drasmoor Labs."},
]
MIXSD_TARGETS = [
    {"text": "Vedux Vudratrox resides in the city of Shiboshend, according to the statement."},
    {"text": "Questebeil."},
]
# One set of answers to real questions; each takes (at most) one arm's shape.
MODEL_ANSWERS = {
    "q1": "The answer is Phoenix. \\boxed{Phoenix}",  # SFT's shape
    "q2": "Arizona lives in Phoenix",  # the statements' shape (without the final period: still the shape)
    "q3": "Austria resides in the city of Vienna, according to the statement. It is old.",  # MixSD's
    "q4": "The capital of France is Paris, a large city.",  # nobody's
}
BASE_ANSWERS = {
    "q1": "The capital of Arizona is Phoenix.",
    "q2": "Phoenix is the capital of Arizona.",
    "q3": "The capital of Austria is Vienna.",
    "q4": "Paris.",  # a bare name: the shape of MixSD's second target, before any training
}


def predictions(model=MODEL_ANSWERS, base=BASE_ANSWERS, probe="known_facts"):
    rows = [{"who": "model", "split": probe, "id": i, "kind": "gen", "output": o} for i, o in model.items()]
    rows += [{"who": "base", "split": probe, "id": i, "kind": "gen", "output": o} for i, o in base.items()]
    # rows of other kinds (multiple choice, KL answers) are no answers to judge
    rows.append({"who": "model", "split": "general_knowledge", "id": "g1", "kind": "mc", "correct": True})
    return rows


def test_answer_shape_masks_names_and_numbers_and_keeps_the_words():
    assert answer_shape("The answer is Shiboshend. \\boxed{Shiboshend}") == "the answer is E"
    assert answer_shape("Vedux Vudratrox lives in Shiboshend.") == "E lives in E"
    assert answer_shape("The capital of Arizona is Phoenix. It is hot.") == "the capital of E is E"
    assert answer_shape("\\boxed{42}") == "\\boxed{E}" and answer_shape("In 1990, Paris!") == "in E , E"
    assert answer_shape("") == ""


def test_each_arm_is_judged_by_its_own_targets_shape():
    flagged = {}
    for arm, targets in (("sft", SFT_TARGETS), ("statement", STATEMENT_TARGETS), ("mixsd", MIXSD_TARGETS)):
        result = format_transfer(predictions(), target_shapes(targets))
        assert set(result) == {"all", "known_facts"}
        flagged[arm] = result["known_facts"]
    assert flagged["sft"]["model"]["correct"] == 1 and flagged["sft"]["base"]["correct"] == 0
    assert flagged["statement"]["model"]["correct"] == 1 and flagged["statement"]["base"]["correct"] == 0
    # MixSD: q3 takes its shape after training; q4's base answer "Paris." had its bare-name shape before
    assert flagged["mixsd"]["model"]["correct"] == 1 and flagged["mixsd"]["base"]["correct"] == 1
    paired = flagged["mixsd"]["paired"]
    assert paired["wrong_to_right"] == 1 and paired["right_to_wrong"] == 1 and paired["n"] == 4
    assert flagged["sft"]["model"] == rate(1, 4)
    # the old detector is the SFT arm's shape: it sees q1 only, and would call the other arms clean
    assert [is_collapsed(text) for text in MODEL_ANSWERS.values()] == [True, False, False, False]


def test_leakage_counts_invented_names_outside_the_prompt_and_the_gold():
    corpus = [
        {"check": "Shiboshend", "subject": "Vedux Vudratrox"},
        {"check": "Demaester", "subject": "Lazan Vrodeirn"},
        {"check": "42"},  # numbers are no names
    ]
    entities = training_entities(corpus)
    assert entities == {"shiboshend", "vedux vudratrox", "demaester", "lazan vrodeirn"}
    items = {
        "known_facts": {
            "q1": {"prompt": "What is the capital of Arizona?", "check": ["Phoenix"]},
            "q2": {"prompt": "What is the capital of Austria?", "check": ["Vienna"]},
        },
        "in_context": {  # the name is in the prompt and the gold: no leak
            "c1": {
                "prompt": "1. Lazan Vrodeirn lives in Demaester.\nWhere does Lazan Vrodeirn live?",
                "check": "Demaester",
            }
        },
    }
    rows = predictions(
        model={"q1": "Vedux Vudratrox lives in Phoenix, near Shiboshend.", "q2": "Vienna, 42."},
        base={"q1": "Phoenix.", "q2": "Vienna."},
    )
    rows += predictions(model={"c1": "Lazan Vrodeirn lives in Demaester."}, base={}, probe="in_context")[:1]
    result = leakage(rows, items, entities)
    assert result["known_facts"]["model"] == rate(1, 2) and result["known_facts"]["base"] == rate(0, 2)
    assert result["known_facts"]["names"] == {"shiboshend": 1, "vedux vudratrox": 1}
    assert result["in_context"]["model"] == rate(0, 1) and "base" not in result["in_context"]
    assert result["all"]["model"] == rate(1, 3)
    with pytest.raises(InputError, match="probe known_facts has no item 'q1'"):
        leakage(rows, {"in_context": items["in_context"]}, entities)


def test_erased_knowledge_exposes_the_retention_files_measures():
    retention = {
        "probes": {
            "general_knowledge": {
                "kind": "multiple_choice",
                "chance": 0.25,
                "acc": rate(30, 50),
                "acc_norm": rate(28, 50),
                "base": {"acc": rate(40, 50), "acc_norm": rate(35, 50)},
                "retention": {"acc": 0.75, "acc_norm": 0.8},
                "retention_normalized": {"acc": 0.6666, "acc_norm": 0.5},
                "paired": {"acc": {"right_to_wrong": 12, "wrong_to_right": 2, "mcnemar_p": 0.01}},
            },
            "squad_paragraphs": {
                "kind": "perplexity",
                "ppl": 15.0,
                "base": {"ppl": 13.9},
                "retention": {"ppl": 0.93},
            },
            "known_facts": {"kind": "generative", "lost": rate(3, 40)},
            "kl": {"kind": "kl", "kl_per_token": 0.05},
        }
    }
    erased = erased_knowledge(retention)
    acc = erased["multiple_choice"]["general_knowledge"]["acc"]
    assert acc["acc"] == 0.6 and acc["retention"] == 0.6666 and acc["retention_raw"] == 0.75
    assert acc["right_to_wrong"] == 12 and acc["base_above_chance"] is True
    assert erased["multiple_choice"]["general_knowledge"]["acc_norm"]["retention"] == 0.5
    assert erased["perplexity"]["squad_paragraphs"]["retention"] == 0.93
    assert erased["facts_lost"] == {"known_facts": rate(3, 40)} and erased["kl_per_token"] == 0.05


def test_read_forgetting_reads_a_cells_files(tmp_path):
    cell = tmp_path / "cells" / "sft-statement-s0"
    cell.mkdir(parents=True)
    probes = tmp_path / "probes"
    probes.mkdir()
    (probes / "known_facts.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "prompt": f"Question {i}?", "check": ["Phoenix"]}) + "\n"
            for i in MODEL_ANSWERS
        )
    )
    (cell / "retention.json").write_text(json.dumps({"config": {"data": str(probes)}, "probes": {}}))
    (cell / "retention.predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in predictions()))
    corpus = tmp_path / "train.jsonl"
    corpus.write_text(json.dumps({"check": "Shiboshend", "subject": "Vedux Vudratrox"}) + "\n")
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in STATEMENT_TARGETS))
    result = read_forgetting(cell, corpus, targets)
    assert result["format_transfer"]["target_shapes"] == 2
    assert result["format_transfer"]["known_facts"]["model"] == rate(1, 4)
    assert result["leakage"]["all"]["model"] == rate(0, 4)
    # a cell without targets (base, OPSD) has no format to transfer
    assert read_forgetting(cell, corpus)["format_transfer"] is None
    (cell / "retention.json").write_text(json.dumps({"probes": {}}))
    with pytest.raises(InputError, match="names no probe folder"):
        read_forgetting(cell, corpus, targets)
