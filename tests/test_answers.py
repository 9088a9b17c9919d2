"""The answer scorer on its own: entity, exact and number matching, and the mode a corpus names."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from mixsd.core.answers import (
    canonical_mode,
    corpus_match_mode,
    extract_answer,
    final_number,
    last_boxed,
    matches,
    parse_number,
    resolve_match_mode,
    score_all,
)
from mixsd.core.files import InputError
from mixsd.corpora.kgfunc import TRAINED, UNSEEN, worked_answer


# --------------------------------------------------------------------------------------------------
# number
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [
        ("The answer is 42. \\boxed{42}", "42", True),
        ("The answer is 12,345.", "12345", True),  # thousands separators
        ("\\boxed{12{,}345}", "12345", True),  # LaTeX thousands separator
        ("The answer is 12345.", "12,345", True),
        ("The answer is 2.5", "2", False),  # decimals count
        ("The answer is 2.5", "2.5", True),
        ("\\boxed{2.50}", "2.5", True),
        ("\\boxed{3.0}", "3", True),
        ("The answer is -3.", "3", False),  # signs count
        ("The answer is -3.", "-3", True),
        ("The answer is \u22123.", "-3", True),  # unicode minus
        ("The answer is 3.", "-3", False),
        ("5 - 3 = 2\nThe result: 5-3", "3", True),  # "-" after a digit is an operator, not a sign
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("\\boxed{\\boxed{7}}", "7", True),  # nested braces
        ("\\boxed{x = {7}}", "7", True),
        ("The answer is 5. Wait, no: the answer is 7.", "7", True),  # the last "answer is" decides
        ("The answer is 5. Wait, no: the answer is 7.", "5", False),
        ("", "0", False),  # empty output
        ("no numbers here", "0", False),
        ("It is 18 plus 24, so 42", "42", True),  # no marker: the last number of the last line
        ("The answer is **42**.", "42", True),
    ],
)
def test_number_match(text, gold, expected):
    assert matches(text, gold, "number") is expected


def test_number_match_gives_no_credit_for_numbers_in_the_working():
    working = "The digits of 4521 are 4, 5, 2, 1.\n4 + 5 + 2 + 1 = 12\nThe answer is 12. \\boxed{12}"
    for inside in ("4", "5", "2", "1", "4521"):
        assert not matches(working, inside, "number")
        assert matches(working, inside, "entity")  # what the entity match used to credit
    assert matches(working, "12", "number")


def test_boxed_wins_over_later_text_and_empty_box_scores_nothing():
    assert final_number("\\boxed{8}\nNote: 9") == 8
    assert final_number("\\boxed{}\nso 9") is None


def test_parse_number_reads_one_number_or_nothing():
    assert parse_number("12,345") == 12345
    assert parse_number(" -0.50 ") == Fraction(-1, 2)
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number("42.") == 42
    assert parse_number("1,2") is None  # not a thousands group
    assert parse_number("Paris") is None
    assert parse_number("12 apples") is None


def test_number_mode_on_a_non_numeric_gold_is_an_exact_match():
    assert matches("The answer is Paris.", "Paris", "number")
    assert not matches("Paris is not it; the answer is Lyon.", "Paris", "number")


def test_wrong_operation_worked_solutions_score_about_zero_with_number():
    """The issue's example: answering every KGFunc unseen question with the worked solution of a wrong
    operation (its digits listed in "The digits of x are ...") scores high under entity, ~0 under number."""
    trained = sorted(TRAINED)
    entity_hits = number_hits = coincidences = total = 0
    for i, x in enumerate(range(1000, 99999, 4999)):
        for j, (_, fn) in enumerate(UNSEEN.values()):
            gold, label = str(fn(x)), trained[(i + j) % len(trained)]
            wrong = worked_answer(label, x)
            total += 1
            entity_hits += matches(wrong, gold, "entity")
            number_hits += matches(wrong, gold, "number")
            coincidences += TRAINED[label](x)[0] == int(gold)  # the wrong operation's result happens to agree
    assert total == 400
    assert entity_hits / total > 0.3  # the loose matcher's false credit the issue describes (~0.39)
    assert number_hits == coincidences  # number credits only a final answer that equals the gold
    assert number_hits / total < 0.05


# --------------------------------------------------------------------------------------------------
# entity and exact
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "gold", "expected"),
    [
        ("Vedux lives in Port Elmarra.", "Port Elmarra", True),  # multi-word entities
        ("Vedux lives in Port.", "Port Elmarra", False),
        ("He lives in port  elmarra!", "Port Elmarra", True),  # case, spacing, punctuation
        ("It was The Beatles.", "Beatles", True),  # articles
        ("It was Beatles.", "the Beatles", True),
        ("She moved to Zürich.", "Zurich", True),  # unicode: accents
        ("She moved to ZURICH", "zürich", True),
        ("\uff30\uff41\uff52\uff49\uff53", "Paris", True),  # fullwidth letters (NFKC)
        ("“Jean-Luc” said hi", "Jean-Luc", True),  # unicode quotes are punctuation
        ("Parisian food", "Paris", False),  # whole words only
        ("It is 12", "1", False),
        ("", "Paris", False),  # empty output
        ("anything", "", False),  # empty gold never matches
    ],
)
def test_entity_match(text, gold, expected):
    assert matches(text, gold, "entity") is expected
    assert matches(text, gold, "loose") is expected  # the old name still works


def test_exact_match_takes_the_final_answer():
    assert matches("Maybe Lyon. The answer is Paris.", "Paris", "exact")
    assert not matches("The answer is Paris, not Lyon.", "Lyon", "exact")
    assert matches("\\boxed{The Paris}", "paris", "strict")
    assert extract_answer("The answer is 5. Wait, the answer is 7.") == "7."
    assert last_boxed("a \\boxed{x^{2}} b") == "x^{2}"
    assert last_boxed("\\boxed{unclosed") is None


def test_none_accepts_everything_and_unknown_modes_fail():
    assert matches("", "x", "none")
    with pytest.raises(ValueError, match="unknown match mode"):
        matches("x", "x", "fuzzy")
    assert canonical_mode("loose") == "entity" and canonical_mode("strict") == "exact"
    assert score_all("The answer is 7.", "7") == {"entity": True, "exact": True, "number": True}


# --------------------------------------------------------------------------------------------------
# The mode a corpus names
# --------------------------------------------------------------------------------------------------
def test_corpus_match_mode_reads_the_manifest(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "other.jsonl").write_text("{}\n")
    assert corpus_match_mode(tmp_path) is None  # no manifest
    manifest = {"answer_match": "strict", "files": {"train.jsonl": {}}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert corpus_match_mode(tmp_path) == "exact"  # old names are read as the new ones
    assert corpus_match_mode(tmp_path / "train.jsonl") == "exact"
    assert corpus_match_mode(tmp_path / "other.jsonl") is None  # not described by this manifest
    assert resolve_match_mode(None, tmp_path / "other.jsonl") == "entity"
    assert resolve_match_mode("number", tmp_path) == "number"  # an explicit option wins
    (tmp_path / "manifest.json").write_text(json.dumps({"answer_match": "fuzzy"}))
    with pytest.raises(InputError, match="answer_match"):
        corpus_match_mode(tmp_path)


def test_generated_corpora_name_their_matcher(tmp_path):
    from mixsd.corpora.kgfunc import KGFuncConfig, build_kgfunc

    build_kgfunc(KGFuncConfig(out=str(tmp_path / "f"), train=14))
    assert corpus_match_mode(tmp_path / "f") == "number"
    assert corpus_match_mode(tmp_path / "f" / "unseen.jsonl") == "number"


def test_mix_verifies_with_the_corpus_matcher_unless_told(tmp_path, tiny_model_dir):
    from conftest import write_jsonl
    from mixsd.method.mix_config import MixConfig
    from mixsd.method.targets import mix

    corpus = tmp_path / "nums"
    corpus.mkdir()
    write_jsonl(corpus / "train.jsonl", [{"id": "a", "prompt": "6 x 7?", "answer": "42"}])
    (corpus / "manifest.json").write_text(
        json.dumps({"answer_match": "number", "files": {"train.jsonl": {}}})
    )

    def run(out: str, **options) -> dict:
        config = MixConfig(
            model=str(tiny_model_dir),
            input=str(corpus / "train.jsonl"),
            output=str(tmp_path / out),
            lam=0.5,
            max_new_tokens=4,
            retries=0,
            on_failure="keep",
            **options,
        )
        return mix(config, progress=False)

    summary = run("t.jsonl")
    assert summary["verify_mode"] == "number" and summary["settings"]["verify"] == "number"
    assert run("t2.jsonl", verify="loose")["verify_mode"] == "entity"  # an explicit option wins
