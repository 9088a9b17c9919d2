"""Scoring statistics as pure functions: intervals, paired comparisons, chance-normalized retention,
correlations over cells, and the result table's columns of a results file. No models, no files:
`evaluate`, `experiment` and `report` call these. The error taxonomy is `mixsd.evaluation.taxonomy`.

Intervals are 95%: Wilson for a single rate (sensible at 0/n and n/n); a percentile bootstrap over items
for ratios and differences. Base and tuned model answer the *same* items, so comparisons are paired:
the exact McNemar test on the discordant items and a paired bootstrap (one resample of items scores both
models), which is tighter and more honest than comparing two independent intervals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
# The paper's tables count target tokens with NLL > 5 nats under the base model (p < e^-5 ~ 0.0067): tokens
# the base model would almost never write. A constant, not an option, so every nll.json counts the same.
HIGH_NLL_NATS = 5.0


# --------------------------------------------------------------------------------------------------
# Single rates
# --------------------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (sensible at 0/n and n/n, unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else low, 1.0 if successes == n else high)


def rate(successes: int, n: int) -> dict[str, Any]:
    """A rate with its count and 95% Wilson interval, as every results file stores one."""
    low, high = wilson_interval(successes, n)
    return {
        "value": successes / n if n else None,
        "correct": successes,
        "n": n,
        "ci95": [round(low, 6), round(high, 6)],
    }


# --------------------------------------------------------------------------------------------------
# Chance-normalized retention
# --------------------------------------------------------------------------------------------------
def well_above_chance(correct: int, n: int, chance: float) -> bool:
    """Whether a base model's accuracy is well above chance: its whole 95% Wilson interval lies above it.

    Retention is only a headline figure on such probes (issue 11): when the base model is near chance,
    (acc - chance) / (acc_base - chance) divides by noise (0.35 vs chance 0.33 turns a 2-item change into
    a retention of 2 or -1). The raw figures stay in the results either way."""
    return n > 0 and wilson_interval(correct, n)[0] > chance


def chance_normalized(acc: float | None, base_acc: float | None, chance: float | None) -> float | None:
    """(acc - chance) / (base_acc - chance): the share of the base model's above-chance skill kept.

    1.0 = all kept, 0.0 = down to guessing. None when the base is not above chance (nothing to keep: the
    ratio would divide by ~0 or flip sign).
    """
    if acc is None or base_acc is None or chance is None or base_acc - chance <= 1e-12:
        return None
    return (acc - chance) / (base_acc - chance)


# --------------------------------------------------------------------------------------------------
# Paired comparisons
# --------------------------------------------------------------------------------------------------
def mcnemar_exact(right_to_wrong: int, wrong_to_right: int) -> float:
    """Two-sided exact McNemar p-value: under "no difference" each discordant item flips either way with
    probability 1/2, so p = P(Binomial(b + c, 1/2) as extreme as min(b, c)), doubled and capped at 1."""
    n = right_to_wrong + wrong_to_right
    if n == 0:
        return 1.0
    k = min(right_to_wrong, wrong_to_right)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_counts(before: Sequence[bool], after: Sequence[bool]) -> dict[str, int]:
    """How items moved between two scorings of the same items (per-example forgetting and learning)."""
    if len(before) != len(after):
        raise ValueError(f"paired scores need the same items ({len(before)} vs {len(after)})")
    counts = {"both_right": 0, "right_to_wrong": 0, "wrong_to_right": 0, "both_wrong": 0}
    for a, b in zip(before, after, strict=True):
        key = ("both_right" if b else "right_to_wrong") if a else ("wrong_to_right" if b else "both_wrong")
        counts[key] += 1
    return counts


def bootstrap_interval(
    statistic: Callable[..., float | None],
    *columns: Sequence[float],
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> list[float] | None:
    """Percentile bootstrap interval of `statistic(*columns)`, resampling items (rows) with replacement.

    The columns are resampled with the *same* indices (a paired bootstrap: both models answer the same
    resampled items). Resamples where the statistic is undefined (None/nan) are left out; None when
    there are no items or fewer than half the resamples are defined. Same seed, same interval.
    """
    arrays = [np.asarray(c, dtype=float) for c in columns]
    n = len(arrays[0]) if arrays else 0
    if n == 0 or any(len(a) != n for a in arrays):
        if any(len(a) != n for a in arrays):
            raise ValueError("bootstrap columns must have the same length")
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, n, size=n)
        value = statistic(*(a[index] for a in arrays))
        if value is not None and math.isfinite(value):
            values.append(value)
    if len(values) < resamples / 2:
        return None
    alpha = (1 - level) / 2
    low, high = np.quantile(np.asarray(values), [alpha, 1 - alpha])
    return [round(float(low), 6), round(float(high), 6)]


def _mean_ratio(model: np.ndarray, base: np.ndarray) -> float | None:
    denominator = base.mean()
    return float(model.mean() / denominator) if denominator > 0 else None


def _mean_difference(before: np.ndarray, after: np.ndarray) -> float:
    return float(after.mean() - before.mean())


def paired_comparison(
    before: Sequence[bool],
    after: Sequence[bool],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict[str, Any]:
    """Two scorings of the same items (base vs tuned, method A vs method B), compared item by item.

    `difference` = accuracy(after) - accuracy(before) with a paired-bootstrap 95% interval; the
    discordant counts (right_to_wrong = forgotten, wrong_to_right = learned) and the exact McNemar p-value.
    """
    counts = paired_counts(before, after)
    n = len(before)
    b = [float(x) for x in before]
    a = [float(x) for x in after]
    return {
        "n": n,
        "before": sum(b) / n if n else None,
        "after": sum(a) / n if n else None,
        "difference": (sum(a) - sum(b)) / n if n else None,
        "difference_ci95": bootstrap_interval(_mean_difference, b, a, resamples=resamples, seed=seed),
        **counts,
        "mcnemar_p": round(mcnemar_exact(counts["right_to_wrong"], counts["wrong_to_right"]), 6),
    }


def ratio_interval(
    model: Sequence[float],
    base: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float] | None:
    """Paired-bootstrap 95% interval of mean(model) / mean(base) over the same items (a retention ratio)."""
    return bootstrap_interval(_mean_ratio, model, base, resamples=resamples, seed=seed)


def chance_normalized_interval(
    model: Sequence[bool],
    base: Sequence[bool],
    chance: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float] | None:
    """Paired-bootstrap 95% interval of the chance-normalized retention (chance per item: 1 / choices)."""

    def statistic(m: np.ndarray, b: np.ndarray, c: np.ndarray) -> float | None:
        return chance_normalized(float(m.mean()), float(b.mean()), float(c.mean()))

    return bootstrap_interval(statistic, model, base, chance, resamples=resamples, seed=seed)


def perplexity_ratio_interval(
    model_nll: Sequence[float],
    base_nll: Sequence[float],
    tokens: Sequence[float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> list[float] | None:
    """Paired-bootstrap 95% interval of base_ppl / model_ppl, resampling texts (token-weighted perplexity)."""

    def statistic(m: np.ndarray, b: np.ndarray, t: np.ndarray) -> float | None:
        total = t.sum()
        return float(math.exp((b.sum() - m.sum()) / total)) if total > 0 else None

    return bootstrap_interval(statistic, model_nll, base_nll, tokens, resamples=resamples, seed=seed)


def mean_interval(values: Sequence[float], **kwargs: Any) -> list[float] | None:
    """Bootstrap 95% interval of a mean (e.g. of per-item scores)."""
    return bootstrap_interval(lambda v: float(v.mean()), values, **kwargs)


def squad_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """SQuAD's scores of a split from per-item `squad_em`, `squad_f1`, `contained` (answers.squad_scores):
    exact match and contained as rates with Wilson intervals, F1 as a mean with a bootstrap interval."""
    n = len(rows)
    f1 = [float(r["squad_f1"]) for r in rows]
    return {
        "em": rate(sum(bool(r["squad_em"]) for r in rows), n),
        "f1": {"value": sum(f1) / n if n else None, "n": n, "ci95": mean_interval(f1) if n else None},
        "contained": rate(sum(bool(r["contained"]) for r in rows), n),
    }


def pair_rows(
    before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]], key: str
) -> tuple[list[bool], list[bool]]:
    """Align two lists of per-item prediction rows by id and return their `key` booleans, item for item.

    Only items both sides scored count (a comparison of different items would not be paired).
    """
    first = {row["id"]: bool(row[key]) for row in before if key in row}
    second = {row["id"]: bool(row[key]) for row in after if key in row}
    common = [i for i in first if i in second]
    return [first[i] for i in common], [second[i] for i in common]


# --------------------------------------------------------------------------------------------------
# Correlation over experiment cells (the paper's Fisher analysis: displacement vs retention drop)
# --------------------------------------------------------------------------------------------------
# Below this many cells a correlation says next to nothing (two points always give r = ±1, three leave one
# degree of freedom), so it is reported as "not enough cells" rather than as a number.
MIN_CORRELATION_CELLS = 4


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None when either side is constant (r is undefined, not 0) or there are < 2 points."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"pearson needs paired values ({len(a)} vs {len(b)})")
    if len(a) < 2:
        return None
    centered = []
    for raw in (a, b):
        deviation = raw - raw.mean()
        # relative test, so that tiny-valued columns (a Fisher ratio of 1e-9) still count as varying while
        # values equal up to float noise count as constant
        if float(np.abs(deviation).max()) <= 1e-12 * float(np.abs(raw).max()):
            return None
        centered.append(deviation)
    a, b = centered
    return max(-1.0, min(1.0, float((a * b).sum()) / math.sqrt(float((a * a).sum()) * float((b * b).sum()))))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n with ties given the mean of the ranks they span (what Spearman's rho needs)."""
    data = np.asarray(values, dtype=float)
    order = np.argsort(data, kind="stable")
    ranks = np.empty(len(data), dtype=float)
    start = 0
    while start < len(data):
        end = start
        while end + 1 < len(data) and data[order[end + 1]] == data[order[start]]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks; None where that is undefined."""
    if len(x) != len(y):
        raise ValueError(f"spearman needs paired values ({len(x)} vs {len(y)})")
    return pearson(average_ranks(x), average_ranks(y)) if len(x) >= 2 else None


def correlation_with_interval(
    x: Sequence[float | None],
    y: Sequence[float | None],
    n_boot: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    *,
    min_cells: int = MIN_CORRELATION_CELLS,
) -> dict[str, Any]:
    """Pearson and Spearman correlation of paired per-cell values, each with a 95% percentile bootstrap
    interval over cells (cells resampled with replacement, x and y together; seeded).

    Pairs where either value is missing (None, nan) are left out first; `n` counts the rest. With fewer
    than `min_cells` pairs nothing is computed and `note` says "not enough cells"; a side that does not
    vary gives r = None with its own note. Resamples where r is undefined (a constant resample) are
    dropped, and the interval is None when fewer than half of them are defined.
    """
    if len(x) != len(y):
        raise ValueError(f"correlation needs one x and one y per cell ({len(x)} vs {len(y)})")
    pairs = [
        (float(a), float(b))
        for a, b in zip(x, y, strict=True)
        if isinstance(a, int | float) and isinstance(b, int | float) and math.isfinite(a) and math.isfinite(b)
    ]
    result: dict[str, Any] = {
        "n": len(pairs),
        "pearson": None,
        "pearson_ci95": None,
        "spearman": None,
        "spearman_ci95": None,
        "resamples": n_boot,
        "seed": seed,
        "note": None,
    }
    if len(pairs) < min_cells:
        result["note"] = f"not enough cells ({len(pairs)} with both values; at least {min_cells} needed)"
        return result
    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    result["pearson"] = pearson(xs, ys)
    result["spearman"] = spearman(xs, ys)
    if result["pearson"] is None:
        result["note"] = "undefined: one of the two values is the same in every cell"
        return result
    result["pearson_ci95"] = bootstrap_interval(pearson, xs, ys, resamples=n_boot, seed=seed)
    result["spearman_ci95"] = bootstrap_interval(spearman, xs, ys, resamples=n_boot, seed=seed)
    return result


def partial_correlation(
    x: Sequence[float], y: Sequence[float], covariates: Sequence[Sequence[float]]
) -> float | None:
    """Pearson correlation of x and y after removing from each what a linear fit on the covariates
    (columns, plus an intercept) explains: the association left once those are held fixed."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    design = np.column_stack([np.ones(len(xs)), *[np.asarray(c, dtype=float) for c in covariates]])
    if len(xs) <= np.linalg.matrix_rank(design) + 1:
        return None  # no degrees of freedom left for a correlation
    fit = np.linalg.lstsq(design, np.column_stack([xs, ys]), rcond=None)[0]
    residuals = np.column_stack([xs, ys]) - design @ fit
    return pearson(residuals[:, 0].tolist(), residuals[:, 1].tolist())


