"""The committed results and the tables of docs/results.md, kept in step.

    python scripts/results.py collect runs/kgfact-20ep      # copy a grid's small result files to results/<name>/
    python scripts/results.py collect runs/kgfact-20ep --merge   # add a later run's cells to them
    python scripts/results.py render                         # summaries + every generated table (make results)
    python scripts/results.py render --check                 # exit 1 if a table differs (make results-check)

`collect` copies what a grid folder holds except weights and checkpoints (the config as run, the results
table, per cell the curve, eval, retention, NLL and Fisher files, targets and per-item predictions) and
writes PROVENANCE.json (source folder, the commit it ran from, when). `collect --merge` adds a later run
of the same study (more seeds, controls: a superset config run with `--only`) to what is committed: its
cells replace or join the committed ones (PROVENANCE.json names the ones it brought, apart from those already
committed byte for byte) (the committed base cell stays, and so do committed shared targets
that the later run mixed again: refused if it mixed other tokens), the rows are merged by cell, and it
is refused unless the base model's curve (epoch 0 of every curve) is item for item the committed one, so that every cell is scored
on the same items; the grid-level files derived from one run's cells (the report and the data it draws) are left out. `render` computes each committed
grid's summary (`mixsd.experiments.grid_summary`, written as results/<name>/summary.json) and rewrites every block of
docs/results.md between

    <!-- results GRID TABLE -->
    ...
    <!-- /results -->

with the table TABLE of grid GRID drawn from it. Tables: cells, groups, matched, choice, compare, fisher, forgetting, targets, opsd, closed_book,
verdicts; and the figure `trajectories` (docs/figures/GRID-trajectories.png, drawn from the summary, whose
plotted points `render --check` compares with the rest of it). `render --check` also fails on a decimal
figure in the doc's prose that no generated table holds (`untraced_figures`), unless the doc's
`<!-- prose figures not from a table: ... -->` comment names it with its source.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, atomic_write_json, atomic_write_text, read_json_object, read_jsonl
from mixsd.experiments.grid_summary import LEVELS, PRIMARY, RETENTION_DATA, SUMMARY_FILE, read_grid, summarize
from mixsd.experiments.report_figures import summary_trajectory_figure
from mixsd.experiments.results import REPORT_DATA_FILES, write_table
from mixsd.experiments.verdicts import CLAIMS, DETERMINISTIC

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOC = ROOT / "docs" / "results.md"
BLOCK = re.compile(r"(<!-- results (\S+) (\S+) -->\n)(.*?)(<!-- /results -->)", re.S)
# what `collect` leaves behind: weights, checkpoints, journals, locks, the copied corpus and probes
SKIPPED_PARTS = {"model", "checkpoints", "stages", "data", "retention-probes", "report"}
SKIPPED_SUFFIXES = {".safetensors", ".bin", ".pt", ".gguf", ".journal", ".lock", ".png", ".html"}
MAX_FILE_BYTES = 8 * 1024 * 1024


# --------------------------------------------------------------------------------------------------
# collect
# --------------------------------------------------------------------------------------------------
def kept(relative: Path) -> bool:
    parts = set(relative.parts[:-1])
    if parts & SKIPPED_PARTS or any(p.startswith("checkpoint-") for p in relative.parts):
        return False
    return relative.suffix not in SKIPPED_SUFFIXES and not relative.name.endswith(".journal")


# grid-level files a run derives from its own cells only: in a merged folder they would describe part of it
RUN_DERIVED = {"report.md", *REPORT_DATA_FILES, "results.csv", SUMMARY_FILE}


STAGE_LOG = "stage-log.jsonl"  # what each run of the grid ran or reused, a line a stage


def _append_log(committed: Path, run: Path) -> None:
    """Add the run's stage-log lines the committed log lacks, the whole kept in time order."""
    lines = committed.read_text(encoding="utf-8").splitlines()
    seen = set(lines)
    lines += [line for line in run.read_text(encoding="utf-8").splitlines() if line not in seen]
    lines = [line for line in lines if line.strip()]
    lines.sort(key=lambda line: json.loads(line).get("time") or "")
    atomic_write_text(committed, "".join(f"{line}\n" for line in lines))


