"""A resumable stage with a settings fingerprint: reuse an output only while it still follows its config.

Every step that writes a result (`mixsd mix`, `train`, `eval`, the analyses and each stage of an
experiment cell) describes itself as a `Stage`: its outputs, the settings that determine them, the
input files they were made from (hashed) and the stages upstream of it. The description is reduced to
one fingerprint (sha256 of its canonical JSON) and recorded beside the output when the stage finishes:

    {"state": "done", "fingerprint": ..., "description": {...}, "run_id": ..., "upstream_runs": {...}}

An output is *current* when every output path exists, the record says done with the same fingerprint,
every upstream stage is current, and every upstream is still the very run this one was made from
(`upstream_runs`): an upstream stage that was redone, even with the same settings, makes everything
downstream of it stale. `begin()` marks the record as running before any output is replaced, so a
crash between replacing an output and recording it never leaves an old record vouching for a new file.

The stage decides whether a *finished* output is current; resuming *within* an unfinished run (the
`mix`/`eval` journals, `train` checkpoints) stays with each command, which `status() == "resumable"`
tells it to keep and `"stale"` tells it to discard.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from mixsd import __version__
from mixsd.core.files import atomic_write_json, sha256_file, sha256_text

Status = Literal["current", "resumable", "stale", "missing"]
RECORD_SUFFIX = ".stage.json"

# sha256 of input files, keyed by (path, size, mtime): a stage chain hashes the same corpus many times.
_HASHES: dict[tuple[str, int, int], str] = {}


def canonical_json(obj: Any) -> str:
    """Same settings, same bytes: sorted keys, no spaces; paths and other objects as their text."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), default=str)


