"""Trainer checkpoints that are complete or not at all: a marker written last, and resume from the newest.

`mixsd train` writes a checkpoint per epoch (transformers' `checkpoint-N` folders). A kill while one is
written, or while an old one is deleted, must never leave a rerun resuming from half a checkpoint: each
complete checkpoint gets `mixsd_run.json` (the run record and every file's size) as its last file, and
a rerun resumes from the newest checkpoint whose marker matches the files on disk.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mixsd.core.files import atomic_write_json

CHECKPOINT_MARKER = "mixsd_run.json"  # written last into a checkpoint: the run record + its file sizes


def checkpoint_files(folder: Path) -> dict[str, int]:
    """Every file of a checkpoint (but its marker) with its size in bytes."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != CHECKPOINT_MARKER
    }


def mark_checkpoint_complete(folder: Path, record: dict[str, Any]) -> None:
    """Write the marker that makes `folder` a complete checkpoint: the run record and every file's size."""
    atomic_write_json(folder / CHECKPOINT_MARKER, {**record, "files": checkpoint_files(folder)})


def checkpoint_is_complete(folder: str | os.PathLike) -> bool:
    """Whether a checkpoint was written to the end and nothing of it was deleted since.

    A kill (or Ctrl-C) while Trainer writes a checkpoint leaves a folder without the marker; one while an
    old checkpoint is being deleted leaves a marker whose files are missing. Either is incomplete.
    """
    folder = Path(folder)
    try:
        files = json.loads((folder / CHECKPOINT_MARKER).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(files, dict) or "trainer_state.json" not in files:
        return False
    for name, size in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def checkpoint_folders(out: Path) -> list[Path]:
    """checkpoint-N folders of `out`, newest (highest N) first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True)


def resume_checkpoint(out: str | os.PathLike, *, remove_incomplete: bool) -> str | None:
    """The newest complete checkpoint of `out` (None: start afresh); incomplete ones are removed first."""
    complete = []
    for folder in checkpoint_folders(Path(out)):
        if checkpoint_is_complete(folder):
            complete.append(folder)
        elif remove_incomplete:
            print(f"removing {folder}: an incomplete checkpoint (the run was interrupted while writing it)")
            shutil.rmtree(folder, ignore_errors=True)
    return str(complete[0]) if complete else None