def _checkout_of(source: Path) -> Path | None:
    """The checkout the grid ran from, found on the path as given, not as resolved: a worktree's `runs` is
    often a link to a disk outside it, where git would find no repository."""
    return next((p for p in (source.absolute(), *source.absolute().parents) if (p / ".git").exists()), None)


def _commit_of(source: Path) -> str | None:
    checkout = _checkout_of(source)
    if checkout is None:
        return None
    return (
        subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or None
    )


def _done_targets(cell: Path) -> bool:
    """A folder of targets shared by the settings of a sweep (no row of its own) whose making finished: its
    stage record says so (MixSD's mix writes one beside the file; SFT's targets have only the stage's own)."""
    records = [cell / "targets.jsonl.stage.json", cell / "stages" / "targets.json"]
    record = next((r for r in records if r.is_file()), None)
    if (cell / "cell.json").is_file() or record is None:
        return False
    try:
        return read_json_object(record).get("state") == "done"
    except InputError:
        return False


def _training_text(targets: Path) -> dict[str, Any]:
    """What a targets file trains on: each record's prompt and target token ids (not the log-probabilities
    beside them, whose last digits move with the machine's arithmetic)."""
    return {row.get("id"): (row.get("prompt_ids"), row.get("target_ids")) for _, row in read_jsonl(targets)}


def _kept_targets(source: Path, target: Path) -> set[str]:
    """Shared target folders the committed results already hold: they stay, as the base cell does. A later
    run that mixed them again must have trained on the same tokens; if not, its cells are not comparable."""
    kept_folders = set()
    for folder in sorted((source / "cells").glob("*")):
        committed = target / "cells" / folder.name
        if not (_done_targets(folder) and _done_targets(committed)):
            continue
        if _training_text(folder / "targets.jsonl") != _training_text(committed / "targets.jsonl"):
            raise InputError(
                f"the shared targets {folder.name} differ from the committed ones ({committed}): the later "
                "run's cells trained on other targets",
                folder / "targets.jsonl",
            )
        kept_folders.add(folder.name)
    return kept_folders


def _collected_files(cell: Path) -> dict[Path, Path]:
    """The files of a cell folder that `collect` keeps, by their path inside it."""
    return {
        path.relative_to(cell): path
        for path in cell.rglob("*")
        if path.is_file()
        and kept(Path("cells", cell.name, path.relative_to(cell)))
        and path.stat().st_size <= MAX_FILE_BYTES
    }


def _same_cell(source: Path, committed: Path) -> bool:
    """Whether a cell of the run is already committed byte for byte (a runs folder keeps every cell it
    finished, so a later merge sees the cells an earlier one brought in)."""
    mine, theirs = _collected_files(source), _collected_files(committed)
    return mine.keys() == theirs.keys() and all(mine[k].read_bytes() == theirs[k].read_bytes() for k in mine)


