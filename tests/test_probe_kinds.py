"""The probe-kind registry (mixsd.evaluation.probe_kinds): one name per kind, the only place that names kinds, and
summaries that regenerate the committed results from their predictions."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from conftest import make_tiny_model, make_tiny_tokenizer, write_jsonl
from mixsd.evaluation.probe_kinds import (
    GENERATIVE,
    KL,
    KL_ANSWER_TAG,
    LM_EVAL,
    MULTIPLE_CHOICE,
    PERPLEXITY,
    PROBE_KINDS,
    kind_of_item,
    kind_of_row,
    load_probe,
)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mixsd"
REGISTRY = "evaluation/probe_kinds.py"  # the registry, relative to the package
COMMITTED_CELLS = sorted((ROOT / "results").glob("*/cells/*/retention.json"))

# Every spelling a probe kind has had, in summaries and in prediction rows ("text" is left out: it is also
# a record field; "lm_eval" is also the package's name).
KIND_WORDS = {"multiple_choice", "mc", "perplexity", "generative", "gen", "kl", "kl_answer"}
# The same word meaning something else: lm-eval's own output type in the task format of exported probes,
# and the prefix of the KL prompts' ids (a corpus builder, which may not import the registry).
OTHER_MEANING = {("evaluation/lmeval_format.py", "multiple_choice"), ("corpora/probes.py", "kl")}
# the registry's kind objects: comparing with one (`kind is MULTIPLE_CHOICE`) is an if-chain on the kind
KIND_OBJECTS = {"GENERATIVE", "MULTIPLE_CHOICE", "PERPLEXITY", "KL"}
# every name and row tag a kind has (the registry is their source)
KIND_TAGS = (
    {k.name for k in PROBE_KINDS.values()}
    | {k.row_tag for k in PROBE_KINDS.values()}
    | {KL_ANSWER_TAG, LM_EVAL}
)


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


def _string_constants(tree: ast.AST) -> set[str]:
    """Every string literal of a module except docstrings."""
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


def _kind_comparisons(tree: ast.AST) -> list[str]:
    """Comparisons that branch on a probe kind: with a kind object of the registry (`kind is
    MULTIPLE_CHOICE`), or of something called kind with a kind's name or tag (`row["kind"] == "text"`)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        names = {o.id if isinstance(o, ast.Name) else getattr(o, "attr", None) for o in operands}
        tags = {o.value for o in operands if isinstance(o, ast.Constant)} & KIND_TAGS
        if names & KIND_OBJECTS or (tags and "kind" in ast.unparse(node)):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def _modules() -> dict[str, ast.AST]:
    return {
        path.relative_to(PACKAGE).as_posix(): ast.parse(path.read_text(encoding="utf-8"))
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def test_the_scans_find_kind_names_and_kind_branches():
    """The scans below can fail: they see a kind spelled and a branch on a kind where there is one."""
    tree = ast.parse(
        '"""docstrings may say multiple_choice"""\n'
        'if summary.get("kind") == "text" or kind is MULTIPLE_CHOICE:\n'
        '    columns = {"mc": 1}\n'
        'if kind.lm_eval is None or row["split"] == "text":\n'
        "    pass\n"
    )
    assert _string_constants(tree) & KIND_WORDS == {"mc"}
    assert _kind_comparisons(tree) == [
        "line 2: summary.get('kind') == 'text'",
        "line 2: kind is MULTIPLE_CHOICE",
    ]


def test_kind_names_are_spelled_only_in_the_registry():
    spelled: dict[str, set[str]] = {}
    for name, tree in _modules().items():
        words = {w for w in _string_constants(tree) & KIND_WORDS if (name, w) not in OTHER_MEANING}
        if words:
            spelled[name] = words
    assert REGISTRY in spelled  # the scan sees the registry's own names
    outside = {name: sorted(words) for name, words in spelled.items() if name != REGISTRY}
    assert not outside, f"{outside}: read the names from mixsd.evaluation.probe_kinds"
    assert KL_ANSWER_TAG in KIND_WORDS and LM_EVAL == "lm_eval"


def test_no_module_but_the_registry_branches_on_a_kind():
    """Everyone dispatches through the registry: no comparison with a kind object or a kind's name."""
    branching = {
        name: found
        for name, tree in _modules().items()
        if name != REGISTRY and (found := _kind_comparisons(tree))
    }
    assert not branching, branching


def test_a_row_is_matched_to_its_kind_by_its_tag():
    assert kind_of_row({"kind": "mc"}) is MULTIPLE_CHOICE and kind_of_row({"kind": "gen"}) is GENERATIVE
    assert kind_of_row({"kind": KL_ANSWER_TAG}) is None and kind_of_row({"kind": LM_EVAL}) is None


def test_each_kind_fills_its_part_of_the_erased_knowledge():
    """forgetting.json's sections come from the registry: one per kind, KL a single number."""
    sections = {k.name: k.erased.section for k in PROBE_KINDS.values() if k.erased is not None}
    assert sections == {
        "generative": "facts_lost",
        "multiple_choice": "multiple_choice",
        "perplexity": "perplexity",
        "kl": "kl_per_token",
    }
    assert KL.erased is not None and KL.erased.add(None, "kl", {"kl_per_token": 0.5}) == 0.5
    assert GENERATIVE.erased is not None and GENERATIVE.erased.add({}, "p", {"acc": 1}) == {}


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
    assert KL.score is None  # no file of items: the curve scores KL on the base's answers


def test_the_curve_names_its_kl_columns_through_the_registry():
    """The curve's KL columns are the registry's: per token over all answer tokens, as `mixsd eval` sums."""
    rows = [
        {"kl_sum": 0.5, "kl_max": 0.4, "tokens": 2},
        {"kl_sum": 0.25, "kl_max": 0.1, "tokens": 3},
        {"kl_sum": 0.0, "kl_max": 0.0, "tokens": 0},
    ]
    assert KL.curve is not None
    assert KL.curve(KL.name, rows) == ({"kl": 0.75 / 5, "kl_tokens": 5}, {})
    assert KL.curve(KL.name, [])[0] == {"kl": None, "kl_tokens": 0}
    assert KL.summarize(rows)["kl_per_token"] == KL.curve(KL.name, rows)[0]["kl"]