def cluster_bootstrap_correlation(
    x: Sequence[float],
    y: Sequence[float],
    clusters: Sequence[str],
    covariates: Sequence[Sequence[float]] = (),
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    min_cells: int = MIN_CORRELATION_CELLS,
) -> dict[str, Any]:
    """A (partial, with covariates) Pearson correlation over cells with a percentile interval from a
    cluster bootstrap: whole clusters (e.g. the seeds of one setting) are resampled, since cells of one
    setting are not independent draws. Resamples where r is undefined are dropped; no interval when fewer
    than half are defined."""
    n = len(x)
    result: dict[str, Any] = {"n": n, "clusters": len(set(clusters)), "r": None, "ci95": None, "note": None}
    if n < min_cells:
        result["note"] = f"not enough cells ({n}; at least {min_cells} needed)"
        return result
    columns = [np.asarray(c, dtype=float) for c in covariates]
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    result["r"] = partial_correlation(xs, ys, columns) if columns else pearson(xs.tolist(), ys.tolist())
    if result["r"] is None:
        result["note"] = "undefined (a value does not vary, or too few cells for the covariates)"
        return result
    names = sorted(set(clusters))
    members = {name: [i for i, c in enumerate(clusters) if c == name] for name in names}
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = [i for k in rng.integers(0, len(names), size=len(names)) for i in members[names[k]]]
        r = (
            partial_correlation(xs[index], ys[index], [c[index] for c in columns])
            if columns
            else pearson(xs[index].tolist(), ys[index].tolist())
        )
        if r is not None and math.isfinite(r):
            values.append(r)
    if len(values) >= resamples / 2:
        low, high = np.quantile(np.asarray(values), [0.025, 0.975])
        result["ci95"] = [round(float(low), 4), round(float(high), 4)]
    result["r"] = round(float(result["r"]), 4)
    return result


