"""The report's figures (matplotlib, PNG), drawn from the results rows and the JSON files the results
side writes (`mixsd.experiments.report_data`); each returns its path, or None when there is nothing to draw.

    pareto.png        memorization vs retention, one point per method and lambda, error bars over seeds
    retention.png     retention per probe and method
    nll.png           NLL of target tokens under the base model: ground truth vs mixed targets
    fisher.png        Fisher-weighted parameter displacement per method
    curves.png        training loss curves
    correlation.png   retention drop against the Fisher-weighted ratio and against raw ‖Δθ‖²
    trajectories.png  with learning curves: each method (and setting) epoch by epoch in the
                      memorization–retention plane, from the base model (epoch 0)
    frontier.png      with a sweep: every setting's epochs and each method's frontier across its settings

and, for docs/results.md (`scripts/results.py render`), `summary_trajectory_figure`: a committed grid's
trajectories in the plane of its tables (primary retention against memorization), from its summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixsd.experiments.report_sections import RETENTION_LABELS
from mixsd.experiments.results import rows_by_group

COLORS = {
    "base": "#444444",
    "sft": "#d62728",
    "mixsd": "#1f77b4",
    "opsd": "#2ca02c",
    "rewrite": "#9467bd",
    "cpt": "#ff7f0e",
    "memit": "#8c564b",
}
SETTING_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _plt():
    # matplotlib loads only when a figure is drawn: a command that writes no report never imports it
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


def _numbers(members: list[dict[str, Any]], key: str) -> list[float]:
    return [m[key] for m in members if isinstance(m.get(key), int | float)]


def _shade(method: str, lam: float | None) -> str:
    if method != "mixsd" or lam is None:
        return COLORS.get(method, "#777777")
    return _plt().colormaps["Blues"](0.45 + 0.5 * (1 - lam))  # matplotlib loads only when a figure is drawn


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
    for group, members in rows_by_group(rows).items():
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
    groups = [(g, m) for g, m in rows_by_group(rows).items() if m[0]["method"] != "base"]
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


def nll_figure(histograms: list[dict[str, Any]], path: Path) -> Path | None:
    """Histogram of per-token target NLL under the base model, one line per method (first seed):
    target-nll.json's `histograms`."""
    if not histograms:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    labels: list[str] = []
    for series in histograms:
        histogram = series["histogram"]
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
            color=_shade(series["method"], series["lam"]),
            label=f"{series['group']} (mean {series['mean']:.2f} nats)",
        )
    ax.set_xticks([i + 0.5 for i in range(len(labels))], labels, rotation=35, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("NLL of a target token under the base model (nats), given the naive prompt")
    ax.set_ylabel("fraction of target tokens")
    ax.set_title("How surprising are the targets to the base model?")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fisher_figure(rows: list[dict[str, Any]], path: Path) -> Path | None:
    groups = [(g, m) for g, m in rows_by_group(rows).items() if _numbers(m, "fisher_displacement_norm")]
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


def curves_figure(losses: list[dict[str, Any]], path: Path) -> Path | None:
    """Each trained cell's loss by optimizer step (training-loss.json)."""
    if not losses:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run in losses:
        ax.plot(
            run["steps"],
            run["losses"],
            lw=1,
            alpha=0.8,
            color=_shade(run["method"], run["lam"]),
            label=run["cell"],
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per target token)")
    ax.set_yscale("log")
    ax.set_title("Training curves")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def correlation_figure(correlations: dict[str, Any], path: Path) -> Path | None:
    """Retention drop against the Fisher-weighted ratio and against raw ‖Δθ‖², one point per tuned cell
    (correlations.json's `panels`)."""
    panels = correlations["panels"]
    if not any(len(panel["points"]) >= 2 for panel in panels):
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(10, 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for point in panel["points"]:
            x, y = point["x"], point["drop"]
            ax.scatter(x, y, color=_shade(point["method"], point["lam"]), s=36, edgecolor="black", lw=0.4)
            ax.annotate(point["cell"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        xs = [point["x"] for point in panel["points"]]
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:  # displacements span orders of magnitude
            ax.set_xscale("log")
        r = panel["pearson"]
        ax.set_title("r undefined" if r is None else f"Pearson r = {r:+.2f} over {len(xs)} cells", fontsize=9)
        ax.set_xlabel(panel["label"])
        ax.set_ylabel(f"retention drop ({correlations['drop']})")
        ax.grid(alpha=0.3)
    fig.suptitle("Parameter displacement vs retention drop (one point per cell)")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# Learning curves (tuning.json and curves.jsonl)
# --------------------------------------------------------------------------------------------------
def _plane(mean_curve: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The points of a mean curve with both a retention score and a memorization."""
    return [
        p
        for p in mean_curve
        if isinstance(p.get(key), int | float) and isinstance(p.get("memorization"), int | float)
    ]


def _curve_styles(groups: dict[str, dict[str, Any]], by: str = "family") -> dict[str, dict[str, Any]]:
    """Per group: the method's colour, darker for each further group of its `by` (family: the settings of
    one method and λ; method: every group of a method), a marker of its own, and dashes for LoRA settings."""
    from matplotlib.colors import to_rgb  # matplotlib loads only when a figure is drawn

    by_family: dict[str, list[str]] = {}
    for group, entry in groups.items():
        by_family.setdefault(entry[by], []).append(group)
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


def _mark_base_and_levels(ax, base_x: float, base_memorization: Any) -> None:
    """The memorization–retention plane's landmarks: the base model (a star, where it has a memorization)
    and the declared levels 90% and 95% (dotted)."""
    if isinstance(base_memorization, int | float):
        ax.scatter(
            [base_x], [base_memorization], marker="*", s=140, color="black", zorder=5, label="base (epoch 0)"
        )
    for level in (0.9, 0.95):
        ax.axhline(level, color="grey", lw=0.6, ls=":")


def trajectory_figure(
    tuning: dict[str, Any], curves: dict[str, list[list[dict[str, Any]]]], path: Path
) -> Path | None:
    """Each group's mean curve over seeds in the memorization–retention plane, from the base model
    (epoch 0) epoch by epoch; error bars: sd over seeds at each epoch (both axes). `curves`: per group
    its seeds' curves (curves.jsonl)."""
    groups, key = tuning["groups"], tuning["retention"]
    if tuning["source"] != "curves" or not groups:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    styles = _curve_styles(groups)
    for group, entry in groups.items():
        mean = _plane(entry["mean_curve"], key)
        if not mean:
            continue
        seeds = curves.get(group, [])
        xs, ys = [p[key] for p in mean], [p["memorization"] for p in mean]
        x_sd = y_sd = None
        if len(seeds) > 1:
            x_sd, y_sd = [], []
            for point in mean:
                at = [
                    q
                    for c in seeds
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
            label=f"{group} (n={len(entry['cells'])})",
            **styles[group],
        )
        ax.annotate(
            f"{mean[-1]['epoch']:g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 2), fontsize=6
        )
    base = tuning.get("base") or {}
    # the base model itself: retention 1, or KL 0 on the other axis
    _mark_base_and_levels(ax, 1.0 if key == "retention" else 0.0, base.get("memorization"))
    ax.set_xlabel(RETENTION_LABELS[key])
    ax.set_ylabel("memorization (training questions, the corpus's scorer)")
    ax.set_ylim(-0.03, 1.05)
    if key != "retention":  # KL: better retention to the right, as with the probe ratio
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.set_title("Learning trajectories (epoch 0 = base; mean ± sd over seeds; last epoch labelled)")
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def frontier_figure(tuning: dict[str, Any], path: Path) -> Path | None:
    """Per method with a sweep: every epoch of every setting (mean over seeds) as a point, the method's
    frontier across its settings (points no other beats on both memorization and retention) as a line,
    and the chosen setting's points ringed."""
    key, selection, groups = tuning["retention"], tuning["selection"], tuning["groups"]
    if not selection:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.4, 5.2))
    plotted = False
    for family, chosen in selection.items():
        has_points, color = False, None
        for setting, group in chosen["groups"].items():
            entry = groups[group]
            color = _shade(entry["method"], entry["lam"])
            mean = [(p[key], p["memorization"]) for p in _plane(entry["mean_curve"], key)]
            has_points = has_points or bool(mean)
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
        if has_points:
            frontier = chosen["frontier"]
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
    if key != "retention":  # KL: lower is better, to the right
        ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.set_title("Every setting's epochs (o full, □ LoRA) and each method's frontier")
    ax.legend(fontsize=6, loc="best")
    return _save(fig, path)


def summary_trajectory_figure(summary: dict[str, Any], groups: list[str], path: Path) -> Path | None:
    """The `groups` of a grid summary (`mixsd.experiments.grid_summary`) in the plane of docs/results.md's
    tables: primary retention (x) against memorization (y), epoch by epoch from the base model (retention
    1 at the base's memorization), mean over seeds with sd bars where a group has several; an edit (MEMIT)
    is its one point. Lines of a method share its colour, darker for each further group."""
    entries = {g: summary["groups"][g] for g in groups if summary["groups"][g]["trajectory"]}
    if not entries:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(10.0, 5.2))
    styles = _curve_styles(entries, by="method")
    start = summary.get("base_memorization")
    for group, entry in entries.items():
        points = [
            p
            for p in entry["trajectory"]
            if all(isinstance(v, int | float) for v in p["primary"] + p["memorization"])
        ]
        x = [_mean_sd(p["primary"]) for p in points]
        y = [_mean_sd(p["memorization"]) for p in points]
        if isinstance(start, int | float) and len(points) > 1:  # a training run starts at the base model
            x, y = [(1.0, 0.0), *x], [(start, 0.0), *y]
        several = len(entry["seeds"]) > 1
        ax.errorbar(
            [m for m, _ in x],
            [m for m, _ in y],
            xerr=[sd for _, sd in x] if several else None,
            yerr=[sd for _, sd in y] if several else None,
            ms=4 if len(points) > 1 else 9,
            lw=1.4,
            capsize=2,
            elinewidth=0.7,
            label=f"{group} (n={len(entry['seeds'])})",
            **styles[group],
        )
        ax.annotate(
            f"{points[-1]['epoch']:g}",
            (x[-1][0], y[-1][0]),
            textcoords="offset points",
            xytext=(4, 2),
            fontsize=6,
        )
    _mark_base_and_levels(ax, 1.0, start)
    ax.set_xlabel("primary retention (base-right probe items kept, mean over probes)")
    ax.set_ylabel("memorization (training questions)")
    ax.set_xlim(-0.03, 1.05)
    ax.set_ylim(-0.03, 1.05)
    ax.grid(alpha=0.3)
    ax.set_title(f"{summary['grid']}: epoch by epoch (mean ± sd over seeds; last epoch labelled)", fontsize=9)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the plot: it covers no curve
    return _save(fig, path)
