"""The results table of an experiment: one row per cell, flattened from its result files, and the
mean and spread over seeds.

`mixsd experiment` writes the rows (`OUT/results.jsonl`, `OUT/results.csv`); `mixsd.experiments.report` reads them.
Both import this module, so the table has one definition and neither command imports the other.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any, Protocol

from mixsd.core.files import atomic_write_jsonl, atomic_write_text
from mixsd.core.metrics import analysis_columns, split_columns
from mixsd.evaluation.lmeval import lm_eval_columns
from mixsd.evaluation.probe_kinds import PROBE_KINDS

# Which score of each retention probe counts (the notes: social_iqa is read length-normalized).
RETENTION_METRIC = {
    "general_knowledge": "acc",
    "qa_wikidata": "acc",
    "social_iqa": "acc_norm",
    "squad_paragraphs": "ppl",
}

# The columns `mixsd experiment` prints and the report's main table shows.
# The files the results side writes beside results.jsonl for the report (`mixsd.experiments.report_data`); the report
# reads them and draws.
TUNING_FILE = "tuning.json"  # matched memorization, the rule's choice, each group's mean curve
CURVES_FILE = "curves.jsonl"  # every point of every learning curve
CORRELATIONS_FILE = "correlations.json"  # displacement vs retention drop
COMPARISONS_FILE = "comparisons.json"  # paired comparisons, item by item
TARGET_NLL_FILE = "target-nll.json"  # target tokens > 5 nats, NLL histograms
TRAINING_LOSS_FILE = "training-loss.json"  # each cell's training loss by optimizer step
REPORT_DATA_FILES = (
    TUNING_FILE,
    CURVES_FILE,
    CORRELATIONS_FILE,
    COMPARISONS_FILE,
    TARGET_NLL_FILE,
    TRAINING_LOSS_FILE,
)

MAIN_COLUMNS = [  # `*_acc`: accuracy under the corpus's own matcher (manifest answer_match)
    "train_acc",
    "paraphrase_acc",
    "retrieval_acc",
    "compositional_acc",
    "test_acc",
    "unseen_acc",
    "retention_mean",
    "kl_per_token",
    "target_nll_mean",
    "target_nll_above_5",
    "fisher_displacement_norm",
    "fisher_ratio",
    "delta_norm_sq",
    "verified_rate",
]


class GridCell(Protocol):
    """What a row needs to know of its cell (`mixsd.experiments.experiment.Cell`)."""

    @property
    def name(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def family(self) -> str: ...
    @property
    def setting(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def lam(self) -> float | None: ...
    @property
    def seed(self) -> int: ...
    @property
    def settings(self) -> tuple[tuple[str, Any], ...]: ...


def _value(node: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def cell_row(
    cell: GridCell,
    results: dict[str, Any],
    analyses: dict[str, Any],
    train_summary: dict | None,
    mix_summary: dict | None,
) -> dict[str, Any]:
    """Flatten one cell's result files into a row of the results table."""
    row: dict[str, Any] = {
        "cell": cell.name,
        "group": cell.group,
        "method": cell.method,
        "lam": cell.lam,
        "seed": cell.seed,
    }
    if cell.settings:  # a setting of a sweep: its method (and λ) and the setting, apart
        row.update(family=cell.family, setting=cell.setting, settings=dict(cell.settings))
    for split, scores in results["eval"].get("splits", {}).items():
        row.update(split_columns(split, scores))  # headline accuracy under the corpus's matcher
    ratios = []
    for probe, summary in results["retention"].get("probes", {}).items():
        metric = RETENTION_METRIC.get(probe, "acc")
        # multiple choice: chance-normalized retention, raw ratio and per-item flips beside it; KL its
        # value alone (no ratio: it is itself a comparison with the base)
        row.update(PROBE_KINDS[summary["kind"]].table_columns(probe, summary, metric))
        ratio = row.get(f"{probe}_retention")
        if ratio is not None:
            ratios.append(ratio)
    # lm-evaluation-harness tasks run by the retention eval (`--lm-eval-tasks`): the same columns, by task
    for task, summary in results["retention"].get("lm_eval", {}).items():
        row.update(lm_eval_columns(task, summary))
        if summary.get("retention") is not None:
            ratios.append(summary["retention"])
    if "unseen_acc" in row and cell.method != "base":
        row["unseen_retention"] = None  # filled against the base row in `add_relative_scores`
    row["retention_mean"] = sum(ratios) / len(ratios) if ratios else None
    # target NLL (mean, median, share > 5 nats) and Fisher columns (Σ F·Δθ², fisher_ratio, ‖Δθ‖²)
    row.update(analysis_columns(analyses.get("nll") or {}, analyses.get("fisher") or {}))
    if train_summary:
        history = [h for h in train_summary.get("history", []) if "loss" in h]
        row["final_train_loss"] = history[-1]["loss"] if history else None
        row["train_epochs"] = history[-1].get("epoch") if history else None
        row["train_seconds"] = _value(train_summary, "seconds")
    if mix_summary:
        row["verified_rate"] = mix_summary.get("verified_rate")
        row["mean_attempts"] = mix_summary.get("mean_attempts")
        row["naive_fraction"] = mix_summary.get("naive_fraction")
        row["verify_mode"] = mix_summary.get("verify_mode")
    return row


def add_relative_scores(rows: list[dict[str, Any]]) -> None:
    """Scores that need the base row: KGFunc's unseen-operation accuracy relative to the base model."""
    base = next((r for r in rows if r["method"] == "base"), None)
    for row in rows:
        if "unseen_acc" in row and base and base.get("unseen_acc"):
            row["unseen_retention"] = row["unseen_acc"] / base["unseen_acc"]
            if row["retention_mean"] is None:
                row["retention_mean"] = row["unseen_retention"]


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_jsonl(out / "results.jsonl", rows)
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", buffer.getvalue())


def rows_by_group(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The rows of each group (its seeds), in the order groups first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    return groups


def aggregate(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per group, in the order groups first appear."""
    table = []
    for group, members in rows_by_group(rows).items():
        entry: dict[str, Any] = {
            "group": group,
            "method": members[0]["method"],
            "lam": members[0]["lam"],
            "seeds": len(members),
        }
        for column in columns:
            values = [m[column] for m in members if isinstance(m.get(column), int | float)]
            entry[column] = sum(values) / len(values) if values else None
            sd = (
                math.sqrt(sum((v - entry[column]) ** 2 for v in values) / (len(values) - 1))
                if len(values) > 1
                else None
            )
            # identical values (e.g. the same ground-truth targets every seed) give float noise, not spread
            entry[f"{column}_sd"] = 0.0 if sd is not None and sd <= 1e-9 * abs(entry[column]) else sd
        table.append(entry)
    return table


def comparison_text(table: list[dict[str, Any]], columns: list[str]) -> str:
    headers = ["method", *columns]
    lines = [headers]
    for entry in table:
        cells = [entry["group"]]
        for column in columns:
            value, sd = entry.get(column), entry.get(f"{column}_sd")
            cells.append("-" if value is None else f"{value:.3g}" + (f"±{sd:.2g}" if sd is not None else ""))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
