"""What a documents grid (issue 23: `mixsd corpus documents`, e.g. SQuAD closed-book) says about questions
nobody in the project wrote, computed from its committed files without a model; part of the grid's summary
(`mixsd.experiments.grid_summary`), shown by the `closed_book` table of scripts/results.py.

It reads each cell's `eval.predictions.jsonl` (`mixsd eval`, qa suite): per split and item, SQuAD's exact
match and F1 against every gold answer and the answer-contained rate (`mixsd.core.answers.squad_scores`).
The splits: `gold` (the crowd-written questions, closed book), `gold_open` (the same with the passage in the
prompt: the base model's is the ceiling), `heldout` (generated questions training never saw), `train`, and
`gold_trained`: the gold questions about the passages that have a training pair (questions can teach only
those; the others are learnable from CPT's passages alone). It needs the corpus folder the grid names
(`corpus: {generator: folder, path: ...}`, read from the working directory, e.g. data/squad50 of the repo):
its gold.jsonl and train.jsonl records carry their `passage` id. Without it that split is left out.

Per group (cells that differ only by seed) and split, each score is averaged over items and seeds with the
hierarchical bootstrap of the retention figures (seeds, then items); against the base model the difference
is paired over items (the same gold questions). A split a cell did not score is left out of its group.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from mixsd.core.files import read_jsonl
from mixsd.core.metrics import hierarchical_bootstrap

PREDICTIONS_FILE = "eval.predictions.jsonl"
SCORES = {"squad_em": "EM", "squad_f1": "F1", "contained": "answer contained"}
SPLITS = ("gold", "gold_trained", "gold_open", "heldout", "train")  # in the table's order


def trained_gold_ids(grid: dict[str, Any]) -> set[str] | None:
    """The ids of the gold questions about a passage that has a training pair, from the grid's corpus folder
    (None when the grid's corpus is not a folder at hand or its records name no passage)."""
    corpus = (grid.get("config") or {}).get("corpus") or {}
    folder = Path(str(corpus.get("path", ""))) if corpus.get("generator") == "folder" else None
    if folder is None or not (folder / "gold.jsonl").is_file() or not (folder / "train.jsonl").is_file():
        return None
    trained = {row.get("passage") for _, row in read_jsonl(folder / "train.jsonl")} - {None}
    gold = [row for _, row in read_jsonl(folder / "gold.jsonl")]
    if not trained or any("passage" not in row for row in gold):
        return None
    return {row["id"] for row in gold if row["passage"] in trained}


def cell_scores(
    folder, cell: str, trained_gold: set[str] | None = None
) -> dict[str, dict[str, list[float]]] | None:
    """One cell's per-item SQuAD scores: split -> score -> values in item-id order (None: no qa predictions);
    with `trained_gold`, also the `gold_trained` split (those gold items)."""
    path = folder / "cells" / cell / PREDICTIONS_FILE
    if not path.is_file():
        return None
    by_split: dict[str, dict[str, float]] = defaultdict(dict)
    rows = [row for _, row in read_jsonl(path) if row.get("who", "model") == "model" and "squad_f1" in row]
    for row in rows:
        by_split[row["split"]][row["id"]] = row
    if not by_split:
        return None
    if trained_gold is not None and "gold" in by_split:
        by_split["gold_trained"] = {i: row for i, row in by_split["gold"].items() if i in trained_gold}
    return {
        split: {score: [float(items[i][score]) for i in sorted(items)] for score in SCORES}
        for split, items in by_split.items()
    }


def closed_book(grid: dict[str, Any]) -> dict[str, Any]:
    """Per group and split, each SQuAD score with its interval; trained groups also minus the base model's
    (paired over items). Empty for a grid whose cells have no qa predictions (every non-documents grid)."""
    groups: dict[str, list[dict[str, dict[str, list[float]]]]] = defaultdict(list)
    seeds: dict[str, list[int]] = defaultdict(list)
    trained_gold = trained_gold_ids(grid)
    for row in sorted(grid["rows"], key=lambda r: (r.get("group", r["cell"]), r.get("seed", 0))):
        scores = cell_scores(grid["folder"], row["cell"], trained_gold)
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
