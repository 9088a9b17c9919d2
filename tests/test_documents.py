"""`mixsd corpus documents` (reading, passages, the QA filters, the corpus folder, SQuAD's gold split),
SQuAD's exact match and F1, and the continued-pre-training method (`mixsd train --method cpt`, grids)."""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_model, make_tiny_tokenizer, make_word_model, make_word_tokenizer, write_jsonl
from mixsd.core.answers import squad_exact, squad_f1, squad_normalize, squad_scores
from mixsd.core.files import InputError
from mixsd.core.metrics import split_columns, squad_summary
from mixsd.corpora.documents import (
    CANDIDATES_FILE,
    PASSAGES_FILE,
    DocumentsConfig,
    Paragraph,
    QAWriter,
    Skips,
    answer_problem,
    build_documents,
    clean_answer,
    find_span,
    input_files,
    question_problem,
    read_document,
    split_passages,
)

WORDS = 200


def word_tokenizer():
    """A word-level tokenizer: one token per whitespace-separated word (unknown words: <unk>)."""
    return make_word_tokenizer(WORDS)


def count_words(text: str) -> int:
    return len(text.split())


# ------------------------------------------------------------------------------------------------
# SQuAD's scores, checked by hand
# ------------------------------------------------------------------------------------------------
def test_squad_normalization_exact_match_and_f1_by_hand():
    assert squad_normalize("The  Denver Broncos!") == "denver broncos"
    assert squad_normalize("an Apple, a day") == "apple day"
    assert squad_normalize("Levi's Stadium") == "levis stadium"  # SQuAD drops the apostrophe
    assert squad_exact("the Denver Broncos.", "Denver Broncos")
    assert not squad_exact("Broncos", "Denver Broncos")
    assert squad_f1("Denver Broncos team", "Denver Broncos") == pytest.approx(0.8)  # P 2/3, R 1
    assert squad_f1("Santa Clara, California", "Levi's Stadium") == 0.0
    assert squad_f1("", "Denver") == 0.0
    # the final answer (last \boxed{}) is scored; the max over the gold answers counts
    scores = squad_scores("The answer is Denver. \\boxed{Denver Broncos}", ["Broncos", "Denver Broncos"])
    assert scores == {"em": True, "f1": 1.0, "contained": True}
    # no box, no "answer is": the last line is the answer. Tokens it, was, played, in, santa, clara against
    # santa, clara, california: 2 common, P 2/6, R 2/3, F1 4/9; neither gold answer appears whole
    scores = squad_scores("It was played in Santa Clara.", ["Santa Clara, California", "Levi's Stadium"])
    assert scores["f1"] == pytest.approx(4 / 9) and not scores["em"] and not scores["contained"]
    assert squad_scores("They played at Levi's Stadium.", ["Levi's Stadium"])["contained"]