# --------------------------------------------------------------------------------------------------
# Item-and-seed intervals: the hierarchical bootstrap
# --------------------------------------------------------------------------------------------------
SeedItems = dict[str, Sequence[float]]  # one seed's per-item scores, by probe (same items in every seed)


def hierarchical_bootstrap(
    seeds: Sequence[SeedItems],
    other: Sequence[SeedItems] | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = 0.95,
) -> dict[str, Any] | None:
    """A score averaged over probes, over seeds and over items, with its percentile interval from a
    two-level bootstrap: resample the seeds, then the items within each probe (issue 19: an interval over
    seeds alone, with the same items reused, understates the noise of small probes).

    `seeds`: one dict per seed, probe -> per-item scores (0/1 or any number), the same items in the same
    order in every seed. With `other` (a second method's seeds on the same items) the statistic is the
    difference seeds − other, and the item resample is shared by both (paired over items); each method's
    seeds are resampled on their own. Probes missing from any seed (or empty) are left out.
    Returns {"value", "ci95", "seeds", "other_seeds", "items": {probe: n}} or None when nothing is shared.
    """
    groups = [list(seeds)] + ([list(other)] if other is not None else [])
    if any(not g for g in groups):
        return None
    probes = [p for p in groups[0][0] if all(len(s.get(p, ())) for g in groups for s in g)]
    sizes = {p: len(groups[0][0][p]) for p in probes}
    if any(len(s[p]) != sizes[p] for g in groups for s in g for p in probes):
        raise ValueError("every seed must score the same items of each probe")
    if not probes:
        return None
    # per group and probe a (seeds x items) array
    arrays = [{p: np.array([s[p] for s in g], dtype=float) for p in probes} for g in groups]
    rng = np.random.default_rng(seed)
    seed_draws = [rng.integers(0, len(g), size=(resamples, len(g))) for g in groups]
    item_draws = {p: rng.integers(0, n, size=(resamples, n)) for p, n in sizes.items()}

    def group_means(index: int) -> tuple[float, np.ndarray]:
        """The group's statistic on the data as it is, and on every resample."""
        point, draws = [], []
        for p in probes:
            data = arrays[index][p]  # seeds x items
            point.append(data.mean())
            per_seed = data[:, item_draws[p]].mean(axis=2)  # seeds x resamples: items resampled
            chosen = np.take_along_axis(per_seed.T, seed_draws[index], axis=1)  # resamples x seeds drawn
            draws.append(chosen.mean(axis=1))
        return float(np.mean(point)), np.mean(draws, axis=0)

    value, values = group_means(0)
    if other is not None:
        other_value, other_values = group_means(1)
        value, values = value - other_value, values - other_values
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha])
    return {
        "value": round(value, 6),
        "ci95": [round(float(low), 6), round(float(high), 6)],
        "seeds": len(groups[0]),
        "other_seeds": len(groups[1]) if other is not None else None,
        "items": sizes,
    }


