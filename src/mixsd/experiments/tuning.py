"""Learning curves at matched memorization and the one declared tuning rule: pure functions (no models,
no files). `report_data` writes what `tuning_results` computes of a grid (OUT/tuning.json, OUT/curves.jsonl)
and `report` draws and tabulates it; `grid` reads the rule from the config.

A *curve* is a list of points in epoch order, each a dict with at least `epoch` and `memorization`: the
rows of a run's `train/curve.jsonl` (mixsd.training.curve), led by the base model's row as epoch 0, with a
`retention` score added by `add_retention`:

    retention = mean over the curve's probes of  <probe>_acc / <probe>_acc of the base model

(probes the base answers at least once; higher is better, 1 = as good as the base). Without probes the
plane's retention axis is `kl`, KL(base ‖ model) per token, where lower is better; every function here
takes the score's key and direction.

Matched memorization: a method's retention when it *first* reaches a memorization level, linearly
interpolated between the two epochs around the crossing (`interpolate_at`). A curve that never reaches
the level gives None: "not reached" is a result. Several seeds: their mean curve is interpolated, and the
95% interval is a percentile bootstrap over seeds; one seed: a Wilson interval of each probe's accuracy
at the interpolated point (base accuracy taken as fixed), averaged over probes like the score itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from mixsd.core.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, bootstrap_interval, wilson_interval
from mixsd.evaluation.probe_kinds import KL

# the 90% and 95%, and two lower levels: small models at a CPU budget often reach only those, and a
# comparison at a level both methods reach says more than two "not reached"
MATCHED_LEVELS = (0.5, 0.7, 0.9, 0.95)
EPOCH_TOLERANCE = 1e-6  # epochs are logged rounded to 4 decimals

Point = dict[str, Any]
Curve = list[Point]


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------------------
# Retention of a curve point
# --------------------------------------------------------------------------------------------------
def retention_probes(base: Point | None) -> list[str]:
    """Probes of the curve that count for retention: the `<probe>_acc` the base model scores above 0 on
    (a ratio to 0 is undefined). Memorization is not a probe: its key is `memorization`."""
    if not base:
        return []
    return sorted(k[: -len("_acc")] for k, v in base.items() if k.endswith("_acc") and _number(v) and v > 0)


def add_retention(rows: Sequence[Point], base: Point | None) -> Curve:
    """The curve of one run: the base row first (epoch 0, when given), then the run's rows, each with
    `retention` (mean probe accuracy ratio to the base; None without probes or without a base row)."""
    probes = retention_probes(base)
    points = []
    for row in [*([base] if base else []), *rows]:
        ratios = [row[f"{p}_acc"] / base[f"{p}_acc"] for p in probes if _number(row.get(f"{p}_acc"))]
        points.append({**row, "retention": sum(ratios) / len(ratios) if ratios else None})
    return points


# --------------------------------------------------------------------------------------------------
# Interpolation at a memorization level
# --------------------------------------------------------------------------------------------------
def interpolate_at(curve: Sequence[Point], level: float, key: str = "memorization") -> Point | None:
    """The curve where `key` first reaches `level`: every numeric score linearly interpolated between the
    last point below it and the first at or above it (`epoch` too), or that first point itself when the
    curve starts at or above the level. None when no point reaches it.

    `weight` is the interpolation weight of the later point (1 = exactly at it); `between` the two epochs.
    """
    points = [p for p in curve if _number(p.get(key))]
    for i, point in enumerate(points):
        if point[key] < level:
            continue
        if i == 0:
            return {**point, "weight": 1.0, "between": [None, point.get("epoch")]}
        before = points[i - 1]
        weight = (level - before[key]) / (point[key] - before[key])  # > 0: before[key] < level <= point[key]
        merged: Point = {}
        for name in set(before) | set(point):
            a, b = before.get(name), point.get(name)
            if _number(a) and _number(b):
                merged[name] = a + weight * (b - a)
            elif a is None and b is None:
                merged[name] = None
            else:
                merged[name] = None if _number(a) or _number(b) else b  # a score missing on one side: unknown
        merged[key] = level
        merged.update(weight=weight, between=[before.get("epoch"), point.get("epoch")])
        return merged
    return None


def retention_at_memorization(
    curve: Sequence[Point], level: float, retention: str = "retention", key: str = "memorization"
) -> float | None:
    """The retention score where the curve first reaches memorization `level` (interpolated); None when
    it never does."""
    point = interpolate_at(curve, level, key)
    return point.get(retention) if point else None


def mean_curve(curves: Sequence[Sequence[Point]]) -> Curve:
    """The mean over seeds, epoch by epoch: the epochs every curve has, every score every curve has there
    as a number (None where one lacks it)."""
    if not curves:
        return []
    keyed = [{round(float(p["epoch"]), 4): p for p in c if _number(p.get("epoch"))} for c in curves]
    epochs = sorted(set.intersection(*(set(k) for k in keyed)))
    mean: Curve = []
    for epoch in epochs:
        points = [k[epoch] for k in keyed]
        merged: Point = {"epoch": epoch}
        for name in set.intersection(*(set(p) for p in points)) - {"epoch"}:
            values = [p[name] for p in points]
            if all(_number(v) for v in values):
                merged[name] = sum(values) / len(values)
            elif all(v is None or _number(v) for v in values):
                merged[name] = None
        mean.append(merged)
    return mean


def within(curve: Sequence[Point], epochs: float | None) -> Curve:
    """The points up to `epochs` (all when None; a point without an epoch counts as within)."""
    return [
        p
        for p in curve
        if epochs is None or not _number(p.get("epoch")) or p["epoch"] <= epochs + EPOCH_TOLERANCE
    ]


def wilson_retention(point: Point, base: Point | None) -> list[float] | None:
    """One seed's 95% interval of the probe retention at a (possibly interpolated) point: each probe's
    Wilson interval at its accuracy there (the interpolated count rounded), divided by the base's
    accuracy, averaged over probes. None without probes or item counts (`<probe>_n`)."""
    probes = retention_probes(base)
    lows, highs = [], []
    for probe in probes:
        acc, n = point.get(f"{probe}_acc"), point.get(f"{probe}_n")
        if not _number(acc) or not _number(n) or n <= 0:
            return None
        low, high = wilson_interval(round(acc * n), int(n))
        lows.append(low / base[f"{probe}_acc"])
        highs.append(high / base[f"{probe}_acc"])
    if not lows:
        return None
    return [round(sum(lows) / len(lows), 6), round(sum(highs) / len(highs), 6)]


def matched_retention(
    curves: Sequence[Sequence[Point]],
    level: float,
    *,
    retention: str = "retention",
    base: Point | None = None,
    resamples: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Retention at matched memorization for one group of seeds (each curve one seed).

    reached          whether the mean curve over seeds reaches `level`
    epoch, value     where (interpolated epoch) and the retention score there
    ci95, interval   percentile bootstrap over seeds (several seeds), Wilson (one seed, probe retention),
                     or None
    seeds_reached    how many seeds' own curves reach it, of `seeds`
    best             the highest memorization of the mean curve (what it got to when not reached)
    """
    mean = mean_curve(curves)
    point = interpolate_at(mean, level)
    memorization = [p["memorization"] for p in mean if _number(p.get("memorization"))]
    entry: dict[str, Any] = {
        "level": level,
        "seeds": len(curves),
        "seeds_reached": sum(interpolate_at(c, level) is not None for c in curves),
        "best": max(memorization) if memorization else None,
        "reached": point is not None,
        "epoch": None,
        "value": None,
        "ci95": None,
        "interval": None,
    }
    if point is None:
        return entry
    entry.update(epoch=point.get("epoch"), value=point.get(retention), between=point["between"])
    if entry["value"] is None:
        return entry
    if len(curves) >= 2:

        def statistic(indices) -> float | None:
            resampled = interpolate_at(mean_curve([curves[int(i)] for i in indices]), level)
            return resampled.get(retention) if resampled else None

        entry["ci95"] = bootstrap_interval(
            statistic,
            [float(i) for i in range(len(curves))],
            resamples=BOOTSTRAP_RESAMPLES if resamples is None else resamples,
            seed=BOOTSTRAP_SEED if seed is None else seed,
        )
        entry["interval"] = "bootstrap over seeds" if entry["ci95"] else None
    elif retention == "retention":
        entry["ci95"] = wilson_retention(point, base)
        entry["interval"] = "Wilson" if entry["ci95"] else None
    return entry


