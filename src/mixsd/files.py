"""Reading and writing the project's files: JSONL with precise errors, atomic writes, checksums.

Every stage reads its input through `read_jsonl` (so a bad line is reported with file, line and field)
and writes its final output through `atomic_write_*` (so a reader never sees half a file).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

_UMASK = os.umask(0)
os.umask(_UMASK)


class InputError(ValueError):
    """Bad user input. The message names the file, the line (1-based) and the field where known."""

    def __init__(
        self,
        message: str,
        path: str | os.PathLike | None = None,
        line: int | None = None,
        field: str | None = None,
    ):
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")
        self.path, self.line, self.field = path, line, field


def read_jsonl(
    path: str | os.PathLike, on_error: Callable[[str, int], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line.

    A line that is not a JSON object raises InputError, or, when `on_error` is given, is reported to
    `on_error(message, line)` and skipped (importers use this for --skip-bad).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                problem = (
                    None if isinstance(obj, dict) else f"expected a JSON object, got {type(obj).__name__}"
                )
            except json.JSONDecodeError as err:
                problem = f"invalid JSON ({err.msg} at column {err.colno})"
            if problem is None:
                yield line_no, obj
            elif on_error is None:
                raise InputError(problem, path, line_no)
            else:
                on_error(problem, line_no)


def dumps(obj: Any) -> str:
    """One canonical JSON line: same object, same bytes, on every machine."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(dumps(row) + "\n" for row in rows))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


class JournalWriter:
    """Append-only JSONL journal that survives `kill -9`: each batch of lines is flushed and fsynced.

    A crash can leave at most one truncated last line; `read_journal` drops it.
    """

    def __init__(self, path: str | os.PathLike, header: dict[str, Any] | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = self.path.open("a", encoding="utf-8")
        if fresh and header is not None:
            self.write([header])

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(dumps(row) + "\n" for row in rows)
        if text:
            self._handle.write(text)
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JournalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a journal written by JournalWriter, repairing a torn last line left by a crash."""
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    if tail:  # the process died mid-line: cut the file back to its last complete line
        with path.open("r+b") as handle:
            handle.truncate(len(raw) - len(tail))
    rows = []
    for line in complete:
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a torn line that later got a newline appended; stop there
                break
    return rows


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