# --------------------------------------------------------------------------------------------------
# Table columns: one experiment cell's results files flattened into a row (used by results.cell_row)
# --------------------------------------------------------------------------------------------------
def _number(node: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def split_columns(split: str, scores: dict[str, Any]) -> dict[str, Any]:
    """A generation split's columns: `{split}_acc` under the corpus's matcher (named in `{split}_match`),
    its count and Wilson interval, and every mode's accuracy beside it (`{split}_entity` ...)."""
    # results written before matchers were named per corpus hold "loose"/"strict" and no "accuracy"
    headline = scores.get("accuracy") or scores.get("loose") or {}
    columns: dict[str, Any] = {
        f"{split}_acc": _number(headline, "value"),
        f"{split}_match": scores.get("match", "entity"),
        f"{split}_correct": _number(headline, "correct"),
        f"{split}_n": _number(headline, "n"),
        f"{split}_acc_ci95": headline.get("ci95"),
    }
    for mode, old in (("entity", "loose"), ("exact", "strict"), ("number", None)):
        node = scores.get(mode) or (scores.get(old) if old else None)
        columns[f"{split}_{mode}"] = _number(node, "value")
    if "squad" in scores:  # qa suite: SQuAD's exact match and F1, and the answer-contained rate
        for key in ("em", "f1", "contained"):
            columns[f"{split}_squad_{key}"] = _number(scores["squad"], key, "value")
    return columns


def probe_columns(probe: str, summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """A retention probe's columns for its chosen `metric` (acc, acc_norm or ppl).

    `{probe}_retention` is the chance-normalized retention for multiple choice ((acc - chance) /
    (acc_base - chance)), model/base for perplexity, with `{probe}_retention_ci95` (paired bootstrap);
    the raw ratio stays beside it (`{probe}_retention_raw`), and for multiple choice the per-item
    movement against the base: `{probe}_right_to_wrong`, `{probe}_wrong_to_right`, `{probe}_mcnemar_p`.
    """
    value = _number(summary, metric) if metric == "ppl" else _number(summary, metric, "value")
    raw = _number(summary, "retention", metric)
    columns: dict[str, Any] = {f"{probe}_{metric}": value, f"{probe}_retention_raw": raw}
    # A probe whose summary has a chance level (its items are answered by choosing among options) is
    # retained above chance; the kind's name is not spelled here (mixsd.evaluation.probe_kinds names the kinds).
    if "chance" in summary:
        normalized = _number(summary, "retention_normalized", metric)
        if normalized is None and "retention_normalized" not in summary:  # results from before it existed
            normalized = chance_normalized(
                value, _number(summary, "base", metric, "value"), summary.get("chance")
            )
        base = (summary.get("base") or {}).get(metric) or {}
        if isinstance(base.get("correct"), int) and isinstance(base.get("n"), int) and summary.get("chance"):
            above = well_above_chance(base["correct"], base["n"], summary["chance"])
            columns[f"{probe}_base_above_chance"] = above
            if not above:  # not a headline probe: raw figures only (see well_above_chance)
                normalized = None
        columns[f"{probe}_retention"] = normalized
        columns[f"{probe}_retention_ci95"] = (summary.get("retention_normalized_ci95") or {}).get(metric)
        columns[f"{probe}_retention_raw_ci95"] = (summary.get("retention_ci95") or {}).get(metric)
        paired = (summary.get("paired") or {}).get(metric) or {}
        for key in ("right_to_wrong", "wrong_to_right", "mcnemar_p"):
            columns[f"{probe}_{key}"] = paired.get(key)
        if _number(summary, metric, "correct") is not None:
            columns[f"{probe}_{metric}_ci95"] = summary[metric].get("ci95")
    else:
        columns[f"{probe}_retention"] = raw
        columns[f"{probe}_retention_ci95"] = (summary.get("retention_ci95") or {}).get(metric)
    return columns


def analysis_columns(nll: dict[str, Any], fisher: dict[str, Any]) -> dict[str, Any]:
    """A cell's columns from `mixsd analyze nll` and `mixsd analyze fisher` (empty dicts: not run).

    NLL of the training targets under the base model: `target_nll_mean`/`_median`, and
    `target_nll_above_5` = share of target tokens with NLL > 5 nats (the paper's count), with its
    `_count`, `_n`, Wilson `_ci95`, and per branch letter `target_nll_above_5_E`/`_N`/`_G` (expert, naive,
    ground truth). Fisher (F from the base model on probe data, Δθ = tuned − base):
    `fisher_displacement` Σ F·Δθ²; `fisher_displacement_norm` Σ F·Δθ² / Σ F; `fisher_ratio`
    Σ F·Δθ² / ‖Δθ‖² (the Fisher-weighted ratio: how sensitive the directions moved along are, whatever the
    step's size); `delta_norm_sq` the raw ‖Δθ‖².
    """
    high = _number(nll, "overall", "high_nll", "value")
    overall_high = (nll.get("overall") or {}).get("high_nll") or {}
    columns: dict[str, Any] = {
        "target_nll_mean": _number(nll, "overall", "mean"),
        "target_nll_median": _number(nll, "overall", "median"),
        "target_nll_above_5": high,
        "target_nll_above_5_count": _number(overall_high, "count"),
        "target_nll_above_5_n": _number(overall_high, "n"),
        "target_nll_above_5_ci95": overall_high.get("ci95") if high is not None else None,
    }
    for letter in ("E", "N", "G"):
        columns[f"target_nll_above_5_{letter}"] = _number(nll, "by_branch", letter, "high_nll", "value")
    columns.update(
        {
            "fisher_displacement": _number(fisher, "totals", "displacement"),
            "fisher_displacement_norm": _number(fisher, "totals", "normalized_by_fisher"),
            "fisher_ratio": _number(fisher, "totals", "normalized_by_delta"),
            "delta_norm_sq": _number(fisher, "totals", "delta_sq"),
        }
    )
    return columns
