"""The report's tables and text sections, as Markdown lines (and their HTML), formatted from the results
rows and the JSON files the results side writes (`mixsd.experiments.report_data`): intervals of the results table,
lm-evaluation-harness retention, paired comparisons, the paper's analyses and the learning-curve sections.
"""

from __future__ import annotations

import html
from typing import Any

from mixsd.core.metrics import wilson_interval
from mixsd.evaluation.lmeval import table_tasks
from mixsd.evaluation.probe_kinds import KL
from mixsd.experiments.results import aggregate, rows_by_group

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
BRANCHES = (("E", "expert"), ("N", "naive"), ("G", "ground truth"))
RETENTION_LABELS = {
    "retention": "probe retention (curve probes, accuracy model / base, mean over probes)",
    KL.name: "KL(base ‖ model) per token (lower = less forgetting)",
}


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _interval(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:+.3f}, {bounds[1]:+.3f}]" if bounds else ""


def table_cell(entry: dict[str, Any], members: list[dict[str, Any]], column: str) -> str:
    """A table cell: the mean over seeds, its 95% interval and the sd over seeds (when several).

    Rates (`*_acc` with counts) get the Wilson interval of the items of every seed pooled; other columns
    of a single-seed group the interval the cell recorded (`<column>_ci95`: paired bootstrap for ratios).
    """
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
    text = fmt(value)
    if value is not None and interval is not None:
        text += f" [{interval[0]:.3g}, {interval[1]:.3g}]"
    return text + (f" ± {sd:.2g}" if sd is not None else "")


