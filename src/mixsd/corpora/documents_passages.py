"""Documents into passages for `mixsd corpus documents` (mixsd.corpora.documents): files and folders read
into paragraphs (no model, no tokenizer), then paragraphs cut into passages within a token budget.

Bad input (an empty, binary or non-UTF-8 file, a bad JSONL line, a sentence longer than the budget) goes to
`Skips`: an InputError naming the file and position, or with --skip-bad a skip listed in the manifest."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, read_jsonl, sha256_text

MAX_LISTED_SKIPS = 200
SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".jsonl": "jsonl"}


# ---------------------------------------------------------------------------------------------------
# Reading documents into paragraphs (no model, no tokenizer)
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Paragraph:
    source: str  # the file as named relative to the input given (no absolute paths: same ids everywhere)
    position: str  # where it starts: "line 12", "line 3, paragraph 2" (JSONL), or a SQuAD paragraph id
    text: str
    title: str | None = None
    line: int | None = None  # for error messages


class Skips:
    """Bad input: raise an InputError naming file and position, or (--skip-bad) record it and go on."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.count = 0
        self.listed: list[dict[str, Any]] = []

    def bad(self, message: str, path: Path | str, line: int | None = None) -> None:
        if not self.skip_bad:
            raise InputError(message, path, line)
        self.note(message, path, line)

    def note(self, message: str, path: Path | str, line: int | None = None) -> None:
        """Record a skip that is no error (an unsupported file in a folder, a heading-sized paragraph)."""
        self.count += 1
        if len(self.listed) < MAX_LISTED_SKIPS:
            entry: dict[str, Any] = {"file": str(path), "reason": message}
            if line is not None:
                entry["line"] = line
            self.listed.append(entry)


def input_files(inputs: str, skips: Skips) -> list[tuple[Path, str]]:
    """(path, name) of every document: a file as given, a folder's supported files (recursively, sorted)."""
    files: list[tuple[Path, str]] = []
    for item in (part.strip() for part in inputs.split(",")):
        if not item:
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            for file in found:
                relative = file.relative_to(path)
                if any(part.startswith(".") for part in relative.parts):
                    continue  # hidden files and folders (.git, editor files) are no documents
                name = f"{path.name}/{relative.as_posix()}"
                if file.suffix.lower() in SUFFIXES:
                    files.append((file, name))
                else:
                    skips.note(f"unsupported file type '{file.suffix}' (expected .txt, .md or .jsonl)", name)
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                skips.bad(f"unsupported file type '{path.suffix}' (expected .txt, .md or .jsonl)", path)
                continue
            files.append((path, path.name))
        else:
            raise InputError("file or folder not found", path)
    return files


def _decode(raw: bytes, path: Path, skips: Skips) -> str | None:
    """The file's text, or None (recorded) when it is empty, binary or not UTF-8."""
    if not raw.strip():
        skips.bad("empty file", path)
        return None
    if b"\x00" in raw[:8192]:
        skips.bad("binary file (NUL bytes), not text", path)
        return None
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        skips.bad(f"not UTF-8 text (byte 0x{raw[err.start]:02x})", path, line)
        return None


def text_paragraphs(text: str, markdown: bool, first_line: int = 1) -> Iterator[tuple[int, str, str | None]]:
    """(start line, paragraph, title) for each paragraph: lines up to a blank line, joined by spaces.
    Markdown: a heading ends a paragraph and becomes the title of those that follow; fenced code is skipped."""
    lines: list[str] = []
    start, title, fenced = first_line, None, False
    for number, line in enumerate(text.splitlines(), start=first_line):
        stripped = line.strip()
        if markdown and stripped.startswith(("```", "~~~")):
            fenced = not fenced
            stripped = ""
        elif markdown and fenced:
            continue
        heading = markdown and re.match(r"#{1,6}\s+(.*)", stripped)
        if not stripped or heading:
            if lines:
                yield start, " ".join(lines), title
                lines = []
            if heading:
                title = heading.group(1).strip(" #") or title
            continue
        if not lines:
            start = number
        lines.append(stripped)
    if lines:
        yield start, " ".join(lines), title


