"""Reading and writing the project's files: JSONL with precise errors, atomic writes, checksums.

Every stage reads its input through `read_jsonl` (so a bad line is reported with file, line and field)
and writes its final output through `atomic_write_*` (so a reader never sees half a file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

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
        self.message = message  # without the file, line and field (to re-raise it with more of them)


class LockHeld(InputError):
    """Another live run holds an output's lock; `holder` describes it (pid, host, start, command)."""

    def __init__(self, message: str, path: str | os.PathLike, holder: str):
        super().__init__(message, path)
        self.holder = holder


def input_file_problem(path: str | os.PathLike) -> str | None:
    """What keeps `path` from being read as an input file, in words ("is a folder, not a file", "is a
    symbolic link loop" ...), or None when it is a regular file. Every "file not found" check asks this,
    so a folder or a broken link is never reported as missing."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "is a symbolic link loop"
        if os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno == errno.ENOTDIR:
            return "not found (a part of the path is a file, not a folder)"
        if err.errno in (errno.EACCES, errno.EPERM):
            return f"cannot be read ({err.strerror}: check the permissions of its folders)"
        return "file not found" if err.errno == errno.ENOENT else f"cannot be read ({err.strerror})"
    if stat.S_ISDIR(mode):
        return "is a folder, not a file"
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    return None


def require_input_file(path: str | os.PathLike, missing: str = "file not found") -> Path:
    """`path` as a Path when it is a readable regular file, else InputError naming it and the problem
    (`missing` replaces the plain "file not found", e.g. to say what creates the file)."""
    problem = input_file_problem(path)
    if problem is not None:
        raise InputError(missing if problem == "file not found" else problem, path)
    return Path(path)


def read_input_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of an input file; any failure is an InputError that names the file as an input (so a
    permission problem is never taken for an output's)."""
    require_input_file(path)
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise InputError(f"cannot read this input ({err.strerror or err})", path) from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file holding one object; InputError names the file (and line) when it is missing or bad."""
    path = require_input_file(path)
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path, err.lineno) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object", path)
    return data


def read_jsonl(
    path: str | os.PathLike, on_error: Callable[[str, int], None] | None = None
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line.

    A line that is not a JSON object raises InputError, or, when `on_error` is given, is reported to
    `on_error(message, line)` and skipped (importers use this for --skip-bad).
    """
    path = require_input_file(path)
    try:
        handle = path.open("rb")
    except OSError as err:
        raise InputError(f"cannot read this input ({err.strerror or err})", path) from None
    with handle:
        # Bytes in, decoded line by line: a non-UTF-8 byte is then reported with its line, not as a bare
        # UnicodeDecodeError from somewhere inside the file. A BOM on the first line is tolerated.
        for line_no, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problem = f"not UTF-8 text (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line)"
                if on_error is None:
                    raise InputError(problem, path, line_no) from None
                on_error(problem, line_no)
                continue
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


def read_text(path: str | os.PathLike) -> str:
    """A whole UTF-8 text file (a BOM is dropped); a byte that is not UTF-8 raises InputError with its line."""
    raw = read_input_bytes(path)
    raw = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"not UTF-8 text (byte 0x{raw[err.start]:02x})", path, line) from None


@dataclasses.dataclass(frozen=True)
class YamlDocument:
    """A YAML file read strictly: its data (plain dicts, lists and scalars) and the line of every key.

    `lines` maps a key path, ("methods", 0, "mixsd", "lam"), to the 1-based line where that key (or list
    item) is written; `line` finds it for a path or, for a value the file does not spell out, the line
    of its nearest written parent."""

    path: Path
    data: Any
    lines: dict[tuple[str | int, ...], int]

    def line(self, key_path: tuple[str | int, ...]) -> int | None:
        for end in range(len(key_path), 0, -1):
            if key_path[:end] in self.lines:
                return self.lines[key_path[:end]]
        return None


