"""The probe-kind registry (mixsd.probe_kinds): one name per kind, the only place that names kinds, and
summaries that regenerate the committed results from their predictions."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

import mixsd.capability
from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.probe_kinds import (
    GENERATIVE,
    KL,
    KL_ANSWER_TAG,
    LM_EVAL,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    PROBE_KINDS,
    kind_of_item,
    load_probe,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mixsd"
COMMITTED_CELLS = sorted((ROOT / "results").glob("*/cells/*/retention.json"))

# Every spelling a probe kind has had, in summaries and in prediction rows ("kl" and "text" are left out:
# they are also a results key and a record field; "lm_eval" is also the package's name).
KIND_WORDS = {"multiple_choice", "mc", "perplexity", "generative", "gen", "kl_answer"}
# The same word meaning something else: lm-eval's own output type in the task files the export writes.
OTHER_MEANING = {("lmeval.py", "multiple_choice")}
# Modules other sessions own that still spell kinds themselves; each should read the registry instead.
NOT_YET_MIGRATED = {
    "capability.py",  # KIND, read by forgetting.py (a test below holds it to the registry)
    "forgetting.py",
    "grid_summary.py",  # forgetting.json's keys
    "metrics.py",
    "report.py",
}


def test_each_kind_has_one_name_and_one_row_tag():
    kinds = list(PROBE_KINDS.values())
    assert [k.name for k in kinds] == list(PROBE_KINDS)
    assert len({k.name for k in kinds}) == len({k.row_tag for k in kinds}) == len(kinds)
    assert {k.name for k in kinds} == {"generative", "multiple_choice", "perplexity", "kl"}
    # the tags files were written with: a journal or base cache from before still reads
    assert {k.name: k.row_tag for k in kinds} == {
        "generative": "gen",
        "multiple_choice": "mc",
        "perplexity": "text",
        "kl": "kl",
    }
    assert GENERATIVE.row_tag == mixsd.capability.KIND


def test_records_are_matched_to_their_kind():
    assert kind_of_item({"prompt": "Q?", "check": "x", "text": "also"}) is GENERATIVE
    assert kind_of_item({"query": "q", "choices": ["a", "b"], "gold": 0}) is MULTIPLE_CHOICE
    assert kind_of_item({"text": "a paragraph"}) is PERPLEXITY
    assert kind_of_item({"id": "x"}) is None


def test_a_file_mixing_kinds_is_refused_at_its_line(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"text": "one"}, {"query": "q", "choices": ["a", "b"], "gold": 0}]
    )
    with pytest.raises(Exception, match=r"line 2: mixes text and mc items"):
        load_probe(path, None)


def _string_constants(path: Path) -> set[str]:
    """Every string literal of a module except docstrings."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    }


def test_kind_names_are_spelled_only_in_the_registry():
    spelled: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        words = sorted(w for w in _string_constants(path) & KIND_WORDS if (name, w) not in OTHER_MEANING)
        if words:
            spelled[name] = words
    assert "probe_kinds.py" in spelled  # the scan sees the registry's own names
    outside = {name: words for name, words in spelled.items() if name != "probe_kinds.py"}
    assert set(outside) <= NOT_YET_MIGRATED, outside
    assert KL_ANSWER_TAG in KIND_WORDS and LM_EVAL == "lm_eval"


@pytest.mark.skipif(not COMMITTED_CELLS, reason="no committed retention results")
@pytest.mark.parametrize("retention", COMMITTED_CELLS, ids=lambda p: p.parent.name)
def test_the_registry_regenerates_the_committed_summaries(retention):
    """Every probe's summary, retention ratios and paired statistics, recomputed from the committed
    predictions through the registry, equal the committed retention.json (bootstrap seeds are fixed)."""
    results = json.loads(retention.read_text(encoding="utf-8"))
    predictions_file = retention.with_name(results["predictions"])
    rows = [json.loads(line) for line in predictions_file.read_text(encoding="utf-8").splitlines()]
    for probe, committed in results["probes"].items():
        kind = PROBE_KINDS[committed["kind"]]
        model = [r for r in rows if r["who"] == "model" and r["split"] == probe]
        assert {r["kind"] for r in model} == {kind.row_tag}
        summary = kind.summarize(model)
        if "base" in committed:
            base = [r for r in rows if r["who"] == "base" and r["split"] == probe]
            summary["base"] = kind.summarize(base)
            summary["retention"] = kind.retention(summary, summary["base"])
            summary.update(kind.compare(model, base))
        assert json.loads(json.dumps(summary)) == committed, probe


def test_eval_and_the_curve_score_a_probe_through_the_same_rows():
    """The learning curve's columns are the registry's view of the rows `mixsd eval` writes."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=3)
    items = [{"id": str(i), "query": f"q{i}", "choices": ["ab", "b", "c"], "gold": i % 3} for i in range(6)]
    rows = MULTIPLE_CHOICE.score_items(model, tokenizer, items, batch_size=4, max_tokens=512)
    assert [list(r)[:2] for r in rows] == [["id", "kind"]] * 6 and {r["kind"] for r in rows} == {"mc"}
    scores, bits = MULTIPLE_CHOICE.curve("p", rows)
    summary = MULTIPLE_CHOICE.summarize(rows)
    assert scores == {"p_acc": summary["acc"]["value"], "p_n": 6}
    assert bits["p"] == "".join("1" if r["correct"] else "0" for r in rows)
    assert KL.curve is None and KL.score is None
