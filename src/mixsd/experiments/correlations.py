"""Parameter displacement against the retention drop over a grid's tuned cells, from the results rows
(OUT/correlations.json; the report tabulates and draws it).

Each per-cell measure of CORRELATES against the drop of the headline retention (1 − retention_mean, or
KL(base‖model) per token where no cell has probe retention), Pearson and Spearman with a seeded
bootstrap 95% interval over cells (every seed its own cell); and, for the figure, the points of the
Fisher-weighted ratio and of raw ‖Δθ‖² with the Pearson r over the points drawn.
"""

from __future__ import annotations

from typing import Any

from mixsd.core.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, correlation_with_interval, pearson

# What the paper reports for its Fisher table (Pearson r with capability drop on three model sizes); shown
# beside ours as the shape of the claim, not as numbers to match.
PAPER_CORRELATIONS = {"fisher_ratio": "+0.56 / +0.82 / +0.57", "delta_norm_sq": "+0.34 / +0.02 / +0.10"}
# Per-cell measures correlated with the retention drop. Σ F·Δθ² / Σ F ranks cells exactly like Σ F·Δθ²
# (Σ F is the same for every cell of a grid: one base model, one probe), so it stands for both.
CORRELATES = (
    ("fisher_ratio", "Fisher-weighted ratio Σ F·Δθ² / ‖Δθ‖²"),
    ("fisher_displacement_norm", "Fisher-weighted displacement Σ F·Δθ² / Σ F"),
    ("delta_norm_sq", "raw displacement ‖Δθ‖²"),
    ("target_nll_above_5", "share of target tokens with NLL > 5"),
)
# the measures the figure sets side by side: the paper's claim is that the first tracks the drop and the
# second does not
FIGURE_MEASURES = ("fisher_ratio", "delta_norm_sq")


def _number(value: Any) -> bool:
    return isinstance(value, int | float)


def retention_drop(rows: list[dict[str, Any]]) -> tuple[str, list[float | None]]:
    """(name, per-row drop): 1 − retention_mean, the report's headline retention (mean over probes of the
    chance-normalized retention), or KL(base‖model) per token where no cell has probe retention."""
    if any(_number(r.get("retention_mean")) for r in rows):
        return "1 − retention_mean", [
            1 - r["retention_mean"] if _number(r.get("retention_mean")) else None for r in rows
        ]
    return "kl_per_token", [r.get("kl_per_token") for r in rows]


def figure_panels(tuned: list[dict[str, Any]], drops: list[float | None]) -> list[dict[str, Any]]:
    """Per FIGURE_MEASURES measure: the cells with both numbers as points and the Pearson r over them
    (None with fewer than two points or no spread)."""
    panels = []
    for column, label in CORRELATES:
        if column not in FIGURE_MEASURES:
            continue
        points = [
            {"cell": r["cell"], "method": r["method"], "lam": r.get("lam"), "x": r[column], "drop": d}
            for r, d in zip(tuned, drops, strict=True)
            if _number(r.get(column)) and _number(d)
        ]
        xs, ys = [p["x"] for p in points], [p["drop"] for p in points]
        r = pearson(xs, ys) if len(xs) >= 2 else None
        panels.append({"column": column, "label": label, "points": points, "pearson": r})
    return panels


def displacement_correlations(
    rows: list[dict[str, Any]], *, n_boot: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Each CORRELATES measure against the retention drop over the tuned cells of a grid (see the
    module doc), and the figure's panels."""
    tuned = [r for r in rows if r.get("method") != "base"]
    drop_name, drops = retention_drop(tuned)
    measures = []
    for column, label in CORRELATES:
        result = correlation_with_interval(
            [r.get(column) for r in tuned],
            drops,
            BOOTSTRAP_RESAMPLES if n_boot is None else n_boot,
            BOOTSTRAP_SEED if seed is None else seed,
        )
        measures.append({"column": column, "label": label, "paper": PAPER_CORRELATIONS.get(column), **result})
    return {
        "drop": drop_name,
        "cells": len(tuned),
        "measures": measures,
        "panels": figure_panels(tuned, drops),
    }