# --------------------------------------------------------------------------------------------------
# The frontier and the selection rule
# --------------------------------------------------------------------------------------------------
def pareto_frontier(
    points: Sequence[tuple[float, float]], *, x_higher_is_better: bool = True
) -> list[tuple[float, float]]:
    """The points no other point beats on both axes (y = memorization, higher is better; x = retention,
    higher or lower is better), in increasing x."""
    sign = 1.0 if x_higher_is_better else -1.0
    frontier: list[tuple[float, float]] = []
    best_y = -math.inf
    # best x first; among equal x the highest y; keep a point only when it adds memorization
    for x, y in sorted(points, key=lambda p: (-sign * p[0], -p[1])):
        if y > best_y:
            frontier.append((x, y))
            best_y = y
    return sorted(frontier)


@dataclass(frozen=True)
class SelectionRule:
    """The one rule that picks each method's setting (the `select:` section of an experiment file)."""

    memorization: float = 0.95
    within_epochs: float | None = None
    retention_at: Literal["matched", "final"] = "matched"
    # the seeds the rule reads (None: all): every setting compared on the same seeds, also when the
    # chosen one is later run with more
    seeds: tuple[int, ...] | None = None

    def text(self, retention_name: str = "retention", higher_is_better: bool = True) -> str:
        budget = "the run's epochs" if self.within_epochs is None else f"{self.within_epochs:g} epochs"
        best = "highest" if higher_is_better else "lowest"
        where = (
            f"where it first reaches {self.memorization:.0%} (interpolated between epochs)"
            if self.retention_at == "matched"
            else f"after the last epoch of {budget}"
        )
        seeds = (
            "its mean curve over seeds"
            if self.seeds is None
            else f"its mean curve over seed(s) {', '.join(str(s) for s in self.seeds)}"
        )
        return (
            f"Per method (and λ), over its settings, each scored on {seeds}: among the "
            f"settings reaching ≥ {self.memorization:.0%} memorization within {budget}, the one with the "
            f"{best} {retention_name} {where}; if none reaches it, the one with the highest memorization "
            f"after the last epoch of {budget} (ties: the better {retention_name})."
        )


