"""What a grid's result files say, computed without a model: the summary the tables of docs/results.md
are drawn from (`scripts/results.py`), written as JSON beside the files it reads; the paper's claims are
decided on it by the rules of `mixsd.experiments.verdicts`.

It reads the folder `mixsd experiment` writes, or its committed copy under results/<grid>/ (the same files
without weights):

    experiment.yaml                 the config as run (its `select` rule)
    results.jsonl                   one row per finished cell (mixsd.experiments.results)
    curve-base.json                 the base model's curve row: epoch 0 of every curve
    cells/<cell>/train/curve.jsonl  the learning curve, with per-item outcomes (`items`, mixsd.training.curve)
    cells/<cell>/train/stage.json   the train stage's record: which target file the cell trained on
    cells/<cell>/retention*.json(l) retention and its per-item answers (forgetting's three measures)
    cells/<cell>/fisher.json        the Fisher displacement and the probe it was measured on
    cells/<cell>/train/opsd-diagnostics.jsonl  an OPSD cell's per-epoch diagnostics
    cells/<cell>/eval.predictions.jsonl        a documents grid's SQuAD scores per item (closed_book.py)
    corpus/train.jsonl              the training corpus (the invented names leakage looks for)
    known-facts/, retention-probes/ the generative probe items (their prompts and accepted answers);
    retention-data/                 or the copy `collect` made of a committed probe folder (`retention: {data:}`)

Declared before the 20-epoch runs of issue 19, and applied to every grid alike:
- Memorization: the share of the training questions answered right (the corpus's own matcher), from the
  curve's per-item outcomes.
- Matched memorization: the first *scored* epoch at which a seed's memorization reaches the level; no
  interpolation, because items are scored only at scored epochs. A seed that never reaches it is counted
  as "not reached"; a group is compared at a level only when all its seeds reach it.
- The primary retention metric: on the generative probes of the curve (in-context facts, instructions,
  known facts), the share of the items the base model answers right that the model still answers right
  (gains are not counted: retention is capped at the base), averaged over the probes. Secondary: KL to
  the base model and the per-item flips right→wrong (1→0) and wrong→right (0→1).
- Intervals: a hierarchical percentile bootstrap (`metrics.hierarchical_bootstrap`): seeds resampled,
  then items within each probe; between two methods the item resample is shared (paired items).
- Fisher (the paper's third claim): over the trained cells, the correlation of each displacement measure
  (the Fisher-weighted ratio Σ F·Δθ²/‖Δθ‖², Σ F·Δθ²/Σ F and raw ‖Δθ‖²; F from the base model on SQuAD
  paragraphs, data apart from the drop measure) with the drop of the primary retention metric at the last
  epoch (1 − it): raw, and partial with log10(lr) and LoRA-vs-full held fixed; intervals from a cluster
  bootstrap over settings (a setting's seeds are not independent draws).
- Forgetting, three measures kept apart (`mixsd.evaluation.forgetting`), pooled over a group's seeds with Wilson
  intervals: format transfer (retention answers taking the shape of the cell's *own* training targets,
  against the base model's answers judged by the same shapes), leakage (answers naming an invented entity
  of the corpus) and erased knowledge (known facts right→wrong; multiple choice where the grid has it).
- Target accounting (`mixsd.method.target_accounting`) per MixSD/self-rewrite cell: verified, faithful, fallback
  and dropped shares of the records drawn; among verified targets, the share of tokens and of targets
  with a token above 5 nats under the base model.
- OPSD diagnostics (`mixsd.training.opsd`) per OPSD cell and epoch, beside the curve's memorization at that
  epoch where it was scored: where the on-policy signal is lost when OPSD does not learn.
- Fisher correlations use only cells whose Fisher was measured on one probe file (the most common one);
  the others are listed as left out. A MEMIT cell is no trained cell (no learning rate to hold fixed) and
  is left out of them; its curve is one point, the edited model (`edit`), matched like any first point.
- The rule that picks each method's setting: on the rule's seeds (`select.seeds`), among the settings
  whose curve reaches `select.memorization` within `select.within_epochs`, the one with the highest
  primary retention at that epoch; if none reaches it, the highest final memorization ("not reached"
  is then written beside the choice).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import yaml

from mixsd.core.files import InputError, atomic_write_json, read_json_object, read_jsonl
from mixsd.core.metrics import cluster_bootstrap_correlation, hierarchical_bootstrap, rate, wilson_interval
from mixsd.evaluation.forgetting import read_forgetting
from mixsd.evaluation.probe_kinds import ERASED_CHOICES, GENERATIVE, KL
from mixsd.experiments.closed_book import closed_book
from mixsd.experiments.verdicts import BASELINES, EXTENSIONS, OWN_LEVEL_FLOOR, VERDICT_FAMILIES, verdicts
from mixsd.method.target_accounting import read_target_accounting
from mixsd.training.opsd_options import DIAGNOSTICS_FILE

SUMMARY_FILE = "summary.json"
LEVELS = (0.9, 0.95)
PRIMARY = "primary retention"
RULE_DEFAULTS = {"memorization": 0.95, "within_epochs": None, "seeds": None}
# the columns of each cell's row (mixsd.experiments.results) the per-cell table shows
CELL_COLUMNS = (
    "cell",
    "group",
    "method",
    "lam",
    "setting",
    "seed",
    "train_acc",
    "train_acc_ci95",
    "paraphrase_acc",
    "kl_per_token",
    "known_facts_acc",
    "target_nll_above_5",
    "target_nll_above_5_ci95",
    "target_nll_above_5_count",
    "target_nll_above_5_n",
    "verified_rate",
    "train_seconds",
)

# where `scripts/results.py collect` copies the probe items of a grid whose retention reads a committed folder
RETENTION_DATA = "retention-data"
# an OPSD cell's diagnostics the summary keeps per epoch (mixsd.training.opsd.OPSDDiagnostics)
OPSD_COLUMNS = (
    "epoch",
    "rollouts",
    "rollout_tokens",
    "rollouts_ended",
    "answer_in_rollouts",
    "facts_with_answer_rollout",
    "kl_per_token",
    "teacher_answer_start_p",
    "student_answer_start_p",
    "student_gold_logprob",
    "teacher_gold_logprob",
)

Point = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Reading a grid folder
# --------------------------------------------------------------------------------------------------
def read_grid(folder: str | Path) -> dict[str, Any]:
    """The files of a grid folder this module reads: config, rows, base row and curves."""
    folder = Path(folder)
    for required in ("experiment.yaml", "results.jsonl"):
        if not (folder / required).is_file():
            raise InputError(f"no {required} here: not a grid folder", folder)
    config = yaml.safe_load((folder / "experiment.yaml").read_text(encoding="utf-8")) or {}
    rows = [row for _, row in read_jsonl(folder / "results.jsonl")]
    base_file = folder / "curve-base.json"
    curves = {}
    for row in rows:
        curve_file = folder / "cells" / row["cell"] / "train" / "curve.jsonl"
        if curve_file.is_file():
            curves[row["cell"]] = [point for _, point in read_jsonl(curve_file)]
    return {
        "name": config.get("name", folder.name),
        "folder": folder,
        "config": config,
        "rows": rows,
        "base": read_json_object(base_file) if base_file.is_file() else None,
        "curves": curves,
    }


# --------------------------------------------------------------------------------------------------
# Per-item scores at a point of a curve
# --------------------------------------------------------------------------------------------------
def generative_probes(base: Point) -> list[str]:
    """The curve's generative probes: those with per-item collapse flags beside their outcomes."""
    items = base.get("items") or {}
    return [name for name in items if name != "memorization" and f"{name}_collapse" in items]


