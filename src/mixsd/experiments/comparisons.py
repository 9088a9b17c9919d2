"""Paired comparisons of a grid's cells, item by item, from each cell's per-item answers (OUT/comparisons.json;
the report tabulates them).

Pairs: every tuned cell against the base; MixSD, OPSD and self-rewrite cells against SFT of the same seed
(at the same setting where the grid sweeps one); MixSD cells against the self-rewrite cell of the same
seed. Each pair is compared on every split and multiple-choice probe both cells answered, on the items
both answered: accuracies before and after, their difference and ratio with paired-bootstrap intervals,
the items turned right→wrong and wrong→right, and the exact McNemar p-value on those.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixsd.core.metrics import paired_comparison, ratio_interval
from mixsd.evaluation.lmeval import item_outcomes
from mixsd.evaluation.probe_kinds import kind_of_row
from mixsd.experiments.results import RETENTION_METRIC

# the baselines each method is compared with, besides the base model
BASELINES = {"mixsd": ("sft", "rewrite"), "opsd": ("sft",), "rewrite": ("sft",)}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def item_scores(cell_dir: Path) -> dict[str, dict[str, bool]]:
    """Per split (generation suites) and per multiple-choice probe: item id -> answered right."""
    scores: dict[str, dict[str, bool]] = {}
    for row in _read_rows(cell_dir / "eval.predictions.jsonl"):
        key = "correct" if "correct" in row else "loose"  # files from before per-corpus matchers
        if key in row:
            scores.setdefault(row["split"], {})[row["id"]] = bool(row[key])
    for row in _read_rows(cell_dir / "retention.predictions.jsonl"):
        kind = kind_of_row(row)
        if row.get("who") == "model" and kind is not None and kind.item_outcome is not None:
            metric = RETENTION_METRIC.get(row["split"], "acc")
            scores.setdefault(f"{row['split']} ({metric})", {})[row["id"]] = kind.item_outcome(row, metric)
    retention = cell_dir / "retention.json"
    if (
        retention.is_file()
    ):  # lm-evaluation-harness tasks (mixsd.evaluation.lmeval), under their headline metric
        summaries = json.loads(retention.read_text(encoding="utf-8")).get("lm_eval") or {}
        if summaries:
            rows = _read_rows(cell_dir / "retention.predictions.jsonl")
            scores.update(item_outcomes(summaries, rows))
    return scores


def comparison_pairs(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(before cell, after cell) of every comparison (see the module doc), in the order of the rows."""
    by_name = {row["cell"]: row for row in rows}
    pairs = []
    for row in rows:
        if row["method"] == "base":
            continue
        if "base" in by_name:
            pairs.append(("base", row["cell"]))
        for baseline in BASELINES.get(row["method"], ()):
            # the baseline of the same seed, at the same setting where the grid sweeps one
            same_seed = [r for r in rows if r["method"] == baseline and r["seed"] == row["seed"]]
            same = [r for r in same_seed if r.get("settings") == row.get("settings")]
            before = (same or same_seed or [None])[0]
            if before is not None:
                pairs.append((before["cell"], row["cell"]))
    return pairs


def paired_comparisons(cells_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per pair and split or probe (see the module doc): the cells, `split`, and
    `metrics.paired_comparison`'s figures with the accuracy ratio after / before and its interval."""
    cache: dict[str, dict[str, dict[str, bool]]] = {}
    out = []
    for before_cell, after_cell in comparison_pairs(rows):
        for name in (before_cell, after_cell):
            if name not in cache:
                cache[name] = item_scores(cells_dir / name)
        before_scores, after_scores = cache[before_cell], cache[after_cell]
        for split in [s for s in after_scores if s in before_scores]:
            ids = [i for i in after_scores[split] if i in before_scores[split]]
            if not ids:
                continue
            before = [before_scores[split][i] for i in ids]
            after = [after_scores[split][i] for i in ids]
            result = paired_comparison(before, after)
            ratio = sum(after) / sum(before) if sum(before) else None
            out.append(
                {
                    "before_cell": before_cell,
                    "after_cell": after_cell,
                    "split": split,
                    **result,
                    "ratio": ratio,
                    "ratio_ci95": ratio_interval([float(x) for x in after], [float(x) for x in before]),
                }
            )
    return out