def summarize_setting(
    curves: Sequence[Sequence[Point]], rule: SelectionRule, retention: str = "retention"
) -> dict[str, Any]:
    """What the rule reads of one setting: its mean curve over seeds within the rule's epochs."""
    mean = within(mean_curve(curves), rule.within_epochs)
    reached = interpolate_at(mean, rule.memorization)
    final = mean[-1] if mean else {}
    return {
        "seeds": len(curves),
        "points": len(mean),
        "reached": reached is not None,
        "epoch": reached.get("epoch") if reached else None,
        "retention_at_threshold": reached.get(retention) if reached else None,
        "final_epoch": final.get("epoch"),
        "final_memorization": final.get("memorization"),
        "final_retention": final.get(retention),
    }


def select_setting(
    summaries: dict[str, dict[str, Any]], rule: SelectionRule, *, higher_is_better: bool = True
) -> tuple[str | None, str]:
    """(chosen setting, why) under the rule, from `summarize_setting` of every setting of one method.
    Ties keep the setting listed first (the config's order)."""
    if not summaries:
        return None, "no settings"
    sign = 1.0 if higher_is_better else -1.0
    order = list(summaries)
    budget = "" if rule.within_epochs is None else f" within {rule.within_epochs:g} epochs"
    score_key = "retention_at_threshold" if rule.retention_at == "matched" else "final_retention"
    reaching = [name for name in order if summaries[name]["reached"]]
    if reaching:
        scored = [name for name in reaching if _number(summaries[name][score_key])]
        if scored:
            chosen = max(scored, key=lambda n: (sign * summaries[n][score_key], -order.index(n)))
            value = summaries[chosen][score_key]
            where = "at that point" if rule.retention_at == "matched" else "at its last epoch"
            return chosen, (
                f"reaches {rule.memorization:.0%} memorization{budget} (epoch "
                f"{_epoch_text(summaries[chosen]['epoch'])}) with retention {value:.3g} {where}: the "
                f"{'highest' if higher_is_better else 'lowest'} of the {len(reaching)} setting(s) reaching it"
            )
        chosen = reaching[0]
        return chosen, (
            f"reaches {rule.memorization:.0%} memorization{budget}; no retention score to rank the "
            f"{len(reaching)} setting(s) reaching it, so the first listed"
        )

    def fallback(name: str) -> tuple[float, float, int]:
        s = summaries[name]
        memo = s["final_memorization"] if _number(s["final_memorization"]) else -math.inf
        kept = sign * s["final_retention"] if _number(s["final_retention"]) else -math.inf
        return (memo, kept, -order.index(name))

    chosen = max(order, key=fallback)
    memo = summaries[chosen]["final_memorization"]
    memo_text = "unknown" if memo is None else f"{memo:.3g}"
    return chosen, (
        f"no setting reaches {rule.memorization:.0%} memorization{budget}: the highest memorization "
        f"({memo_text})"
    )