def merge(source: Path, name: str | None = None, results: Path = RESULTS, base_tolerance: int = 0) -> Path:
    """Add the cells of the grid folder `source` to the committed results/<name>/ (see the module doc)."""
    import yaml

    config = source / "experiment.yaml"
    if not config.is_file():
        raise InputError("no experiment.yaml: not a grid folder written by `mixsd experiment`", source)
    name = name or (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("name") or source.name
    target = results / name
    if not (target / "results.jsonl").is_file():
        raise InputError("nothing committed to merge into: collect without --merge first", target)
    base_new, base_old = source / "curve-base.json", target / "curve-base.json"
    for path in (base_new, base_old):
        if not path.is_file():
            raise InputError("no curve-base.json: the base curve is what makes the runs comparable", path)
    new_items = read_json_object(base_new).get("items")
    old_items = read_json_object(base_old).get("items")
    if (
        not new_items
        or set(new_items) != set(old_items or {})
        or any(len(new_items[k]) != len(old_items[k]) for k in new_items)
    ):
        raise InputError(
            "the base model's per-item curve outcomes differ from the committed ones "
            f"({target / 'curve-base.json'}): the two runs did not score the same items",
            base_new,
        )
    # the same items, scored by the same base model: outcomes can still differ on a few items where another
    # machine's arithmetic flips a greedy choice; accepted only up to `base_tolerance` items, and recorded
    differing = {
        k: sum(a != b for a, b in zip(new_items[k], old_items[k], strict=True))
        for k in sorted(new_items)
        if new_items[k] != old_items[k]
    }
    if sum(differing.values()) > base_tolerance:
        raise InputError(
            f"the base model's per-item curve outcomes differ from the committed ones on {differing} items "
            f"(tolerance {base_tolerance}; --base-tolerance N accepts up to N, recorded in PROVENANCE.json)",
            base_new,
        )
    new_rows = (
        [row for _, row in read_jsonl(source / "results.jsonl")]
        if (source / "results.jsonl").is_file()
        else []
    )
    old_rows = [row for _, row in read_jsonl(target / "results.jsonl")]
    # the committed base cell stays, as the committed base curve does: it is the reference every merged cell
    # is read against, and a later run's base (another probe suite, another machine's bf16) would move it
    committed_base = {row["cell"] for row in old_rows if row.get("method") == "base"}
    new_rows = [row for row in new_rows if row["cell"] not in committed_base]
    new_cells = {row["cell"] for row in new_rows}
    kept_targets = _kept_targets(source, target)
    unchanged = {c for c in new_cells if _same_cell(source / "cells" / c, target / "cells" / c)}
    staging = target.with_name(f".{name}.merging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(target, staging)
    copied = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or not kept(relative) or path.stat().st_size > MAX_FILE_BYTES:
            continue
        if relative.parts[0] == "cells" and not (
            len(relative.parts) > 2
            and (relative.parts[1] in new_cells or _done_targets(source / "cells" / relative.parts[1]))
            and relative.parts[1] not in kept_targets
        ):
            continue  # only finished cells (their rows are current in the source) and new finished shared targets
        if relative.parts[0] != "cells" and (
            relative.name in RUN_DERIVED or relative.name in ("results.jsonl", "curve-base.json")
        ):  # the committed base curve stays the reference every merged run was checked against
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        if relative == Path(STAGE_LOG) and (staging / relative).is_file():
            _append_log(staging / relative, path)  # every run's log lines stay, not only the last run's
        else:
            shutil.copy2(path, staging / relative)
        copied.append(str(relative))
    for cell in new_cells:  # a cell's folder is the new run's, whole: no file of an older run stays beside it
        for old in (staging / "cells" / cell).rglob("*"):
            if old.is_file() and not (source / old.relative_to(staging)).is_file():
                old.unlink()
    rows = [row for row in old_rows if row["cell"] not in new_cells] + new_rows
    write_table(staging, rows)
    for derived in RUN_DERIVED - {"results.csv", SUMMARY_FILE}:
        (staging / derived).unlink(missing_ok=True)
    provenance = (
        read_json_object(target / "PROVENANCE.json") if (target / "PROVENANCE.json").is_file() else {}
    )
    runs = provenance.get("runs") or [{k: v for k, v in provenance.items() if k != "runs"}]
    runs.append(
        {
            "source": str(source.resolve()),
            "commit": _commit_of(source),
            "collected": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cells": sorted(new_cells - unchanged),  # the cells this run brought: new or changed
            "cells_unchanged": sorted(unchanged),  # in the runs folder too, committed already as they are
            "files": len(copied),
            "base_items_differing": differing,  # the summaries keep the committed base curve
            "shared_targets_kept": sorted(kept_targets),  # mixed again to the same tokens; the committed stay
        }
    )
    atomic_write_json(staging / "PROVENANCE.json", {"runs": runs})
    shutil.rmtree(target)
    staging.rename(target)
    print(
        f"merged {len(new_cells - unchanged)} new or changed cells ({len(unchanged)} unchanged; {len(copied)} "
        f"files) into {target}",
        file=sys.stderr,
    )
    return target


def _copy_retention_data(source: Path, config: dict[str, Any], staging: Path) -> None:
    """A grid whose retention probes are a committed folder of the checkout (`retention: {data: DIR}`,
    relative to the checkout the grid ran from) gets a copy of its item files as retention-data/, so that
    the summary reads the probes' accepted answers from results/ alone."""
    data, checkout = (config.get("retention") or {}).get("data"), _checkout_of(source)
    if not data or checkout is None or not (checkout / data).is_dir():
        return
    for path in sorted((checkout / data).glob("*.json*")):
        if path.stat().st_size <= MAX_FILE_BYTES:
            (staging / RETENTION_DATA).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, staging / RETENTION_DATA / path.name)


def collect(source: Path, name: str | None = None, results: Path = RESULTS) -> Path:
    """Copy the small result files of the grid folder `source` to results/<name>/ (replacing it)."""
    config = source / "experiment.yaml"
    if not config.is_file():
        raise InputError("no experiment.yaml: not a grid folder written by `mixsd experiment`", source)
    import yaml

    settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    name = name or settings.get("name") or source.name
    target = results / name
    staging = target.with_name(f".{name}.collecting")
    shutil.rmtree(staging, ignore_errors=True)
    copied, skipped_large = [], []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if not path.is_file() or not kept(relative):
            continue
        if path.stat().st_size > MAX_FILE_BYTES:
            skipped_large.append(str(relative))
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / relative)
        copied.append(str(relative))
    _copy_retention_data(source, settings, staging)
    commit = _commit_of(source)
    atomic_write_json(
        staging / "PROVENANCE.json",
        {
            "source": str(source.resolve()),
            "commit": commit,
            "collected": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": len(copied),
            "left_out_over_8_MiB": skipped_large,
        },
    )
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    print(f"collected {len(copied)} files into {target}", file=sys.stderr)
    return target


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------
def num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def interval(ci: list[float] | None, digits: int = 3) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def estimate(boot: dict[str, Any] | None) -> str:
    """A hierarchical-bootstrap estimate as "value [95% CI]"."""
    return f"{boot['value']:.3f} {interval(boot['ci95'])}" if boot else "–"


