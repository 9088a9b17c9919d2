"""Print the per-cell tables of docs/results.md from an experiment folder (issue 11's curve protocol).

    python scripts/grid_table.py runs/kgfact-curves                 # one row per cell, final epoch
    python scripts/grid_table.py runs/kgfact-curves --cells 'sft-lr0.0003-*,mixsd-*-lr0.0003-*'
    python scripts/grid_table.py runs/kgfact-curves --curve sft-lr0.0001-s0     # every epoch of one cell

Reads only what the grid wrote: `cells/CELL/train/curve.jsonl` (the per-epoch scores of `mixsd train
--curve`), `cells/CELL/eval.json` (all training questions and paraphrases) and `cells/CELL/retention.json`
(the known-facts probe: base-right items answered wrong after training). Cells without a file show "-".
"""

from __future__ import annotations

import argparse
import fnmatch
import json
from pathlib import Path
from typing import Any

from mixsd.curve import read_curve
from mixsd.files import InputError


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"invalid JSON ({error.msg})", path, error.lineno) from None


def read_cell_curve(cell: Path) -> list[dict[str, Any]]:
    return read_curve(cell / "train" / "curve.jsonl")


def count(point: dict[str, Any], probe: str, field: str = "acc") -> str:
    n = point.get(f"{probe}_n")
    value = point.get(f"{probe}_{field}")
    return "-" if n is None or value is None else f"{round(value * n)}/{n}"


def split_score(evaluation: dict[str, Any] | None, split: str) -> str:
    if not evaluation or split not in evaluation.get("splits", {}):
        return "-"
    acc = evaluation["splits"][split]["accuracy"]
    return f"{acc['correct']}/{acc['n']}"


def known_facts_lost(retention: dict[str, Any] | None) -> str:
    probe = (retention or {}).get("probes", {}).get("known_facts")
    if not probe or "lost" not in probe:
        return "-"
    lost = probe["lost"]
    low, high = lost["ci95"]
    return f"{lost['correct']}/{lost['n']} [{low:.2f}, {high:.2f}]"


def cell_row(cell: Path) -> list[str]:
    curve = read_cell_curve(cell)
    last = curve[-1] if curve else {}
    kl = last.get("kl")
    return [
        cell.name,
        split_score(read_json(cell / "eval.json"), "train"),
        split_score(read_json(cell / "eval.json"), "paraphrase"),
        count(last, "in_context"),
        f"{count(last, 'in_context', 'collapse')} / {count(last, 'instructions', 'collapse')}",
        count(last, "instructions"),
        "-" if kl is None else f"{kl:.2f}",
        known_facts_lost(read_json(cell / "retention.json")),
    ]


def curve_rows(cell: Path, base: dict[str, Any] | None) -> list[list[str]]:
    points = ([{"epoch": 0, **base}] if base else []) + read_cell_curve(cell)
    return [
        [
            f"{p['epoch']:g}",
            f"{p.get('memorized', '-')}/{p.get('questions', '-')}",
            count(p, "in_context"),
            f"{count(p, 'in_context', 'collapse')} / {count(p, 'instructions', 'collapse')}",
            count(p, "instructions"),
            f"{p.get('kl', 0.0):.2f}",
        ]
        for p in points
    ]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main() -> None:
    try:
        tables()
    except InputError as error:  # a damaged file: its name and line, one line
        raise SystemExit(f"grid_table: {error}") from None


def tables() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid", type=Path, help="the experiment's output folder")
    parser.add_argument("--cells", default="*", help="comma-separated glob patterns of cell names")
    parser.add_argument("--curve", metavar="CELL", help="print every epoch of this cell instead")
    args = parser.parse_args()
    if not (args.grid / "cells").is_dir():
        parser.error(f"{args.grid}: not an experiment folder (no cells/ in it)")
    if args.curve and not (args.grid / "cells" / args.curve).is_dir():
        parser.error(f"{args.grid}: no cell named {args.curve!r} (see cells/)")
    if args.curve:
        base = read_json(args.grid / "curve-base.json")
        header = ["epoch", "memorized", "in-context", "collapse (ctx / instr)", "instructions", "KL"]
        print(markdown(header, curve_rows(args.grid / "cells" / args.curve, base)))
        return
    patterns = args.cells.split(",")
    cells = sorted(
        c
        for c in (args.grid / "cells").iterdir()
        if c.is_dir() and any(fnmatch.fnmatch(c.name, p) for p in patterns) and (c / "cell.json").exists()
    )
    header = [
        "cell",
        "memorized (all)",
        "paraphrase",
        "in-context",
        "collapse (ctx / instr)",
        "instructions",
        "KL",
        "known facts lost [95%]",
    ]
    print(markdown(header, [cell_row(c) for c in cells]))


if __name__ == "__main__":
    main()
