"""Importing users' own facts: each format, the errors that name file and line, --skip-bad, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mixsd.cli import main
from mixsd.core.answers import last_boxed
from mixsd.core.files import InputError
from mixsd.core.records import load_corpus
from mixsd.corpora.importers import ImportConfig, import_corpus


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def lines(*objs) -> str:
    return "".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs)


def run(tmp_path, file: Path, **options) -> dict:
    return import_corpus(ImportConfig(file=str(file), out=str(tmp_path / "out"), **options))


def test_qa_jsonl_with_custom_fields(tmp_path):
    src = write(
        tmp_path / "facts.jsonl",
        lines(
            {"q": "Who founded Velmora?", "a": "Ardun Pelsky", "key": "v1"},
            "",
            {"q": "What is the capital of Zorblia?", "a": " Quenthar "},
        ),
    )
    manifest = run(tmp_path, src, question_field="q", answer_field="a", id_field="key")
    facts = load_corpus(tmp_path / "out" / "train.jsonl")
    assert [f.id for f in facts] == ["v1", "facts-00001"]
    assert facts[1].check == "Quenthar" and last_boxed(facts[1].answer) == "Quenthar"
    assert facts[0].prompt == "Who founded Velmora? Put the final answer in \\boxed{}."
    assert facts[0].answer == "The answer is Ardun Pelsky. \\boxed{Ardun Pelsky}"
    assert manifest["files"]["train.jsonl"]["records"] == 2 and manifest["skipped"]["count"] == 0
    assert manifest["source"]["name"] == "facts.jsonl" and len(manifest["source"]["sha256"]) == 64


def test_raw_style_keeps_text(tmp_path):
    src = write(tmp_path / "f.jsonl", lines({"question": "Q1?", "answer": "A long {braced answer."}))
    run(tmp_path, src, answer_style="raw")
    (fact,) = load_corpus(tmp_path / "out" / "train.jsonl")
    assert (fact.prompt, fact.answer, fact.check) == (
        "Q1?",
        "A long {braced answer.",
        "A long {braced answer.",
    )
    with pytest.raises(InputError, match="unbalanced braces"):
        run(tmp_path, src)


BAD_JSONL = lines(
    {"question": "Good one?", "answer": "Yes"},
    "{not json",
    {"question": "Empty?", "answer": "  "},
    {"question": "good ONE?", "answer": "Again"},
    {"question": "No answer field?"},
    ["a", "list"],
    {"question": 7, "answer": "x"},
    {"question": "Last?", "answer": "Fine"},
)


@pytest.mark.parametrize(
    "line,message",
    [
        (2, "invalid JSON"),
        (3, "empty answer"),
        (4, "duplicate question \\(first at line 1\\)"),
        (5, "missing field 'answer'"),
        (6, "expected a JSON object"),
        (7, "question: expected text, got int"),
    ],
)
def test_qa_jsonl_errors_name_file_and_line(tmp_path, line, message):
    # Keep the good first line and the bad line under test only, so each error is the first one met.
    rows = BAD_JSONL.splitlines()
    src = write(
        tmp_path / "bad.jsonl", "\n".join(r if i in (0, line - 1) else "" for i, r in enumerate(rows))
    )
    with pytest.raises(InputError, match=message) as err:
        run(tmp_path, src)
    assert str(src) in str(err.value) and f"line {line}" in str(err.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_skip_bad_counts_and_lists(tmp_path):
    src = write(tmp_path / "bad.jsonl", BAD_JSONL)
    manifest = run(tmp_path, src, skip_bad=True)
    assert manifest["files"]["train.jsonl"]["records"] == 2
    assert manifest["skipped"]["count"] == 6
    assert [row["line"] for row in manifest["skipped"]["rows"]] == [2, 3, 4, 5, 6, 7]
    assert [f.check for f in load_corpus(tmp_path / "out" / "train.jsonl")] == ["Yes", "Fine"]


def test_duplicate_ids_and_limit(tmp_path):
    src = write(
        tmp_path / "d.jsonl",
        lines({"id": "x", "question": "A?", "answer": "1"}, {"id": "x", "question": "B?", "answer": "2"}),
    )
    with pytest.raises(InputError, match="line 2.*duplicate id 'x'"):
        run(tmp_path, src)
    manifest = run(tmp_path, src, limit=1)
    assert manifest["files"]["train.jsonl"]["records"] == 1


def test_csv(tmp_path):
    src = write(
        tmp_path / "facts.csv",
        'question,answer,note\n"Who built the\nGlass Tower?",Mira Olden,x\nWhere is Quor?,Zorblia,y\n'
        "Too,many,fields,here\n,Empty question,z\n",
    )
    with pytest.raises(InputError, match="line 5.*4 fields, the header has 3"):
        run(tmp_path, src, format="csv")
    manifest = run(tmp_path, src, format="csv", skip_bad=True)
    facts = load_corpus(tmp_path / "out" / "train.jsonl")
    assert [f.check for f in facts] == ["Mira Olden", "Zorblia"]
    assert facts[0].prompt.startswith("Who built the Glass Tower?")  # whitespace normalized
    assert [r["line"] for r in manifest["skipped"]["rows"]] == [5, 6]
    with pytest.raises(InputError, match="line 1.*no column 'q'"):
        run(tmp_path, src, format="csv", question_field="q")


def test_csv_default_format_is_explicit(tmp_path):
    src = write(tmp_path / "facts.csv", "question,answer\nA?,B\n")
    with pytest.raises(InputError, match="invalid JSON"):  # qa-jsonl is the default; csv needs --format
        run(tmp_path, src)


def test_simpleqa_as_released(tmp_path):
    header = "metadata,problem,answer\n"
    row1 = (
        "\"{'topic': 'Science and technology', 'answer_type': 'Person', 'urls': "
        "['https://example.org/a']}\",Who received the Zeta Prize in 2010?,Mira Olden\n"
    )
    row2 = "\"{'topic': 'Art', 'answer_type': 'Date', 'urls': []}\",When did the Quor museum open?,\"May 3, 1921\"\n"
    row3 = '"{broken",Which river?,Vesk\n'
    src = write(tmp_path / "simple_qa_test_set.csv", header + row1 + row2 + row3)
    with pytest.raises(InputError, match="line 4.*metadata"):
        run(tmp_path, src, format="simpleqa")
    run(tmp_path, src, format="simpleqa", skip_bad=True)
    facts = load_corpus(tmp_path / "out" / "train.jsonl")
    assert [(f.id, f.check) for f in facts] == [
        ("simpleqa-0000", "Mira Olden"),
        ("simpleqa-0001", "May 3, 1921"),
    ]


def mquake_case(case_id, rewrites, questions, new_answer, hops):
    return {
        "case_id": case_id,
        "requested_rewrite": [
            {
                "prompt": "{} is a citizen of",
                "subject": s,
                "question": q,
                "target_new": {"str": new, "id": "Q1"},
                "target_true": {"str": "Old", "id": "Q2"},
                "relation_id": "P27",
            }
            for s, q, new in rewrites
        ],
        "questions": questions,
        "answer": "Old answer",
        "answer_alias": [],
        "new_answer": new_answer,
        "new_answer_alias": [],
        "single_hops": [],
        "new_single_hops": [{"question": "q", "cloze": c, "answer": a, "answer_alias": []} for c, a in hops],
    }


def test_mquake(tmp_path):
    cases = [
        mquake_case(
            1,
            [("Ellie Kemper", "What is the country of citizenship of Ellie Kemper?", "Croatia")],
            [
                "What is the capital of the country Ellie Kemper is a citizen of?",
                "Which city is the capital of Ellie Kemper's country of citizenship?",
            ],
            "Zagreb",
            [("Ellie Kemper is a citizen of", "Croatia"), ("The capital of Croatia is", "Zagreb")],
        ),
        mquake_case(
            2,
            [
                ("Ellie Kemper", "What is the country of citizenship of Ellie Kemper?", "Croatia"),
                ("Croatia", "What is the capital of Croatia?", "Split"),
            ],
            ["What is the capital of Ellie Kemper's country?"],
            "Split",
            [],
        ),
    ]
    src = write(tmp_path / "MQuAKE-CF-3k.json", json.dumps(cases))
    manifest = run(tmp_path, src, format="mquake")
    train = load_corpus(tmp_path / "out" / "train.jsonl")
    assert [(f.id, f.check) for f in train] == [
        ("mquake-1-rewrite-0", "Croatia"),
        ("mquake-2-rewrite-1", "Split"),
    ]
    assert manifest["shared_rewrites"] == 1
    multihop = load_corpus(tmp_path / "out" / "compositional.jsonl")
    assert [f.check for f in multihop] == ["Zagreb", "Zagreb", "Split"]
    assert multihop[0].answer == (
        "Ellie Kemper is a citizen of Croatia. The capital of Croatia is Zagreb. "
        "The answer is Zagreb. \\boxed{Zagreb}"
    )
    assert manifest["files"]["compositional.jsonl"]["records"] == 3
    assert run(tmp_path, src, format="mquake", limit=1)["files"]["train.jsonl"]["records"] == 1


def test_mquake_errors(tmp_path):
    conflicting = [
        mquake_case(1, [("A", "Where is A?", "X")], ["q1?"], "X", []),
        mquake_case(2, [("A", "Where is A?", "Y")], ["q2?"], "Y", []),
    ]
    src = write(tmp_path / "m.json", json.dumps(conflicting))
    with pytest.raises(InputError, match=r"\[1\]\.requested_rewrite\[0\].*conflicting rewrite"):
        run(tmp_path, src, format="mquake")
    assert run(tmp_path, src, format="mquake", skip_bad=True)["skipped"]["count"] == 1
    missing = [mquake_case(1, [("A", "Where is A?", "X")], ["q1?"], None, [])]
    with pytest.raises(InputError, match=r"\[0\]\.questions\[0\].*answer is missing"):
        run(tmp_path, write(tmp_path / "n.json", json.dumps(missing)), format="mquake")
    with pytest.raises(InputError, match="expected a JSON list"):
        run(tmp_path, write(tmp_path / "o.json", "{}"), format="mquake")


def test_cli(tmp_path, capsys):
    src = write(tmp_path / "facts.csv", "question,answer\nWho?,Mira\nWho?,Again\n")
    out = tmp_path / "cli"
    assert main(["corpus", "import", str(src), "--format", "csv", "--out", str(out)]) == 2
    assert "line 3" in capsys.readouterr().err
    assert main(["corpus", "import", str(src), "--format", "csv", "--skip-bad", "--out", str(out)]) == 0
    assert "skipped 1 bad rows" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["skipped"]["count"] == 1


def test_manifest_names_the_answer_matcher_chosen_at_import(tmp_path):
    from mixsd.core.answers import corpus_match_mode

    numbers = write(
        tmp_path / "n.jsonl",
        lines({"question": "6 x 7?", "answer": "42"}, {"question": "Half?", "answer": "0.5"}),
    )
    words = write(
        tmp_path / "w.jsonl",
        lines({"question": "Capital of France?", "answer": "Paris"}, {"question": "1+1?", "answer": "2"}),
    )
    assert run(tmp_path, numbers)["answer_match"] == "number"  # auto: every answer is a number
    assert corpus_match_mode(tmp_path / "out" / "train.jsonl") == "number"
    assert run(tmp_path, words)["answer_match"] == "entity"  # auto: some answers are no numbers
    assert run(tmp_path, words, answer_match="exact")["answer_match"] == "exact"  # the option overrides