def per_seed(values: list[Any], digits: int = 2) -> str:
    return ", ".join(
        num(v, digits) if isinstance(v, float) else ("not reached" if v is None else str(v)) for v in values
    )


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cells_table(summary: dict[str, Any]) -> str:
    rows = []
    for c in summary["cells"]:
        rows.append(
            [
                c["cell"],
                num(c["seed"]),
                f"{num(c['train_acc'], 2)} {interval(c['train_acc_ci95'], 2)}",
                num(c["paraphrase_acc"], 2),
                num(c["kl_per_token"]),
                num(c["known_facts_acc"], 2),
                f"{num(c['target_nll_above_5'], 3)} {interval(c['target_nll_above_5_ci95'])}",
                num(c["verified_rate"], 2),
            ]
        )
    header = [
        "cell",
        "seed",
        "memorization (final eval) [Wilson 95% CI]",
        "paraphrase",
        "KL/token",
        "known facts acc",
        "target tokens > 5 nats [Wilson 95% CI]",
        "verified",
    ]
    return table(header, rows)


def groups_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, g in summary["groups"].items():
        rows.append(
            [
                name,
                str(len(g["seeds"])),
                per_seed(g["final_epoch"], 0),
                per_seed(g["final_memorization"]),
                estimate(g["final_memorization_ci"]),
                per_seed(g["first_epoch"]["0.9"], 0),
                per_seed(g["first_epoch"]["0.95"], 0),
                per_seed(g["final_primary"]),
            ]
        )
    header = [
        "group",
        "seeds",
        "last epoch",
        "memorization per seed (curve, last epoch)",
        "memorization [95% CI, items × seeds]",
        "first epoch ≥ 90% (per seed)",
        "first epoch ≥ 95% (per seed)",
        f"{PRIMARY} at the last epoch (per seed)",
    ]
    return table(header, rows)


