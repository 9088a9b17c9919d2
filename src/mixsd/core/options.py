"""Checks of command options, run by every config dataclass's `__post_init__`.

A config is checked when it is built, so the CLI (HfArgumentParser builds the dataclass), the Python API
and the experiment loader all refuse a bad value before any model is loaded or any file is written. A
bad value raises `InputError` naming the option (`field 'lam': must be in [0, 1]; got 1.5`), which the
CLI reports in one line with exit status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

from mixsd.core.files import InputError


def check_range(
    name: str,
    value: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    integer: bool = False,
    optional: bool = False,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    """Refuse a value that is not a finite number in [lo, hi] (ends excluded with lo_open / hi_open).

    `integer` also refuses floats, `optional` lets None through. Booleans are never numbers here, even
    though Python counts True as 1.
    """
    if value is None and optional:
        return
    kind = "an integer" if integer else "a number"
    numeric = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not numeric:
        raise InputError(f"must be {kind}; got {value!r}", field=name)
    if not math.isfinite(value):
        raise InputError(f"must be a finite number; got {value!r}", field=name)
    too_low = lo is not None and (value <= lo if lo_open else value < lo)
    too_high = hi is not None and (value >= hi if hi_open else value > hi)
    if too_low or too_high:
        if lo is not None and hi is not None:
            wanted = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            wanted = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            wanted = f"{'<' if hi_open else '<='} {hi:g}"
        raise InputError(f"must be {wanted}; got {value!r}", field=name)


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """{field name: allowed values} for every field annotated with a Literal (or an optional Literal)."""
    hints = typing.get_type_hints(cls)
    choices = {}
    for item in dataclasses.fields(cls):
        hint = hints.get(item.name)
        options = [hint, *typing.get_args(hint)]  # Literal[...] itself, or inside `Literal[...] | None`
        for option in options:
            if typing.get_origin(option) is Literal:
                allowed = typing.get_args(option)
                if type(None) in typing.get_args(hint):
                    allowed = (*allowed, None)
                choices[item.name] = allowed
                break
    return choices


def check_choices(config: Any) -> None:
    """Refuse a value outside its field's Literal choices (argparse checks the CLI; this the Python API/YAML)."""
    for name, allowed in _literal_fields(type(config)).items():
        value = getattr(config, name)
        if value not in allowed or (isinstance(value, bool) and not any(a is value for a in allowed)):
            listed = ", ".join(str(a) for a in allowed)
            raise InputError(f"must be one of {listed}; got {value!r}", field=name)


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file, through symlinks and `..`, whether or not they exist yet."""
    a, b = Path(a).expanduser(), Path(b).expanduser()
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def check_distinct(outputs: dict[str, Any], inputs: dict[str, Any]) -> None:
    """Refuse an output that would overwrite one of the inputs (`--output` equal to `--input`)."""
    for out_name, out in outputs.items():
        for in_name, source in inputs.items():
            if out is not None and source is not None and same_file(out, source):
                raise InputError(
                    f"is the same file as --{in_name.replace('_', '-')} ({source}); "
                    "writing it would destroy the input",
                    field=out_name,
                )


# --------------------------------------------------------------------------------------------------
# The options of every command that loads a model for inference
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ModelOptions:
    """Which model a command loads and how: the base class of every such command's config, so the fields
    have one name, one meaning and one help text everywhere (`mixsd eval --help` lists them first).

    The fields are keyword-only, so a config keeps its own positional fields; a config may redeclare
    `model` to say what the model is for there. `dtype` is the one meaning of precision for inference:
    the dtype models are loaded in (a model passed in-process runs under autocast to it). Training's
    `--bf16` is another thing, mixed precision over float32 weights (`mixsd train`). A config that had a
    `bf16` switch keeps it as a deprecated alias: `check_model_options` turns it into `dtype` and then
    keeps it equal to `dtype == "bfloat16"`, so configs, experiment files and recorded settings that
    name it stay valid.
    """

    model: str = dataclasses.field(
        kw_only=True,
        metadata={
            "help": "The model: the alias smollm2-135m, a HF folder, a `mixsd train` output folder, a LoRA "
            "adapter folder (merged into its base), a .gguf file or a hub id in the local cache."
        },
    )
    dtype: Literal["float32", "bfloat16"] = dataclasses.field(
        default="float32",
        kw_only=True,
        metadata={
            "help": "Inference precision: models are loaded in this dtype (a model passed in-process runs "
            "under autocast to it)."
        },
    )
    device: str | None = dataclasses.field(
        default=None, kw_only=True, metadata={"help": "cpu, cuda, cuda:1 ...; default: cuda if present."}
    )
    threads: int | None = dataclasses.field(
        default=None,
        kw_only=True,
        metadata={
            "help": "CPU threads for torch (torch.set_num_threads); 1 is much faster on a machine shared "
            "with other jobs. Default: torch's choice."
        },
    )
    trust_remote_code: bool = dataclasses.field(
        default=False, kw_only=True, metadata={"help": "Allow model code from the model folder."}
    )

    def check_model_options(self) -> None:
        """Check these fields and apply the `bf16` alias (call from the config's `__post_init__`)."""
        if getattr(self, "bf16", None):
            self.dtype = "bfloat16"
        check_choices(self)
        check_range("threads", self.threads, 1, integer=True, optional=True)
        if hasattr(self, "bf16"):
            self.bf16 = self.dtype == "bfloat16"

    def set_threads(self) -> None:
        """Apply --threads to torch (nothing when it is unset)."""
        if self.threads is not None:
            import torch  # here: options are checked before any model library loads

            torch.set_num_threads(self.threads)