def _flags(text: str) -> list[int]:
    return [1 if c == "1" else 0 for c in text]


def kept_items(point: Point, base: Point, probes: list[str]) -> dict[str, list[int]]:
    """Per probe, for each item the base answers right: 1 if `point` still answers it right."""
    kept = {}
    for probe in probes:
        before, after = _flags(base["items"][probe]), _flags(point["items"][probe])
        if len(before) != len(after):
            raise ValueError(f"{probe}: the base and the model scored different items")
        kept[probe] = [a for b, a in zip(before, after, strict=True) if b]
    return kept


def flips(point: Point, base: Point, probes: list[str]) -> dict[str, int]:
    """Items turned right→wrong (1→0) and wrong→right (0→1) against the base, over the probes."""
    lost = gained = 0
    for probe in probes:
        for b, a in zip(_flags(base["items"][probe]), _flags(point["items"][probe]), strict=True):
            lost += b and not a
            gained += a and not b
    return {"right_to_wrong": lost, "wrong_to_right": gained}


def primary(point: Point, base: Point, probes: list[str]) -> float | None:
    """The primary retention metric of one curve point (mean over probes of base-right items kept)."""
    shares = [sum(k) / len(k) for k in kept_items(point, base, probes).values() if k]
    return sum(shares) / len(shares) if shares else None