def matched_table(summary: dict[str, Any]) -> str:
    probes = list(summary["probes"])
    rows = []
    for name, g in summary["groups"].items():
        for level in LEVELS:
            m = g["matched"][f"{level:g}"]
            if "primary" not in m:
                rows.append(
                    [name, f"{level:.0%}", f"{m['seeds_reached']}/{m['seeds']}", "not reached by every seed"]
                    + [""] * (len(probes) + 2)
                )
                continue
            lost = sum(f["right_to_wrong"] for f in m["flips"])
            gained = sum(f["wrong_to_right"] for f in m["flips"])
            rows.append(
                [name, f"{level:.0%}", f"{m['seeds_reached']}/{m['seeds']}", estimate(m["primary"])]
                + [estimate(m["per_probe"][p]) for p in probes]
                + [f"{lost} / {gained}", per_seed(m["kl"])]
            )
    header = ["group", "level", "seeds reached", f"{PRIMARY} [95% CI]"]
    header += [f"{p} kept [95% CI]" for p in probes] + ["1→0 / 0→1 (all seeds)", "KL/token per seed"]
    return table(header, rows)


def choice_table(summary: dict[str, Any]) -> str:
    rows = []
    for family, choice in summary["choices"].items():
        candidates = "; ".join(
            f"{name}: {'epoch ' + num(c['epoch'], 0) + ', ' + PRIMARY + ' ' + num(c['primary']) if c['reached'] else 'not reached, final ' + num(c['final_memorization'], 2)}"
            for name, c in choice["candidates"].items()
        )
        rows.append([family, choice["chosen"], choice["why"], candidates])
    return table(
        ["method", "chosen setting", "why (the declared rule)", "every setting on the rule's seeds"], rows
    )


def compare_table(summary: dict[str, Any]) -> str:
    rows = []
    for pair, levels in summary["comparisons"].items():
        for level, boot in levels.items():
            rows.append(
                [pair, f"{float(level):.0%}", estimate(boot), f"{boot['seeds']} vs {boot['other_seeds']}"]
            )
    if not rows:
        return "No pair of groups has every seed at a common matched level yet.\n"
    return table(["pair", "matched level", f"difference in {PRIMARY} [95% CI, paired items]", "seeds"], rows)


def correlation(entry: dict[str, Any]) -> str:
    if entry["r"] is None:
        return entry["note"] or "–"
    return f"{entry['r']:+.2f} {interval(entry['ci95'], 2)}"


def fisher_table(summary: dict[str, Any]) -> str:
    rows = []
    for measure in summary["fisher"]["measures"].values():
        raw, partial = measure["raw"], measure["partial"]
        rows.append(
            [
                measure["label"],
                correlation(raw),
                correlation(partial),
                ", ".join(measure["controls"]),
                f"{raw['n']} cells, {raw['clusters']} settings",
            ]
        )
    header = [
        "displacement measure",
        "r with the retention drop [95% CI, cluster bootstrap]",
        "partial r [95% CI]",
        "held fixed",
        "cells",
    ]
    fisher = summary["fisher"]
    note = f"\nFisher measured on {fisher.get('probe') or '–'} (file, sha256 prefix)"
    note += (
        f"; left out, measured on another probe or not at all: {', '.join(fisher['left_out'])}.\n"
        if fisher.get("left_out")
        else ".\n"
    )
    return table(header, rows) + note


def share(entry: dict[str, Any] | None) -> str:
    """A pooled rate: value, count and Wilson interval."""
    if not entry or entry.get("value") is None:
        return "–"
    return f"{entry['value']:.3f} ({entry['correct']}/{entry['n']}) {interval(entry['ci95'], 3)}"