def file_hash(path: str | os.PathLike) -> str | None:
    """sha256 of a file (None when it does not exist), cached while its size and mtime stay the same."""
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def config_settings(config: Any, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """A config dataclass as settings, without the fields that do not change its output.

    The fields a config class names in `OMIT_WHILE_DEFAULT` (a class attribute, not a field) are left out
    while they hold their default: an option added after results were recorded then keeps those results
    current until someone uses it. (Not field metadata: HfArgumentParser passes that to argparse.)"""
    values = asdict(config) if is_dataclass(config) else dict(config)
    skip = set(ignore)
    if is_dataclass(config):
        omit = set(getattr(config, "OMIT_WHILE_DEFAULT", ()))
        skip |= {f.name for f in fields(config) if f.name in omit and values[f.name] == f.default}
    return {key: value for key, value in values.items() if key not in skip}


class Stage:
    """One resumable step: see the module docstring.

    name      short label, used in the description and by downstream stages
    outputs   files or folders the stage produces; all must exist for it to be current
    settings  JSON-able values that determine the outputs (nothing that only changes speed), or a
              function returning them, called whenever the fingerprint is taken (for settings that
              embed hashes of files an upstream stage has yet to write)
    inputs    files whose content determines the outputs (hashed; a missing file hashes to None)
    upstream  stages whose outputs this one consumes
    record    where the fingerprint is recorded; default `<first output>.stage.json` beside it
    version   the code version that makes the outputs (None: not part of the fingerprint)
    """

    def __init__(
        self,
        name: str,
        outputs: str | os.PathLike | Sequence[str | os.PathLike],
        settings: dict[str, Any] | Callable[[], dict[str, Any]],
        *,
        inputs: Iterable[str | os.PathLike] = (),
        upstream: Sequence[Stage] = (),
        record: str | os.PathLike | None = None,
        version: str | None = __version__,
    ):
        if isinstance(outputs, str | os.PathLike):
            outputs = [outputs]
        self.name = name
        self.outputs = [Path(p) for p in outputs]
        if not self.outputs:
            raise ValueError("a stage needs at least one output")
        self.settings = settings
        self.inputs = [Path(p) for p in inputs]
        self.upstream = list(upstream)
        first = self.outputs[0]
        self.record = Path(record) if record is not None else first.with_name(first.name + RECORD_SUFFIX)
        self.version = version
        self._started: float | None = None

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, {str(self.outputs[0])!r})"

    # ---- what the stage is ------------------------------------------------------------------------
    def description(self) -> dict[str, Any]:
        # Settings go through JSON once so that tuples/lists and paths/strings compare equal to what a
        # record read back from disk holds.
        return {
            "stage": self.name,
            "settings": json.loads(
                canonical_json(self.settings() if callable(self.settings) else self.settings)
            ),
            "inputs": {str(path): file_hash(path) for path in self.inputs},
            "upstream": {stage.name: stage.fingerprint() for stage in self.upstream},
            "version": self.version,
        }

    def fingerprint(self) -> str:
        return sha256_text(canonical_json(self.description()))

    # ---- what was recorded ------------------------------------------------------------------------
    def recorded(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.record.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # absent, unreadable or torn: nothing is vouched for
            return None
        return record if isinstance(record, dict) else None

    def run_id(self) -> str | None:
        """The id of the finished run whose outputs are on disk (None when not finished)."""
        record = self.recorded()
        return record.get("run_id") if record and record.get("state") == "done" else None

    def status(self) -> Status:
        """current: reuse the outputs. resumable: an unfinished run of these very settings (keep its
        journal/checkpoints). stale: outputs or a run of other settings (discard them). missing: nothing."""
        record = self.recorded()
        if record is None:
            return "stale" if any(path.exists() for path in self.outputs) else "missing"
        if record.get("fingerprint") != self.fingerprint():
            return "stale"
        if record.get("state") == "running":
            return "resumable"
        if record.get("state") != "done" or not all(path.exists() for path in self.outputs):
            return "stale"
        upstream_runs = {stage.name: stage.run_id() for stage in self.upstream}
        if record.get("upstream_runs") != upstream_runs:
            return "stale"
        if not all(stage.is_current() for stage in self.upstream):
            return "stale"
        return "current"

    def is_current(self) -> bool:
        return self.status() == "current"

    def changes(self) -> list[str]:
        """What differs from the recorded run, for messages: e.g. ['settings.lr', 'upstream.train']."""
        record = self.recorded()
        if record is None:
            return ["no record"]
        old, new = record.get("description") or {}, self.description()
        changed = []
        for part in ("settings", "inputs", "upstream"):
            before, after = old.get(part) or {}, new[part]
            changed += [
                f"{part}.{key}"
                for key in sorted(set(before) | set(after))
                if before.get(key) != after.get(key)
            ]
        if old.get("version") != new["version"]:
            changed.append("version")
        if not changed:
            upstream_runs = {stage.name: stage.run_id() for stage in self.upstream}
            changed += [
                f"upstream.{name} redone"
                for name, run in upstream_runs.items()
                if (record.get("upstream_runs") or {}).get(name) != run
            ]
        if not changed and record.get("state") == "running":
            changed.append("unfinished")
        if not changed and not all(path.exists() for path in self.outputs):
            changed.append("output missing")
        return changed

    # ---- recording --------------------------------------------------------------------------------
    def begin(self) -> None:
        """Mark the stage as running these settings, before any output is replaced."""
        self._started = time.perf_counter()
        atomic_write_json(
            self.record,
            {
                "state": "running",
                "fingerprint": self.fingerprint(),
                "description": self.description(),
                "started": _now(),
            },
        )

    def finish(self) -> str:
        """Record the outputs as made by these settings; return the run's id."""
        run_id = uuid.uuid4().hex
        atomic_write_json(
            self.record,
            {
                "state": "done",
                "fingerprint": self.fingerprint(),
                "description": self.description(),
                "upstream_runs": {stage.name: stage.run_id() for stage in self.upstream},
                "run_id": run_id,
                "finished": _now(),
                # time since begin() in this process (None when an earlier process began the run)
                "seconds": None if self._started is None else round(time.perf_counter() - self._started, 3),
            },
        )
        return run_id

    def run(
        self,
        produce: Callable[[bool], Any],
        *,
        force: bool = False,
        log: Callable[[Stage, str, list[str]], None] | None = None,
    ) -> bool:
        """Reuse the outputs when current; else call `produce(discard)` and record it. True when it ran.

        `discard` is True when what is on disk belongs to other settings (the producer must not resume
        what it finds); False when there is nothing or an unfinished run of these settings to resume.
        """
        status = "stale" if force else self.status()
        if status == "current":
            if log:
                log(self, "reused", [])
            return False
        if log:
            log(self, "ran", ["forced"] if force else self.changes())
        self.begin()
        produce(status == "stale")
        self.finish()
        return True


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
