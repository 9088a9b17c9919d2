"""What a grid's report shows, computed from its rows and its cells' files and written as JSON beside
results.jsonl; `mixsd.experiments.report` then reads these files and draws, and opens no cell's file itself.

    OUT/tuning.json          matched memorization, the rule's choice per method, each group's mean curve
                             (mixsd.experiments.tuning)
    OUT/curves.jsonl         every point of every learning curve (base first, with `retention`)
    OUT/correlations.json    displacement vs retention drop over the cells (mixsd.experiments.correlations)
    OUT/comparisons.json     paired comparisons, item by item (mixsd.experiments.comparisons)
    OUT/target-nll.json      target tokens > 5 nats and NLL histograms (mixsd.experiments.target_nll)
    OUT/training-loss.json   each trained cell's loss by optimizer step (its train/summary.json)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mixsd.core.files import atomic_write_jsonl, atomic_write_text
from mixsd.experiments.comparisons import paired_comparisons
from mixsd.experiments.correlations import displacement_correlations
from mixsd.experiments.results import (
    COMPARISONS_FILE,
    CORRELATIONS_FILE,
    CURVES_FILE,
    TARGET_NLL_FILE,
    TRAINING_LOSS_FILE,
    TUNING_FILE,
)
from mixsd.experiments.target_nll import target_nll
from mixsd.experiments.tuning import SelectionRule, curve_points, tuning_results


def training_losses(cells_dir: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per trained cell with a logged loss: its `steps` and `losses` (train/summary.json's history)."""
    out = []
    for row in rows:
        summary_file = cells_dir / row["cell"] / "train" / "summary.json"
        if not summary_file.is_file():
            continue
        history = [h for h in json.loads(summary_file.read_text()).get("history", []) if "loss" in h]
        if history:
            out.append(
                {
                    "cell": row["cell"],
                    "method": row["method"],
                    "lam": row["lam"],
                    "steps": [h["step"] for h in history],
                    "losses": [h["loss"] for h in history],
                }
            )
    return out


def tuning_file(tuning: dict[str, Any]) -> dict[str, Any]:
    """`tuning_results` as OUT/tuning.json holds it: the per-seed curves left to OUT/curves.jsonl."""
    groups = {
        name: {k: v for k, v in entry.items() if k != "curves"} for name, entry in tuning["groups"].items()
    }
    return {**tuning, "groups": groups}


def _write_json(path: Path, obj: Any) -> None:
    # keys in the order computed, not sorted: the order of groups, settings and methods is the config's,
    # and the report shows them (and breaks the rule's ties) in that order
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_report_data(
    out: Path,
    rows: list[dict[str, Any]],
    *,
    curves: dict[str, list[dict[str, Any]]] | None = None,
    curve_base: dict[str, Any] | None = None,
    rule: SelectionRule | None = None,
) -> dict[str, Path]:
    """Every file of the module doc, from the rows and OUT/cells/. `curves`: each trained cell's
    curve.jsonl rows; `curve_base`: the base model's curve row (epoch 0); `rule`: the selection rule
    among each method's settings. Returns the paths written, by file name."""
    cells_dir = out / "cells"
    tuning = tuning_results(rows, curves or {}, curve_base, rule or SelectionRule())
    paths = {name: out / name for name in (TUNING_FILE, CORRELATIONS_FILE, COMPARISONS_FILE)}
    paths.update({name: out / name for name in (CURVES_FILE, TARGET_NLL_FILE, TRAINING_LOSS_FILE)})
    atomic_write_jsonl(paths[CURVES_FILE], curve_points(tuning))
    _write_json(paths[TUNING_FILE], tuning_file(tuning))
    _write_json(paths[CORRELATIONS_FILE], displacement_correlations(rows))
    _write_json(paths[COMPARISONS_FILE], paired_comparisons(cells_dir, rows))
    _write_json(paths[TARGET_NLL_FILE], target_nll(cells_dir, rows))
    _write_json(paths[TRAINING_LOSS_FILE], training_losses(cells_dir, rows))
    return paths