def forgetting_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, f in summary.get("forgetting", {}).items():
        transfer = f["format_transfer"] or {}
        names = ", ".join(f"{k} ×{v}" for k, v in f["names_leaked"].items())
        rows.append(
            [
                name,
                str(len(f["cells"])),
                share(transfer.get("model")),
                share(transfer.get("base")),
                share(f["leakage"]["model"]) + (f" ({names})" if names else ""),
                share(f["facts_lost"]),
                "; ".join(f"{p} {num(v, 2)}" for p, v in f["multiple_choice_retention"].items()) or "–",
            ]
        )
    if not rows:
        return "No cell has its retention answers and the corpus committed.\n"
    header = [
        "group",
        "cells",
        "format transfer: answers in the shape of its own targets [Wilson 95%]",
        "base answers in the same shapes",
        "leakage: answers naming an invented entity",
        "known facts lost (base-right → wrong)",
        "multiple-choice retention (mean over seeds)",
    ]
    return table(header, rows)


def targets_table(summary: dict[str, Any]) -> str:
    rows = []
    for name, cells in summary.get("targets", {}).items():
        for a in cells:
            high = a["high_nll"]["verified"] or {}
            rows.append(
                [
                    name,
                    a["targets"],
                    str(a["records"]),
                    share(a["verified"]),
                    share(a["faithful"]),
                    share(a["fallback"]),
                    share(a["dropped"]),
                    share(high.get("per_token")),
                    share(high.get("per_target")),
                ]
            )
    if not rows:
        return "No MixSD or self-rewrite cell with its targets committed.\n"
    header = [
        "group",
        "targets",
        "records",
        "verified",
        "faithful (no expert token below e^-5)",
        "ground-truth fallback",
        "dropped",
        "verified: tokens > 5 nats",
        "verified: targets with a token > 5 nats",
    ]
    return table(header, rows)


def opsd_table(summary: dict[str, Any]) -> str:
    """Per OPSD cell and epoch, its diagnostics beside the curve's memorization (docs/training.md says what
    each column measures)."""
    rows = [
        [
            cell,
            num(d["epoch"], 0),
            num(d["memorization"], 2),
            num(d["rollout_tokens"], 1),
            num(d["rollouts_ended"], 2),
            num(d["answer_in_rollouts"], 3),
            num(d["facts_with_answer_rollout"], 0),
            num(d["kl_per_token"], 3),
            num(d["teacher_answer_start_p"], 3),
            num(d["student_answer_start_p"], 3),
            num(d["student_gold_logprob"], 1),
        ]
        for cell, epochs in summary.get("opsd", {}).items()
        for d in epochs
    ]
    if not rows:
        return "No OPSD cell with its diagnostics committed.\n"
    header = [
        "cell",
        "epoch",
        "memorization",
        "rollout tokens",
        "ended before cap",
        "answer in rollouts",
        "facts with one",
        "KL / token",
        "teacher start p",
        "student start p",
        "student log p(gold \\| x)",  # the bar escaped: a table cell
    ]
    return table(header, rows)


def closed_book_table(summary: dict[str, Any]) -> str:
    """A documents grid: per group and split, SQuAD's EM and F1 and the answer-contained rate (mean over
    seeds and items [95% CI]), and F1 minus the base model's, paired over items."""
    rows = []
    for group, entry in summary.get("closed_book", {}).items():
        for split, scores in entry["splits"].items():
            rows.append(
                [
                    group,
                    split,
                    str(scores["items"]),
                    str(len(entry["seeds"])),
                    estimate(scores["squad_em"]),
                    estimate(scores["squad_f1"]),
                    estimate(scores["contained"]),
                    estimate(scores.get("squad_f1_vs_base")),
                ]
            )
    if not rows:
        return "No cell with SQuAD-scored predictions committed.\n"
    header = ["group", "split", "items", "seeds", "EM", "F1", "answer contained", "F1 − base (paired)"]
    return table(header, rows)


def verdicts_table(summary: dict[str, Any]) -> str:
    rows = [
        [
            CLAIMS[v["claim"]],
            f"**{v['verdict']}**",
            v["figure"],
            v.get("value") or (estimate(v["boot"]) if v["boot"] else ""),  # a value not from one bootstrap
            v["seeds"],
        ]
        for v in summary["verdicts"]
    ]
    return table(
        [
            "claim (the paper's, unless marked)",
            "verdict (declared rule)",
            "figure",
            "value [95% CI]",
            "seeds",
        ],
        rows,
    )