def lm_eval_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section on lm-evaluation-harness tasks (`mixsd eval --lm-eval-tasks`): per method and
    task the headline metric of model and base, the retention and the per-item movement, over seeds."""
    tasks = table_tasks(rows)
    if not tasks:
        return []
    groups = rows_by_group(rows)
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


# --------------------------------------------------------------------------------------------------
# Paired comparisons (comparisons.json)
# --------------------------------------------------------------------------------------------------
def comparison_rows(comparisons: list[dict[str, Any]]) -> list[list[str]]:
    """The rows of the paired-comparison table, one per entry of comparisons.json (COMPARISON_COLUMNS)."""
    return [
        [
            f"{c['before_cell']} → {c['after_cell']}",
            c["split"],
            str(c["n"]),
            f"{c['before']:.3f}",
            f"{c['after']:.3f}",
            f"{c['difference']:+.3f}" + _interval(c["difference_ci95"]),
            fmt(c["ratio"]) + (_interval(c["ratio_ci95"]) if c["ratio"] is not None else ""),
            str(c["right_to_wrong"]),
            str(c["wrong_to_right"]),
            f"{c['mcnemar_p']:.3g}",
        ]
        for c in comparisons
    ]


def comparisons_markdown(rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    return [
        "## Paired comparisons (same items)",
        "",
        "Each row compares two cells on the items both answered: right→wrong = items forgotten, "
        "wrong→right = items learned, exact McNemar p-value on those, and the difference and ratio of "
        "accuracies with 95% paired-bootstrap intervals.",
        "",
        "| " + " | ".join(COMPARISON_COLUMNS) + " |",
        "|" + "---|" * len(COMPARISON_COLUMNS),
        *("| " + " | ".join(c) + " |" for c in rows),
        "",
    ]


def comparisons_html(rows: list[list[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COMPARISON_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return (
        "<h2>Paired comparisons (same items)</h2><p>right→wrong = items forgotten, wrong→right = items "
        "learned; exact McNemar p-value; 95% paired-bootstrap intervals.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
    )


# --------------------------------------------------------------------------------------------------
# The paper's analyses: target tokens with NLL > 5 nats, and displacement vs retention drop over cells
# --------------------------------------------------------------------------------------------------
def share_text(counts: list[int] | None) -> str:
    """ "count/n = share [95% Wilson interval]", or "-" where nothing was counted."""
    if not counts or not counts[1]:
        return "-"
    count, n = counts
    low, high = wilson_interval(count, n)
    return f"{count}/{n} = {count / n:.1%} [{low:.1%}, {high:.1%}]"


def high_nll_rows(high_nll: list[dict[str, Any]]) -> list[list[str]]:
    """The NLL > 5 table's rows from target-nll.json's `high_nll`: group, seeds, all, then per branch."""
    keys = ["all", *(letter for letter, _ in BRANCHES)]
    return [
        [entry["group"], str(entry["seeds"]), *(share_text(entry["counts"].get(key)) for key in keys)]
        for entry in high_nll
    ]


def analyses_markdown(high_nll: list[dict[str, Any]], correlations: dict[str, Any]) -> list[str]:
    """The report's "Paper analyses" section: the NLL > 5 table (target-nll.json's `high_nll`) and the
    correlation table (correlations.json)."""
    high = high_nll_rows(high_nll)
    measures = [m for m in correlations["measures"] if m["n"] or m["paper"]]
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


def section_html(lines: list[str]) -> str:
    """HTML of a Markdown section built here (headings, paragraphs and pipe tables only)."""
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
# Learning curves: retention at matched memorization and the tuning rule (tuning.json)
# --------------------------------------------------------------------------------------------------
def _epoch_text(epoch: Any) -> str:
    return f"{epoch:.2f}" if isinstance(epoch, int | float) else "-"


def _interval_plain(bounds: list[float] | None) -> str:
    return f" [{bounds[0]:.3g}, {bounds[1]:.3g}]" if bounds else ""


def matched_cell(entry: dict[str, Any]) -> str:
    """A cell of the matched-memorization table: "0.812 [0.70, 0.90] @ epoch 2.35", or "not reached"."""
    if not entry["reached"]:
        best = "-" if entry["best"] is None else f"{entry['best']:.3g}"
        return f"not reached (best {best}; {entry['seeds_reached']}/{entry['seeds']} seeds reach it)"
    text = f"{fmt(entry['value'])}{_interval_plain(entry['ci95'])} @ epoch {_epoch_text(entry['epoch'])}"
    if entry["seeds"] > 1 and entry["seeds_reached"] < entry["seeds"]:
        text += f" ({entry['seeds_reached']}/{entry['seeds']} seeds reach it)"
    return text


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The report's sections on learning curves (matched memorization) and the tuning rule."""
    key, levels, retention = tuning["retention"], tuning["levels"], tuning["retention_name"]
    md: list[str] = []
    name = "probe retention" if key == "retention" else "KL(base‖model) per token"
    if tuning["matched"]:
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
        for group, entries in tuning["matched"].items():
            entry = tuning["groups"][group]
            last = entry["mean_curve"][-1] if entry["mean_curve"] else {}
            md.append(
                f"| {group} | {len(entry['cells'])} | "
                + " | ".join(matched_cell(e) for e in entries)
                + f" | {fmt(last.get('memorization'))} @ epoch {_epoch_text(last.get('epoch'))} |"
            )
        md.append("")
    if tuning["selection"]:
        source = (
            "each setting's mean learning curve over seeds"
            if tuning["source"] == "curves"
            else "each setting's final model (no learning curves: one point per setting, its train_acc "
            "and retention_mean / KL)"
        )
        md += [
            "## Tuning: one declared rule",
            "",
            f"Rule (the `select` section of the config): {tuning['rule']['text']}",
            "",
            f"Read from {source}. Every setting is listed; the chosen one is marked ✓.",
            "",
        ]
        for family, entry in tuning["selection"].items():
            md += [
                f"### {family}",
                "",
                f"| setting | seeds | reaches {tuning['rule']['memorization']:.0%} at epoch | {retention} there "
                f"| last epoch | memorization | {retention} | chosen |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for setting, s in entry["settings"].items():
                md.append(
                    f"| {setting or '(default)'} | {s['seeds']} | "
                    + (_epoch_text(s["epoch"]) if s["reached"] else "not reached")
                    + f" | {fmt(s['retention_at_threshold'])} | {_epoch_text(s['final_epoch'])} "
                    f"| {fmt(s['final_memorization'])} | {fmt(s['final_retention'])} "
                    f"| {'✓' if setting == entry['chosen'] else ''} |"
                )
            md += ["", f"Chosen: {entry['chosen'] or '(default)'}: {entry['why']}.", ""]
    return md