def read_document(path: Path, name: str, skips: Skips) -> list[Paragraph]:
    """The paragraphs of one file; bad files and lines go to `skips` (an error, or a recorded skip)."""
    raw = path.read_bytes()
    kind = SUFFIXES[path.suffix.lower()]
    text = _decode(raw, path, skips)
    if text is None:
        return []
    paragraphs: list[Paragraph] = []
    if kind != "jsonl":
        for line, body, title in text_paragraphs(text, kind == "markdown"):
            paragraphs.append(Paragraph(name, f"line {line}", body, title, line))
        return paragraphs
    for line, obj in read_jsonl(path, on_error=lambda message, line: skips.bad(message, path, line)):
        body, title = obj.get("text"), obj.get("title")
        if not isinstance(body, str) or not body.strip():
            skips.bad("missing or empty field 'text'" if not body else "field 'text' is not text", path, line)
            continue
        if title is not None and not isinstance(title, str):
            skips.bad("field 'title' is not text", path, line)
            continue
        label = obj.get("id")
        where = (
            f"id {label}" if isinstance(label, str | int) and not isinstance(label, bool) else f"line {line}"
        )
        parts = list(text_paragraphs(body, markdown=False))
        for part, (_, paragraph, _) in enumerate(parts, start=1):
            position = where if len(parts) == 1 else f"{where}, paragraph {part}"
            paragraphs.append(Paragraph(name, position, paragraph, title, line))
    return paragraphs


# ---------------------------------------------------------------------------------------------------
# Passages: paragraphs within the token budget
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Passage:
    id: str
    source: str
    position: str
    title: str | None
    text: str
    tokens: int

    def to_json(self) -> dict[str, Any]:
        row = {"id": self.id, "source": self.source, "position": self.position, "text": self.text}
        return {**row, "tokens": self.tokens, **({"title": self.title} if self.title else {})}


def passage_id(source: str, position: str, text: str) -> str:
    """Stable across machines and runs: a hash of where the passage comes from and what it says."""
    return "p-" + sha256_text(f"{source}\x00{position}\x00{text}")[:12]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def split_passages(
    paragraphs: list[Paragraph],
    count_tokens: Callable[[str], int],
    budget: int,
    min_words: int,
    skips: Skips,
) -> list[Passage]:
    """One passage per paragraph within `budget` tokens; a longer one is cut at sentence ends into parts
    that fit (a single sentence over the budget is bad input). Paragraphs under `min_words` are skipped."""
    passages: list[Passage] = []
    for paragraph in paragraphs:
        if len(paragraph.text.split()) < min_words:
            skips.note(
                f"paragraph at {paragraph.position} has fewer than {min_words} words", paragraph.source
            )
            continue
        size = count_tokens(paragraph.text)
        if size <= budget:
            pieces = [(paragraph.position, paragraph.text, size)]
        else:
            pieces, current = [], []
            for sentence in sentences(paragraph.text):
                joined = " ".join([*current, sentence])
                if current and count_tokens(joined) > budget:
                    pieces.append(" ".join(current))
                    current = [sentence]
                else:
                    current.append(sentence)
            if current:
                pieces.append(" ".join(current))
            too_long = [p for p in pieces if count_tokens(p) > budget]
            if too_long:
                skips.bad(
                    f"a sentence of {count_tokens(too_long[0])} tokens at {paragraph.position} is longer than "
                    f"--max-passage-tokens {budget}",
                    paragraph.source,
                    paragraph.line,
                )
                continue
            pieces = [
                (f"{paragraph.position}, part {i}", p, count_tokens(p)) for i, p in enumerate(pieces, 1)
            ]
        for position, text, tokens in pieces:
            pid = passage_id(paragraph.source, position, text)
            passages.append(Passage(pid, paragraph.source, position, paragraph.title, text, tokens))
    return passages