TABLES: dict[str, Callable[[dict[str, Any]], str]] = {
    "cells": cells_table,
    "groups": groups_table,
    "matched": matched_table,
    "choice": choice_table,
    "compare": compare_table,
    "fisher": fisher_table,
    "forgetting": forgetting_table,
    "targets": targets_table,
    "opsd": opsd_table,
    "closed_book": closed_book_table,
    "verdicts": verdicts_table,
}


def trajectory_groups(summary: dict[str, Any]) -> list[str]:
    """The groups a grid's trajectory figure draws: those run with several seeds (the study's arms) and the
    edits (one deterministic point); a grid with none of either (a one-seed sweep) draws every group."""
    groups = summary["groups"]
    chosen = [n for n, g in groups.items() if len(g["seeds"]) > 1 or g["method"] in DETERMINISTIC]
    return chosen or list(groups)


def trajectories_figure(summary: dict[str, Any], doc: Path, draw: bool) -> str:
    """The figure block: docs/figures/GRID-trajectories.png, drawn from the summary (with `draw`; a check
    only looks that the file is there, since the summary holding the plotted points is compared itself)."""
    relative = Path("figures") / f"{summary['grid']}-trajectories.png"
    path, groups = doc.parent / relative, trajectory_groups(summary)
    if draw:
        path.parent.mkdir(parents=True, exist_ok=True)
        if summary_trajectory_figure(summary, groups, path) is None:
            return "No group with a learning curve.\n"
    elif not path.is_file():
        return "(figure missing: run `make results`)\n"
    return (
        f"![{summary['grid']}: primary retention against memorization, epoch by epoch]({relative.as_posix()})\n\n"
        f"Drawn by `make results` from results/{summary['grid']}/summary.json (`trajectory` of each group): "
        f"{', '.join(groups)}; mean over seeds, bars ± sd over seeds (not intervals).\n"
    )


FIGURES: dict[str, Callable[[dict[str, Any], Path, bool], str]] = {"trajectories": trajectories_figure}


# --------------------------------------------------------------------------------------------------
# render / check
# --------------------------------------------------------------------------------------------------
def summaries(results: Path, write: bool) -> dict[str, dict[str, Any]]:
    """Every committed grid's summary, recomputed from its files (and written beside them with `write`)."""
    out = {}
    folders = (
        sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("."))
        if results.is_dir()
        else []
    )
    for folder in folders:
        summary = json.loads(json.dumps(summarize(read_grid(folder))))  # as it reads back from JSON
        if write:
            atomic_write_json(folder / SUMMARY_FILE, summary)
        out[folder.name] = summary
    return out


def rendered(text: str, grids: dict[str, dict[str, Any]], doc: Path, draw: bool = False) -> str:
    """`text` with every generated block recomputed (figures drawn too with `draw`)."""

    def block(match: re.Match) -> str:
        grid, name = match.group(2), match.group(3)
        line = text.count("\n", 0, match.start()) + 1
        if grid not in grids:
            raise InputError(f"no committed grid results/{grid}", doc, line)
        if name in FIGURES:
            return match.group(1) + FIGURES[name](grids[grid], doc, draw) + match.group(5)
        if name not in TABLES:
            known = ", ".join([*TABLES, *FIGURES])
            raise InputError(f"unknown table {name!r}; expected one of {known}", doc, line)
        return match.group(1) + TABLES[name](grids[grid]) + match.group(5)

    return BLOCK.sub(block, text)


FIGURE = re.compile(r"(?<![\w.])[−-]?\d*\.\d+(?![\w.])")  # a decimal figure: 0.573, −0.087, .5
# a doc names the figures its prose takes from elsewhere (a paper, a replaced cell), each with its source:
#   <!-- prose figures not from a table: 2605.16865 (arXiv id); −0.249 (verdict table at 03f33e9) -->
ELSEWHERE = re.compile(r"<!-- prose figures not from a table: (.*?) -->", re.S)


