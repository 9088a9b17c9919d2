"""The counterfactual-edit corpus: parsing qa_wikidata clozes, choosing edits, and the written folder."""

from __future__ import annotations

import json
import random

import pytest

from mixsd.cli import main
from mixsd.core.answers import matches
from mixsd.core.files import InputError
from mixsd.core.records import load_corpus
from mixsd.corpora.counterfact import (
    CounterfactConfig,
    Fact,
    build_counterfact,
    counterfact_command,
    new_object,
    parse_facts,
)


def _item(cloze: str, target: str | list[str]) -> dict:
    return {"input": cloze, "target": target}


TASK = {
    "examples": [
        _item("The capital of France is", "Paris"),
        _item("The capital of Italy is", "Rome"),
        _item("The capital of Germany is", "Berlin"),
        _item("The capital of Spain is", "Madrid"),
        _item("The capital of Peru is", "Lima"),
        _item("The capital of Luxembourg is", "Luxembourg"),  # answer inside the question: dropped
        _item("The capital of France is", "Paris"),  # repeated pair: dropped
        _item("Paris is located in", "France"),  # another form: dropped
        _item("The country of citizenship of Dante Alighieri is", "Italy"),
        _item("The country of citizenship of Goethe is", "Germany"),
        _item("The country of citizenship of Miguel de Cervantes is", "Spain"),
        _item("The country of citizenship of Molière is", "France"),
        _item("The country of citizenship of Mario Vargas Llosa is", ["Peru", "Spain"]),
        _item("The country of Louvre is", "France"),
        _item("The country of Colosseum is", "Italy"),
        _item("The country of Kingdom of Naples is", "Italy"),
        _item("The official language of France is", "French"),
        _item("The official language of Italy is", "Italian"),
        _item("The official language of Germany is", "German"),
        _item("The official language of Spain is", "Spanish"),
        _item("The official language of Peru is", ["Spanish", "Quechua"]),
        _item("The sport played by Lionel Messi is", "association football"),
        _item("The sport played by Roger Federer is", "tennis"),
        _item("The sport played by Michael Jordan is", "basketball"),
        _item("The sport played by Tiger Woods is", "golf"),
        _item("The continent of Peru is", ["South America", "Americas"]),
        _item("The continent of Italy is", "Europe"),
        _item("The continent of Japan is", "Asia"),
        {"input": 7, "target": "x"},  # malformed: dropped
    ]
}
# What the oracle "knows": facts whose subject is listed here it answers right, others it gets wrong.
UNKNOWN_SUBJECTS = {"Peru", "Tiger Woods", "Japan"}


def oracle(prompts: list[str]) -> list[str]:
    """A stand-in for the base model: a sentence naming the true object, or a wrong guess."""
    facts, _ = parse_facts(TASK)
    by_question = {f.question: f for f in facts}
    by_question.update({f"Complete the sentence: {f.cloze}": f for f in facts})
    texts = []
    for prompt in prompts:
        fact = by_question.get(prompt)
        if fact is None:  # a 2-hop question
            texts.append("I do not know.")
        elif fact.subject in UNKNOWN_SUBJECTS:
            texts.append("I am not sure, maybe Atlantis.")
        else:
            texts.append(
                f"{fact.cloze} {fact.accepted[-1]}."
            )  # the last accepted answer: not always the first
    return texts


