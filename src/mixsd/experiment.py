"""`mixsd experiment CONFIG.yaml` and `mixsd demo`: a declared grid, run end to end and reported.

A grid is corpus x methods x seeds. The whole file is checked when it is loaded: every section is built
into its command's config, for every cell, before any work. Each cell runs its stages in order, each
writing into `OUT/cells/<cell>/` atomically. Every stage is a `mixsd.stages.Stage`: its output is reused
only while the settings it recorded (config, input file hashes, upstream stages, mixsd version) equal the
current ones, so an interrupted experiment resumes where it stopped, and a changed config redoes exactly
the stages it affects and everything downstream of them. The records are in `OUT/cells/<cell>/stages/`;
every decision (ran / reused, and what changed) is appended to `OUT/stage-log.jsonl`:

    targets.jsonl   ground truth (sft) or `mixsd mix` (mixsd)          — not for base / opsd
    train/          `mixsd train` output; train/model is the tuned model  — not for base
    eval.json       `mixsd eval` on the corpus suite (memorization, generalization)
    retention.json  `mixsd eval --suite retention` against the base model
    nll.json        `mixsd analyze nll`: the targets' NLL under the base model
    fisher.json     `mixsd analyze fisher`: Fisher-weighted displacement from the base
    cell.json       the cell's row of the results table (written last: the cell is done)

Then `OUT/results.jsonl`, `OUT/results.csv` and the report (`OUT/report.md`, `OUT/report.html`) are
written from every cell whose stages are all current for this config. The config file format is documented in docs/experiments.md.
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
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from mixsd import __version__
from mixsd.files import (
    InputError,
    JournalWriter,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    output_lock,
)
from mixsd.metrics import analysis_columns, probe_columns, split_columns
from mixsd.stages import Stage, config_settings

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
    _validate(experiment)
    return experiment


# What the runner sets itself in each stage's config; the file may set every other field.
RUNNER_SET = {
    "mix": ("mixsd.targets", "MixConfig", {"model", "input", "output", "lam", "seed"}),
    "train": ("mixsd.train", "TrainConfig", {"model", "out", "targets", "corpus", "method", "seed"}),
    "opsd": ("mixsd.train", "TrainConfig", {"model", "out", "targets", "corpus", "method", "seed"}),
    "eval": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "data", "out"}),
    "retention": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "base", "out"}),
}
ANALYSES_OPTIONS: dict[str, Any] = {"nll": bool, "fisher": bool, "fisher_samples": int, "fisher_probe": str}
RETENTION_EXTRA: dict[str, Any] = {"data": str, "probes": bool}  # the probe folder; probes: false skips them
# Fields that change only speed, logging or where a run goes, never what a stage writes: a change to
# them redoes nothing. (Training's own list is `mixsd.train.run_settings`.)
MIX_SPEED_ONLY = ("batch_size", "device", "overwrite")
EVAL_SPEED_ONLY = ("batch_size", "device", "threads", "overwrite", "base_cache")
NLL_SPEED_ONLY = ("batch_size", "device", "threads")
FISHER_SPEED_ONLY = ("device", "threads")


def _validate(experiment: Experiment) -> None:
    """Build every config of every cell now, so a bad value fails at load, before any work is done."""
    runner = Runner(experiment)
    runner.corpus_config()
    for key, kind in ANALYSES_OPTIONS.items():
        if key in experiment.sections["analyses"]:
            _typed(experiment.sections["analyses"][key], kind, experiment, f"analyses.{key}")
    for key in experiment.sections["analyses"]:
        if key not in ANALYSES_OPTIONS:
            raise InputError(
                f"unknown option; expected one of {', '.join(sorted(ANALYSES_OPTIONS))}",
                experiment.path,
                field=f"analyses.{key}",
            )
    for key, kind in RETENTION_EXTRA.items():
        if key in experiment.sections["retention"]:
            _typed(experiment.sections["retention"][key], kind, experiment, f"retention.{key}")
    for cell in experiment.cells:
        runner.plan(cell)


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


def _type_text(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_text(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(hint))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text", type(None): "null"}
    return names.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> tuple[bool, Any]:
    """(fits, value) for a YAML value and a field's type; a value of an unknown type fits (the config's own
    checks judge it). Coerced only where YAML's reading is the sole problem: 3 for a float field is 3.0,
    and "1e-4" (YAML 1.1 reads exponents without a dot as text) is 0.0001."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            fits, coerced = (value is None, None) if arg is type(None) else _coerce(value, arg)
            if fits:
                return True, coerced
        return False, value
    if origin is Literal:
        return value in typing.get_args(hint) and not isinstance(value, bool), value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return False, value
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            return False, value
        return True, float(number)
    if hint is str:
        return isinstance(value, str), value
    return True, value