def _decimals(figure: str) -> tuple[float, int]:
    figure = figure.replace("−", "-")
    return float(figure), len(figure.split(".")[1])


def untraced_figures(text: str) -> list[tuple[int, str]]:
    """The decimal figures of `text`'s prose (outside generated blocks, code and the ELSEWHERE list) that no
    generated table of `text` holds: (line, figure). A figure is traced when a table holds it to at least
    as many decimals (0.94 quotes 0.940; signs are ignored, as prose says "less by 0.087")."""
    tables = "\n".join(m.group(4) for m in BLOCK.finditer(text))
    held = {
        (round(abs(v), d), d)
        for v, places in map(_decimals, FIGURE.findall(tables))
        for d in range(places + 1)
    }
    allowed = {f.replace("−", "-") for m in ELSEWHERE.finditer(text) for f in FIGURE.findall(m.group(1))}

    def blank(match: re.Match) -> str:  # keep the line count, drop what is not prose
        return "\n" * match.group().count("\n")

    prose = ELSEWHERE.sub(blank, BLOCK.sub(blank, text))
    prose = re.sub(r"```.*?```|`[^`\n]*`", blank, prose, flags=re.S)
    untraced = []
    for m in FIGURE.finditer(prose):
        value, places = _decimals(m.group())
        if (round(abs(value), places), places) not in held and m.group().replace("−", "-") not in allowed:
            untraced.append((prose.count("\n", 0, m.start()) + 1, m.group()))
    return untraced


def render(check: bool, doc: Path = DOC, results: Path = RESULTS) -> int:
    """Rewrite the generated tables of `doc` from `results` (check: change nothing, 1 if out of date)."""
    text = doc.read_text(encoding="utf-8")
    grids = summaries(results, write=not check)
    new = rendered(text, grids, doc, draw=not check)
    if check:
        stale = [
            f"{m.group(2)} {m.group(3)}"
            for m, n in zip(BLOCK.finditer(text), BLOCK.finditer(new), strict=True)
            if m.group(4) != n.group(4)
        ]
        for folder, summary in grids.items():
            committed = results / folder / SUMMARY_FILE
            if not committed.is_file() or json.loads(committed.read_text(encoding="utf-8")) != summary:
                stale.append(f"results/{folder}/{SUMMARY_FILE}")
        if stale:
            print(
                f"{doc.name} is out of date with results/: {', '.join(stale)}; run `make results`",
                file=sys.stderr,
            )
            return 1
        untraced = untraced_figures(text)  # the prose quotes the tables, never types a figure
        for line, figure in untraced:
            print(
                f"{doc}:{line}: figure {figure} is in no generated table (quote one, or name its source in "
                "the doc's `prose figures not from a table` comment)",
                file=sys.stderr,
            )
        if untraced:
            return 1
        print(f"{doc.name}: {len(BLOCK.findall(text))} generated tables match results/", file=sys.stderr)
        return 0
    if new != text:
        atomic_write_text(doc, new)
    print(f"rendered {len(BLOCK.findall(text))} tables into {doc.name}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="copy a grid folder's small result files to results/<name>/")
    c.add_argument("source", type=Path)
    c.add_argument("--name", default=None, help="folder name under results/ (default: the config's name)")
    c.add_argument(
        "--merge",
        action="store_true",
        help="add the folder's finished cells to the committed results/<name>/ instead of replacing it",
    )
    c.add_argument(
        "--base-tolerance",
        type=int,
        default=0,
        metavar="N",
        help="with --merge: accept a base curve whose per-item outcomes differ from the committed one on at "
        "most N items (another machine's arithmetic flipping a greedy choice); the counts go into PROVENANCE.json",
    )
    r = sub.add_parser("render", help="regenerate the summaries and docs/results.md's tables")
    r.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of date")
    args = parser.parse_args(argv)
    try:
        if args.command == "collect":
            if args.merge:
                merge(args.source, args.name, base_tolerance=args.base_tolerance)
            else:
                collect(args.source, args.name)
            return 0
        return render(args.check)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
