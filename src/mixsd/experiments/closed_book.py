"""What a documents grid (issue 23: `mixsd corpus documents`, e.g. SQuAD closed-book) says about questions
nobody in the project wrote, computed from its committed files without a model; part of the grid's summary
(`mixsd.experiments.grid_summary`), shown by the `closed_book` table of scripts/results.py.

It reads each cell's `eval.predictions.jsonl` (`mixsd eval`, qa suite): per split and item, SQuAD's exact
match and F1 against every gold answer and the answer-contained rate (`mixsd.core.answers.squad_scores`).
The splits: `gold` (the crowd-written questions, closed book), `gold_open` (the same with the passage in the
prompt: the base model's is the ceiling), `heldout` (generated questions training never saw), `train`.

Per group (cells that differ only by seed) and split, each score is averaged over items and seeds with the
hierarchical bootstrap of the retention figures (seeds, then items); against the base model the difference
is paired over items (the same gold questions). A split a cell did not score is left out of its group.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mixsd.core.files import read_jsonl
from mixsd.core.metrics import hierarchical_bootstrap

PREDICTIONS_FILE = "eval.predictions.jsonl"
SCORES = {"squad_em": "EM", "squad_f1": "F1", "contained": "answer contained"}
SPLITS = ("gold", "gold_open", "heldout", "train")  # in the table's order


def cell_scores(folder, cell: str) -> dict[str, dict[str, list[float]]] | None:
    """One cell's per-item SQuAD scores: split -> score -> values in item-id order (None: no qa predictions)."""
    path = folder / "cells" / cell / PREDICTIONS_FILE
    if not path.is_file():
        return None
    by_split: dict[str, dict[str, float]] = defaultdict(dict)
    rows = [row for _, row in read_jsonl(path) if row.get("who", "model") == "model" and "squad_f1" in row]
    for row in rows:
        by_split[row["split"]][row["id"]] = row
    if not by_split:
        return None
    return {
        split: {score: [float(items[i][score]) for i in sorted(items)] for score in SCORES}
        for split, items in by_split.items()
    }


def closed_book(grid: dict[str, Any]) -> dict[str, Any]:
    """Per group and split, each SQuAD score with its interval; trained groups also minus the base model's
    (paired over items). Empty for a grid whose cells have no qa predictions (every non-documents grid)."""
    groups: dict[str, list[dict[str, dict[str, list[float]]]]] = defaultdict(list)
    seeds: dict[str, list[int]] = defaultdict(list)
    for row in sorted(grid["rows"], key=lambda r: (r.get("group", r["cell"]), r.get("seed", 0))):
        scores = cell_scores(grid["folder"], row["cell"])
        if scores is not None:
            group = "base" if row["method"] == "base" else row.get("group", row["cell"])
            groups[group].append(scores)
            seeds[group].append(row.get("seed", 0))
    if not groups:
        return {}
    out: dict[str, Any] = {}
    base = groups.get("base")
    for group, cells in groups.items():
        splits = [s for s in SPLITS if all(s in c for c in cells)]
        entry: dict[str, Any] = {"seeds": seeds[group], "splits": {}}
        for split in splits:
            items = len(cells[0][split]["squad_f1"])
            scores = {}
            for score in SCORES:
                per_seed = [{score: c[split][score]} for c in cells]
                scores[score] = hierarchical_bootstrap(per_seed)
                paired = group != "base" and base and all(split in b for b in base)
                if paired and len(base[0][split][score]) == items:  # the same questions: paired
                    scores[f"{score}_vs_base"] = hierarchical_bootstrap(
                        per_seed, [{score: b[split][score]} for b in base]
                    )
            entry["splits"][split] = {"items": items, **scores}
        out[group] = entry
    return out
