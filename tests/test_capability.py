"""Generative capability probes: constraint checkers on hand-made answers, collapse, the builders (golden
checksums), the known-facts filter, and evaluation of a generative probe with a tiny model."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from mixsd.cli import main
from mixsd.core.files import InputError
from mixsd.core.instructions import (
    CHECKERS,
    check_constraint,
    collapse_rate,
    count_sentences,
    is_collapsed,
    validate_constraint,
)
from mixsd.corpora.capability import (
    INSTRUCTION_KINDS,
    CapabilityConfig,
    build_capability,
    in_context_items,
    instruction_items,
    keep_known,
    known_fact_candidates,
    parse_counts,
)
from mixsd.corpora.kgfact import build_world
from mixsd.evaluation.capability import compare_generative, parse_generative_item, summarize_generative
from mixsd.evaluation.evaluate import EvalConfig, evaluate
from mixsd.evaluation.probe_kinds import GENERATIVE, load_probe
from mixsd.method.answering import score_answer

# --------------------------------------------------------------------------------------------------
# Checkers: for every kind, answers that pass and answers that fail
# --------------------------------------------------------------------------------------------------
CASES: dict[str, tuple[dict, list[str], list[str]]] = {
    "lowercase": ({}, ["the sea is calm today.", "ok, 42 cats!"], ["The sea is calm.", "", "123 456"]),
    "uppercase": ({}, ["THE SEA IS CALM.", "OK, 42 CATS!"], ["THE SEA is calm.", "", "!!!"]),
    "bullets": (
        {"n": 3},
        ["* one\n* two\n* three", "Intro:\n- a\n- b\n- c\nDone.", "\u2022 x\n\u2022 y\n  * z"],
        ["* one\n* two", "1. one\n2. two\n3. three", "* a\n* b\n* c\n* d", "*one\n*two\n*three"],
    ),
    "starts_with": (
        {"phrase": "In my opinion"},
        ["In my opinion, yes.", "  in my opinion it rains"],
        ["I think, in my opinion, yes.", "In my view", "In my opinion.", "  in my opinion  "],
    ),
    "ends_with": (
        {"phrase": "The end."},
        ["It was fun. The end.", "it was fun. the end.  \n"],
        ["The end. Thanks!", "It was fun. The end", "The end!", "The end.", "\n the END. "],
    ),
    "one_word": (
        {},
        ["Blue", "blue.", '"Paris"', "**Green**"],
        ["Light blue", "", "The sky is blue.", "..."],
    ),
    "keyword": (
        {"keyword": "sand"},
        ["The Sand was warm.", "sandy beaches", "sand"],
        ["thousand grains", "The beach was warm.", ""],
    ),
    "no_commas": ({}, ["No commas here. None at all.", "a b c"], ["One, two.", "", "a\uff0cb"]),
    "json": (
        {"keys": ["place", "weather"]},
        ['{"place": "beach", "weather": "sunny"}', '```json\n{"place": 1, "weather": 2, "x": 3}\n```'],
        ['{"place": "beach"}', '["place", "weather"]', 'Here: {"place": 1, "weather": 2}', "{place: 1}"],
    ),
    "sentences": (
        {"n": 2},
        ["It is sunny. The sea is 3.5 metres deep!", "Why? Because."],
        ["It is sunny.", "One. Two. Three.", ""],
    ),
    "max_words": ({"n": 5}, ["one two three four five", "Sure."], ["one two three four five six", "  "]),
}


def test_every_kind_has_cases_and_the_set_is_large_enough():
    assert set(CASES) == set(CHECKERS) == set(INSTRUCTION_KINDS)
    assert len(CHECKERS) >= 8


@pytest.mark.parametrize("kind", sorted(CASES))
def test_checker_passes_and_fails(kind):
    args, passing, failing = CASES[kind]
    constraint = {"kind": kind, "args": args}
    assert validate_constraint(constraint) is None
    for text in passing:
        assert check_constraint(text, constraint), (kind, text)
    for text in failing:
        assert not check_constraint(text, constraint), (kind, text)


def test_json_keys_are_optional():
    assert check_constraint('{"a": 1}', {"kind": "json"})
    assert not check_constraint("[1, 2]", {"kind": "json", "args": {}})


def test_count_sentences():
    assert count_sentences("Hello there. How are you? Fine!") == 3
    assert count_sentences("Pi is 3.14 roughly.") == 1
    assert count_sentences('He said "stop." Then left.') == 2
    assert count_sentences("") == 0


@pytest.mark.parametrize(
    "constraint, problem",
    [
        ({"kind": "shout"}, "unknown constraint kind"),
        ({"kind": "bullets"}, "needs the argument 'n'"),
        ({"kind": "bullets", "args": {"n": 0}}, "positive integer"),
        ({"kind": "bullets", "args": {"n": True}}, "positive integer"),
        ({"kind": "keyword", "args": {"keyword": " "}}, "non-empty string"),
        ({"kind": "lowercase", "args": {"n": 2}}, "unknown argument"),
        ({"kind": "json", "args": {"keys": [1]}}, "list of strings"),
        ("lowercase", "expected an object"),
    ],
)
def test_validate_constraint_rejects(constraint, problem):
    assert problem in validate_constraint(constraint)
    with pytest.raises(ValueError, match=problem):
        check_constraint("text", constraint)


# --------------------------------------------------------------------------------------------------
# Collapse
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "The answer is Paris. \\boxed{Paris}",
        "The answer is Quor.",
        "Quite simply, the answer is Quor.",
        "\\boxed{42}",
        "Sure! Here are three tips \\boxed{x}",
        "the answer is: blue",
    ],
)
def test_collapsed_answers(text):
    assert is_collapsed(text)


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "Here are three tips.\nThe answer is simple: practice.",  # not in the first sentence
        "I am not sure what the answer to that is.",
        "",
        "* sand\n* sea",
    ],
)
def test_not_collapsed_answers(text):
    assert not is_collapsed(text)


def test_collapse_rate():
    assert collapse_rate([]) is None
    assert collapse_rate(["The answer is X.", "A long real answer.", "\\boxed{1}", "No."]) == 0.5


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------
GOLDEN = {
    "in_context.jsonl": "18d7d2d7359e185b3c1859729ac7df57d2729817e155b4621bc7e8c23da93e87",
    "instructions.jsonl": "96fc02e74b1f0274fa23e1221b747095cb31cde02c64afa4e37aa5a3bb1e1f13",
}


def test_build_is_deterministic_with_golden_checksums(tmp_path):
    first = build_capability(CapabilityConfig(out=str(tmp_path / "a")))
    second = build_capability(CapabilityConfig(out=str(tmp_path / "b")))
    assert first == second
    assert {name: entry["sha256"] for name, entry in first["files"].items()} == GOLDEN
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    assert first["files"]["in_context.jsonl"]["records"] == 150
    assert first["files"]["instructions.jsonl"]["records"] == 110
    assert not (tmp_path / "a" / "known_facts.jsonl").exists()
    other = build_capability(CapabilityConfig(out=str(tmp_path / "c"), seed=1))
    assert other["files"]["instructions.jsonl"]["sha256"] != GOLDEN["instructions.jsonl"]


def test_in_context_items_use_held_out_facts_only():
    items = in_context_items("small", 0, (0, 4, 19), seed=0)
    world = build_world("small", 0)
    train_names = {name for names in world["entities"].values() for name in names}
    heldout = {f["id"]: f for f in world["facts"] if f["split"] == "heldout"}
    assert len(items) == 3 * len(heldout)
    positions = set()
    for item in items:
        fact = heldout[item["fact"]]  # a KeyError would mean a training fact
        statements = item["prompt"].split("\n\n")[1].splitlines()
        assert len(statements) == item["k"] + 1
        assert statements[item["gold_position"]] == f"{item['gold_position'] + 1}. {fact['statement']}"
        assert item["check"] == fact["target"] and item["group"] == f"k={item['k']}"
        assert not any(name in item["prompt"] for name in train_names)
        assert "boxed" not in item["prompt"]
        positions.add(item["gold_position"])
    assert len(positions) > 10  # the gold moves around among 20 statements


def test_instruction_items_cover_every_kind_and_validate(tmp_path):
    items = instruction_items(0)
    assert len(items) >= 100
    assert {item["group"] for item in items} == set(INSTRUCTION_KINDS)
    for item in items:
        assert validate_constraint(item["constraint"]) is None
        assert item["constraint"]["kind"] == item["group"]
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    kind, loaded = load_probe(path, None)
    assert kind is GENERATIVE and len(loaded) == len(items)


def test_parse_counts():
    assert parse_counts("0,4,19") == (0, 4, 19)
    for bad in ("", "a", "1,1", "-1"):
        with pytest.raises(InputError):
            parse_counts(bad)
    with pytest.raises(InputError, match="held-out facts"):
        in_context_items("small", 0, (60,), seed=0)


# --------------------------------------------------------------------------------------------------
# Known facts
# --------------------------------------------------------------------------------------------------
WIKIDATA = {
    "examples": [
        {"input": "The capital of France is", "target": "Paris"},
        {"input": "The capital of Austria is", "target": "Vienna"},
        {"input": "The capital of Luxembourg is", "target": "Luxembourg"},  # answer inside the question
        {"input": "The currency of Estonia is", "target": "euro"},
        {"input": "The emergency phone number of Chad is", "target": "17"},  # not a known relation
        {"input": "The continent of Peru is", "target": ["South America", "Americas"]},
        {"input": "The currency of Japan is", "target": "123"},  # numeric answer
        {"input": "The genre of Hamlet is", "target": "tragedy"},  # not a known relation
        {"input": "Munich is capital of", "target": "Bavaria"},
    ]
}


def test_known_fact_candidates():
    candidates, usable = known_fact_candidates(WIKIDATA, per_relation=10, seed=0)
    prompts = {c["prompt"]: c["check"] for c in candidates}
    assert prompts == {
        "What is the capital of France?": ["Paris"],
        "What is the capital of Austria?": ["Vienna"],
        "What is the currency of Estonia?": ["euro"],
        "On which continent is Peru?": ["South America", "Americas"],
        "Munich is the capital of which country or region?": ["Bavaria"],
    }
    assert usable["capital"] == 2 and usable["currency"] == 1 and usable["sport"] == 0
    one, _ = known_fact_candidates(WIKIDATA, per_relation=1, seed=0)
    assert sum(c["group"] == "capital" for c in one) == 1


def test_keep_known_keeps_only_right_answers():
    candidates, _ = known_fact_candidates(WIKIDATA, per_relation=10, seed=0)
    replies = {
        "What is the capital of France?": "The capital of France is Paris.",
        "What is the capital of Austria?": "The capital of Austria is Salzburg.",
        "What is the currency of Estonia?": "Estonia uses the Euro.",
        "On which continent is Peru?": "Peru is in the Americas.",
        "Munich is the capital of which country or region?": "Germany.",
    }
    kept, counts = keep_known(candidates, lambda items: [replies[i["prompt"]] for i in items])
    assert [k["prompt"] for k in kept] == [
        "What is the capital of France?",  # relation-major order, as KNOWN_RELATIONS lists them
        "On which continent is Peru?",
        "What is the currency of Estonia?",
    ]
    assert counts["capital"] == {"kept": 1, "total": 2}
    assert counts["capital_of"] == {"kept": 0, "total": 1}
    assert counts["all"] == {"kept": 3, "total": 5}


def _sdist(path: Path) -> Path:
    """A tarball with the bigbench layout holding the four files `read_members` needs."""
    files = {
        "general_knowledge/task.json": {"examples": []},
        "social_iqa/task.json": {"examples": []},
        "qa_wikidata/task.json": WIKIDATA,
        "squad_shifts/squaddev_v1.1.json": {"data": []},
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/" + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_build_with_answers_writes_known_facts_and_counts(tmp_path):
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "probes"
    config = CapabilityConfig(out=str(out), sdist=str(sdist))
    manifest = build_capability(config, answer=lambda items: ["Paris" for _ in items])
    assert manifest["files"]["known_facts.jsonl"]["records"] == 1
    notes = manifest["notes"]["known_facts.jsonl"]
    assert notes["counts"]["all"] == {"kept": 1, "total": 5}
    assert manifest["source"]["name"] == "bigbench-1.0.0.tar.gz"
    kind, items = load_probe(out / "known_facts.jsonl", None)
    assert kind is GENERATIVE and items[0]["check"] == ["Paris"]
    # nothing right: no file, and the earlier one does not survive beside the new manifest
    manifest = build_capability(config, answer=lambda items: ["no idea" for _ in items])
    assert "known_facts.jsonl" not in manifest["files"]
    assert not (out / "known_facts.jsonl").exists()


def test_cli_builds_with_a_tiny_model(tmp_path, tiny_model_dir):
    sdist = _sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "probes"
    code = main(
        [
            "probes",
            "build-capability",
            "--out",
            str(out),
            "--model",
            str(tiny_model_dir),
            "--sdist",
            str(sdist),
        ]
    )
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    known = manifest["notes"]["known_facts.jsonl"]
    assert known["counts"]["all"]["total"] == 5 and known["model"]["path"] == str(tiny_model_dir)
    assert {"in_context.jsonl", "instructions.jsonl"} <= set(manifest["files"])


# --------------------------------------------------------------------------------------------------
# Items, scoring, evaluation
# --------------------------------------------------------------------------------------------------
def test_parse_generative_item_errors(tmp_path):
    good = parse_generative_item({"prompt": "Q?", "check": "Paris"}, "f.jsonl", 1, "a")
    assert good["check"] == ["Paris"] and good["max_new_tokens"] == 64
    bad = [
        ({"prompt": "", "check": "x"}, "prompt"),
        ({"prompt": "Q?"}, "check"),
        ({"prompt": "Q?", "check": "x", "constraint": {"kind": "lowercase"}}, "check"),
        ({"prompt": "Q?", "check": []}, "check"),
        ({"prompt": "Q?", "constraint": {"kind": "nope"}}, "constraint"),
        ({"prompt": "Q?", "check": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ]
    for obj, where in bad:
        with pytest.raises(InputError, match=f"line 3, field '{where}'"):
            parse_generative_item(obj, "f.jsonl", 3, "a")


def test_score_answer_by_entity_and_constraint():
    item = {"check": ["South America", "Americas"]}
    assert score_answer(item, "It lies in South America.")
    assert not score_answer(item, "It lies in America.")
    assert score_answer({"constraint": {"kind": "one_word", "args": {}}}, "Blue.")


def test_summary_and_comparison():
    def row(i, correct, collapsed, group="g"):
        return {"id": str(i), "correct": correct, "collapsed": collapsed, "group": group, "finish": "stop"}

    base = [row(0, True, False), row(1, True, False), row(2, False, False, "h"), row(3, True, False, "h")]
    model = [row(0, False, True), row(1, True, False), row(2, True, False, "h"), row(3, False, True, "h")]
    summary = summarize_generative(model)
    assert summary["acc"]["correct"] == 2 and summary["collapse"]["correct"] == 2
    assert summary["groups"]["h"]["n"] == 2
    compared = compare_generative(model, base)
    assert compared["lost"]["correct"] == 2 and compared["lost"]["n"] == 3
    assert compared["paired"]["acc"]["right_to_wrong"] == 2
    assert compared["paired"]["acc"]["wrong_to_right"] == 1
    assert compared["paired"]["collapse"]["wrong_to_right"] == 2  # not collapsed -> collapsed


def test_retention_suite_runs_generative_probes(tmp_path, tiny_model, tiny_tokenizer):
    folder = tmp_path / "probes"
    folder.mkdir()
    rows = [
        {
            "id": "a",
            "prompt": "Say hi.",
            "constraint": {"kind": "max_words", "args": {"n": 400}},
            "max_new_tokens": 5,
        },
        {"id": "b", "prompt": "Say hi.", "constraint": {"kind": "uppercase"}, "max_new_tokens": 5},
        {"id": "c", "prompt": "Capital?", "check": "zzzzqqq", "group": "facts", "max_new_tokens": 3},
    ]
    (folder / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = EvalConfig(
        model="tiny",
        suite="retention",
        out=str(tmp_path / "r.json"),
        data=str(folder),
        base="tiny",
        batch_size=2,
    )
    results = evaluate(
        config, model=tiny_model, tokenizer=tiny_tokenizer, base_model=tiny_model, progress=False
    )
    probe = results["probes"]["mixed"]
    assert probe["kind"] == "generative" and probe["n"] == 3
    assert set(probe["groups"]) == {"max_words", "uppercase", "facts"}
    assert probe["groups"]["facts"]["correct"] == 0
    assert probe["base"]["acc"] == probe["acc"] and probe["lost"]["correct"] == 0
    predictions = [json.loads(line) for line in (tmp_path / "r.predictions.jsonl").read_text().splitlines()]
    outputs = {p["id"]: p for p in predictions if p["split"] == "mixed" and p["who"] == "model"}
    assert outputs["c"]["output_tokens"] <= 3 and outputs["a"]["output_tokens"] <= 5
    assert outputs["a"]["correct"] == (1 <= len(outputs["a"]["output"].split()) <= 400)
