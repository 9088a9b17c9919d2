"""Import your own question/answer knowledge into a corpus folder that `mixsd mix` reads unchanged.

    mixsd corpus import facts.jsonl --format qa-jsonl --out data/mine
    mixsd corpus import facts.csv --format csv --question-field q --answer-field a --out data/mine
    mixsd corpus import simple_qa_test_set.csv --format simpleqa --out data/simpleqa
    mixsd corpus import MQuAKE-CF-3k.json --format mquake --limit 100 --out data/mquake

Formats:
    qa-jsonl  one JSON object per line with a question and an answer field (names configurable)
    csv       a CSV file with a header row, same field options
    simpleqa  the SimpleQA CSV as its authors released it (columns metadata, problem, answer)
    mquake    MQuAKE-CF JSON: each case's requested rewrites become atomic facts with their new answers
              (train.jsonl); its multi-hop questions become a compositional test whose answer is the new
              answer (compositional.jsonl), with the new single hops as the step-by-step target

Every record gets `check` = the bare gold answer. With --answer-style boxed (default) the prompt asks for
the final answer in \\boxed{} and the answer is "The answer is X. \\boxed{X}", as in KGFact; with raw the
question and answer are kept as written. manifest.json names how `mix` and `eval` match the answers
(`answer_match`; --answer-match, default auto: number when every answer is a number, else entity).

Malformed rows, missing or empty fields and duplicate questions raise an InputError naming the file and
line (JSON: the case); with --skip-bad they are skipped instead and listed in manifest.json.
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mixsd.core.answers import parse_number
from mixsd.core.files import InputError, atomic_write_jsonl, read_jsonl, read_text, sha256_file
from mixsd.core.options import check_choices, check_distinct, check_range
from mixsd.corpora._manifest import write_manifest

GENERATOR = "mixsd.corpora.importers"
VERSION = 1
MAX_LISTED_SKIPS = 200  # the manifest lists at most this many skipped rows (all are counted)


@dataclass
class ImportConfig:
    file: str = field(metadata={"help": "The file to import."})
    out: str = field(
        metadata={
            "help": "Folder to write train.jsonl (+ compositional.jsonl for mquake) and manifest.json into."
        }
    )
    format: Literal["qa-jsonl", "csv", "simpleqa", "mquake"] = field(
        default="qa-jsonl",
        metadata={
            "help": "qa-jsonl: JSON lines; csv: CSV with a header; simpleqa: the SimpleQA CSV; mquake: MQuAKE-CF JSON."
        },
    )
    question_field: str = field(
        default="question", metadata={"help": "Question field/column (qa-jsonl, csv)."}
    )
    answer_field: str = field(default="answer", metadata={"help": "Answer field/column (qa-jsonl, csv)."})
    id_field: str = field(
        default="id",
        metadata={"help": "Optional id field/column (qa-jsonl, csv); ids are generated when it is absent."},
    )
    answer_style: Literal["boxed", "raw"] = field(
        default="boxed",
        metadata={
            "help": "boxed: prompt asks for \\boxed{}, answer 'The answer is X. \\boxed{X}'; raw: keep the text as is."
        },
    )
    skip_bad: bool = field(
        default=False,
        metadata={
            "help": "Skip malformed, empty or duplicate rows (counted and "
            "listed in manifest.json) instead of stopping."
        },
    )
    limit: int | None = field(
        default=None, metadata={"help": "Import at most this many rows (mquake: cases)."}
    )
    answer_match: Literal["auto", "entity", "exact", "number"] = field(
        default="auto",
        metadata={
            "help": "How mix and eval match answers of this corpus (written to manifest.json): entity (the answer "
            "appears as whole words), exact (the final answer equals it), number (the final number equals it); "
            "auto: number when every answer is a number, else entity."
        },
    )

    def __post_init__(self) -> None:  # refuse bad options before any file is written (issue 10)
        check_choices(self)
        check_range("limit", self.limit, 1, integer=True, optional=True)
        written = ("train.jsonl", "compositional.jsonl", "manifest.json")
        check_distinct({f"out ({name})": Path(self.out) / name for name in written}, {"file": self.file})


@dataclass
class _Row:
    """One question/answer pair read from the source, with where it came from (for error messages)."""

    question: Any
    answer: Any
    id: Any = None
    line: int | None = None
    where: str | None = None  # a field path inside a JSON document, when there are no useful lines
    steps: str | None = None  # step-by-step text before the final answer (mquake multi-hop)


class _Skips:
    def __init__(self, path: Path, skip_bad: bool):
        self.path, self.skip_bad = path, skip_bad
        self.count = 0
        self.listed: list[dict[str, Any]] = []

    def bad(self, message: str, line: int | None = None, where: str | None = None) -> None:
        """Raise, or record the problem and let the caller drop the row."""
        if not self.skip_bad:
            raise InputError(message, self.path, line, where)
        self.count += 1
        if len(self.listed) < MAX_LISTED_SKIPS:
            self.listed.append(
                {k: v for k, v in (("line", line), ("field", where), ("reason", message)) if v is not None}
            )


def _boxable(answer: str) -> bool:
    depth = 0
    for c in answer:
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def make_record(question: str, answer: str, record_id: str, style: str, steps: str | None = None) -> dict:
    if style == "raw":
        return {
            "id": record_id,
            "prompt": question,
            "answer": answer if steps is None else f"{steps} {answer}",
            "check": answer,
        }
    body = f"The answer is {answer}. \\boxed{{{answer}}}"
    return {
        "id": record_id,
        "prompt": f"{question} Put the final answer in \\boxed{{}}.",
        "answer": body if steps is None else f"{steps} {body}",
        "check": answer,
    }


def _convert(rows: Iterator[_Row], skips: _Skips, style: str, prefix: str, limit: int | None) -> list[dict]:
    """Validate rows (types, emptiness, duplicates) and turn them into corpus records."""
    records: list[dict] = []
    first_seen: dict[str, str] = {}
    ids: dict[str, str] = {}
    for row in rows:
        if limit is not None and len(records) >= limit:
            break
        here = f"line {row.line}" if row.line is not None else (row.where or "?")
        problem = None
        for name, value in (("question", row.question), ("answer", row.answer)):
            if not isinstance(value, str):
                problem = (
                    f"{name} is missing"
                    if value is None
                    else f"{name}: expected text, got {type(value).__name__}"
                )
                break
            if not value.strip():
                problem = f"empty {name}"
                break
        if problem is None and style == "boxed" and not _boxable(row.answer):
            problem = "answer has unbalanced braces and cannot go inside \\boxed{}; use --answer-style raw"
        if problem is not None:
            skips.bad(problem, row.line, row.where)
            continue
        question, answer = " ".join(row.question.split()), row.answer.strip()
        key = question.lower()
        if key in first_seen:
            skips.bad(f"duplicate question (first at {first_seen[key]})", row.line, row.where)
            continue
        record_id = f"{prefix}-{len(records):05d}" if row.id in (None, "") else str(row.id)
        if record_id in ids:
            skips.bad(f"duplicate id '{record_id}' (first at {ids[record_id]})", row.line, row.where)
            continue
        first_seen[key] = ids[record_id] = here
        records.append(make_record(question, answer, record_id, style, row.steps))
    return records


# ---------------------------------------------------------------------------------------------------
# Readers: each yields _Row objects and reports malformed rows through `skips`.
# ---------------------------------------------------------------------------------------------------


def _read_qa_jsonl(path: Path, config: ImportConfig, skips: _Skips) -> Iterator[_Row]:
    for line_no, obj in read_jsonl(path, on_error=skips.bad):
        missing = [f for f in (config.question_field, config.answer_field) if f not in obj]
        if missing:
            skips.bad(
                f"missing field '{missing[0]}' (fields present: {', '.join(sorted(obj)) or 'none'})",
                line_no,
                missing[0],
            )
            continue
        yield _Row(obj[config.question_field], obj[config.answer_field], obj.get(config.id_field), line_no)


def _csv_rows(path: Path, skips: _Skips, required: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    read_text(path)  # a byte that is not UTF-8 is reported with its line, before the CSV reader meets it
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames
        if not header:
            raise InputError("empty file: expected a header row", path, 1)
        absent = [c for c in required if c not in header]
        if absent:
            raise InputError(
                f"the header has no column '{absent[0]}' (columns: {', '.join(header)})", path, 1, absent[0]
            )
        start = 2
        try:
            for row in reader:
                line = start
                start = reader.line_num + 1  # a quoted field may span lines: report where the row began
                if None in row:
                    skips.bad(f"{len(header) + len(row[None])} fields, the header has {len(header)}", line)
                    continue
                if any(row[c] is None for c in required):
                    skips.bad(
                        f"{sum(v is not None for v in row.values())} fields, the header has {len(header)}",
                        line,
                    )
                    continue
                yield line, row
        except csv.Error as err:
            raise InputError(f"malformed CSV ({err})", path, reader.line_num) from None


def _read_csv(path: Path, config: ImportConfig, skips: _Skips) -> Iterator[_Row]:
    for line, row in _csv_rows(path, skips, [config.question_field, config.answer_field]):
        yield _Row(row[config.question_field], row[config.answer_field], row.get(config.id_field), line)


def _read_simpleqa(path: Path, config: ImportConfig, skips: _Skips) -> Iterator[_Row]:
    for index, (line, row) in enumerate(_csv_rows(path, skips, ["problem", "answer"])):
        # Released rows carry a Python-literal metadata dict (topic, answer_type, urls); an unreadable one
        # means the row was damaged, since the columns are otherwise plain text.
        metadata = row.get("metadata")
        if metadata:
            try:
                ast.literal_eval(metadata)
            except (ValueError, SyntaxError):
                skips.bad("unreadable metadata column", line, "metadata")
                continue
        yield _Row(row["problem"], row["answer"], f"simpleqa-{index:04d}", line)


def _get(obj: Any, *keys: Any) -> Any:
    for key in keys:
        if isinstance(key, int):
            obj = obj[key] if isinstance(obj, list) and -len(obj) <= key < len(obj) else None
        else:
            obj = obj.get(key) if isinstance(obj, dict) else None
        if obj is None:
            return None
    return obj


def _load_mquake(path: Path) -> list[Any]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON ({err.msg} at column {err.colno})", path, err.lineno) from None
    if not isinstance(data, list):
        raise InputError(f"expected a JSON list of cases, got {type(data).__name__}", path)
    return data


def _mquake_rows(cases: list[Any], skips: _Skips, limit: int | None) -> tuple[list[_Row], list[_Row], int]:
    """Atomic facts from requested rewrites, and multi-hop questions. Cases share rewrites: an identical
    rewrite (same question, same new answer) is one fact, counted as shared; a conflicting one is an error."""
    facts: list[_Row] = []
    multihop: list[_Row] = []
    by_question: dict[str, tuple[str, str]] = {}
    shared = 0
    for i, case in enumerate(cases[:limit] if limit is not None else cases):
        where = f"[{i}]"
        if not isinstance(case, dict):
            skips.bad(f"expected an object, got {type(case).__name__}", where=where)
            continue
        case_id = case.get("case_id", i)
        rewrites = case.get("requested_rewrite")
        if not isinstance(rewrites, list) or not rewrites:
            skips.bad("missing or empty requested_rewrite", where=f"{where}.requested_rewrite")
            continue
        for j, rewrite in enumerate(rewrites):
            spot = f"{where}.requested_rewrite[{j}]"
            question, answer = _get(rewrite, "question"), _get(rewrite, "target_new", "str")
            if isinstance(question, str) and isinstance(answer, str):
                key = " ".join(question.split()).lower()
                if key in by_question:
                    if by_question[key][0].strip().lower() == answer.strip().lower():
                        shared += 1
                        continue
                    skips.bad(
                        f"conflicting rewrite: the same question has new answer '{answer}' here and "
                        f"'{by_question[key][0]}' at {by_question[key][1]}",
                        where=spot,
                    )
                    continue
                by_question[key] = (answer, spot)
            facts.append(_Row(question, answer, f"mquake-{case_id}-rewrite-{j}", where=spot))
        new_answer = case.get("new_answer")
        hops = case.get("new_single_hops") or []
        steps = (
            " ".join(
                f"{h['cloze'].strip()} {h['answer'].strip()}."
                for h in hops
                if isinstance(h, dict)
                and isinstance(h.get("cloze"), str)
                and isinstance(h.get("answer"), str)
            )
            or None
        )
        questions = case.get("questions")
        if not isinstance(questions, list):
            skips.bad("missing questions list", where=f"{where}.questions")
            continue
        for k, question in enumerate(questions):
            multihop.append(
                _Row(
                    question,
                    new_answer,
                    f"mquake-{case_id}-multihop-{k}",
                    where=f"{where}.questions[{k}]",
                    steps=steps,
                )
            )
    return facts, multihop, shared


def import_corpus(config: ImportConfig) -> dict:
    """Convert `config.file` into a corpus folder and return its manifest."""
    path, out = Path(config.file), Path(config.out)
    if not path.is_file():
        raise InputError("file not found", path)
    if config.limit is not None and config.limit < 1:
        raise InputError("--limit must be at least 1")
    skips = _Skips(path, config.skip_bad)
    outputs: dict[str, list[dict]] = {}
    extra: dict[str, Any] = {}
    if config.format == "mquake":
        facts, multihop, shared = _mquake_rows(_load_mquake(path), skips, config.limit)
        outputs["train.jsonl"] = _convert(iter(facts), skips, config.answer_style, "mquake", None)
        outputs["compositional.jsonl"] = _convert(
            iter(multihop), skips, config.answer_style, "mquake-multihop", None
        )
        extra["shared_rewrites"] = shared
    else:
        reader = {"qa-jsonl": _read_qa_jsonl, "csv": _read_csv, "simpleqa": _read_simpleqa}[config.format]
        outputs["train.jsonl"] = _convert(
            reader(path, config, skips), skips, config.answer_style, path.stem, config.limit
        )
    empty = [name for name, rows in outputs.items() if not rows]
    if "train.jsonl" in empty:
        raise InputError(
            "no usable records" + (f" ({skips.count} rows skipped)" if skips.count else ""), path
        )
    for name, rows in outputs.items():
        if rows:
            atomic_write_jsonl(out / name, rows)
    return write_manifest(
        out,
        GENERATOR,
        VERSION,
        [n for n, rows in outputs.items() if rows],
        format=config.format,
        answer_style=config.answer_style,
        answer_match=_answer_match(config.answer_match, outputs["train.jsonl"]),
        source={"name": path.name, "sha256": sha256_file(path)},
        skipped={"count": skips.count, "rows": skips.listed},
        **extra,
    )


def _answer_match(choice: str, rows: list[dict]) -> str:
    """The corpus's match mode: the chosen one, or for `auto` number when every answer is a number."""
    if choice != "auto":
        return choice
    numeric = bool(rows) and all(parse_number(str(row["check"])) is not None for row in rows)
    return "number" if numeric else "entity"


def import_command(config: ImportConfig) -> dict:
    manifest = import_corpus(config)
    counts = ", ".join(f"{name}: {entry['records']}" for name, entry in manifest["files"].items())
    skipped = manifest["skipped"]["count"]
    print(
        f"imported {config.file} ({config.format}) into {config.out}: {counts}"
        + (f"; skipped {skipped} bad rows (listed in manifest.json)" if skipped else "")
    )
    return manifest