def _epoch_text(epoch: Any) -> str:
    return f"{epoch:.2f}" if _number(epoch) else "final"


# --------------------------------------------------------------------------------------------------
# A grid's curves: grouped, matched and tuned (OUT/tuning.json and OUT/curves.jsonl; the report draws them)
# --------------------------------------------------------------------------------------------------
def curve_groups(
    rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], base: Point | None
) -> tuple[dict[str, dict[str, Any]], str]:
    """Per group (method, λ, setting): its seeds' curves as points (base row first), and where they
    come from: "curves" (train/curve.jsonl), or "final" when no cell has a curve (one point per cell:
    its final train_acc and retention_mean / kl_per_token, enough for the selection rule)."""
    tuned = [r for r in rows if r.get("method") != "base"]
    source = "curves" if any(curves.get(r["cell"]) for r in tuned) else "final"
    groups: dict[str, dict[str, Any]] = {}
    for row in tuned:
        if source == "curves":
            if not curves.get(row["cell"]):
                continue
            points = add_retention(curves[row["cell"]], base)
            if base and any(point.get("edit") for point in curves[row["cell"]]):
                points = points[1:]  # an edit is one state, not a path from the base: nothing to interpolate
        else:
            epoch = row.get("train_epochs")
            points = [
                {
                    "epoch": epoch if isinstance(epoch, int | float) else 1.0,
                    "memorization": row.get("train_acc"),
                    "retention": row.get("retention_mean"),
                    KL.name: row.get("kl_per_token"),  # as the curve names its KL column
                }
            ]
        entry = groups.setdefault(
            row["group"],
            {
                "family": row.get("family", row["group"]),
                "setting": row.get("setting", ""),
                "method": row["method"],
                "lam": row.get("lam"),
                "cells": [],
                "seeds": [],
                "curves": [],
            },
        )
        entry["cells"].append(row["cell"])
        entry["seeds"].append(row.get("seed"))
        entry["curves"].append(points)
    return groups, source


