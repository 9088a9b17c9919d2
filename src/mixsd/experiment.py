"""`mixsd experiment CONFIG.yaml` and `mixsd demo`: a declared grid, run end to end and reported.

A grid is corpus x methods x seeds. Each cell runs its stages in order, each stage writing one file
atomically into `OUT/cells/<cell>/`; a stage whose file exists is never redone, so an interrupted
experiment resumes where it stopped:

    targets.jsonl   ground truth (sft) or `mixsd mix` (mixsd)          — not for base / opsd
    train/          `mixsd train` output; train/model is the tuned model  — not for base
    eval.json       `mixsd eval` on the corpus suite (memorization, generalization)
    retention.json  `mixsd eval --suite retention` against the base model
    nll.json        `mixsd analyze nll`: the targets' NLL under the base model
    fisher.json     `mixsd analyze fisher`: Fisher-weighted displacement from the base
    cell.json       the cell's row of the results table (written last: the cell is done)

Then `OUT/results.jsonl`, `OUT/results.csv` and the report (`OUT/report.md`, `OUT/report.html`) are
written from every finished cell. The config file format is documented in docs/experiments.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from mixsd import __version__
from mixsd.files import InputError, atomic_write_json, atomic_write_jsonl, atomic_write_text

DEMO_FACTS = Path(str(resources.files("mixsd") / "data" / "facts-demo.jsonl"))
PACKAGED_CONFIGS = Path(str(resources.files("mixsd") / "configs"))

# Which score of each retention probe counts (the notes: social_iqa is read length-normalized).
RETENTION_METRIC = {
    "general_knowledge": "acc",
    "qa_wikidata": "acc",
    "social_iqa": "acc_norm",
    "squad_paragraphs": "ppl",
}
METHOD_LABELS = {"base": "Base", "sft": "SFT", "mixsd": "MixSD", "opsd": "OPSD"}
SECTIONS = ("mix", "train", "opsd", "eval", "retention", "analyses")


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------
@dataclass
class ExperimentConfig:
    config: str = field(metadata={"help": "Experiment YAML (see configs/ and docs/experiments.md)."})
    out: str | None = field(default=None, metadata={"help": "Output folder; overrides the file's `out`."})
    only: str | None = field(
        default=None,
        metadata={
            "help": "Run only the cells whose name contains one of these comma-separated texts (e.g. s0,base)."
        },
    )
    report_only: bool = field(
        default=False, metadata={"help": "Rebuild table and report from finished cells."}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads (default: torch's choice). 1 is fastest when several runs share the cores."
        },
    )


@dataclass
class DemoConfig:
    out: str = field(default="runs/demo", metadata={"help": "Output folder of the demo run."})
    config: str | None = field(default=None, metadata={"help": "Another experiment YAML to run as the demo."})


@dataclass(frozen=True)
class Cell:
    method: str
    lam: float | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        if self.method == "base":
            return "base"
        lam = f"-lam{self.lam:g}" if self.lam is not None else ""
        return f"{self.method}{lam}-s{self.seed}"

    @property
    def group(self) -> str:
        """Cells that differ only by seed share a group (one point on the plots)."""
        return METHOD_LABELS[self.method] + (f" λ={self.lam:g}" if self.lam is not None else "")


@dataclass
class Experiment:
    """A parsed, validated experiment file."""

    path: Path
    name: str
    model: str
    out: Path
    corpus: dict[str, Any]
    cells: list[Cell]
    sections: dict[str, dict[str, Any]]
    raw: dict[str, Any]


def load_experiment(path: str | Path, out: str | None = None) -> Experiment:
    path = Path(path)
    if not path.is_file():
        raise InputError("experiment file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise InputError(
            f"invalid YAML: {getattr(err, 'problem', err)}", path, mark.line + 1 if mark else None
        ) from None
    if not isinstance(raw, dict):
        raise InputError("expected a mapping at the top level", path)
    known = {"name", "model", "out", "corpus", "methods", "seeds", *SECTIONS}
    for key in raw:
        if key not in known:
            raise InputError(f"unknown key (expected one of {', '.join(sorted(known))})", path, field=key)
    corpus = raw.get("corpus") or {"generator": "kgfact", "size": "small"}
    if not isinstance(corpus, dict) or corpus.get("generator", "kgfact") not in (
        "kgfact",
        "kgfunc",
        "folder",
    ):
        raise InputError("corpus needs generator: kgfact | kgfunc | folder", path, field="corpus")
    if corpus.get("generator") == "folder" and not corpus.get("path"):
        raise InputError("generator: folder needs a path", path, field="corpus.path")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise InputError("expected a non-empty list of integers", path, field="seeds")
    cells = _cells(raw.get("methods") or ["base", "sft", {"mixsd": {"lam": [0.3]}}], seeds, path)
    sections = {}
    for name in SECTIONS:
        value = raw.get(name) or {}
        if not isinstance(value, dict):
            raise InputError("expected a mapping of options", path, field=name)
        sections[name] = value
    name = str(raw.get("name") or path.stem)
    experiment = Experiment(
        path=path,
        name=name,
        model=str(raw.get("model", "smollm2-135m")),
        out=Path(out or raw.get("out") or f"runs/{name}"),
        corpus=corpus,
        cells=cells,
        sections=sections,
        raw=raw,
    )
    _check_options(experiment)
    return experiment


# What the runner sets itself in each stage's config; the file may set every other field.
RUNNER_SET = {
    "mix": ("mixsd.targets", "MixConfig", {"model", "input", "output", "lam", "seed"}),
    "train": ("mixsd.train", "TrainConfig", {"model", "out", "targets", "corpus", "method", "seed"}),
    "opsd": ("mixsd.train", "TrainConfig", {"model", "out", "targets", "corpus", "method", "seed"}),
    "eval": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "data", "out"}),
    "retention": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "base", "out"}),
}
ANALYSES_OPTIONS = {"nll", "fisher", "fisher_samples", "fisher_probe"}
RETENTION_EXTRA = {"data", "probes"}  # the probe folder, and probes: false to skip the probe files


def _check_options(experiment: Experiment) -> None:
    """Refuse unknown options before any work, naming the file and the field."""
    import importlib

    for section, (module, cls_name, runner_set) in RUNNER_SET.items():
        cls = getattr(importlib.import_module(module), cls_name)
        allowed = {f.name for f in fields(cls)} - runner_set
        if section == "retention":
            allowed |= RETENTION_EXTRA
        for key in experiment.sections[section]:
            if key not in allowed:
                raise InputError(
                    f"'{key}' is not an option of this stage (or is set by the runner); "
                    f"options: {', '.join(sorted(allowed))}",
                    experiment.path,
                    field=f"{section}.{key}",
                )
    for key in experiment.sections["analyses"]:
        if key not in ANALYSES_OPTIONS:
            raise InputError(
                f"unknown option; expected one of {', '.join(sorted(ANALYSES_OPTIONS))}",
                experiment.path,
                field=f"analyses.{key}",
            )


def _cells(methods: list[Any], seeds: list[int], path: Path) -> list[Cell]:
    cells: list[Cell] = []
    for i, entry in enumerate(methods):
        options: dict[str, Any] = {}
        if isinstance(entry, dict) and len(entry) == 1:
            ((method, options),) = entry.items()
            options = options or {}
        else:
            method = entry
        if method not in METHOD_LABELS or not isinstance(options, dict):
            raise InputError(
                f"unknown method {method!r} (expected base, sft, mixsd or opsd)", path, field=f"methods[{i}]"
            )
        if method == "base":
            cells.append(Cell("base"))
            continue
        unknown = set(options) - {"lam", "seeds"}
        if unknown or (method != "mixsd" and "lam" in options):
            raise InputError(
                f"unknown method options {sorted(unknown or {'lam'})} (mixsd takes lam and seeds; "
                "the others take seeds)",
                path,
                field=f"methods[{i}]",
            )
        method_seeds = options.get("seeds", seeds)
        if not isinstance(method_seeds, list) or not all(isinstance(s, int) for s in method_seeds):
            raise InputError("expected a list of integers", path, field=f"methods[{i}].seeds")
        lams = options.get("lam", [0.3]) if method == "mixsd" else [None]
        lams = lams if isinstance(lams, list) else [lams]
        for lam in lams:
            if lam is not None and not (isinstance(lam, int | float) and 0 <= lam <= 1):
                raise InputError(f"lam must be in [0, 1], got {lam!r}", path, field=f"methods[{i}].lam")
            cells.extend(Cell(method, None if lam is None else float(lam), seed) for seed in method_seeds)
    return cells


def _configure(cls, base: dict[str, Any], overrides: dict[str, Any], experiment: Experiment, section: str):
    """Build a stage's config dataclass: the runner's fields, then the experiment file's section on top."""
    names = {f.name for f in fields(cls)}
    for key in overrides:  # sections were checked at load time; the corpus options are checked here
        if key not in names or key in base:
            raise InputError(
                f"'{key}' is not an option of this stage (or is set by the runner); "
                f"options: {', '.join(sorted(names - set(base)))}",
                experiment.path,
                field=f"{section}.{key}",
            )
    return cls(**base, **overrides)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, experiment: Experiment):
        self.x = experiment
        self.out = experiment.out
        self.corpus_dir = self.out / "corpus"
        self.probes_dir: Path | None = None

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    # corpus and probes, shared by every cell
    def prepare_data(self) -> None:
        corpus = self.x.corpus
        generator = corpus.get("generator", "kgfact")
        options = {k: v for k, v in corpus.items() if k not in ("generator", "path", "train_limit")}
        if generator == "folder":
            self.corpus_dir = Path(corpus["path"])
            if not (self.corpus_dir / "train.jsonl").is_file():
                raise InputError("corpus folder has no train.jsonl", self.corpus_dir)
        elif not (self.corpus_dir / "manifest.json").is_file():
            if generator == "kgfact":
                from mixsd.corpora.kgfact import KGFactConfig, build_kgfact

                build_kgfact(
                    _configure(KGFactConfig, {"out": str(self.corpus_dir)}, options, self.x, "corpus")
                )
            else:
                from mixsd.corpora.kgfunc import KGFuncConfig, build_kgfunc

                build_kgfunc(
                    _configure(KGFuncConfig, {"out": str(self.corpus_dir)}, options, self.x, "corpus")
                )
        if corpus.get("train_limit"):
            self.corpus_dir = self._subset(self.corpus_dir, int(corpus["train_limit"]))
        self.probes_dir = self._probes()

    def _subset(self, source: Path, limit: int) -> Path:
        """A copy of the corpus that trains on its first `limit` facts (kept small for quick runs).

        The generated corpus stays untouched; OUT/data holds train.jsonl cut to `limit` records, the
        paraphrase and compositional records that ask about those facts only, and every other split as
        is, with a manifest saying where it came from.
        """
        from mixsd.files import read_jsonl, sha256_file

        target = self.out / "data"
        if (target / "manifest.json").is_file():
            return target
        target.mkdir(parents=True, exist_ok=True)
        train = [row for _, row in read_jsonl(source / "train.jsonl")][:limit]
        kept = {row.get("fact", row.get("id")) for row in train}
        counts = {}
        for path in sorted(source.glob("*.jsonl")):
            rows = [row for _, row in read_jsonl(path)]
            if path.name == "train.jsonl":
                rows = train
            elif path.name == "paraphrase.jsonl":
                rows = [r for r in rows if r.get("fact") in kept]
            elif path.name == "compositional.jsonl" and rows and "facts" in rows[0]:
                rows = [r for r in rows if set(r["facts"]) <= kept]
            if rows:  # a split with nothing left is left out (evaluation notes it as skipped)
                atomic_write_jsonl(target / path.name, rows)
                counts[path.name] = len(rows)
        manifest = {
            "derived_from": str(source),
            "train_limit": limit,
            "records": counts,
            "source_manifest_sha256": sha256_file(source / "manifest.json")
            if (source / "manifest.json").is_file()
            else None,
            "sha256": {name: sha256_file(target / name) for name in counts},
        }
        atomic_write_json(target / "manifest.json", manifest)
        return target

    def _probes(self) -> Path | None:
        """The retention probe folder: fetched once into the cache; None (KL-only retention) when offline."""
        options = dict(self.x.sections["retention"])
        if options.get("probes") is False:
            return None
        folder = Path(options.pop("data", None) or _default_probes_dir())
        if (folder / "manifest.json").is_file():
            return folder
        try:
            from mixsd.corpora.probes import ProbesFetchConfig, fetch_probes

            fetch_probes(ProbesFetchConfig(out=str(folder)))
            return folder
        except Exception as err:  # noqa: BLE001 - the experiment goes on with the probes that need no data
            print(
                f"warning: could not fetch retention probes ({err}); retention uses KL only", file=sys.stderr
            )
            return None

    def targets(self, cell: Cell, folder: Path) -> Path | None:
        path = folder / "targets.jsonl"
        if cell.method not in ("sft", "mixsd") or path.exists():
            return path if path.exists() else None
        train_file = self.corpus_dir / "train.jsonl"
        if cell.method == "sft":
            from mixsd.models import load_tokenizer
            from mixsd.records import load_corpus
            from mixsd.targets import sft_target_rows

            atomic_write_jsonl(path, sft_target_rows(load_corpus(train_file), load_tokenizer(self.x.model)))
        else:
            from mixsd.targets import MixConfig, mix

            base = {
                "model": self.x.model,
                "input": str(train_file),
                "output": str(path),
                "lam": cell.lam,
                "seed": cell.seed,
            }
            mix(_configure(MixConfig, base, self.x.sections["mix"], self.x, "mix"))
        return path

    def train(self, cell: Cell, folder: Path, targets: Path | None) -> Path:
        from mixsd.train import TrainConfig, train

        model_dir = folder / "train" / "model"
        summary_file = folder / "train" / "summary.json"
        if summary_file.is_file():
            return Path(json.loads(summary_file.read_text())["model_dir"])
        base = {"model": self.x.model, "out": str(folder / "train"), "seed": cell.seed}
        overrides = dict(self.x.sections["train"])
        if cell.method == "opsd":
            base.update(method="opsd", corpus=str(self.corpus_dir / "train.jsonl"))
            overrides.update(self.x.sections["opsd"])
        else:
            base["targets"] = str(targets)
        summary = train(_configure(TrainConfig, base, overrides, self.x, "train"))
        return Path(summary.get("model_dir", model_dir))

    def evaluate(self, model: str, folder: Path) -> dict[str, Any]:
        from mixsd.evaluate import EvalConfig, evaluate

        suite = (
            "kgfunc"
            if self.x.corpus.get("generator") == "kgfunc"
            else ("qa" if self.x.corpus.get("generator") == "folder" else "kgfact")
        )
        results: dict[str, Any] = {}
        eval_file, retention_file = folder / "eval.json", folder / "retention.json"
        if not eval_file.is_file():
            evaluate(
                _configure(
                    EvalConfig,
                    {"model": model, "suite": suite, "data": str(self.corpus_dir), "out": str(eval_file)},
                    self.x.sections["eval"],
                    self.x,
                    "eval",
                )
            )
        results["eval"] = json.loads(eval_file.read_text())
        if not retention_file.is_file():
            options = {k: v for k, v in self.x.sections["retention"].items() if k not in RETENTION_EXTRA}
            base = {
                "model": model,
                "suite": "retention",
                "base": self.x.model,
                "out": str(retention_file),
                "data": str(self.probes_dir) if self.probes_dir else str(self.out / "no-probes"),
            }
            evaluate(_configure(EvalConfig, base, options, self.x, "retention"))
        results["retention"] = json.loads(retention_file.read_text())
        return results

    def analyses(self, cell: Cell, folder: Path, model: Path, targets: Path | None) -> dict[str, Any]:
        options = dict(self.x.sections["analyses"])
        out: dict[str, Any] = {}
        if targets is not None and options.get("nll", True):
            from mixsd.analyze import NLLConfig, target_nll

            nll_file = folder / "nll.json"
            if not nll_file.is_file():
                target_nll(NLLConfig(model=self.x.model, targets=str(targets), out=str(nll_file)))
            out["nll"] = json.loads(nll_file.read_text())
        if options.get("fisher", True):
            from mixsd.analyze import FisherConfig, fisher_displacement

            fisher_file = folder / "fisher.json"
            if not fisher_file.is_file():
                probe = options.get("fisher_probe") or str(self._fisher_probe())
                fisher_displacement(
                    FisherConfig(
                        base=self.x.model,
                        model=str(model),
                        probe=probe,
                        samples=int(options.get("fisher_samples", 64)),
                        out=str(fisher_file),
                    )
                )
            out["fisher"] = json.loads(fisher_file.read_text())
        return out

    def _fisher_probe(self) -> Path:
        """Held-out text the Fisher is measured on: ability we want to keep, not the injected facts."""
        if self.probes_dir and (self.probes_dir / "squad_paragraphs.jsonl").is_file():
            return self.probes_dir / "squad_paragraphs.jsonl"
        for name in ("unseen.jsonl", "paraphrase.jsonl", "retrieval.jsonl"):
            if (self.corpus_dir / name).is_file():
                return self.corpus_dir / name
        return self.corpus_dir / "train.jsonl"

    # one cell, all stages
    def run_cell(self, cell: Cell, progress) -> dict[str, Any]:
        folder = self.cell_dir(cell)
        done_file = folder / "cell.json"
        if done_file.is_file():
            return json.loads(done_file.read_text())
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        progress(cell, "targets")
        targets = self.targets(cell, folder)
        model: str | Path = self.x.model
        train_summary = None
        if cell.method != "base":
            progress(cell, "train")
            model = self.train(cell, folder, targets)
            train_summary = json.loads((folder / "train" / "summary.json").read_text())
        progress(cell, "eval")
        results = self.evaluate(str(model), folder)
        analyses = {}
        if cell.method != "base":
            progress(cell, "analyses")
            analyses = self.analyses(cell, folder, Path(model), targets)
        mix_summary = None
        if cell.method == "mixsd":
            from mixsd.targets import summary_path

            mix_summary = json.loads(summary_path(targets).read_text())
        row = cell_row(cell, results, analyses, train_summary, mix_summary)
        row["seconds"] = round(time.perf_counter() - started, 1)
        atomic_write_json(done_file, row)
        return row