def _typed(value: Any, hint: Any, experiment: Experiment, where: str) -> Any:
    fits, coerced = _coerce(value, hint)
    if not fits:
        raise InputError(f"expected {_type_text(hint)}; got {value!r}", experiment.path, field=where)
    return coerced


def _configure(cls, base: dict[str, Any], sections: list[tuple[str, dict[str, Any]]], experiment: Experiment):
    """Build a stage's config dataclass: the runner's fields, then the experiment file's sections on top.

    Every value is checked against its field's type here and against the config's own checks (ranges,
    choices) when it is built; either failure names the file and `section.field`.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section, options in sections:
        for key, value in options.items():
            if key not in names or key in base:
                raise InputError(
                    f"'{key}' is not an option of this stage (or is set by the runner); "
                    f"options: {', '.join(sorted(names - set(base)))}",
                    experiment.path,
                    field=f"{section}.{key}",
                )
            values[key] = _typed(value, hints.get(key), experiment, f"{section}.{key}")
            origin[key] = section
    try:
        return cls(**base, **values)
    except InputError as err:
        if err.path is not None or err.line is not None or err.field is None:
            raise InputError(str(err), experiment.path, field=sections[0][0]) from None
        message = str(err).removeprefix(f"field '{err.field}': ")
        section = origin.get(err.field, sections[0][0])
        raise InputError(message, experiment.path, field=f"{section}.{err.field}") from None
    except (TypeError, ValueError) as err:
        raise InputError(str(err), experiment.path, field=sections[0][0]) from None


def _user_files(config: Any, names: tuple[str, ...]) -> list[Path]:
    """Files a config names by path (templates, prompt lists): their content is part of the fingerprint."""
    paths = [getattr(config, name, None) for name in names]
    return [Path(p) for p in paths if isinstance(p, str) and Path(p).is_file()]


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
StagePlan = dict[str, tuple[Stage, Callable[[bool], Any]]]


class Runner:
    def __init__(self, experiment: Experiment):
        self.x = experiment
        self.out = experiment.out
        corpus = experiment.corpus
        generated = self.out / "corpus"
        self.source_dir = Path(corpus["path"]) if corpus.get("generator") == "folder" else generated
        # train_limit: the cells train and evaluate on a cut copy in OUT/data
        self.corpus_dir = self.out / "data" if corpus.get("train_limit") else self.source_dir
        self.probes_dir: Path | None = self._probes(fetch=False)
        self.stage_log = self.out / "stage-log.jsonl"

    def cell_dir(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.name

    def _log(self, cell: Cell | None) -> Callable[[Stage, str, list[str]], None]:
        """Every stage decision goes to OUT/stage-log.jsonl: what ran, what was reused, and why."""

        def log(stage: Stage, action: str, changes: list[str]) -> None:
            entry = {
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "cell": cell.name if cell else None,
                "stage": stage.name,
                "action": action,
                "changes": changes,
            }
            with JournalWriter(self.stage_log) as writer:
                writer.write([entry])

        return log

    # corpus and probes, shared by every cell
    def corpus_config(self):
        """The generator's config (KGFactConfig / KGFuncConfig), or None for a corpus folder."""
        corpus = self.x.corpus
        generator = corpus.get("generator", "kgfact")
        options = {k: v for k, v in corpus.items() if k not in ("generator", "path", "train_limit")}
        if "train_limit" in corpus:
            limit = _typed(corpus["train_limit"], int | None, self.x, "corpus.train_limit")
            if limit is not None and limit < 1:
                raise InputError(f"must be >= 1; got {limit}", self.x.path, field="corpus.train_limit")
        if generator == "folder":
            for key in options:
                raise InputError(
                    f"'{key}' is not an option of a corpus folder (path, train_limit)",
                    self.x.path,
                    field=f"corpus.{key}",
                )
            return None
        if generator == "kgfact":
            from mixsd.corpora.kgfact import KGFactConfig as cls
        else:
            from mixsd.corpora.kgfunc import KGFuncConfig as cls
        return _configure(cls, {"out": str(self.out / "corpus")}, [("corpus", options)], self.x)

    def prepare_data(self) -> None:
        config = self.corpus_config()
        if config is not None:
            from mixsd.corpora.kgfact import build_kgfact
            from mixsd.corpora.kgfunc import build_kgfunc

            build = build_kgfact if self.x.corpus.get("generator", "kgfact") == "kgfact" else build_kgfunc
            stage = Stage(
                "corpus",
                self.source_dir / "manifest.json",
                config_settings(config),
                record=self.out / "stages" / "corpus.json",
            )
            stage.run(lambda discard: build(config), log=self._log(None))
        elif not (self.source_dir / "train.jsonl").is_file():
            raise InputError("corpus folder has no train.jsonl", self.source_dir)
        if self.x.corpus.get("train_limit"):
            limit = int(self.x.corpus["train_limit"])
            source = self.source_dir
            stage = Stage(
                "data",
                self.corpus_dir / "manifest.json",
                {"train_limit": limit, "source": str(source)},
                inputs=[*sorted(source.glob("*.jsonl")), source / "manifest.json"],
                record=self.out / "stages" / "data.json",
            )
            stage.run(lambda discard: self._subset(source, limit), log=self._log(None))
        self.probes_dir = self._probes(fetch=True)

    def _subset(self, source: Path, limit: int) -> Path:
        """A copy of the corpus that trains on its first `limit` facts (kept small for quick runs).

        The generated corpus stays untouched; OUT/data holds train.jsonl cut to `limit` records, the
        paraphrase and compositional records that ask about those facts only, and every other split as
        is, with a manifest saying where it came from.
        """
        from mixsd.files import read_jsonl, sha256_file

        target = self.corpus_dir
        target.mkdir(parents=True, exist_ok=True)
        for old in target.glob("*.jsonl"):  # a split left empty this time must not linger from the last
            old.unlink()
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
        if (source / "manifest.json").is_file():  # the corpus's scorer (answer_match) travels with it
            source_manifest = json.loads((source / "manifest.json").read_text(encoding="utf-8"))
            if isinstance(source_manifest, dict) and "answer_match" in source_manifest:
                manifest["answer_match"] = source_manifest["answer_match"]
        atomic_write_json(target / "manifest.json", manifest)
        return target

    def _probes(self, fetch: bool) -> Path | None:
        """The retention probe folder: fetched once into the cache (when `fetch`); None (KL-only
        retention) when there is none."""
        options = dict(self.x.sections["retention"])
        if options.get("probes") is False:
            return None
        folder = Path(options.pop("data", None) or _default_probes_dir())
        if (folder / "manifest.json").is_file():
            return folder
        if not fetch:
            return None
        try:
            from mixsd.corpora.probes import ProbesFetchConfig, fetch_probes

            fetch_probes(ProbesFetchConfig(out=str(folder)))
            return folder
        except Exception as err:  # noqa: BLE001 - the experiment goes on with the probes that need no data
            print(
                f"warning: could not fetch retention probes ({err}); retention uses KL only", file=sys.stderr
            )
            return None

    def _fisher_probe(self) -> Path:
        """Held-out text the Fisher is measured on: ability we want to keep, not the injected facts."""
        if self.probes_dir and (self.probes_dir / "squad_paragraphs.jsonl").is_file():
            return self.probes_dir / "squad_paragraphs.jsonl"
        for name in ("unseen.jsonl", "paraphrase.jsonl", "retrieval.jsonl"):
            if (self.corpus_dir / name).is_file():
                return self.corpus_dir / name
        return self.corpus_dir / "train.jsonl"

    # one cell: its stages, each with what it reads, what it depends on and how it is made
    def plan(self, cell: Cell) -> StagePlan:
        """The cell's stages in run order, each with its producer. Building it checks every config."""
        from mixsd.analyze import FisherConfig, NLLConfig
        from mixsd.evaluate import EvalConfig
        from mixsd.targets import MixConfig, summary_path
        from mixsd.train import TrainConfig, run_settings

        x, folder = self.x, self.cell_dir(cell)
        records = folder / "stages"
        train_file = self.corpus_dir / "train.jsonl"
        data_files = [*sorted(self.corpus_dir.glob("*.jsonl")), self.corpus_dir / "manifest.json"]
        plan: StagePlan = {}

        targets_file = folder / "targets.jsonl"
        targets: Stage | None = None
        if cell.method == "sft":
            targets = Stage(
                "targets",
                targets_file,
                {"method": "sft", "model": x.model},
                inputs=[train_file],
                record=records / "targets.json",
            )
            plan["targets"] = (targets, lambda discard: self._sft_targets(train_file, targets_file))
        elif cell.method == "mixsd":
            base = {
                "model": x.model,
                "input": str(train_file),
                "output": str(targets_file),
                "lam": cell.lam,
                "seed": cell.seed,
            }
            mix_config = _configure(MixConfig, base, [("mix", x.sections["mix"])], x)
            targets = Stage(
                "targets",
                [targets_file, summary_path(targets_file)],
                config_settings(mix_config, MIX_SPEED_ONLY),
                inputs=[train_file, *_user_files(mix_config, ("expert_template",))],
                record=records / "targets.json",
            )
            plan["targets"] = (targets, lambda discard: self._mix(mix_config, discard))

        model = x.model
        trained: list[Stage] = []
        if cell.method != "base":
            base = {"model": x.model, "out": str(folder / "train"), "seed": cell.seed}
            sections = [("train", x.sections["train"])]
            if cell.method == "opsd":
                base.update(method="opsd", corpus=str(train_file))
                sections.append(("opsd", x.sections["opsd"]))
            else:
                base["targets"] = str(targets_file)
            train_config = _configure(TrainConfig, base, sections, x)
            # run_settings hashes the target file: taken when the fingerprint is, after targets are made
            train = Stage(
                "train",
                [folder / "train" / "summary.json", folder / "train" / "model"],
                lambda: run_settings(train_config),
                inputs=_user_files(train_config, ("expert_template",)),
                upstream=[targets] if targets else [],
                record=records / "train.json",
            )
            plan["train"] = (train, lambda discard: self._train(train_config, discard))
            model = str(folder / "train" / "model")
            trained = [train]

        suite = {"kgfunc": "kgfunc", "folder": "qa"}.get(x.corpus.get("generator", "kgfact"), "kgfact")
        eval_base = {
            "model": model,
            "suite": suite,
            "data": str(self.corpus_dir),
            "out": str(folder / "eval.json"),
        }
        eval_config = _configure(EvalConfig, eval_base, [("eval", x.sections["eval"])], x)
        plan["eval"] = (
            Stage(
                "eval",
                folder / "eval.json",
                config_settings(eval_config, EVAL_SPEED_ONLY),
                inputs=[*data_files, *_user_files(eval_config, ("entities", "kl_prompts"))],
                upstream=trained,
                record=records / "eval.json",
            ),
            lambda discard: self._evaluate(eval_config, discard),
        )
        probes = self.probes_dir
        retention_base = {
            "model": model,
            "suite": "retention",
            "base": x.model,
            "out": str(folder / "retention.json"),
            "data": str(probes) if probes else str(self.out / "no-probes"),
        }
        options = {k: v for k, v in x.sections["retention"].items() if k not in RETENTION_EXTRA}
        retention_config = _configure(EvalConfig, retention_base, [("retention", options)], x)
        probe_files = [*sorted(probes.glob("*.jsonl")), probes / "manifest.json"] if probes else []
        plan["retention"] = (
            Stage(
                "retention",
                folder / "retention.json",
                config_settings(retention_config, EVAL_SPEED_ONLY),
                inputs=[*probe_files, *_user_files(retention_config, ("entities", "kl_prompts"))],
                upstream=trained,
                record=records / "retention.json",
            ),
            lambda discard: self._evaluate(retention_config, discard),
        )

        analyses = x.sections["analyses"]
        if targets is not None and analyses.get("nll", True):
            from mixsd.analyze import target_nll

            nll_config = _configure(
                NLLConfig,
                {"model": x.model, "targets": str(targets_file), "out": str(folder / "nll.json")},
                [],
                x,
            )
            plan["nll"] = (
                Stage(
                    "nll",
                    folder / "nll.json",
                    config_settings(nll_config, NLL_SPEED_ONLY),
                    inputs=[targets_file],
                    upstream=[targets],
                    record=records / "nll.json",
                ),
                lambda discard: target_nll(nll_config),
            )
        if trained and analyses.get("fisher", True):
            from mixsd.analyze import fisher_displacement

            probe = Path(analyses.get("fisher_probe") or self._fisher_probe())
            fisher_base = {
                "base": x.model,
                "model": model,
                "probe": str(probe),
                "samples": int(analyses.get("fisher_samples", 64)),
                "out": str(folder / "fisher.json"),
            }
            fisher_config = _configure(FisherConfig, fisher_base, [], x)
            plan["fisher"] = (
                Stage(
                    "fisher",
                    folder / "fisher.json",
                    config_settings(fisher_config, FISHER_SPEED_ONLY),
                    inputs=[probe],
                    upstream=trained,
                    record=records / "fisher.json",
                ),
                lambda discard: fisher_displacement(fisher_config),
            )

        # The row is a stage of its own, downstream of all others: it is current only while they are.
        upstream = [stage for stage, _ in plan.values()]
        row = Stage(
            "row",
            folder / "cell.json",
            {"cell": cell.name, "method": cell.method, "lam": cell.lam, "seed": cell.seed},
            upstream=upstream,
            record=records / "row.json",
        )
        plan["row"] = (row, lambda discard: self._write_row(cell, plan))
        return plan

    def _sft_targets(self, train_file: Path, targets_file: Path) -> None:
        from mixsd.models import load_tokenizer
        from mixsd.records import load_corpus
        from mixsd.targets import sft_target_rows

        atomic_write_jsonl(
            targets_file, sft_target_rows(load_corpus(train_file), load_tokenizer(self.x.model))
        )

    def _mix(self, config, discard: bool) -> None:
        from mixsd.targets import mix

        mix(replace(config, overwrite=discard))

    def _train(self, config, discard: bool) -> None:
        from mixsd.train import train

        train(replace(config, overwrite=discard))

    def _evaluate(self, config, discard: bool) -> None:
        from mixsd.evaluate import evaluate

        evaluate(replace(config, overwrite=discard))

    def _write_row(self, cell: Cell, plan: StagePlan) -> None:
        """The cell's row of the results table, from the stage files just checked to be current."""
        folder = self.cell_dir(cell)

        def read(path: Path) -> dict[str, Any]:
            return json.loads(path.read_text(encoding="utf-8"))

        results = {"eval": read(folder / "eval.json"), "retention": read(folder / "retention.json")}
        analyses = {name: read(folder / f"{name}.json") for name in ("nll", "fisher") if name in plan}
        train_summary = read(folder / "train" / "summary.json") if "train" in plan else None
        mix_summary = None
        if cell.method == "mixsd":
            from mixsd.targets import summary_path

            mix_summary = read(summary_path(folder / "targets.jsonl"))
        row = cell_row(cell, results, analyses, train_summary, mix_summary)
        # compute time of the stages as last made (each counted by the process that made it)
        seconds = [
            (stage.recorded() or {}).get("seconds") for name, (stage, _) in plan.items() if name != "row"
        ]
        row["seconds"] = round(sum(s for s in seconds if isinstance(s, int | float)), 1)
        atomic_write_json(folder / "cell.json", row)

    def run_cell(self, cell: Cell, progress) -> dict[str, Any]:
        """Run every stage of the cell that is not current for this config; return the cell's row."""
        self.cell_dir(cell).mkdir(parents=True, exist_ok=True)
        log = self._log(cell)
        for name, (stage, produce) in self.plan(cell).items():
            progress(cell, name)
            stage.run(produce, log=log)
        return json.loads((self.cell_dir(cell) / "cell.json").read_text(encoding="utf-8"))

    def current_row(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's row when every stage of it is current for this config; None otherwise."""
        row, _ = self.plan(cell)["row"]
        return json.loads(row.outputs[0].read_text(encoding="utf-8")) if row.is_current() else None


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
        row.update(split_columns(split, scores))  # headline accuracy under the corpus's matcher
    ratios = []
    for probe, summary in results["retention"].get("probes", {}).items():
        if probe == "kl":
            row["kl_per_token"] = _value(summary, "kl_per_token")
            continue
        metric = RETENTION_METRIC.get(probe, "acc")
        # multiple choice: chance-normalized retention, raw ratio and per-item flips beside it
        row.update(probe_columns(probe, summary, metric))
        ratio = row[f"{probe}_retention"]
        if ratio is not None:
            ratios.append(ratio)
    if "unseen_acc" in row and cell.method != "base":
        row["unseen_retention"] = None  # filled against the base row in `add_relative_scores`
    row["retention_mean"] = sum(ratios) / len(ratios) if ratios else None
    # target NLL (mean, median, share > 5 nats) and Fisher columns (Σ F·Δθ², fisher_ratio, ‖Δθ‖²)
    row.update(analysis_columns(analyses.get("nll") or {}, analyses.get("fisher") or {}))
    if train_summary:
        history = [h for h in train_summary.get("history", []) if "loss" in h]
        row["final_train_loss"] = history[-1]["loss"] if history else None
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
    """Run (or resume) every cell and write the report, under the lock of the output folder (issue 10)."""
    with output_lock(experiment.out):  # one run per folder: a second one refuses before any work
        return _run_experiment_locked(
            experiment, only=only, report_only=report_only, show_progress=show_progress
        )


def _run_experiment_locked(
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
    # Only rows whose every stage is current for this config: a cell not rerun (--only, --report-only)
    # after its settings changed is left out, never shown with old numbers.
    rows, out_of_date = [], []
    for cell in experiment.cells:
        row = runner.current_row(cell)
        if row is not None:
            rows.append(row)
        elif (runner.cell_dir(cell) / "cell.json").is_file():
            out_of_date.append(cell.name)
    if out_of_date:
        print(
            f"left out of the table, out of date for this config (rerun them): {', '.join(out_of_date)}",
            file=sys.stderr,
        )
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
