"""The experiment report: figures (matplotlib, PNG) and one Markdown and one self-contained HTML page.

Figures:
    pareto.png     memorization vs retention, one point per method and lambda, error bars over seeds
    retention.png  retention per probe and method
    nll.png        NLL of target tokens under the base model: ground truth vs mixed targets
    fisher.png     Fisher-weighted parameter displacement per method
    curves.png     training loss curves
    trajectories.png  with learning curves: each method (and setting) epoch by epoch in the
                   memorization–retention plane, from the base model (epoch 0)
    frontier.png   with a sweep: every setting's epochs and each method's frontier across its settings

With learning curves the report also holds retention at matched memorization (90%, 95%, interpolated
between epochs) and, where a method sweeps settings, the declared selection rule and its choice
(`mixsd.tuning`); every curve point is in OUT/curves.jsonl, the tables in OUT/tuning.json.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mixsd.files import atomic_write_json, atomic_write_jsonl, atomic_write_text
from mixsd.lmeval import item_outcomes, table_tasks
from mixsd.results import MAIN_COLUMNS, RETENTION_METRIC, aggregate
from mixsd.tuning import SelectionRule

COLORS = {
    "base": "#444444",
    "sft": "#d62728",
    "mixsd": "#1f77b4",
    "opsd": "#2ca02c",
    "rewrite": "#9467bd",
    "cpt": "#ff7f0e",
}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; works on machines without a display
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def _groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return groups


def _numbers(members: list[dict[str, Any]], key: str) -> list[float]:
    return [m[key] for m in members if isinstance(m.get(key), int | float)]


def _shade(method: str, lam: float | None) -> str:
    if method != "mixsd" or lam is None:
        return COLORS.get(method, "#777777")
    from matplotlib import colormaps

    return colormaps["Blues"](0.45 + 0.5 * (1 - lam))


def pareto_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    memo_key = "train_acc"
    modes = sorted({r["train_match"] for r in rows if isinstance(r.get("train_match"), str)})
    retention_key = (
        "retention_mean" if any(isinstance(r.get("retention_mean"), float) for r in rows) else None
    )
    x_key, x_label = (
        (retention_key, "retention (model / base, mean over probes)")
        if retention_key
        else ("kl_per_token", "KL(base ‖ model) per token  (lower = less forgetting)")
    )
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    plotted = False
    for group, members in _groups(rows).items():
        xs, ys = _numbers(members, x_key), _numbers(members, memo_key)
        if not xs or not ys:
            continue
        (x, x_sd), (y, y_sd) = _mean_sd(xs), _mean_sd(ys)
        first = members[0]
        ax.errorbar(
            x,
            y,
            xerr=x_sd or None,
            yerr=y_sd or None,
            fmt="o",
            ms=8,
            capsize=3,
            color=_shade(first["method"], first["lam"]),
            label=f"{group} (n={len(members)})",
        )
        ax.annotate(group, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
        plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"memorization (training questions, {'/'.join(modes) or 'entity'} match accuracy)")
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title("Memorization vs retention (mean ± sd over seeds)")
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)


def retention_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    probes = sorted(
        {
            k[: -len("_retention")]
            for r in rows
            for k, v in r.items()
            if k.endswith("_retention") and isinstance(v, int | float)
        }
    )
    groups = [(g, m) for g, m in _groups(rows).items() if m[0]["method"] != "base"]
    if not probes or not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.4, 1.6 * len(probes) + 2), 4.2))
    width = 0.8 / len(groups)
    for i, (group, members) in enumerate(groups):
        stats = [_mean_sd(_numbers(members, f"{p}_retention") or [float("nan")]) for p in probes]
        ax.bar(
            [j + i * width for j in range(len(probes))],
            [s[0] for s in stats],
            width,
            yerr=[s[1] for s in stats],
            capsize=2,
            label=group,
            color=_shade(members[0]["method"], members[0]["lam"]),
        )
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(probes))], probes, fontsize=8)
    ax.set_ylabel("retention (model / base)")
    ax.set_title("Retention per probe")
    ax.legend(fontsize=7)
    return _save(fig, path)


def nll_figure(cells_dir: Path, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Histogram of per-token target NLL under the base model, one line per method (first seed)."""
    series = []
    for row in rows:
        nll_file = cells_dir / row["cell"] / "nll.json"
        first_seed = min(r["seed"] for r in rows if r["group"] == row["group"])
        if row["seed"] != first_seed or not nll_file.is_file():
            continue
        overall = json.loads(nll_file.read_text()).get("overall", {})
        histogram = overall.get("histogram") or {}
        if histogram.get("counts"):
            series.append((row, overall, histogram))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels: list[str] = []
    for row, overall, histogram in series:
        # The bins are uneven (finer near zero), so they are drawn side by side, labelled by range.
        edges = histogram["edges"]
        labels = [
            f"{lo}–{hi}" if hi != "inf" else f">{lo}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
        total = sum(histogram["counts"]) or 1
        ax.stairs(
            [max(c / total, 1e-4) for c in histogram["counts"]],
            range(len(labels) + 1),
            lw=1.6,
            color=_shade(row["method"], row["lam"]),
            label=f"{row['group']} (mean {overall['mean']:.2f} nats)",
        )
    ax.set_xticks([i + 0.5 for i in range(len(labels))], labels, rotation=35, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("NLL of a target token under the base model (nats), given the naive prompt")
    ax.set_ylabel("fraction of target tokens")
    ax.set_title("How surprising are the targets to the base model?")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fisher_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    groups = [(g, m) for g, m in _groups(rows).items() if _numbers(m, "fisher_displacement_norm")]
    if not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    stats = [_mean_sd(_numbers(m, "fisher_displacement_norm")) for _, m in groups]
    ax.bar(
        range(len(groups)),
        [s[0] for s in stats],
        yerr=[s[1] for s in stats],
        capsize=3,
        color=[_shade(m[0]["method"], m[0]["lam"]) for _, m in groups],
    )
    ax.set_xticks(range(len(groups)), [g for g, _ in groups], rotation=20, fontsize=8)
    ax.set_ylabel("Σ F·Δθ² / Σ F")
    ax.set_title("Fisher-weighted displacement from the base model")
    return _save(fig, path)


def curves_figure(cells_dir: Path, rows: list[dict[str, Any]], path: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    plotted = False
    for row in rows:
        summary_file = cells_dir / row["cell"] / "train" / "summary.json"
        if not summary_file.is_file():
            continue
        history = [h for h in json.loads(summary_file.read_text()).get("history", []) if "loss" in h]
        if history:
            ax.plot(
                [h["step"] for h in history],
                [h["loss"] for h in history],
                lw=1,
                alpha=0.8,
                color=_shade(row["method"], row["lam"]),
                label=row["cell"],
            )
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_yscale("log")
    ax.set_title("Training curves")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Intervals and paired comparisons for the tables
# --------------------------------------------------------------------------------------------------
SINGLE_SEED_MARK = "†"
COMPARISON_COLUMNS = [
    "before → after",
    "split / probe",
    "n",
    "before",
    "after",
    "difference [95%]",
    "ratio [95%]",
    "right→wrong",
    "wrong→right",
    "McNemar p",
]


def table_cell(entry: dict[str, Any], members: list[dict[str, Any]], column: str) -> str:
    """A table cell: the mean over seeds, its 95% interval and the sd over seeds (when several).

    Rates (`*_acc` with counts) get the Wilson interval of the items of every seed pooled; other columns
    of a single-seed group the interval the cell recorded (`<column>_ci95`: paired bootstrap for ratios).
    """
    from mixsd.metrics import wilson_interval

    value, sd = entry.get(column), entry.get(f"{column}_sd")
    interval = None
    prefix = column[: -len("_acc")] if column.endswith("_acc") else None
    counts = [(m.get(f"{prefix}_correct"), m.get(f"{prefix}_n")) for m in members] if prefix else []
    if not prefix and any(f"{column}_count" in m for m in members):  # shares of counted things (tokens)
        counts = [(m.get(f"{column}_count"), m.get(f"{column}_n")) for m in members]
    if counts and all(isinstance(k, int | float) and isinstance(n, int | float) and n for k, n in counts):
        interval = wilson_interval(int(sum(k for k, _ in counts)), int(sum(n for _, n in counts)))
    elif len(members) == 1 and isinstance(members[0].get(f"{column}_ci95"), list):
        interval = members[0][f"{column}_ci95"]
    text = _fmt(value)
    if value is not None and interval is not None:
        text += f" [{interval[0]:.3g}, {interval[1]:.3g}]"
    return text + (f" ± {sd:.2g}" if sd is not None else "")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _item_scores(cell_dir: Path) -> dict[str, dict[str, bool]]:
    """Per split (generation suites) and per multiple-choice probe: item id -> answered right."""
    scores: dict[str, dict[str, bool]] = {}
    for row in _read_rows(cell_dir / "eval.predictions.jsonl"):
        key = "correct" if "correct" in row else "loose"  # files from before per-corpus matchers
        if key in row:
            scores.setdefault(row["split"], {})[row["id"]] = bool(row[key])
    for row in _read_rows(cell_dir / "retention.predictions.jsonl"):
        if row.get("who") == "model" and row.get("kind") == "mc":
            metric = RETENTION_METRIC.get(row["split"], "acc")
            key = "correct_norm" if metric == "acc_norm" else "correct"
            scores.setdefault(f"{row['split']} ({metric})", {})[row["id"]] = bool(row[key])
    retention = cell_dir / "retention.json"
    if retention.is_file():  # lm-evaluation-harness tasks (mixsd.lmeval), under their headline metric
        summaries = json.loads(retention.read_text(encoding="utf-8")).get("lm_eval") or {}
        if summaries:
            rows = _read_rows(cell_dir / "retention.predictions.jsonl")
            scores.update(item_outcomes(summaries, rows))
    return scores


LM_EVAL_HEADERS = [
    "method",
    "seeds",
    "task",
    "metric",
    "model",
    "base",
    "retention",
    "raw ratio",
    "right→wrong",
    "wrong→right",
]


def lm_eval_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section on lm-evaluation-harness tasks (`mixsd eval --lm-eval-tasks`): per method and
    task the headline metric of model and base, the retention and the per-item movement, over seeds."""
    tasks = table_tasks(rows)
    if not tasks:
        return []
    groups = _groups(rows)
    md = [
        "## Retention through lm-evaluation-harness",
        "",
        "Tasks run by lm-eval in-process on each model and its base with identical settings "
        "(`retention: {lm_eval_tasks: ...}`). retention: for multiple-choice tasks (acc − chance) / "
        "(acc_base − chance), `-` when the base is not above chance; else model / base (the raw ratio "
        "beside it); right→wrong / wrong→right: items of lm-eval's logged samples, model against base.",
        "",
        "| " + " | ".join(LM_EVAL_HEADERS) + " |",
        "|" + "---|" * len(LM_EVAL_HEADERS),
    ]
    for task in tasks:
        prefix = f"lm_eval_{task}"
        metric = next((r[f"{prefix}_metric"] for r in rows if r.get(f"{prefix}_metric")), None)
        value = f"{prefix}_{(metric or 'score').split(',')[0]}"
        columns = [value, *(f"{prefix}_{k}" for k in ("base", "retention", "retention_raw"))]
        columns += [f"{prefix}_right_to_wrong", f"{prefix}_wrong_to_right"]
        for entry in aggregate(rows, columns):
            if all(entry[c] is None for c in columns):
                continue
            cells = [table_cell(entry, groups[entry["group"]], c) for c in columns]
            md.append(
                f"| {entry['group']} | {entry['seeds']} | {task} | {metric} | " + " | ".join(cells) + " |"
            )
    return [*md, ""]


def paired_comparisons(cells_dir: Path, rows: list[dict[str, Any]]) -> list[list[str]]:
    """Every tuned cell against the base, MixSD / OPSD / self-rewrite cells against SFT of the same seed,
    and MixSD cells against the self-rewrite cell of the same seed, item by item."""
    from mixsd.metrics import paired_comparison, ratio_interval

    by_name = {row["cell"]: row for row in rows}
    pairs = []
    for row in rows:
        if row["method"] == "base":
            continue
        if "base" in by_name:
            pairs.append(("base", row["cell"]))
        baselines = {"mixsd": ("sft", "rewrite"), "opsd": ("sft",), "rewrite": ("sft",)}
        for baseline in baselines.get(row["method"], ()):
            # the baseline of the same seed, at the same setting where the grid sweeps one
            same_seed = [r for r in rows if r["method"] == baseline and r["seed"] == row["seed"]]
            same = [r for r in same_seed if r.get("settings") == row.get("settings")]
            before = (same or same_seed or [None])[0]
            if before is not None:
                pairs.append((before["cell"], row["cell"]))
    cache: dict[str, dict[str, dict[str, bool]]] = {}
    table = []
    for before_cell, after_cell in pairs:
        for name in (before_cell, after_cell):
            if name not in cache:
                cache[name] = _item_scores(cells_dir / name)
        before_scores, after_scores = cache[before_cell], cache[after_cell]
        for split in [s for s in after_scores if s in before_scores]:
            ids = [i for i in after_scores[split] if i in before_scores[split]]
            if not ids:
                continue
            before = [before_scores[split][i] for i in ids]
            after = [after_scores[split][i] for i in ids]
            result = paired_comparison(before, after)
            ratio = sum(after) / sum(before) if sum(before) else None
            ratio_ci = ratio_interval([float(x) for x in after], [float(x) for x in before])
            table.append(
                [
                    f"{before_cell} → {after_cell}",
                    split,
                    str(result["n"]),
                    f"{result['before']:.3f}",
                    f"{result['after']:.3f}",
                    f"{result['difference']:+.3f}" + _interval(result["difference_ci95"]),
                    _fmt(ratio) + (_interval(ratio_ci) if ratio is not None else ""),
                    str(result["right_to_wrong"]),
                    str(result["wrong_to_right"]),
                    f"{result['mcnemar_p']:.3g}",
                ]
            )
    return table


def _interval(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:+.3f}, {bounds[1]:+.3f}]" if bounds else ""


def _comparisons_html(comparisons: list[list[str]]) -> str:
    if not comparisons:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COMPARISON_COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in comparisons
    )
    return (
        "<h2>Paired comparisons (same items)</h2><p>right→wrong = items forgotten, wrong→right = items "
        "learned; exact McNemar p-value; 95% paired-bootstrap intervals.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
    )


# --------------------------------------------------------------------------------------------------
# The paper's analyses: target tokens with NLL > 5 nats, and displacement vs retention drop over cells
# --------------------------------------------------------------------------------------------------
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
BRANCHES = (("E", "expert"), ("N", "naive"), ("G", "ground truth"))


def retention_drop(rows: list[dict[str, Any]]) -> tuple[str, list[float | None]]:
    """(name, per-row drop): 1 − retention_mean, the report's headline retention (mean over probes of the
    chance-normalized retention), or KL(base‖model) per token where no cell has probe retention."""
    if any(isinstance(r.get("retention_mean"), int | float) for r in rows):
        return "1 − retention_mean", [
            1 - r["retention_mean"] if isinstance(r.get("retention_mean"), int | float) else None
            for r in rows
        ]
    return "kl_per_token", [r.get("kl_per_token") for r in rows]


def displacement_correlations(
    rows: list[dict[str, Any]], *, n_boot: int | None = None, seed: int | None = None
) -> dict[str, Any]:
    """Each CORRELATES measure against the retention drop over the tuned cells of a grid (every seed its
    own cell), Pearson and Spearman with a seeded bootstrap 95% interval over cells."""
    from mixsd.metrics import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, correlation_with_interval

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
    return {"drop": drop_name, "cells": len(tuned), "measures": measures}


def high_nll_table(cells_dir: Path, rows: list[dict[str, Any]]) -> list[list[str]]:
    """Per group: tokens with NLL > 5 nats under the base model, overall and per branch, the counts of
    every seed's nll.json pooled, with the Wilson interval. Empty when no cell has such counts."""
    table = []
    for group, members in _groups(rows).items():
        pooled: dict[str, list[int]] = {}
        for member in members:
            path = cells_dir / member["cell"] / "nll.json"
            if not path.is_file():
                continue
            nll = json.loads(path.read_text(encoding="utf-8"))
            parts = [("all", nll.get("overall") or {})]
            parts += [(k, d) for k, d in (nll.get("by_branch") or {}).items()]
            for key, part in parts:
                high = part.get("high_nll") or {}
                if isinstance(high.get("count"), int) and isinstance(high.get("n"), int):
                    counts = pooled.setdefault(key, [0, 0])
                    counts[0] += high["count"]
                    counts[1] += high["n"]
        if "all" in pooled:
            keys = ["all", *(letter for letter, _ in BRANCHES)]
            table.append([group, str(len(members)), *(_share_text(pooled.get(key)) for key in keys)])
    return table


def _share_text(counts: list[int] | None) -> str:
    """ "count/n = share [95% Wilson interval]", or "-" where nothing was counted."""
    from mixsd.metrics import wilson_interval

    if not counts or not counts[1]:
        return "-"
    count, n = counts
    low, high = wilson_interval(count, n)
    return f"{count}/{n} = {count / n:.1%} [{low:.1%}, {high:.1%}]"


def correlation_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Retention drop against the Fisher-weighted ratio and against raw ‖Δθ‖², one point per tuned cell."""
    from mixsd.metrics import pearson

    tuned = [r for r in rows if r.get("method") != "base"]
    drop_name, drops = retention_drop(tuned)
    panels = [(c, label) for c, label in CORRELATES if c in ("fisher_ratio", "delta_norm_sq")]
    points = {
        column: [
            (r[column], d, r)
            for r, d in zip(tuned, drops, strict=True)
            if isinstance(r.get(column), int | float) and isinstance(d, int | float)
        ]
        for column, _ in panels
    }
    if not any(len(p) >= 2 for p in points.values()):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4.2), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels, strict=True):
        for x, y, row in points[column]:
            ax.scatter(x, y, color=_shade(row["method"], row["lam"]), s=36, edgecolor="black", lw=0.4)
            ax.annotate(row["cell"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        xs = [x for x, _, _ in points[column]]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # displacements span orders of magnitude
            ax.set_xscale("log")
        r = pearson(xs, [y for _, y, _ in points[column]]) if len(xs) >= 2 else None
        ax.set_title("r undefined" if r is None else f"Pearson r = {r:+.2f} over {len(xs)} cells", fontsize=9)
        ax.set_xlabel(label)
        ax.set_ylabel(f"retention drop ({drop_name})")
        ax.grid(alpha=0.3)
    fig.suptitle("Parameter displacement vs retention drop (one point per cell)")
    return _save(fig, path)


def analyses_markdown(
    cells_dir: Path, rows: list[dict[str, Any]], correlations: dict[str, Any] | None = None
) -> list[str]:
    """The report's "Paper analyses" section: the NLL > 5 table and the correlation table."""
    high = high_nll_table(cells_dir, rows)
    correlations = correlations or displacement_correlations(rows)
    measures = [m for m in correlations["measures"] if m["n"] or m["column"] in PAPER_CORRELATIONS]
    drop = (
        "1 − retention_mean (the results table's headline retention: mean over probes, multiple choice "
        "chance-normalized)"
        if correlations["drop"] == "1 − retention_mean"
        else "here KL(base‖model) per token on the base model's own answers, as no cell has probe retention"
    )
    if not high and not any(m["n"] for m in measures):
        return []
    md = ["## Paper analyses", ""]
    if high:
        md += [
            "### Target tokens with NLL > 5 nats under the base model",
            "",
            "Training-target tokens the base model would almost never write (p < e⁻⁵ ≈ 0.0067), given the "
            "naive prompt: count / tokens = share [95% Wilson interval], every seed's targets pooled; per "
            "branch letter of the mixed targets (E expert, N naive, G ground truth: SFT's targets are all G). "
            "The paper's Tables 7–8 count these tokens.",
            "",
            "| method | seeds | all | " + " | ".join(f"{k} ({name})" for k, name in BRANCHES) + " |",
            "|---|---|---|" + "---|" * len(BRANCHES),
            *("| " + " | ".join(row) + " |" for row in high),
            "",
        ]
    md += [
        "### Parameter displacement vs retention drop",
        "",
        f"Over the {correlations['cells']} tuned cells of this grid (each seed its own cell), the correlation "
        f"of each measure with the retention drop, {drop}, with 95% percentile-bootstrap intervals over cells "
        f"({correlations['measures'][0]['resamples']} resamples, seed {correlations['measures'][0]['seed']}). "
        "F is the diagonal Fisher of the base model on the probe data, Δθ = tuned − base. The paper reports "
        "(source: a low-confidence machine extraction of its Fisher table, method notes §5d) "
        "Pearson r = +0.56 / +0.82 / +0.57 for the Fisher-weighted ratio against +0.34 / +0.02 / +0.10 for "
        "raw ‖Δθ‖² on three model sizes (its claim: the Fisher-weighted measure tracks capability loss, raw "
        "displacement does not); our reading of its ratio is Σ F·Δθ² / ‖Δθ‖².",
        "",
        "| measure | cells | Pearson r [95%] | Spearman ρ [95%] | paper r (3 sizes, low-confidence extraction) |",
        "|---|---|---|---|---|",
    ]
    for m in measures:
        if m["note"]:
            pearson_text, spearman_text = m["note"], "-"
        else:
            pearson_text = f"{m['pearson']:+.2f}" + _interval(m["pearson_ci95"])
            spearman_text = (
                "-" if m["spearman"] is None else f"{m['spearman']:+.2f}" + _interval(m["spearman_ci95"])
            )
        md.append(
            f"| {m['label']} (`{m['column']}`) | {m['n']} | {pearson_text} | {spearman_text} | {m['paper'] or '-'} |"
        )
    md.append("")
    return md


def _section_html(lines: list[str]) -> str:
    """HTML of a section built by analyses_markdown (headings, paragraphs and pipe tables only)."""
    out, table = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):  # skip the |---| rule
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *body = table
            out.append(
                "<table><tr>"
                + "".join(f"<th>{html.escape(c)}</th>" for c in head)
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
                + "</table>"
            )
            table = []
        if line.startswith("### "):
            out.append(f"<h3>{html.escape(line[4:])}</h3>")
        elif line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Learning curves: trajectories, retention at matched memorization, the tuning rule (mixsd.tuning)
# --------------------------------------------------------------------------------------------------
RETENTION_LABELS = {
    "retention": "probe retention (curve probes, accuracy model / base, mean over probes)",
    "kl": "KL(base ‖ model) per token (lower = less forgetting)",
}


def curve_groups(
    rows: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], base: dict[str, Any] | None
) -> tuple[dict[str, dict[str, Any]], str]:
    """Per group (method, λ, setting): its seeds' curves as points (base row first), and where they
    come from: "curves" (train/curve.jsonl), or "final" when no cell has a curve (one point per cell:
    its final train_acc and retention_mean / kl_per_token, enough for the selection rule)."""
    from mixsd.tuning import add_retention

    tuned = [r for r in rows if r.get("method") != "base"]
    source = "curves" if any(curves.get(r["cell"]) for r in tuned) else "final"
    groups: dict[str, dict[str, Any]] = {}
    for row in tuned:
        if source == "curves":
            if not curves.get(row["cell"]):
                continue
            points = add_retention(curves[row["cell"]], base)
        else:
            epoch = row.get("train_epochs")
            points = [
                {
                    "epoch": epoch if isinstance(epoch, int | float) else 1.0,
                    "memorization": row.get("train_acc"),
                    "retention": row.get("retention_mean"),
                    "kl": row.get("kl_per_token"),
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
    return ("retention", True) if has else ("kl", False)


def tuning_results(
    rows: list[dict[str, Any]],
    curves: dict[str, list[dict[str, Any]]],
    base: dict[str, Any] | None,
    rule: SelectionRule,
) -> dict[str, Any]:
    """Everything the curve sections of the report show, as JSON (also OUT/tuning.json): the matched
    memorization table per group, and per method with several settings each setting's summary under the
    rule and the one chosen."""
    from mixsd.tuning import MATCHED_LEVELS, matched_retention, select_setting, summarize_setting

    groups, source = curve_groups(rows, curves, base)
    key, higher = retention_key(groups)
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
        selection[family] = {"settings": summaries, "groups": settings, "chosen": chosen, "why": why}
    return {
        "source": source,
        "retention": key,
        "higher_is_better": higher,
        "levels": levels,
        "rule": {**asdict(rule), "text": rule.text(_retention_name(key), higher)},
        "base": base,
        "groups": groups,
        "matched": matched,
        "selection": selection,
    }


def _rule_curves(entry: dict[str, Any], rule: SelectionRule) -> list[list[dict[str, Any]]]:
    """The curves of a group that the rule reads: those of its seeds (all when it names none)."""
    if rule.seeds is None:
        return entry["curves"]
    return [c for c, seed in zip(entry["curves"], entry["seeds"], strict=True) if seed in rule.seeds]


def _retention_name(key: str) -> str:
    return "retention" if key == "retention" else "KL to the base"


SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _curve_styles(groups: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per group: the method's colour, darker for each further setting of the method, a marker of its
    own, and dashes for LoRA settings."""
    from matplotlib.colors import to_rgb

    by_family: dict[str, list[str]] = {}
    for group, entry in groups.items():
        by_family.setdefault(entry["family"], []).append(group)
    styles = {}
    for members in by_family.values():
        for k, group in enumerate(members):
            entry = groups[group]
            darken = 0.6 * k / (len(members) - 1) if len(members) > 1 else 0.0
            color = tuple(c * (1 - darken) for c in to_rgb(_shade(entry["method"], entry["lam"])))
            styles[group] = {
                "color": color,
                "marker": SETTING_MARKERS[k % len(SETTING_MARKERS)],
                "ls": "--" if "LoRA" in entry["setting"] else "-",
            }
    return styles


def trajectory_figure(results: dict[str, Any], path: Path) -> Path | None:
    """Each group's mean curve over seeds in the memorization–retention plane, from the base model
    (epoch 0) epoch by epoch; error bars: sd over seeds at each epoch (both axes)."""
    from mixsd.tuning import mean_curve

    groups, key = results["groups"], results["retention"]
    if results["source"] != "curves" or not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    styles = _curve_styles(groups)
    for group, entry in groups.items():
        mean = [
            p
            for p in mean_curve(entry["curves"])
            if isinstance(p.get(key), int | float) and isinstance(p.get("memorization"), int | float)
        ]
        if not mean:
            continue
        xs, ys = [p[key] for p in mean], [p["memorization"] for p in mean]
        x_sd = y_sd = None
        if len(entry["curves"]) > 1:
            x_sd, y_sd = [], []
            for point in mean:
                at = [
                    q
                    for c in entry["curves"]
                    for q in c
                    if isinstance(q.get("epoch"), int | float) and abs(q["epoch"] - point["epoch"]) < 1e-6
                ]
                x_sd.append(_mean_sd(_numbers(at, key) or [0.0])[1])
                y_sd.append(_mean_sd(_numbers(at, "memorization") or [0.0])[1])
        ax.errorbar(
            xs,
            ys,
            xerr=x_sd,
            yerr=y_sd,
            ms=4,
            lw=1.4,
            capsize=2,
            elinewidth=0.7,
            label=f"{group} (n={len(entry['curves'])})",
            **styles[group],
        )
        ax.annotate(
            f"{mean[-1]['epoch']:g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 2), fontsize=6
        )
    base = results.get("base") or {}
    base_x = 1.0 if key == "retention" and base else (0.0 if key == "kl" and base else None)
    if base_x is not None and isinstance(base.get("memorization"), int | float):
        ax.scatter(
            [base_x],
            [base["memorization"]],
            marker="*",
            s=140,
            color="black",
            zorder=5,
            label="base (epoch 0)",
        )
    for level in (0.9, 0.95):
        ax.axhline(level, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(RETENTION_LABELS[key])
    ax.set_ylabel("memorization (training questions, the corpus's scorer)")
    ax.set_ylim(-0.03, 1.05)
    if key == "kl":
        ax.invert_xaxis()  # better retention to the right, as with the probe ratio
    ax.grid(alpha=0.3)
    ax.set_title("Learning trajectories (epoch 0 = base; mean ± sd over seeds; last epoch labelled)")
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def frontier_figure(results: dict[str, Any], path: Path) -> Path | None:
    """Per method with a sweep: every epoch of every setting (mean over seeds) as a point, the method's
    frontier across its settings (points no other beats on both memorization and retention) as a line,
    and the chosen setting's points ringed."""
    from mixsd.tuning import mean_curve, pareto_frontier

    key, higher = results["retention"], results["higher_is_better"]
    selection, groups = results["selection"], results["groups"]
    if not selection:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    plotted = False
    for family, chosen in selection.items():
        points, color = [], None
        for setting, group in chosen["groups"].items():
            entry = groups[group]
            color = _shade(entry["method"], entry["lam"])
            mean = [
                (p[key], p["memorization"])
                for p in mean_curve(entry["curves"])
                if isinstance(p.get(key), int | float) and isinstance(p.get("memorization"), int | float)
            ]
            points += mean
            marker = "s" if "LoRA" in setting else "o"
            ax.scatter(
                [x for x, _ in mean], [y for _, y in mean], s=14, alpha=0.45, color=color, marker=marker
            )
            if setting == chosen["chosen"]:
                ax.scatter(
                    [x for x, _ in mean],
                    [y for _, y in mean],
                    s=70,
                    facecolors="none",
                    edgecolors=color,
                    lw=1.2,
                )
        if points:
            frontier = pareto_frontier(points, x_higher_is_better=higher)
            ax.plot(
                [x for x, _ in frontier],
                [y for _, y in frontier],
                color=color,
                lw=2,
                label=f"{family}: frontier; ringed = chosen {chosen['chosen'] or '-'}",
            )
            plotted = True
    if not plotted:
        plt.close(fig)
        return None
    ax.set_xlabel(RETENTION_LABELS[key])
    ax.set_ylabel("memorization (training questions)")
    ax.set_ylim(-0.03, 1.05)
    if key == "kl":
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.set_title("Every setting's epochs (o full, □ LoRA) and each method's frontier")
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def _epoch_text(epoch: Any) -> str:
    return f"{epoch:.2f}" if isinstance(epoch, int | float) else "-"


def matched_cell(entry: dict[str, Any]) -> str:
    """A cell of the matched-memorization table: "0.812 [0.70, 0.90] @ epoch 2.35", or "not reached"."""
    if not entry["reached"]:
        best = "-" if entry["best"] is None else f"{entry['best']:.3g}"
        return f"not reached (best {best}; {entry['seeds_reached']}/{entry['seeds']} seeds reach it)"
    text = f"{_fmt(entry['value'])}{_interval_plain(entry['ci95'])} @ epoch {_epoch_text(entry['epoch'])}"
    if entry["seeds"] > 1 and entry["seeds_reached"] < entry["seeds"]:
        text += f" ({entry['seeds_reached']}/{entry['seeds']} seeds reach it)"
    return text


def _interval_plain(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:.3g}, {bounds[1]:.3g}]" if bounds else ""


def tuning_markdown(results: dict[str, Any]) -> list[str]:
    """The report's sections on learning curves (matched memorization) and the tuning rule."""
    key, levels = results["retention"], results["levels"]
    md: list[str] = []
    name = "probe retention" if key == "retention" else "KL(base‖model) per token"
    if results["matched"]:
        md += [
            "## Retention at matched memorization",
            "",
            f"Each method's {name} where its mean learning curve over seeds first reaches each memorization "
            "level, linearly interpolated between the two epochs around the crossing (epoch 0 = the base "
            'model); "not reached" is a result. 95% intervals: percentile bootstrap over seeds (several '
            "seeds), Wilson over each probe's items at that point with the base's accuracy held fixed "
            f"(one seed, probe retention). Retention here: {RETENTION_LABELS[key]}; at the base model "
            f"{'1' if key == 'retention' else '0'}. Every point: `curves.jsonl`.",
            "",
            "| method | seeds | "
            + " | ".join(f"at {level:.0%} memorization" for level in levels)
            + " | last epoch: memorization |",
            "|---|---|" + "---|" * (len(levels) + 1),
        ]
        from mixsd.tuning import mean_curve

        for group, entries in results["matched"].items():
            curves = results["groups"][group]["curves"]
            last = mean_curve(curves)[-1] if mean_curve(curves) else {}
            md.append(
                f"| {group} | {len(curves)} | "
                + " | ".join(matched_cell(e) for e in entries)
                + f" | {_fmt(last.get('memorization'))} @ epoch {_epoch_text(last.get('epoch'))} |"
            )
        md.append("")
    if results["selection"]:
        source = (
            "each setting's mean learning curve over seeds"
            if results["source"] == "curves"
            else "each setting's final model (no learning curves: one point per setting, its train_acc "
            "and retention_mean / KL)"
        )
        md += [
            "## Tuning: one declared rule",
            "",
            f"Rule (the `select` section of the config): {results['rule']['text']}",
            "",
            f"Read from {source}. Every setting is listed; the chosen one is marked ✓.",
            "",
        ]
        for family, entry in results["selection"].items():
            md += [
                f"### {family}",
                "",
                f"| setting | seeds | reaches {results['rule']['memorization']:.0%} at epoch | {_retention_name(key)} there "
                f"| last epoch | memorization | {_retention_name(key)} | chosen |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for setting, s in entry["settings"].items():
                md.append(
                    f"| {setting or '(default)'} | {s['seeds']} | "
                    + (_epoch_text(s["epoch"]) if s["reached"] else "not reached")
                    + f" | {_fmt(s['retention_at_threshold'])} | {_epoch_text(s['final_epoch'])} "
                    f"| {_fmt(s['final_memorization'])} | {_fmt(s['final_retention'])} "
                    f"| {'✓' if setting == entry['chosen'] else ''} |"
                )
            md += ["", f"Chosen: {entry['chosen'] or '(default)'}: {entry['why']}.", ""]
    return md


def curve_points(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every point of every curve, one row each (OUT/curves.jsonl)."""
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


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def write_report(
    out: Path,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    cells_dir: Path,
    *,
    curves: dict[str, list[dict[str, Any]]] | None = None,
    curve_base: dict[str, Any] | None = None,
    rule: SelectionRule | None = None,
) -> dict[str, str]:
    """The report of a grid. `curves`: each trained cell's curve.jsonl rows; `curve_base`: the base
    model's curve row (epoch 0); `rule`: the selection rule among each method's settings."""
    figures_dir = out / "report"
    figures_dir.mkdir(parents=True, exist_ok=True)
    tuning = tuning_results(rows, curves or {}, curve_base, rule or SelectionRule())
    atomic_write_jsonl(out / "curves.jsonl", curve_points(tuning))
    atomic_write_json(out / "tuning.json", {k: v for k, v in tuning.items() if k != "groups"})
    figures = [
        ("Learning trajectories", trajectory_figure(tuning, figures_dir / "trajectories.png")),
        ("Settings and frontiers", frontier_figure(tuning, figures_dir / "frontier.png")),
        ("Memorization vs retention", pareto_figure(rows, figures_dir / "pareto.png")),
        ("Retention per probe", retention_figure(rows, figures_dir / "retention.png")),
        ("Target NLL under the base model", nll_figure(cells_dir, rows, figures_dir / "nll.png")),
        ("Fisher-weighted displacement", fisher_figure(rows, figures_dir / "fisher.png")),
        ("Training curves", curves_figure(cells_dir, rows, figures_dir / "curves.png")),
        ("Displacement vs retention drop", correlation_figure(rows, figures_dir / "correlation.png")),
    ]
    figures = [(title, p) for title, p in figures if p is not None]
    columns = [c for c in MAIN_COLUMNS if any(isinstance(r.get(c), int | float) for r in rows)]
    table = aggregate(rows, columns)
    groups = _groups(rows)

    def cell_text(entry: dict[str, Any], column: str) -> str:
        return table_cell(entry, groups[entry["group"]], column)

    def seeds_text(entry: dict[str, Any]) -> str:
        return f"{entry['seeds']}{SINGLE_SEED_MARK if entry['seeds'] == 1 else ''}"

    comparisons = paired_comparisons(cells_dir, rows)
    modes = sorted({v for r in rows for k, v in r.items() if k.endswith("_match") and isinstance(v, str)})

    md = [
        f"# mixsd report: {meta['name']}",
        "",
        f"Model `{meta['model']}`; mixsd {meta['mixsd']}, torch {meta['torch']}, transformers "
        f"{meta['transformers']}, Python {meta['python']}; finished {meta['finished']}.",
        "",
        f"Command: `{meta['command']}`  (config: `{meta['config_file']}`, copied to `experiment.yaml`)",
        "",
        "## Results (mean [95% interval] ± sd over seeds)",
        "",
        "| method | seeds | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    md += [
        f"| {e['group']} | {seeds_text(e)} | " + " | ".join(cell_text(e, c) for c in columns) + " |"
        for e in table
    ]
    md += [
        "",
        f"Columns: `*_acc` accuracy under the corpus's own matcher ({', '.join(modes) or 'entity'}; "
        "`answer_match` in its manifest.json), 95% Wilson interval over the items of all seeds; "
        "`retention_mean` mean over probes of the retention (multiple choice chance-normalized: "
        "(acc − chance) / (acc_base − chance); raw ratios in `*_retention_raw` of `results.csv`), "
        "intervals of ratios from a paired bootstrap over items; `kl_per_token` KL(base‖model) on the base "
        "model's own answers, `target_nll_mean` mean NLL of the training targets under the base model, "
        "`target_nll_above_5` share of target tokens above 5 nats (Wilson interval over the tokens of all "
        "seeds), `fisher_displacement_norm` Σ F·Δθ² / Σ F, `fisher_ratio` Σ F·Δθ² / ‖Δθ‖², "
        "`delta_norm_sq` raw ‖Δθ‖². ± sd: spread over seeds. "
        f"{SINGLE_SEED_MARK} single seed: the interval covers the sampling of items only, not seed-to-seed "
        "variation. Every cell's raw numbers: `results.csv`.",
        "",
    ]
    lm_eval_md = lm_eval_markdown(rows)
    md += lm_eval_md
    if comparisons:
        md += [
            "## Paired comparisons (same items)",
            "",
            "Each row compares two cells on the items both answered: right→wrong = items forgotten, "
            "wrong→right = items learned, exact McNemar p-value on those, and the difference and ratio of "
            "accuracies with 95% paired-bootstrap intervals.",
            "",
            "| " + " | ".join(COMPARISON_COLUMNS) + " |",
            "|" + "---|" * len(COMPARISON_COLUMNS),
            *("| " + " | ".join(c) + " |" for c in comparisons),
            "",
        ]
    # the paper's analyses (NLL > 5 share, displacement vs retention drop); the numbers also as JSON
    correlations = displacement_correlations(rows)
    atomic_write_json(out / "correlations.json", correlations)
    analyses = analyses_markdown(cells_dir, rows, correlations)
    md += analyses
    tuning_md = tuning_markdown(tuning)
    md += tuning_md
    for title, path in figures:
        md += [f"## {title}", "", f"![{title}](report/{path.name})", ""]
    md += ["## Configuration", "", "```yaml", _yaml(meta["config"]), "```", ""]
    markdown_path = out / "report.md"
    atomic_write_text(markdown_path, "\n".join(md))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["method", "seeds", *columns])
    body = "".join(
        "<tr><td>"
        + html.escape(e["group"])
        + f"</td><td>{html.escape(seeds_text(e))}</td>"
        + "".join(f"<td>{html.escape(cell_text(e, c))}</td>" for c in columns)
        + "</tr>"
        for e in table
    )
    images = "".join(
        f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'>"
        for title, path in figures
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>mixsd report: {html.escape(meta["name"])}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child,th:first-child{{text-align:left}}img{{max-width:100%}}code,pre{{background:#f4f4f4}}</style></head><body>
<h1>mixsd report: {html.escape(meta["name"])}</h1>
<p>Model <code>{html.escape(meta["model"])}</code>; mixsd {meta["mixsd"]}, torch {meta["torch"]},
transformers {meta["transformers"]}, Python {meta["python"]}; finished {html.escape(meta["finished"])}.</p>
<p>Command: <code>{html.escape(meta["command"])}</code></p>
<h2>Results (mean [95% interval] ± sd over seeds)</h2><table><tr>{head}</tr>{body}</table>
<p>{html.escape(SINGLE_SEED_MARK)} single seed: the interval covers the sampling of items only.
Accuracy under the corpus's own matcher ({html.escape(", ".join(modes) or "entity")}).
Raw rows: <code>results.csv</code>, <code>results.jsonl</code>.</p>{_section_html(lm_eval_md)}{_comparisons_html(comparisons)}{_section_html(analyses)}{_section_html(tuning_md)}{images}
<h2>Configuration</h2><pre>{html.escape(_yaml(meta["config"]))}</pre></body></html>"""
    html_path = out / "report.html"
    atomic_write_text(html_path, page)
    return {"markdown": str(markdown_path), "html": str(html_path)}


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False).strip()