def test_squad_summary_and_table_columns():
    rows = [
        {"squad_em": True, "squad_f1": 1.0, "contained": True},
        {"squad_em": False, "squad_f1": 0.5, "contained": True},
        {"squad_em": False, "squad_f1": 0.0, "contained": False},
        {"squad_em": False, "squad_f1": 0.5, "contained": False},
    ]
    summary = squad_summary(rows)
    assert summary["em"]["correct"] == 1 and summary["em"]["n"] == 4
    assert summary["f1"]["value"] == pytest.approx(0.5)
    low, high = summary["f1"]["ci95"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    assert summary["contained"]["value"] == 0.5
    columns = split_columns("gold", {"accuracy": {"value": 0.5}, "squad": summary})
    assert columns["gold_squad_em"] == 0.25 and columns["gold_squad_f1"] == pytest.approx(0.5)
    assert columns["gold_squad_contained"] == 0.5
    assert "gold_squad_em" not in split_columns("train", {"accuracy": {"value": 1.0}})


def test_qa_eval_scores_every_gold_answer(tmp_path):
    """`mixsd eval --suite qa`: a record's `answers` list is what EM/F1/contained are scored against."""
    from mixsd.evaluation.evaluate import EvalConfig, evaluate
    from test_evaluate import _answer_qz_model

    tokenizer = make_tiny_tokenizer()
    folder = tmp_path / "qa"
    folder.mkdir()
    write_jsonl(
        folder / "gold.jsonl",
        [
            {
                "id": "a",
                "prompt": "A?",
                "answer": "Wy",
                "check": "Wy",
                "answers": ["Wy", "Qz"],
            },  # Qz: 2nd gold
            {"id": "b", "prompt": "B?", "answer": "Wy", "check": "Wy"},  # no list: the check alone
        ],
    )
    res = evaluate(
        EvalConfig(model="m", suite="qa", data=str(folder), out=str(tmp_path / "r.json")),
        model=_answer_qz_model(tokenizer),
        tokenizer=tokenizer,
        progress=False,
    )
    squad = res["splits"]["gold"]["squad"]
    assert squad["em"]["correct"] == 1 and squad["contained"]["correct"] == 1
    assert squad["f1"]["value"] == pytest.approx(0.5)
    assert res["splits"]["gold"]["accuracy"]["correct"] == 0  # the headline still uses `check`


# ------------------------------------------------------------------------------------------------
# Reading and splitting
# ------------------------------------------------------------------------------------------------
def test_text_markdown_and_jsonl_paragraphs_with_positions(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.txt").write_text("w1 w2 w3\nw4 w5\n\n\nw6 w7 w8\n")
    (docs / "sub" / "b.md").write_text("# Title One\n\nw9 w10\n\n```\ncode w11\n```\n## Two\nw12 w13\n")
    write_jsonl(
        docs / "c.jsonl",
        [{"id": "d1", "title": "T", "text": "w14 w15\n\nw16"}, {"text": "w17 w18"}],
    )
    (docs / "image.png").write_bytes(b"\x89PNG")
    (docs / ".hidden.txt").write_text("w19")
    skips = Skips(skip_bad=False)
    files = input_files(str(docs), skips)
    assert [name for _, name in files] == ["docs/a.txt", "docs/c.jsonl", "docs/sub/b.md"]
    assert skips.listed == [
        {"file": "docs/image.png", "reason": "unsupported file type '.png' (expected .txt, .md or .jsonl)"}
    ]
    found = [p for path, name in files for p in read_document(path, name, skips)]
    assert [(p.source, p.position, p.text, p.title) for p in found] == [
        ("docs/a.txt", "line 1", "w1 w2 w3 w4 w5", None),
        ("docs/a.txt", "line 5", "w6 w7 w8", None),
        ("docs/c.jsonl", "id d1, paragraph 1", "w14 w15", "T"),
        ("docs/c.jsonl", "id d1, paragraph 2", "w16", "T"),
        ("docs/c.jsonl", "line 2", "w17 w18", None),
        ("docs/sub/b.md", "line 3", "w9 w10", "Title One"),
        ("docs/sub/b.md", "line 9", "w12 w13", "Two"),
    ]


def test_long_paragraphs_are_cut_at_sentences_and_ids_are_stable():
    text = "A w1 w2 w3. B w4 w5 w6. C w7 w8 w9 w10. D w11."
    paragraph = Paragraph("doc.txt", "line 4", text, None, 4)
    skips = Skips(skip_bad=False)
    passages = split_passages([paragraph], count_words, budget=9, min_words=1, skips=skips)
    assert [p.text for p in passages] == ["A w1 w2 w3. B w4 w5 w6.", "C w7 w8 w9 w10. D w11."]
    assert [p.position for p in passages] == ["line 4, part 1", "line 4, part 2"]
    assert all(p.tokens <= 9 for p in passages)
    again = split_passages([paragraph], count_words, budget=9, min_words=1, skips=skips)
    assert [p.id for p in again] == [p.id for p in passages]
    moved = split_passages([Paragraph("doc.txt", "line 5", text, None, 5)], count_words, 9, 1, skips)
    assert {p.id for p in moved}.isdisjoint(p.id for p in passages)
    # one sentence over the budget is bad input, named by file and line
    with pytest.raises(InputError, match=r"doc.txt, line 4: a sentence of 5 tokens at line 4 is longer"):
        split_passages([paragraph], count_words, budget=4, min_words=1, skips=skips)
    short = split_passages([Paragraph("doc.txt", "line 9", "w1 w2", None, 9)], count_words, 9, 3, skips)
    assert short == [] and "fewer than 3 words" in skips.listed[-1]["reason"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"  \n\n", r"empty.txt: empty file"),
        ("binary.txt", b"w1 w2\x00\x01\x02", r"binary.txt: binary file"),
        ("latin.md", b"w1 w2 w3\nw4 caf\xe9\n", r"latin.md, line 2: not UTF-8 text \(byte 0xe9\)"),
        (
            "bad.jsonl",
            b'{"text": "w1 w2"}\n{"title": "x"}\n',
            r"bad.jsonl, line 2: missing or empty field 'text'",
        ),
        ("broken.jsonl", b'{"text": "w1"}\n{"text": \n', r"broken.jsonl, line 2: invalid JSON"),
        ("notes.pdf", b"%PDF", r"notes.pdf: unsupported file type '.pdf'"),
    ],
)
def test_bad_input_stops_before_any_model_loads_or_is_skipped(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    (tmp_path / "good.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8 w9\n")
    inputs = f"{tmp_path / name},{tmp_path / 'good.txt'}"
    config = DocumentsConfig(model="no-such-model", inputs=inputs, out=str(tmp_path / "out"))
    with pytest.raises(InputError, match=message):  # not a missing model: the input is checked first
        build_documents(config, tokenizer=word_tokenizer())
    skipping = DocumentsConfig(
        model="no-such-model", inputs=inputs, out=str(tmp_path / "out"), skip_bad=True, min_passage_words=2
    )
    writer = ScriptedWriter({("w1", "Who"): ("Who wrote w3 and w4?", "w5")})
    manifest = build_documents(skipping, tokenizer=word_tokenizer(), writer=writer)
    assert manifest["skipped"]["items"][0]["file"].endswith(name)
    assert manifest["counts"]["kept"] == 1  # good.txt's passage


def test_options_and_a_passage_budget_over_the_context_are_refused(tmp_path):
    with pytest.raises(InputError, match="--inputs"):
        DocumentsConfig(model="m", out=str(tmp_path))
    with pytest.raises(InputError, match="candidates"):
        DocumentsConfig(model="m", inputs="x", out=str(tmp_path), candidates=99)
    (tmp_path / "a.txt").write_text("w1 w2 w3 w4 w5 w6 w7 w8\n")
    config = DocumentsConfig(model="m", inputs=str(tmp_path / "a.txt"), out=str(tmp_path / "o"))
    model = make_word_model(WORDS, max_positions=128)
    with pytest.raises(InputError, match="do not fit the QA model's context of 128 tokens"):
        build_documents(config, model=model, tokenizer=word_tokenizer())


# ------------------------------------------------------------------------------------------------
# The filters
# ------------------------------------------------------------------------------------------------
PASSAGE = (
    "Super Bowl 50 was played on February 7, 2016, at Levi's Stadium in Santa Clara. The Denver Broncos "
    "defeated the Carolina Panthers 24-10."
)


def test_each_drop_reason():
    seen: set[str] = set()

    def asked(question, gold=frozenset()):
        return question_problem(question, PASSAGE, 2, seen, set(gold))

    assert asked(None) == "no_question"
    assert asked("Who won Super Bowl 50") == "no_question"  # no question mark
    assert asked("Which team did the Denver Broncos defeat in Super Bowl 50?") is None
    seen.add(squad_normalize("Which team did the Denver Broncos defeat in Super Bowl 50?"))
    assert asked("Which team did the Denver Broncos defeat in Super Bowl 50?") == "duplicate_question"
    assert asked("According to the passage, who won Super Bowl 50?") == "refers_to_passage"
    assert asked("What does the text say about the Broncos game?") == "refers_to_passage"
    # the instruction's example leaking into a question about another passage
    assert asked("In what year did the Eiffel Tower host Super Bowl 50?") == "copies_the_example"
    assert asked("Who was named after Gustave Eiffel?") == "copies_the_example"
    paris = "Super Bowl 50 was watched in Paris by 2,000 fans of the Denver Broncos."
    assert question_problem("How many fans watched Super Bowl 50 in Paris?", paris, 2, set(), set()) is None
    assert asked("Who is the Eiffel Tower named after?") == "copies_the_example"
    assert asked("Who won the game?") == "names_nothing_in_passage"  # names no content word it shares
    assert asked("Where was Super Bowl 50 played?", {"where was super bowl 50 played"}) == "gold_question"
    question = "Which team did the Denver Broncos defeat in Super Bowl 50?"
    assert answer_problem(question, None, PASSAGE, 5) == ("no_answer", None)
    assert answer_problem(question, " . ", PASSAGE, 5) == ("no_answer", None)
    assert (
        answer_problem(question, "the team from Carolina that lost the game", PASSAGE, 5)[0]
        == "answer_too_long"
    )
    assert answer_problem(question, "the Seattle Seahawks", PASSAGE, 5) == ("answer_not_in_passage", None)
    assert answer_problem(question, "Denver Broncos", PASSAGE, 5) == ("answer_in_question", "Denver Broncos")
    assert answer_problem(question, "the carolina  panthers.", PASSAGE, 5) == (None, "the Carolina Panthers")


def test_spans_and_answer_cleaning():
    assert find_span('"Levi\'s Stadium"', PASSAGE) == "Levi's Stadium"
    assert find_span("santa clara.", PASSAGE) == "Santa Clara"
    assert find_span("Clar", PASSAGE) is None  # whole words only
    assert find_span("24-10", PASSAGE) == "24-10"
    assert clean_answer("The answer is: Santa Clara") == "Santa Clara"
    assert clean_answer("Answer: 2016") == "2016"
    assert clean_answer("  ") is None


# ------------------------------------------------------------------------------------------------
# The corpus folder
# ------------------------------------------------------------------------------------------------
class ScriptedWriter:
    """Writes the pairs given for (first word of the passage, question start); nothing for the rest.
    Stands in for the model so that the folder, the split and the manifest can be checked exactly."""

    def __init__(self, script: dict[tuple[str, str], tuple[str, str]]):
        self.script = script

    def questions(self, jobs):
        out = []
        for passage, start in jobs:
            question, _ = self.script.get((passage.text.split()[0], start), (None, None))
            out.append(((passage.text.split()[0], start), question))
        return out

    def answers(self, jobs):
        return [self.script[key][1] for key, _ in jobs]


ALPHA = "Alpha Vexlor founded the Trinnic guild in 1721 in the harbor town of Osmere."
BETA = "Beta Quorra is a river that flows from Mount Pell to the Saline Sea over 410 kilometres."
SCRIPT = {
    ("Alpha", "Who"): ("Who founded the Trinnic guild?", "Alpha Vexlor"),
    ("Alpha", "When"): ("When was the Trinnic guild founded?", "1721"),
    ("Alpha", "Where"): ("Where was the Trinnic guild founded?", "Osmere"),
    ("Alpha", "What"): ("What did the passage say about Alpha Vexlor?", "a guild"),
    ("Alpha", "Which"): ("Which guild did Alpha Vexlor found in Osmere?", "Trinnic"),
    ("Beta", "Where"): ("Where does the river Beta Quorra flow from?", "Mount Pell"),
    ("Beta", "How many"): ("How many kilometres does Beta Quorra flow?", "420"),
    ("Beta", "What"): (
        "What is Beta Quorra?",
        "a river that flows from Mount Pell to the Saline Sea over 410 km",
    ),
}


def build(tmp_path: Path, name: str = "out", **options) -> tuple[dict, Path]:
    docs = tmp_path / "docs.md"
    docs.write_text(f"# Notes\n\n{ALPHA}\n\n{BETA}\n")
    out = tmp_path / name
    config = DocumentsConfig(
        model="unused", inputs=str(docs), out=str(out), questions=3, heldout=1, **options
    )
    return build_documents(config, tokenizer=word_tokenizer(), writer=ScriptedWriter(SCRIPT)), out


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_corpus_folder_split_reasons_and_manifest(tmp_path):
    manifest, out = build(tmp_path)
    assert manifest["counts"] == {
        "passages": 2,
        "candidates": 18,
        "kept": 4,
        "passages_with_pairs": 2,
        "train": 3,
        "heldout": 1,  # Beta keeps one pair only: it stays in training
    }
    dropped = {k: v for k, v in manifest["dropped"].items() if v}
    assert dropped == {
        "no_question": 10,
        "refers_to_passage": 1,
        "answer_not_in_passage": 1,  # 420 kilometres: not what the passage says
        "answer_too_long": 1,
        "over_limit": 1,  # Alpha's fourth good pair (questions=3)
    }
    assert manifest["answer_match"] == "entity"
    train, heldout = read(out / "train.jsonl"), read(out / "heldout.jsonl")
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in heldout)
    record = train[0]
    assert record["context"] in (ALPHA, BETA) and record["check"] in record["context"]
    assert record["answer"] == f"The answer is {record['check']}. \\boxed{{{record['check']}}}"
    assert record["prompt"].endswith("Put the final answer in \\boxed{}.")
    passages = read(out / PASSAGES_FILE)
    assert [(p["position"], p["title"]) for p in passages] == [("line 3", "Notes"), ("line 5", "Notes")]
    candidates = read(out / CANDIDATES_FILE)
    assert len(candidates) == 18 and all(c["kept"] == (c["reason"] is None) for c in candidates)
    assert set(manifest["files"]) == {"train.jsonl", "heldout.jsonl", PASSAGES_FILE, CANDIDATES_FILE}
    # the corpus reads as every stage reads a corpus
    from mixsd.core.records import load_corpus

    assert [f.context for f in load_corpus(out / "train.jsonl")] == [r["context"] for r in train]