def _build(**options):
    asked: list[str] = []

    def answer(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        return oracle(prompts)

    options = {"size": 6, "neighbors": 5, "seed": 0, "chunk": 4, **options}
    return build_counterfact(TASK, answer, **options), asked


def _by_key(facts: list[Fact]) -> dict[tuple[str, str], Fact]:
    return {(f.subject, f.relation): f for f in facts}


# --------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------
def test_parse_facts_finds_relations_and_subjects():
    facts, dropped = parse_facts(TASK)
    assert dropped == {"answer_in_question": 1, "malformed": 1, "other_form": 1, "repeated": 1}
    keys = {(f.relation, f.subject) for f in facts}
    # a longer phrase that starts enough clozes is a relation of its own ...
    assert ("country of citizenship of", "Dante Alighieri") in keys
    assert ("country of", "Louvre") in keys
    # ... but not one whose added words are a name
    assert ("country of", "Kingdom of Naples") in keys
    peru = _by_key(facts)[("Mario Vargas Llosa", "country of citizenship of")]
    assert peru.accepted == ("Peru", "Spain")
    assert peru.question == "What is the country of citizenship of Mario Vargas Llosa?"
    assert peru.statement("Chile") == "The country of citizenship of Mario Vargas Llosa is Chile."
    assert peru.answered("He was born in Peru.") == "Peru" and peru.answered("Chile") is None


def test_new_object_never_names_an_accepted_answer():
    fact = Fact(0, "country of", "Alcatraz", "is", ("United States of America",))
    pool = ["America", "Alcatraz", "Canada", "Mexico", "United States of America", "Utah"]
    picks = {new_object(fact, "It is in Mexico.", pool, random.Random(s)) for s in range(30)}
    # "America" is inside the accepted answer, "Alcatraz" inside the question, Mexico the model's answer
    assert picks == {"Canada", "Utah"}
    assert new_object(fact, "", ["United States of America"], random.Random(0)) is None


# --------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------
def test_edits_are_known_facts_moved_to_another_object():
    result, asked = _build()
    facts, _ = parse_facts(TASK)
    by_question = {f.question: f for f in facts}
    edits = result.splits["edits.jsonl"]
    assert len(edits) == 6
    for row in edits:
        fact = by_question[row["prompt"]]
        base_answer = oracle([row["prompt"]])[0]
        # the true answer is one the answer function produced, and an accepted one
        assert row["true_answer"] in fact.accepted and matches(base_answer, row["true_answer"], "entity")
        assert row["true_answers"] == list(fact.accepted)
        new = row["check"]
        assert new not in fact.accepted
        assert not any(matches(new, a, "entity") or matches(a, new, "entity") for a in fact.accepted)
        assert not matches(base_answer, new, "entity")  # the base model scores 0 before editing
        assert row["answer"] == row["context"] == fact.statement(new)
        assert row["subject"] == fact.subject and row["subject"] in row["prompt"]
        # the new object is another object of the same relation
        assert new in {f.accepted[0] for f in facts if f.relation == fact.relation}
    assert len({row["subject"] for row in edits}) == len(edits)
    # every question was asked at most once
    assert len(asked) == len(set(asked))


def test_paraphrase_neighborhood_and_counts():
    result, _ = _build()
    edits = result.splits["edits.jsonl"]
    paraphrase = result.splits["paraphrase.jsonl"]
    assert [p["id"] for p in paraphrase] == [e["id"] for e in edits]
    for edit, para in zip(edits, paraphrase, strict=True):
        assert para["prompt"].startswith("Complete the sentence: The ") and para["prompt"].endswith(" is")
        assert edit["subject"] in para["prompt"]
        assert (para["check"], para["answer"]) == (edit["check"], edit["answer"])
    neighborhood = result.splits["neighborhood.jsonl"]
    assert len(neighborhood) == 5
    edited = {e["subject"] for e in edits}
    relations = {e["relation"] for e in edits}
    for row in neighborhood:
        assert row["subject"] not in edited and row["relation"] in relations
        # specificity: the true answer, which the base model gives
        assert row["check"] == row["true_answer"]
        assert matches(oracle([row["prompt"]])[0], row["check"], "entity")
    counts = result.counts
    assert counts["edits"] == 6 and counts["neighborhood"] == 5
    assert counts["facts"] == 25 and counts["tried"] <= counts["facts"]
    assert counts["known"] >= counts["edits"] + counts["neighborhood"]
    assert sum(counts["relations"].values()) == 6


def test_twohop_items_follow_the_new_object():
    result, _ = _build(size=10, neighbors=0)
    facts, _ = parse_facts(TASK)
    keyed = _by_key(facts)
    edits = {e["subject"]: e for e in result.splits["edits.jsonl"]}
    twohop = result.splits["twohop.jsonl"]
    assert twohop, "the task has second hops (capital / official language / continent of a country)"
    assert result.counts["twohop"]["edits_with_a_known_hop"] == len(twohop)
    for row in twohop:
        edit = edits[row["subject"]]
        assert row["bridge"] == edit["check"] and row["true_bridge"] == edit["true_answer"]
        hop = keyed[(row["bridge"], row["hop_relation"])]
        assert row["check"] in hop.accepted and hop.subject not in UNKNOWN_SUBJECTS
        assert row["prompt"] == (f"What is the {row['hop_relation']} the {row['relation']} {row['subject']}?")
        before = keyed.get((row["true_bridge"], row["hop_relation"]))
        assert row["true_answer"] == (before.accepted[0] if before else None)
        assert row["true_answer"] != row["check"]  # the edit changes the 2-hop answer


def test_twohop_questions_the_base_model_already_answers_are_dropped():
    plain, _ = _build(size=10, neighbors=0)
    dante = next(row for row in plain.splits["twohop.jsonl"] if row["subject"] == "Dante Alighieri")

    def answer(prompts: list[str]) -> list[str]:
        texts = oracle(prompts)
        return [dante["check"] if p == dante["prompt"] else t for p, t in zip(prompts, texts, strict=True)]

    result = build_counterfact(TASK, answer, size=10, neighbors=0, seed=0, chunk=4)
    assert result.splits["edits.jsonl"] == plain.splits["edits.jsonl"]
    assert dante["prompt"] not in {row["prompt"] for row in result.splits["twohop.jsonl"]}
    assert result.counts["twohop"]["base_model_already_answers"] == 1
    assert plain.counts["twohop"]["base_model_already_answers"] == 0


def test_determinism_and_independence_of_chunk():
    first, _ = _build()
    again, _ = _build()
    assert first.splits == again.splits and first.counts == again.counts
    for chunk in (1, 7, 100):
        other, _ = _build(chunk=chunk)
        assert other.splits == first.splits, chunk
    seeds = {json.dumps(_build(seed=s)[0].splits, sort_keys=True) for s in range(4)}
    assert len(seeds) > 1


def test_visiting_stops_when_enough_are_found():
    result, asked = _build(size=2, neighbors=1, chunk=2)
    assert result.counts["tried"] < result.counts["facts"]
    efficacy_questions = [q for q in asked if q.startswith("What")]
    assert len(efficacy_questions) >= result.counts["tried"]  # second hops are asked too
    capped, _ = _build(size=50, neighbors=50, max_tries=5, chunk=2)
    assert capped.counts["tried"] == 5


def test_answer_count_mismatch_is_refused():
    with pytest.raises(ValueError, match="answers for"):
        build_counterfact(TASK, lambda prompts: prompts[:-1], size=2, neighbors=0)


# --------------------------------------------------------------------------------------------------
# The folder
# --------------------------------------------------------------------------------------------------
GOLDEN = {  # sha256 of each file for the oracle's answers, seed 0, size 6, neighbors 5
    "edits.jsonl": "e975828ea4f4f7c048e40a398db22867be2f5fb107dd0d57bddb713691ebb7dc",
    "neighborhood.jsonl": "aec2cd54a44d660f647c3888c346c01cf02d0bfd537b532cfe6698f723501d1f",
    "paraphrase.jsonl": "66ff167cb976537c716cc3ca8c4acd128f599226873f2e64c78dc15e5ce86ef2",
    "twohop.jsonl": "cf3ca8abd5d7c2e6826117b36dea3640b10bbd04653fb1667639e07679ae3e88",
}


def _write_task(tmp_path):
    path = tmp_path / "task.json"
    path.write_text(json.dumps(TASK), encoding="utf-8")
    return path


def test_command_writes_the_folder_with_golden_checksums(tmp_path):
    task = _write_task(tmp_path)
    out = tmp_path / "cf"
    config = CounterfactConfig(out=str(out), model="oracle", task=str(task), size=6, neighbors=5, chunk=4)
    manifest = counterfact_command(config, answer=oracle)
    assert manifest["answer_match"] == "entity" and manifest["model"] == {"name": "oracle", "sha256": None}
    assert manifest["counts"]["edits"] == 6 and manifest["seed"] == 0
    digests = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    assert digests == GOLDEN
    for name in manifest["files"]:
        facts = load_corpus(out / name)  # every split is a valid corpus file
        assert len(facts) == manifest["files"][name]["records"]
    # the same again: byte-identical, manifest included
    before = (out / "manifest.json").read_bytes()
    counterfact_command(config, answer=oracle)
    assert (out / "manifest.json").read_bytes() == before


def test_a_split_left_empty_is_not_left_stale(tmp_path):
    task = _write_task(tmp_path)
    out = tmp_path / "cf"
    config = CounterfactConfig(out=str(out), model="oracle", task=str(task), size=10, neighbors=0)
    assert "twohop.jsonl" in counterfact_command(config, answer=oracle)["files"]
    config.neighbors = 5
    config.size = 1
    # one edit (seed 0: Italy's official language -> Spanish), and Spanish is no subject: no second hop
    manifest = counterfact_command(config, answer=oracle)
    assert set(manifest["files"]) == {"edits.jsonl", "paraphrase.jsonl", "neighborhood.jsonl"}
    assert not (out / "twohop.jsonl").exists()


def test_nothing_known_is_a_clear_error(tmp_path):
    task = _write_task(tmp_path)
    config = CounterfactConfig(out=str(tmp_path / "cf"), model="oracle", task=str(task))
    with pytest.raises(InputError, match="answered none of the 25 facts"):
        counterfact_command(config, answer=lambda prompts: ["no idea"] * len(prompts))
    assert not (tmp_path / "cf").exists()


def test_cli_with_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    """Plumbing: the tiny random model knows no fact, so the command stops with one line and status 2."""
    task = _write_task(tmp_path)
    out = tmp_path / "cf"
    argv = ["corpus", "counterfact", "--model", str(tiny_model_dir), "--out", str(out)]
    code = main([*argv, "--task", str(task), "--max-new-tokens", "4", "--threads", "1"])
    assert code == 2
    err = capsys.readouterr().err
    assert "answered none of the 25 facts asked" in err and "no corpus written" in err
    assert not out.exists()
    assert main([*argv, "--task", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: file not found" in capsys.readouterr().err