def _default_probes_dir() -> Path:
    from mixsd.models import cache_dir

    return cache_dir() / "probes"


# --------------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------------
def _value(node: Any, *keys: str) -> float | None:
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, int | float) and not isinstance(node, bool) else None


def cell_row(
    cell: Cell,
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
    for split, scores in results["eval"].get("splits", {}).items():
        row[f"{split}_loose"] = _value(scores, "loose", "value")
        row[f"{split}_strict"] = _value(scores, "strict", "value")
    ratios = []
    for probe, summary in results["retention"].get("probes", {}).items():
        if probe == "kl":
            row["kl_per_token"] = _value(summary, "kl_per_token")
            continue
        metric = RETENTION_METRIC.get(probe, "acc")
        row[f"{probe}_{metric}"] = (
            _value(summary, metric) if metric == "ppl" else _value(summary, metric, "value")
        )
        ratio = _value(summary, "retention", metric)
        row[f"{probe}_retention"] = ratio
        if ratio is not None:
            ratios.append(ratio)
    if "unseen_loose" in row and cell.method != "base":
        row["unseen_retention"] = None  # filled against the base row in `add_relative_scores`
    row["retention_mean"] = sum(ratios) / len(ratios) if ratios else None
    nll = analyses.get("nll", {})
    row["target_nll_mean"] = _value(nll, "overall", "mean")
    row["target_nll_median"] = _value(nll, "overall", "median")
    fisher = analyses.get("fisher", {})
    row["fisher_displacement"] = _value(fisher, "totals", "displacement")
    row["fisher_displacement_norm"] = _value(fisher, "totals", "normalized_by_fisher")
    row["delta_norm_sq"] = _value(fisher, "totals", "delta_sq")
    if train_summary:
        history = [h for h in train_summary.get("history", []) if "loss" in h]
        row["final_train_loss"] = history[-1]["loss"] if history else None
        row["train_seconds"] = _value(train_summary, "seconds")
    if mix_summary:
        row["verified_rate"] = mix_summary.get("verified_rate")
        row["mean_attempts"] = mix_summary.get("mean_attempts")
        row["naive_fraction"] = mix_summary.get("naive_fraction")
    return row


def add_relative_scores(rows: list[dict[str, Any]]) -> None:
    """Scores that need the base row: KGFunc's unseen-operation accuracy relative to the base model."""
    base = next((r for r in rows if r["method"] == "base"), None)
    for row in rows:
        if "unseen_loose" in row and base and base.get("unseen_loose"):
            row["unseen_retention"] = row["unseen_loose"] / base["unseen_loose"]
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


def aggregate(rows: list[dict[str, Any]], columns: list[str]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds, per group, in the order groups first appear."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    table = []
    for group, members in groups.items():
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


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def run_experiment(
    experiment: Experiment, *, only: str | None = None, report_only: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from mixsd.report import write_report

    runner = Runner(experiment)
    experiment.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(experiment.out / "experiment.yaml", yaml.safe_dump(experiment.raw, sort_keys=False))
    wanted = [text.strip() for text in only.split(",")] if only else None
    cells = [c for c in experiment.cells if wanted is None or any(text in c.name for text in wanted)]
    if not report_only:
        runner.prepare_data()
        bar = tqdm(total=len(cells), desc=experiment.name, unit="cell", disable=not show_progress)

        def progress(cell: Cell, stage: str) -> None:
            bar.set_postfix_str(f"{cell.name}: {stage}")

        for cell in cells:
            try:
                runner.run_cell(cell, progress)
            except InputError:
                bar.close()
                raise
            except Exception as err:
                bar.close()
                raise RuntimeError(
                    f"cell {cell.name} failed ({err}); fix and rerun: finished stages are kept"
                ) from err
            bar.update(1)
        bar.close()
    rows = [
        json.loads((runner.cell_dir(c) / "cell.json").read_text())
        for c in experiment.cells
        if (runner.cell_dir(c) / "cell.json").is_file()
    ]
    add_relative_scores(rows)
    write_table(experiment.out, rows)
    meta = run_metadata(experiment)
    report = write_report(experiment.out, rows, meta, cells_dir=experiment.out / "cells")
    return {"rows": rows, "report": report, "meta": meta}


def run_metadata(experiment: Experiment) -> dict[str, Any]:
    import torch
    import transformers

    return {
        "name": experiment.name,
        "config_file": str(experiment.path),
        "model": experiment.model,
        "command": "mixsd " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "",
        "mixsd": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "config": experiment.raw,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


MAIN_COLUMNS = [
    "train_loose",
    "paraphrase_loose",
    "retrieval_loose",
    "compositional_loose",
    "test_loose",
    "unseen_loose",
    "retention_mean",
    "kl_per_token",
    "target_nll_mean",
    "fisher_displacement_norm",
    "verified_rate",
]


def print_outcome(result: dict[str, Any]) -> None:
    rows = result["rows"]
    columns = [c for c in MAIN_COLUMNS if any(isinstance(r.get(c), int | float) for r in rows)]
    print()
    print(comparison_text(aggregate(rows, columns), columns))
    print(f"\nreport: {result['report']['html']}\n        {result['report']['markdown']}")


def experiment_command(config: ExperimentConfig) -> dict[str, Any]:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    experiment = load_experiment(config.config, config.out)
    result = run_experiment(experiment, only=config.only, report_only=config.report_only)
    print_outcome(result)
    return result


def demo_command(config: DemoConfig) -> dict[str, Any]:
    experiment = load_experiment(config.config or PACKAGED_CONFIGS / "demo.yaml", config.out)
    print(f"mixsd demo: {experiment.name} on {experiment.model} -> {experiment.out}")
    result = run_experiment(experiment)
    print_outcome(result)
    return result
