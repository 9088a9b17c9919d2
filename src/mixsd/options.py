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

from mixsd.files import InputError


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