def test_same_seed_same_bytes_other_seed_other_choices(tmp_path):
    _, first = build(tmp_path, "a")
    _, second = build(tmp_path, "b")
    for name in ("train.jsonl", "heldout.jsonl", CANDIDATES_FILE, "manifest.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    orders = set()
    for seed in range(6):
        _, out = build(tmp_path, f"s{seed}", seed=seed)
        orders.add(tuple(c["start"] for c in read(out / CANDIDATES_FILE)))
    assert len(orders) > 1  # the question starts' order follows the seed


def test_no_kept_pair_is_an_error_that_leaves_the_candidates(tmp_path):
    docs = tmp_path / "a.txt"
    docs.write_text(ALPHA + "\n")
    config = DocumentsConfig(model="unused", inputs=str(docs), out=str(tmp_path / "out"))
    with pytest.raises(InputError, match="no generated pair passed the filters \\(no_question: 9\\)"):
        build_documents(config, tokenizer=word_tokenizer(), writer=ScriptedWriter({}))
    assert len(read(tmp_path / "out" / CANDIDATES_FILE)) == 9


def fake_sdist(path: Path) -> Path:
    """A tarball laid out like bigbench-1.0.0.tar.gz with a two-paragraph SQuAD dev file."""
    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "Test_Article",
                "paragraphs": [
                    {
                        "context": ALPHA,
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Who founded the Trinnic guild?",
                                "answers": [{"text": "Alpha Vexlor"}, {"text": "Vexlor"}, {"text": "Vexlor"}],
                            },
                            {"id": "q2", "question": "In what year?", "answers": [{"text": "1721"}]},
                        ],
                    },
                    {
                        "context": BETA,
                        "qas": [{"id": "q3", "question": "Where?", "answers": [{"text": "Pell"}]}],
                    },
                ],
            }
        ],
    }
    tasks = "bigbench-1.0.0/bigbench/benchmark_tasks/"
    members = {
        tasks + "squad_shifts/squaddev_v1.1.json": squad,
        **{
            tasks + f"{t}/task.json": {"examples": []}
            for t in ("general_knowledge", "social_iqa", "qa_wikidata")
        },
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members.items():
            data = json.dumps(obj).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_squad_mode_writes_gold_questions_that_training_never_sees(tmp_path):
    sdist = fake_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    config = DocumentsConfig(
        model="unused", squad=2, squad_source=str(sdist), out=str(tmp_path / "out"), questions=3, heldout=1
    )
    manifest = build_documents(config, tokenizer=word_tokenizer(), writer=ScriptedWriter(SCRIPT))
    out = tmp_path / "out"
    gold, gold_open = read(out / "gold.jsonl"), read(out / "gold_open.jsonl")
    assert [(g["id"], g["answers"]) for g in gold] == [
        ("squad-q1", ["Alpha Vexlor", "Vexlor"]),
        ("squad-q2", ["1721"]),
        ("squad-q3", ["Pell"]),
    ]
    assert gold_open[0]["prompt"].startswith(f"Passage: {ALPHA}\n\n") and "context" not in gold[0]
    # "Who founded the Trinnic guild?" is a gold question: dropped, never trained on
    assert manifest["dropped"]["gold_question"] == 1
    trained = {
        squad_normalize(r["prompt"]) for name in ("train.jsonl", "heldout.jsonl") for r in read(out / name)
    }
    assert not trained & {squad_normalize(g["prompt"]) for g in gold}
    assert manifest["squad"]["paragraphs"] == ["squad-00-000", "squad-00-001"]
    assert manifest["squad"]["gold_questions"] == 3
    with pytest.raises(InputError, match="only 2 SQuAD paragraphs with 1\\+ gold questions"):
        build_documents(
            DocumentsConfig(model="u", squad=5, squad_source=str(sdist), out=str(tmp_path / "o2")),
            tokenizer=word_tokenizer(),
            writer=ScriptedWriter(SCRIPT),
        )


def test_a_real_model_writes_the_same_candidates_twice(tmp_path):
    """QAWriter on a tiny random chat model: greedy, batched, the same pairs whatever the batch size."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), max_positions=1024)
    docs = tmp_path / "a.txt"
    docs.write_text("Zed Quill built a tower. It stands in Orv.\n\nMira Dunn wrote nine plays in Kest.\n")
    outputs = []
    for batch_size in (1, 7):
        config = DocumentsConfig(
            model="unused",
            inputs=str(docs),
            out=str(tmp_path / f"o{batch_size}"),
            max_passage_tokens=64,
            min_passage_words=2,
            max_new_tokens=6,
            batch_size=batch_size,
            candidates=3,
        )
        writer = QAWriter(copy.deepcopy(model), tokenizer, config.max_new_tokens, config.batch_size)
        with pytest.raises(InputError, match="no generated pair passed"):  # a random model writes no question
            build_documents(config, tokenizer=tokenizer, writer=writer)
        outputs.append((Path(config.out) / CANDIDATES_FILE).read_bytes())
    assert outputs[0] == outputs[1]
    assert {c["reason"] for c in read(tmp_path / "o1" / CANDIDATES_FILE)} == {"no_question"}


# ------------------------------------------------------------------------------------------------
# Continued pre-training
# ------------------------------------------------------------------------------------------------
def write_passages(path: Path) -> Path:
    return write_jsonl(
        path,
        [
            {"id": f"p{i}", "text": " ".join(f"w{(7 * i + k) % 150 + 10}" for k in range(12))}
            for i in range(6)
        ],
    )


def test_cpt_examples_read_passages_or_contexts(tmp_path):
    from mixsd.training.cpt import cpt_examples, passage_texts

    corpus = write_jsonl(
        tmp_path / "train.jsonl",
        [
            {"prompt": "q1", "answer": "a", "context": "w10 w11"},
            {"prompt": "q2", "answer": "b", "context": "w10 w11"},  # the same passage: trained once
            {"prompt": "q3", "answer": "c", "context": "w12"},
        ],
    )
    assert passage_texts(corpus) == ["w10 w11", "w12"]
    examples = cpt_examples(write_passages(tmp_path / "p.jsonl"), word_tokenizer())
    assert len(examples) == 6 and examples[0]["input_ids"] == examples[0]["labels"]
    with pytest.raises(InputError, match="longer than the model's context \\(4\\)"):
        cpt_examples(tmp_path / "p.jsonl", word_tokenizer(), context_limit=4)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "w1"}, {"text": ""}])
    with pytest.raises(InputError, match="bad.jsonl, line 2, field 'text'"):
        passage_texts(bad)


def test_cpt_training_lowers_the_passages_nll(tmp_path):
    from mixsd.training.cpt import cpt_examples, passage_nll
    from mixsd.training.train import TrainConfig, train

    passages = write_passages(tmp_path / "passages.jsonl")
    tokenizer = word_tokenizer()
    base = make_word_model(WORDS, max_positions=64)
    examples = cpt_examples(passages, tokenizer)
    before = passage_nll(base, examples, pad_id=0)
    config = TrainConfig(
        model="tiny",
        out=str(tmp_path / "run"),
        method="cpt",
        corpus=str(passages),
        epochs=4,
        lr=1e-2,
        batch_size=3,
        save_every=-1,
        progress=False,
    )
    summary = train(config, model=copy.deepcopy(base), tokenizer=tokenizer)
    assert summary["history"][-1]["tokens"] == 4 * 6 * 11  # every token after the first, every epoch
    from transformers import AutoModelForCausalLM

    after = passage_nll(AutoModelForCausalLM.from_pretrained(summary["model_dir"]), examples, pad_id=0)
    assert after < before - 1.0, (before, after)
    with pytest.raises(InputError, match="--method cpt needs --corpus"):
        TrainConfig(model="tiny", out=str(tmp_path / "r2"), method="cpt")


def test_tiny_grid_with_cpt_on_a_documents_folder(tmp_path, tiny_model_dir):
    """A documents corpus in a grid: base and cpt cells; cpt trains on documents/passages.jsonl."""
    from mixsd.experiments.experiment import load_experiment, run_experiment

    tokenizer = make_tiny_tokenizer()
    corpus = tmp_path / "corpus"
    (tmp_path / "docs.md").write_text(f"{ALPHA}\n\n{BETA}\n")
    config = DocumentsConfig(model="unused", inputs=str(tmp_path / "docs.md"), out=str(corpus), questions=2)
    build_documents(config, tokenizer=tokenizer, writer=ScriptedWriter(SCRIPT))
    grid = {
        "name": "docs",
        "model": str(tiny_model_dir),
        "out": str(tmp_path / "run"),
        "corpus": {"generator": "folder", "path": str(corpus)},
        "methods": ["base", "cpt"],
        "train": {"epochs": 1, "batch_size": 2, "progress": False},
        "eval": {"max_new_tokens": 4},
        "retention": {"limit": 2, "max_new_tokens": 4, "probes": False},
        "analyses": {"fisher_samples": 2},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    experiment = load_experiment(path)
    assert [c.name for c in experiment.cells] == ["base", "cpt-s0"]
    result = run_experiment(experiment, show_progress=False)
    run_config = json.loads((tmp_path / "run" / "cells" / "cpt-s0" / "train" / "run_config.json").read_text())
    assert run_config["config"]["method"] == "cpt"
    assert run_config["config"]["corpus"] == str(corpus / PASSAGES_FILE)
    rows = {row["cell"]: row for row in result["rows"]}
    assert set(rows) == {"base", "cpt-s0"}
    assert rows["cpt-s0"]["train_squad_f1"] is not None and "heldout_squad_em" in rows["base"]