def retention_key(groups: dict[str, dict[str, Any]]) -> tuple[str, bool]:
    """The plane's retention score and whether higher is better: probe retention where any point has it,
    else KL(base‖model) per token."""
    has = any(
        isinstance(p.get("retention"), int | float) for g in groups.values() for c in g["curves"] for p in c
    )
    return ("retention", True) if has else (KL.name, False)


def retention_name(key: str) -> str:
    """How the tables name the retention score `key`."""
    return "retention" if key == "retention" else "KL to the base"


def tuning_results(
    rows: list[dict[str, Any]],
    curves: dict[str, list[dict[str, Any]]],
    base: Point | None,
    rule: SelectionRule,
) -> dict[str, Any]:
    """Everything the report's curve sections and figures show: per group its curves and their mean over
    seeds, the matched memorization table, and per method with several settings each setting's summary
    under the rule, the one chosen and the method's frontier across its settings (OUT/tuning.json holds
    all but the per-seed curves, which are OUT/curves.jsonl)."""
    groups, source = curve_groups(rows, curves, base)
    key, higher = retention_key(groups)
    for entry in groups.values():
        entry["mean_curve"] = mean_curve(entry["curves"])
    levels = sorted({*MATCHED_LEVELS, rule.memorization})
    matched = {}
    if source == "curves":
        for group, entry in groups.items():
            matched[group] = [
                matched_retention(entry["curves"], level, retention=key, base=base) for level in levels
            ]
    families: dict[str, dict[str, str]] = {}
    for group, entry in groups.items():
        families.setdefault(entry["family"], {})[entry["setting"]] = group
    selection = {}
    for family, settings in families.items():
        if len(settings) < 2 and not any(settings):  # a method without a sweep: nothing to choose
            continue
        summaries = {  # a setting without a curve on the rule's seeds is not a candidate
            setting: summarize_setting(_rule_curves(groups[group], rule), rule, key)
            for setting, group in settings.items()
            if _rule_curves(groups[group], rule)
        }
        chosen, why = select_setting(summaries, rule, higher_is_better=higher)
        selection[family] = {
            "settings": summaries,
            "groups": settings,
            "chosen": chosen,
            "why": why,
            "frontier": pareto_frontier(
                [point for group in settings.values() for point in _plane(groups[group], key)],
                x_higher_is_better=higher,
            ),
        }
    return {
        "source": source,
        "retention": key,
        "retention_name": retention_name(key),
        "higher_is_better": higher,
        "levels": levels,
        "rule": {**asdict(rule), "text": rule.text(retention_name(key), higher)},
        "base": base,
        "groups": groups,
        "matched": matched,
        "selection": selection,
    }


def _plane(entry: dict[str, Any], key: str) -> list[tuple[float, float]]:
    """A group's mean curve in the memorization–retention plane: (retention score, memorization)."""
    return [
        (p[key], p["memorization"])
        for p in entry["mean_curve"]
        if isinstance(p.get(key), int | float) and isinstance(p.get("memorization"), int | float)
    ]


def _rule_curves(entry: dict[str, Any], rule: SelectionRule) -> list[list[dict[str, Any]]]:
    """The curves of a group that the rule reads: those of its seeds (all when it names none)."""
    if rule.seeds is None:
        return entry["curves"]
    return [c for c, seed in zip(entry["curves"], entry["seeds"], strict=True) if seed in rule.seeds]


def curve_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of every curve of `tuning_results`, one row each (OUT/curves.jsonl)."""
    points = []
    for group, entry in results["groups"].items():
        for cell, seed, curve in zip(entry["cells"], entry["seeds"], entry["curves"], strict=True):
            for point in curve:
                points.append(
                    {
                        "cell": cell,
                        "group": group,
                        "family": entry["family"],
                        "setting": entry["setting"],
                        "seed": seed,
                        **point,
                    }
                )
    return points