def read_yaml(path: str | os.PathLike) -> YamlDocument:
    """Read a YAML file strictly: a key written twice in one mapping is an InputError naming the key as
    written and both lines (PyYAML would keep the last silently), and so is invalid YAML or text that is
    not UTF-8. Only plain data is built (yaml.SafeLoader: no tags that run code)."""

    path = Path(path)
    text = read_text(path)

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *defaults` is meant to be overridden
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = seen.get(key)
                    except TypeError:  # an unhashable key: SafeLoader reports it below
                        continue
                    if first is not None:
                        raise InputError(
                            f"key '{key_node.value}' is written twice in one mapping (first on line "
                            f"{first}); YAML would silently keep only the last",
                            path,
                            key_node.start_mark.line + 1,
                        )
                    seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    loader = StrictLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
        lines: dict[tuple[str | int, ...], int] = {}
        _record_lines(loader, node, (), lines)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(
            f"invalid YAML: {getattr(err, 'problem', None) or err}", path, mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    return YamlDocument(path, data, lines)


def _record_lines(loader: Any, node: Any, key_path: tuple[str | int, ...], lines: dict) -> None:

    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = loader.construct_object(key_node, deep=True)
            lines[(*key_path, key)] = key_node.start_mark.line + 1
            _record_lines(loader, value_node, (*key_path, key), lines)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*key_path, index)] = item.start_mark.line + 1
            _record_lines(loader, item, (*key_path, index), lines)


def dumps(obj: Any) -> str:
    """One canonical JSON line: same object, same bytes, on every machine."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def naming(err: OSError, path: str | os.PathLike) -> OSError:
    """`err` with `path` as its file name when it has none (a write() failing for a full disk names nothing)."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, err.strerror, str(path))  # OSError() picks the subclass (PermissionError ...)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`.

    A missing parent folder is created. Any failure (read-only folder, full disk) leaves `path` as it was
    and raises an OSError that names `path`.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise naming(err, path) from err
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_copy(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy `source` byte for byte to `path` atomically (a temporary file renamed over it)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        shutil.copyfile(source, tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise naming(err, path) from err
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
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._handle = self.path.open("a", encoding="utf-8")
        except OSError as err:
            raise naming(err, self.path) from err
        if fresh and header is not None:
            self.write([header])

    def write(self, rows: Iterable[dict[str, Any]]) -> None:
        text = "".join(dumps(row) + "\n" for row in rows)
        if text:
            try:
                self._handle.write(text)
                self._handle.flush()
                os.fsync(self._handle.fileno())
            except OSError as err:
                raise naming(err, self.path) from err

    def close(self) -> None:
        try:
            self._handle.close()  # flushes what a failed write left in the buffer, and may fail the same way
        except OSError as err:
            raise naming(err, self.path) from err

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


# --------------------------------------------------------------------------------------------------
# One writer per output
# --------------------------------------------------------------------------------------------------
_HELD_LOCKS: dict[str, int] = {}  # lock file -> nesting depth, for the locks this process holds


def lock_path(output: str | os.PathLike) -> Path:
    """The lock file of an output file or folder: beside it, named after it (`out.jsonl.lock`, `run.lock`)."""
    output = Path(output)
    return output.with_name(output.name + ".lock")


def _lock_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is still writing its details
        return "details not yet written"


def live_lock_holder(output: str | os.PathLike) -> str | None:
    """Who holds the output's lock now (pid, host, start, command), or None when no live run does."""
    try:
        import fcntl  # POSIX only: elsewhere no lock is taken
    except ImportError:
        return None
    try:
        fd = os.open(lock_path(output), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _lock_holder(fd)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(output: str | os.PathLike, *, wait: bool = False) -> Iterator[Path]:
    """Hold the output's lock for the duration of the block; refuse at once if another run holds it
    (raise LockHeld), or with `wait`, wait for it to let go (shared inputs several workers need).

    The lock is an advisory `flock` on `<output>.lock`, which records the holder's pid, host, start time
    and command. The kernel drops a flock when its process dies, however it dies, so a lock file left by
    a killed run is simply taken over; a live holder makes this raise InputError naming it. Re-entering
    the lock of an output this process already holds nests. Under torchrun/accelerate only global rank 0
    takes the lock (the other ranks write their own journals under the main process's lock). Creating
    the lock file also proves, before any work, that the output's folder exists (it is created) and is
    writable.
    """
    try:
        import fcntl  # POSIX only: elsewhere no lock is taken
    except ImportError:  # not POSIX: no advisory locks; run unguarded rather than not at all
        yield lock_path(output)
        return
    lock = lock_path(output)
    key = os.path.realpath(lock)
    if key in _HELD_LOCKS or int(os.environ.get("RANK", "0") or 0) != 0:
        _HELD_LOCKS[key] = _HELD_LOCKS.get(key, 0) + 1
        try:
            yield lock
        finally:
            _HELD_LOCKS[key] -= 1
            if not _HELD_LOCKS[key]:
                del _HELD_LOCKS[key]
        return
    # Folders created for the output are removed again if the run fails before writing into them.
    created = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    fd = -1
    try:
        while True:
            # (again on each try: a holder we waited for removes the folders its own lock created)
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                if wait:
                    print(f"waiting for another run to finish {output} ({holder})", file=sys.stderr)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    os.close(fd)
                    fd = -1
                    raise LockHeld(
                        f"another run is writing this output ({holder}); wait for it to finish or "
                        f"choose another output (its lock file is {lock})",
                        output,
                        holder,
                    ) from None
            # Between our open and our flock the previous holder may have released and deleted the
            # file, and a third run created a new one: a lock on the deleted file guards nothing.
            try:
                current = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
            fd = -1
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv) or "python",
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    except OSError as err:
        if fd >= 0:
            os.close(fd)
        _remove_empty(created)
        raise naming(err, lock) from err
    except BaseException:
        _remove_empty(created)
        raise
    _HELD_LOCKS[key] = 1
    try:
        yield lock
    finally:
        del _HELD_LOCKS[key]
        # Delete before unlocking, so that no run can lock the file and then see it vanish.
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (innermost first) that are still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