def first_at(curve: list[Point], level: float, within: float | None = None) -> Point | None:
    """The first scored point whose memorization reaches `level` (within `within` epochs), or None."""
    for point in curve:
        if within is not None and (point.get("epoch") or 0) > within + 1e-6:
            break
        if (point.get("memorization") or 0) >= level - 1e-9:
            return point
    return None


# --------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------
def _groups(grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Trained cells with a curve, by group (method, λ and setting), seeds in order."""
    groups: dict[str, dict[str, Any]] = {}
    for row in sorted(grid["rows"], key=lambda r: (r["group"], r["seed"])):
        if row["cell"] not in grid["curves"]:
            continue
        entry = groups.setdefault(
            row["group"],
            {
                "family": row.get("family", row["group"]),
                "method": row["method"],
                "lam": row.get("lam"),
                "setting": row.get("setting", ""),
                "cells": [],
                "seeds": [],
            },
        )
        entry["cells"].append(row["cell"])
        entry["seeds"].append(row["seed"])
    return groups


def _memorization_items(point: Point) -> dict[str, list[int]]:
    return {"memorization": _flags(point["items"]["memorization"])}


def _best_memorization(cells: list[str], curves: list[list[Point]]) -> dict[str, Any] | None:
    """The highest memorization at any scored epoch of any seed, with its Wilson interval over the
    questions: for a method that never learns, how far from a level even its best point is."""
    scored = [
        (p, cell) for cell, curve in zip(cells, curves, strict=True) for p in curve if p.get("questions")
    ]
    if not scored:
        return None
    point, cell = max(scored, key=lambda pc: pc[0]["memorized"] / pc[0]["questions"])
    memorized, questions = point["memorized"], point["questions"]
    return {
        "cell": cell,
        "epoch": point.get("epoch"),
        "memorized": memorized,
        "questions": questions,
        "value": memorized / questions,
        "ci95": list(wilson_interval(memorized, questions)),
    }


def trajectory(curves: list[list[Point]], base: Point, probes: list[str]) -> list[dict[str, Any]]:
    """Per scored epoch every seed's curve has: each seed's memorization and primary retention (the
    memorization–retention plane of docs/results.md's figures; the base model is epoch 0)."""
    by_epoch = [{round(float(p.get("epoch") or 0), 4): p for p in curve} for curve in curves]
    shared = sorted(set.intersection(*(set(points) for points in by_epoch))) if by_epoch else []
    return [
        {
            "epoch": epoch,
            "memorization": [points[epoch].get("memorization") for points in by_epoch],
            "primary": [primary(points[epoch], base, probes) for points in by_epoch],
        }
        for epoch in shared
    ]


def summarize_group(grid: dict[str, Any], entry: dict[str, Any], probes: list[str]) -> dict[str, Any]:
    """One group's memorization, epochs to each level and matched retention, over its seeds."""
    base = grid["base"]
    curves = [grid["curves"][cell] for cell in entry["cells"]]
    finals = [curve[-1] for curve in curves]
    memorized = sum(p["memorized"] for p in finals)
    questions = sum(p["questions"] for p in finals)
    out: dict[str, Any] = {
        **{k: entry[k] for k in ("family", "method", "lam", "setting", "cells", "seeds")},
        "final_epoch": [p.get("epoch") for p in finals],
        "final_memorization": [p["memorization"] for p in finals],
        "final_memorization_pooled": {
            "value": memorized / questions if questions else None,
            "wilson95": list(wilson_interval(memorized, questions)) if questions else None,
        },
        "final_memorization_ci": hierarchical_bootstrap([_memorization_items(p) for p in finals]),
        "best_memorization": _best_memorization(entry["cells"], curves),
        "final_kl": [p.get(KL.name) for p in finals],  # the curve's KL column
        "final_primary": [primary(p, base, probes) for p in finals],
        "trajectory": trajectory(curves, base, probes),
        "first_epoch": {
            f"{level:g}": [(p or {}).get("epoch") for p in (first_at(c, level) for c in curves)]
            for level in LEVELS
        },
        "matched": {},
    }
    for level in LEVELS:
        points = [first_at(curve, level) for curve in curves]
        reached = [p for p in points if p is not None]
        matched: dict[str, Any] = {"seeds_reached": len(reached), "seeds": len(curves)}
        if reached and len(reached) == len(curves):
            kept = [kept_items(p, base, probes) for p in reached]
            matched.update(
                epochs=[p.get("epoch") for p in reached],
                primary=hierarchical_bootstrap(kept),
                per_probe={
                    probe: hierarchical_bootstrap([{probe: k[probe]} for k in kept]) for probe in probes
                },
                flips=[flips(p, base, probes) for p in reached],
                kl=[p.get(KL.name) for p in reached],
            )
        out["matched"][f"{level:g}"] = matched
    return out


def choose_settings(
    grid: dict[str, Any], groups: dict[str, dict[str, Any]], probes: list[str]
) -> dict[str, dict[str, Any]]:
    """The declared rule's choice per family (method and λ) over its settings (see the module's doc)."""
    rule = {**RULE_DEFAULTS, **(grid["config"].get("select") or {})}
    level, within, rule_seeds = float(rule["memorization"]), rule["within_epochs"], rule["seeds"]
    families: dict[str, list[str]] = defaultdict(list)
    for name, entry in groups.items():
        if entry["setting"]:
            families[entry["family"]].append(name)
    choices = {}
    for family, names in families.items():
        candidates = {}
        for name in names:
            entry = groups[name]
            cells = [
                c
                for c, s in zip(entry["cells"], entry["seeds"], strict=True)
                if rule_seeds is None or s in rule_seeds
            ]
            if not cells:
                continue
            curve = grid["curves"][cells[0]]
            point = first_at(curve, level, within)
            candidates[name] = {
                "reached": point is not None,
                "epoch": point.get("epoch") if point else None,
                "primary": primary(point, grid["base"], probes) if point else None,
                "final_memorization": curve[-1]["memorization"],
            }
        reaching = [n for n in candidates if candidates[n]["reached"]]
        if reaching:
            chosen = max(reaching, key=lambda n: (candidates[n]["primary"] or 0, -names.index(n)))
            why = f"first reaches {level:.0%} at epoch {candidates[chosen]['epoch']:g} with the highest {PRIMARY} there"
        elif candidates:
            chosen = max(candidates, key=lambda n: (candidates[n]["final_memorization"], -names.index(n)))
            why = f"no setting reaches {level:.0%}: the highest final memorization"
        else:
            continue
        choices[family] = {"chosen": chosen, "why": why, "candidates": candidates, "rule": rule}
    return choices


FISHER_MEASURES = {
    "fisher_ratio": "Σ F·Δθ² / ‖Δθ‖² (the paper's ratio, our reading)",
    "fisher_displacement_norm": "Σ F·Δθ² / Σ F",
    "delta_norm_sq": "raw ‖Δθ‖²",
}


def fisher_correlations(grid: dict[str, Any], probes: list[str]) -> dict[str, Any]:
    """Each displacement measure against the retention drop over the trained cells (see the module doc)."""
    train = grid["config"].get("train") or {}
    cells = []
    for row in grid["rows"]:
        curve = grid["curves"].get(row["cell"])
        if not curve or any(point.get("edit") for point in curve):  # an edit: no training, no lr
            continue
        settings = row.get("settings") or {}
        lr = settings.get("lr", settings.get("learning_rate", train.get("lr", train.get("learning_rate"))))
        kept = primary(curve[-1], grid["base"], probes)
        cells.append(
            {
                "cell": row["cell"],
                "probe": _fisher_probe(grid, row["cell"]),
                "setting": row["group"],
                "drop": None if kept is None else 1 - kept,
                "log10_lr": math.log10(lr) if isinstance(lr, int | float) and lr > 0 else None,
                "lora": 1.0 if (settings.get("lora_rank") or train.get("lora_rank") or 0) > 0 else 0.0,
                **{m: row.get(m) for m in FISHER_MEASURES},
            }
        )
    # a displacement is only comparable across cells whose Fisher was measured on the same text
    measured = [c["probe"] for c in cells if c["probe"]]
    probe = max(sorted(set(measured)), key=measured.count) if measured else None
    out: dict[str, Any] = {
        "cells": cells,
        "probe": probe,
        "left_out": [c["cell"] for c in cells if c["probe"] != probe],
        "measures": {},
    }
    for measure, label in FISHER_MEASURES.items():
        usable = [
            c
            for c in cells
            if c["probe"] == probe and _finite(c[measure]) and _finite(c["drop"]) and _finite(c["log10_lr"])
        ]
        x, y = [c[measure] for c in usable], [c["drop"] for c in usable]
        clusters = [c["setting"] for c in usable]
        covariates = [[c["log10_lr"] for c in usable]]
        if len({c["lora"] for c in usable}) > 1:
            covariates.append([c["lora"] for c in usable])
        out["measures"][measure] = {
            "label": label,
            "raw": cluster_bootstrap_correlation(x, y, clusters),
            "partial": cluster_bootstrap_correlation(x, y, clusters, covariates),
            "controls": ["log10 lr"] + (["LoRA"] if len(covariates) > 1 else []),
        }
    return out


def _fisher_probe(grid: dict[str, Any], cell: str) -> str | None:
    """The probe file (its name and sha256) the cell's Fisher was measured on; None when not measured."""
    path = grid["folder"] / "cells" / cell / "fisher.json"
    if not path.is_file():
        return None
    probe = read_json_object(path).get("probe") or {}
    return f"{Path(str(probe.get('path', '?'))).name} {str(probe.get('sha256', '?'))[:12]}"


# --------------------------------------------------------------------------------------------------
# Forgetting and target accounting, from each cell's files
# --------------------------------------------------------------------------------------------------
def targets_of(folder: Path, cell: str) -> Path | None:
    """The target file the cell trained on, named by its train stage's record (None: none, or not kept)."""
    record = folder / "cells" / cell / "train" / "stage.json"
    if not record.is_file():
        return None
    settings = (read_json_object(record).get("description") or {}).get("settings") or {}
    if not settings.get("targets"):
        return None
    recorded = Path(str(settings["targets"]))  # as the run wrote it: OUT/cells/<targets cell>/<file>
    path = folder / "cells" / recorded.parent.name / recorded.name
    return path if path.is_file() else None


def _probe_folder(folder: Path, probes: list[str]) -> Path | None:
    """The folder holding the generative retention probes' items (the run's, or the committed copy)."""
    for name in ("retention-probes", "known-facts", RETENTION_DATA):
        candidate = folder / name
        if probes and all((candidate / f"{p}.jsonl").is_file() for p in probes):
            return candidate
    return None


def cell_forgetting(grid: dict[str, Any], cell: str) -> dict[str, Any] | None:
    """`mixsd.evaluation.forgetting` of one cell; None when its retention answers or the corpus are not at hand."""
    folder: Path = grid["folder"]
    cell_dir, corpus = folder / "cells" / cell, folder / "corpus" / "train.jsonl"
    predictions = cell_dir / "retention.predictions.jsonl"
    if not (predictions.is_file() and (cell_dir / "retention.json").is_file() and corpus.is_file()):
        return None
    generative = sorted(
        {
            str(r["split"])
            for _, r in read_jsonl(predictions)
            if r.get("kind") == GENERATIVE.row_tag and r.get("who") == "model"
        }
    )
    probes = _probe_folder(folder, generative)
    if probes is None:
        return None
    return read_forgetting(cell_dir, corpus, targets_of(folder, cell), probes)


def _pooled(parts: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Rates (`metrics.rate`) pooled over seeds: the counts add up."""
    parts = [p for p in parts if p and p.get("n")]
    return rate(sum(p["correct"] for p in parts), sum(p["n"] for p in parts)) if parts else None


def group_forgetting(grid: dict[str, Any], cells: list[str]) -> dict[str, Any] | None:
    """The three forgetting measures over a group's seeds (see the module doc)."""
    per_cell = {cell: cell_forgetting(grid, cell) for cell in cells}
    found = [f for f in per_cell.values() if f is not None]
    if not found:
        return None
    transfer = [f["format_transfer"]["all"] for f in found if f["format_transfer"]]
    leak = [f["leakage"]["all"] for f in found if f["leakage"]]
    lost = [lost for f in found for lost in f["erased_knowledge"]["facts_lost"].values()]
    multiple_choice: dict[str, list[float]] = defaultdict(list)
    for f in found:
        for probe, metrics in f["erased_knowledge"][ERASED_CHOICES.section].items():
            # the probe's headline: acc, or acc_norm where acc is not above chance for the base model
            value = metrics["acc"].get("retention")
            value = value if value is not None else metrics["acc_norm"].get("retention")
            if value is not None:
                multiple_choice[probe].append(value)
    return {
        "cells": [cell for cell, f in per_cell.items() if f is not None],
        "format_transfer": {
            "model": _pooled([t["model"] for t in transfer]),
            "base": _pooled([t["base"] for t in transfer]),
        }
        if transfer
        else None,
        "leakage": {"model": _pooled([t["model"] for t in leak]), "base": _pooled([t["base"] for t in leak])},
        "names_leaked": dict(sum((Counter(t.get("names") or {}) for t in leak), Counter()).most_common(5)),
        "facts_lost": _pooled(lost),
        "multiple_choice_retention": {p: sum(v) / len(v) for p, v in sorted(multiple_choice.items())},
    }


def group_targets(grid: dict[str, Any], cells: list[str]) -> list[dict[str, Any]]:
    """Target accounting of each cell's own target file (cells sharing one file: listed once)."""
    out, seen = [], set()
    for cell in cells:
        targets = targets_of(grid["folder"], cell)
        if targets is None or targets in seen:
            continue
        seen.add(targets)
        summary = targets.with_name(targets.name.removesuffix(".jsonl") + ".summary.json")
        nll = grid["folder"] / "cells" / cell / "nll.json"
        accounting = read_target_accounting(
            targets, summary if summary.is_file() else None, nll if nll.is_file() else None
        )
        out.append({"cell": cell, "targets": targets.parent.name, **accounting})
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summarize(grid: dict[str, Any]) -> dict[str, Any]:
    """The whole summary of a grid (JSON-ready)."""
    if grid["base"] is None or "items" not in grid["base"]:
        raise InputError(
            "no curve-base.json with per-item outcomes: the grid ran without curves", grid["name"]
        )
    probes = generative_probes(grid["base"])
    groups = _groups(grid)
    summaries = {name: summarize_group(grid, entry, probes) for name, entry in groups.items()}
    base_items = {p: _flags(grid["base"]["items"][p]) for p in probes}
    comparisons = {}
    # the comparator is plain SFT on the ground truth (not the format control `SFT statement`)
    sft = [n for n, g in summaries.items() if g["method"] == "sft" and g["family"] == "SFT"]
    # MixSD against the other baselines too (issue 20): the self-rewrite (SDFT) and OPSD
    baselines = [n for n, g in summaries.items() if g["method"] in BASELINES]
    # our extensions of MixSD against the paper's MixSD λ=0.3 (issue 19 §4)
    plain = [n for n, g in summaries.items() if g["family"] == VERDICT_FAMILIES["mixsd"]]
    extensions = {VERDICT_FAMILIES[key] for key in EXTENSIONS}
    for name, group in summaries.items():
        if group["method"] == "sft":
            continue
        others = sft + (baselines if group["method"] == "mixsd" else [])
        for other in others + (plain if group["family"] in extensions else []):
            for level in LEVELS:
                key = f"{level:g}"
                a, b = group["matched"][key], summaries[other]["matched"][key]
                if "primary" not in a or "primary" not in b:
                    continue
                kept_a = [kept_items(p, grid["base"], probes) for p in _reached(grid, group, level)]
                kept_b = [
                    kept_items(p, grid["base"], probes) for p in _reached(grid, summaries[other], level)
                ]
                comparisons.setdefault(f"{name} vs {other}", {})[key] = hierarchical_bootstrap(kept_a, kept_b)
    own_level = {
        f"{name} vs {other}": comparison
        for name, group in summaries.items()
        if group["method"] == "mixsd"
        for other in baselines
        if f"{name} vs {other}" not in comparisons
        and (comparison := compare_at_own_level(grid, group, summaries[other], probes)) is not None
    }
    out = {
        "grid": grid["name"],
        "probes": {p: {"items": len(v), "base_right": sum(v)} for p, v in base_items.items()},
        "base_memorization": grid["base"].get("memorization"),
        "groups": summaries,
        "choices": choose_settings(grid, groups, probes),
        "comparisons": comparisons,
        "own_level_comparisons": own_level,
        "fisher": fisher_correlations(grid, probes),
        "forgetting": {
            name: f
            for name, f in (
                (n, group_forgetting(grid, ["base"] if n == "base" else g["cells"]))
                for n, g in [("base", {}), *summaries.items()]
            )
            if f is not None
        },
        "targets": {
            name: group_targets(grid, g["cells"])
            for name, g in summaries.items()
            if g["method"] in ("mixsd", "rewrite")
        },
        "opsd": opsd_diagnostics(grid),
        "closed_book": closed_book(grid),  # documents grids: SQuAD scores on questions nobody here wrote
        "cells": [{k: row.get(k) for k in CELL_COLUMNS} for row in grid["rows"]],
    }
    out["verdicts"] = verdicts(out)
    return out


def opsd_diagnostics(grid: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per OPSD cell, its diagnostics rows (epoch 0 first), each with the curve's memorization at that
    epoch where the curve scored it (None at epochs it skipped)."""
    out = {}
    for row in grid["rows"]:
        path = grid["folder"] / "cells" / row["cell"] / "train" / DIAGNOSTICS_FILE
        if row["method"] != "opsd" or not path.is_file():
            continue
        scored = {
            round(float(p.get("epoch") or 0), 4): p["memorization"]
            for p in grid["curves"].get(row["cell"], [])
        }
        out[row["cell"]] = [
            {**{k: d.get(k) for k in OPSD_COLUMNS}, "memorization": scored.get(round(float(d["epoch"]), 4))}
            for _, d in read_jsonl(path)
        ]
    return out


def _reached(grid: dict[str, Any], group: dict[str, Any], level: float) -> list[Point]:
    return [first_at(grid["curves"][cell], level) for cell in group["cells"]]


def own_level(grid: dict[str, Any], group: dict[str, Any]) -> float:
    """The highest memorization every seed of a group reaches at some scored point of its curve."""
    return min(max(p.get("memorization") or 0 for p in grid["curves"][cell]) for cell in group["cells"])


def compare_at_own_level(
    grid: dict[str, Any], group: dict[str, Any], baseline: dict[str, Any], probes: list[str]
) -> dict[str, Any] | None:
    """`group` (MixSD) minus `baseline` in primary retention at the baseline's own level (`own_level`),
    each seed at the first point of its curve reaching it, paired items: for a baseline that reaches no
    level of LEVELS. None when it reaches one, when its own level is under OWN_LEVEL_FLOOR, or when a seed
    of `group` never reaches it."""
    if any(baseline["matched"][f"{level:g}"].get("primary") for level in LEVELS):
        return None
    level = own_level(grid, baseline)
    if level < OWN_LEVEL_FLOOR - 1e-9:
        return None
    mine, theirs = _reached(grid, group, level), _reached(grid, baseline, level)
    if any(p is None for p in mine + theirs):
        return None
    kept = [[kept_items(p, grid["base"], probes) for p in points] for points in (mine, theirs)]
    boot = hierarchical_bootstrap(*kept)
    if boot is None:
        return None
    epochs = {"epochs": [p.get("epoch") for p in mine], "baseline_epochs": [p.get("epoch") for p in theirs]}
    return {"level": level, **epochs, **boot}


def write_summary(folder: str | Path) -> Path:
    """Compute the summary of a grid folder and write it there (summary.json); returns its path."""
    folder = Path(folder)
    path = folder / SUMMARY_FILE
    atomic_write_json(path, summarize(read_grid(folder)))
    return path
