"""A stage's settings from its command's config: every field but those that change only speed, logging or
where a run goes, never what the stage writes (a change to them redoes nothing).

Each config class declares those fields itself in a `SPEED_ONLY` class attribute (a class attribute, not field
metadata: HfArgumentParser passes metadata to argparse); the same way, `IO_FIELDS` names the fields of its
model and files, which the grid's runner sets itself. `dtype` of eval and nll is in their settings as
`bf16`, which those configs keep equal to `dtype == "bfloat16"` (`options.ModelOptions`), so records
written before `dtype` existed stay current; mix and rewrite keep `dtype`. Training's settings are its own
(`mixsd.training.train_config.run_settings`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mixsd.core.stages import config_settings


def speed_only(cls: type) -> set[str]:
    """The fields of config class `cls` that change only speed, logging or output location (none for a
    class that declares no `SPEED_ONLY`: the corpus generators' options all shape what they write)."""
    return set(getattr(cls, "SPEED_ONLY", ()))


def io_fields(cls: type) -> set[str]:
    """The fields of config class `cls` that name the model it loads and the files it reads and writes
    (its `IO_FIELDS`): whoever runs the command for someone else (the grid) sets them itself."""
    return set(getattr(cls, "IO_FIELDS", ()))


def stage_settings(config: Any, also: Iterable[str] = ()) -> dict[str, Any]:
    """The settings of the stage that runs `config`: its fields but the speed-only ones (and `also`, fields
    that do not matter where this stage uses the config)."""
    return config_settings(config, speed_only(type(config)) | set(also))


def user_files(config: Any, names: tuple[str, ...]) -> list[Path]:
    """Files a config names by path (templates, prompt lists): their content is part of the fingerprint."""
    paths = [getattr(config, name, None) for name in names]
    return [Path(p) for p in paths if isinstance(p, str) and Path(p).is_file()]
