"""Trainer checkpoints that are complete or not at all: a marker written last, and resume from the newest.

`mixsd train` writes a checkpoint per epoch (transformers' `checkpoint-N` folders). A kill while one is
written, or while an old one is deleted, must never leave a rerun resuming from half a checkpoint: each
complete checkpoint gets `mixsd_run.json` (the run record and every file's size) as its last file, and
a rerun resumes from the newest checkpoint whose marker matches the files on disk.

Before a run starts, its disk plan (`disk_plan`, `check_disk_space`) estimates what those checkpoints and
the final model take, and refuses a run the free space cannot hold.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mixsd.core.files import InputError, atomic_write_json
from mixsd.training.train_config import TrainConfig, _strategy

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


# --------------------------------------------------------------------------------------------------
# Disk space: what the run keeps, checked before it starts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskPlan:
    """What a run writes, estimated from its parameters: the optimizer state as two moments per trainable
    parameter (AdamW; one for SGD), in the parameters' dtype."""

    weights_bytes: int  # the weights in a checkpoint (only the adapter with LoRA)
    optimizer_bytes: int  # the optimizer state in a checkpoint (0 with --save_only_model)
    model_bytes: int  # the final OUT/model
    saves: int  # checkpoints the run writes
    kept: int  # checkpoints on disk at once (one more while the next one is written)

    @property
    def checkpoint_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes

    @property
    def needed_bytes(self) -> int:
        """The peak: the kept checkpoints plus the larger of a checkpoint being written and the final model."""
        writing = self.checkpoint_bytes if self.saves > self.kept else 0
        return self.kept * self.checkpoint_bytes + max(writing, self.model_bytes)

    def describe(self) -> str:
        parts = [
            f"one checkpoint is about {format_bytes(self.checkpoint_bytes)} (weights "
            f"{format_bytes(self.weights_bytes)} + optimizer state {format_bytes(self.optimizer_bytes)})",
            f"the run writes {self.saves} and keeps at most {self.kept}",
            f"the final model is {format_bytes(self.model_bytes)}",
        ]
        return "; ".join(parts) + f": about {format_bytes(self.needed_bytes)} at the peak"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def optimizer_steps(config: TrainConfig, examples: int, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run over `examples` records."""
    per_process = math.ceil(examples / max(processes, 1))
    batches = math.ceil(per_process / config.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / config.gradient_accumulation_steps), 1)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
    return per_epoch, total


def disk_plan(config: TrainConfig, model, examples: int, processes: int = 1) -> DiskPlan:
    """Estimate what the run keeps on disk (`model` as it will be trained: with its LoRA adapters)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    all_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    lora = config.lora_rank > 0
    moments = 1 if "sgd" in _strategy(config.optim) else 2
    weights = trainable_bytes if lora else all_bytes  # Trainer saves only the adapter of a peft model
    optimizer = 0 if config.save_only_model else moments * trainable_bytes
    final = trainable_bytes if config.save_adapter_only else all_bytes - (trainable_bytes if lora else 0)
    per_epoch, total = optimizer_steps(config, examples, processes)
    strategy = _strategy(config.save_strategy)
    if strategy == "no":
        saves = 0
    elif strategy == "steps":
        every = config.save_steps if config.save_steps >= 1 else math.ceil(config.save_steps * total)
        saves = math.ceil(total / max(int(every), 1))
    else:  # epoch (and best, which saves at most at every evaluation)
        saves = math.ceil(total / per_epoch)
    limit = config.save_total_limit
    if limit is not None and config.select == "best":
        limit = max(limit, 2)  # the best checkpoint is kept beside the newest
    kept = saves if limit is None else min(saves, limit)
    return DiskPlan(weights, optimizer, final, saves, kept)


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space where `folder` is (or will be created)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(plan: DiskPlan, out: str | os.PathLike, free: int | None = None) -> str:
    """The plan as one line; InputError when the free space cannot hold it. Complete checkpoints already in
    `out` (a resumed run) count as written."""
    held = sum(
        sum(checkpoint_files(folder).values())
        for folder in checkpoint_folders(Path(out))
        if checkpoint_is_complete(folder)
    )
    needed = max(plan.needed_bytes - held, 0)
    free = free_bytes(out) if free is None else free
    line = f"disk: {plan.describe()}; free {format_bytes(free)}"
    if needed > free:
        raise InputError(
            f"not enough free disk space: {plan.describe()}, {format_bytes(needed)} still to write, but only "
            f"{format_bytes(free)} free. Free some space, keep fewer checkpoints (--save_total_limit 1), "
            "save no optimizer state (--save_only_model, no exact resume), or none at all (--save_every -1); "
            "--check_disk false skips this check",
            out,
        )
    return line
