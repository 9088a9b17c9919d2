"""`mixsd experiment CONFIG.yaml` and `mixsd demo`: a declared grid, run end to end and reported.

A grid is corpus x methods x seeds. The whole file is checked when it is loaded: every section is built
into its command's config, for every cell, before any work. Each cell runs its stages in order, each
writing into `OUT/cells/<cell>/` atomically. Every stage is a `mixsd.stages.Stage`: its output is reused
only while the settings it recorded (config, input file hashes, upstream stages, mixsd version) equal the
current ones, so an interrupted experiment resumes where it stopped, and a changed config redoes exactly
the stages it affects and everything downstream of them. The records are in `OUT/cells/<cell>/stages/`;
every decision (ran / reused, and what changed) is appended to `OUT/stage-log.jsonl`:

    targets.jsonl   ground truth (sft), `mixsd mix` (mixsd) or `mixsd rewrite` (rewrite) — not for base / opsd / cpt
    train/          `mixsd train` output; train/model is the tuned model  — not for base
                    (with `curves:`, train/curve.jsonl: the scores after every epoch)
    eval.json       `mixsd eval` on the corpus suite (memorization, generalization)
    retention.json  `mixsd eval --suite retention` against the base model
    nll.json        `mixsd analyze nll`: the targets' NLL under the base model
    fisher.json     `mixsd analyze fisher`: Fisher-weighted displacement from the base
    cell.json       the cell's row of the results table (written last: the cell is done)

Then `OUT/results.jsonl`, `OUT/results.csv` and the report (`OUT/report.md`, `OUT/report.html`) are
written from every cell whose stages are all current for this config. The config file format is documented in docs/experiments.md.

A method entry may sweep `mixsd train` options (`sft: {lr: [3e-5, 1e-4]}`): each setting is its own cell
and group; the settings of one method, λ and seed share their targets. The `select` section's rule
(`mixsd.tuning.SelectionRule`) picks each method's setting in the report, from the learning curves.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
import re
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
    LockHeld,
    YamlDocument,
    atomic_copy,
    atomic_write_json,
    atomic_write_jsonl,
    atomic_write_text,
    live_lock_holder,
    output_lock,
    read_yaml,
    require_input_file,
)
from mixsd.lmeval import include_files
from mixsd.results import (
    MAIN_COLUMNS,
    add_relative_scores,
    aggregate,
    cell_row,
    comparison_text,
    write_table,
)
from mixsd.stages import Stage, config_settings, file_hash
from mixsd.tuning import SelectionRule

# Bumped when the way a row is built from the cell's files changes, so rows (cheap: no model) are rebuilt
# while every stage they read from stays current. 2: retention headline only on probes whose base model is
# well above chance (metrics.well_above_chance).
ROW_VERSION = "row2"

DEMO_FACTS = Path(str(resources.files("mixsd") / "data" / "facts-demo.jsonl"))
PACKAGED_CONFIGS = Path(str(resources.files("mixsd") / "configs"))

METHOD_LABELS = {
    "base": "Base",
    "sft": "SFT",
    "mixsd": "MixSD",
    "opsd": "OPSD",
    "memit": "MEMIT",
    "rewrite": "Self-rewrite",
    "cpt": "CPT",
}
SECTIONS = ("mix", "rewrite", "train", "opsd", "memit", "eval", "retention", "analyses")


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
    status: bool = field(
        default=False,
        metadata={
            "help": "Print each cell's state (done, running and by whom, partly done, out of date, not "
            "started) and exit; loads no model."
        },
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


# Short names of swept training options in cell names and labels (any other option: its own name).
SETTING_NAMES = {
    "lr": "lr",
    "learning_rate": "lr",
    "lora_rank": "lora",
    "epochs": "ep",
    "num_train_epochs": "ep",
}


def _setting_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value).lower()


@dataclass(frozen=True)
class Cell:
    method: str
    lam: float | None = None
    seed: int = 0
    # training options of this cell on top of the `train` section: one setting of a sweep, in the
    # order the method entry lists them, e.g. (("lora_rank", 16), ("lr", 0.003))
    settings: tuple[tuple[str, Any], ...] = ()
    # what this cell's targets are made with, where the method entry differs from the default: sft's
    # `target` (("target", "statement")), mixsd's `mix` options on top of the `mix` section
    # (("retries", 30), ("on_failure", "drop")); in the entry's order
    target_options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.method == "base":
            return "base"
        lam = f"-lam{self.lam:g}" if self.lam is not None else ""
        target = "".join(f"-{_target_option_name(k, v)}" for k, v in self.target_options)
        setting = "".join(f"-{SETTING_NAMES.get(k, k)}{_setting_value(v)}" for k, v in self.settings)
        return f"{self.method}{lam}{target}{setting}-s{self.seed}"

    @property
    def family(self) -> str:
        """The method (and λ, and its target options): the settings of a sweep compete within it under the
        selection rule. Other targets are another family ("SFT statement", "MixSD λ=0.3 on_failure=drop")."""
        lam = f" λ={self.lam:g}" if self.lam is not None else ""
        target = "".join(f" {_target_option_label(k, v)}" for k, v in self.target_options)
        return METHOD_LABELS[self.method] + lam + target

    @property
    def setting(self) -> str:
        """The setting's label ("lr=3e-05", "LoRA r=16 lr=0.003"); empty without one."""
        parts = []
        for key, value in self.settings:
            if key == "lora_rank":
                parts.append(f"LoRA r={value}" if value else "full")
            else:
                parts.append(f"{SETTING_NAMES.get(key, key)}={_setting_value(value)}")
        return " ".join(parts)

    @property
    def group(self) -> str:
        """Cells that differ only by seed share a group (one point on the plots)."""
        return self.family + (f" {self.setting}" if self.settings else "")

    @property
    def targets_cell(self) -> Cell:
        """The cell whose folder holds this cell's targets: every setting of one method, λ, target options
        and seed trains on the same targets, made once (the bare cell without settings)."""
        return replace(self, settings=())


# Target options in cell names and family labels: those named here show their value only
# ("sft-statement", "mixsd-lam0.3-drop"); every other one its name without underscores, then its value
# ("verifynone", "retries30"). An expert template that is no single word (a file, the text itself) is named
# by its file's stem or the text's hash.
TARGET_OPTION_VALUE_ONLY = {"target", "on_failure", "expert_template"}
TARGET_OPTION_LABELS = {"target": "", "expert_template": "template"}


def _target_option_value(key: str, value: Any) -> str:
    if key == "expert_template" and isinstance(value, str) and not value.isalnum():
        from mixsd.files import sha256_text

        path = Path(value)
        return (
            f"file-{path.stem}" if len(value) < 4096 and path.is_file() else f"text{sha256_text(value)[:8]}"
        )
    return _setting_value(value)


def _target_option_name(key: str, value: Any) -> str:
    prefix = "" if key in TARGET_OPTION_VALUE_ONLY else key.replace("_", "")
    return prefix + _target_option_value(key, value)


def _target_option_label(key: str, value: Any) -> str:
    label = TARGET_OPTION_LABELS.get(key, key)
    return f"{label}={_target_option_value(key, value)}" if label else _target_option_value(key, value)


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
    # the per-epoch learning curve of every trained cell: the `curves` options (None: no curves)
    curves: dict[str, Any] | None = None
    # the rule that picks each method's setting among those it sweeps (the `select` section)
    select: SelectionRule = field(default_factory=SelectionRule)


def load_experiment(path: str | Path, out: str | None = None) -> Experiment:
    """The experiment file, read strictly (a duplicated key is refused) and checked whole; every error
    names the file, the line and the key as the file writes it."""
    document = read_yaml(require_input_file(path, "experiment file not found"))
    try:
        return _experiment(document.path, document.data, out)
    except InputError as err:
        raise _as_written(err, document) from None


def _as_written(err: InputError, document: YamlDocument) -> InputError:
    """`err` about `document` with the field spelt as in the file and its line. The checks name some
    fields by what they become (`curves.eval_limit` for `curves: {limit}`, `methods.sft.lr` for a swept
    option, `train.learning_rate` for `lr`): each is turned back into the key the file writes."""
    if err.line is not None or err.field is None or err.path is None or Path(err.path) != document.path:
        return err
    key_path: list[str | int] = [
        int(part[1:-1]) if part.startswith("[") else part
        for part in re.findall(r"\[\d+\]|[^.\[\]]+", err.field)
    ]
    data = document.data if isinstance(document.data, dict) else {}
    if key_path[:1] == ["curves"] and len(key_path) > 1:
        key_path[1] = {field: option for option, field in CURVE_OPTIONS.items()}.get(key_path[1], key_path[1])
    elif key_path[:1] == ["methods"] and len(key_path) > 2 and isinstance(key_path[1], str):
        entries = data.get("methods") if isinstance(data.get("methods"), list) else []
        for index, entry in enumerate(entries):  # the first entry of that method that names the option
            options = entry.get(key_path[1]) if isinstance(entry, dict) else None
            if isinstance(options, dict) and key_path[2] in options:
                key_path[1:2] = [index]
                break
    if tuple(key_path) not in document.lines and len(key_path) > 1:
        from mixsd.train import ALIASES

        spellings = {target: alias for alias, target in ALIASES.items()}
        spellings.update(ALIASES)
        other = (*key_path[:-1], spellings.get(key_path[-1]))
        if other in document.lines:
            key_path = list(other)
    field_name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in key_path)
    return InputError(err.message, err.path, document.line(tuple(key_path)), field_name.lstrip("."))


def _experiment(path: Path, raw: Any, out: str | None) -> Experiment:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise InputError("expected a mapping at the top level", path)
    known = {"name", "model", "out", "corpus", "methods", "seeds", "curves", "select", *SECTIONS}
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
    if not isinstance(raw.get("methods") or [], list):  # a bare `methods: sft` is no list of letters
        raise InputError(
            "expected a list of methods (- base, - sft, - mixsd: {lam: 0.3} ...)", path, field="methods"
        )
    cells = _cells(
        raw.get("methods") or ["base", "sft", {"mixsd": {"lam": [0.3]}}], seeds, path, raw.get("mix") or {}
    )
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
        curves=_curves_section(raw.get("curves"), path),
        select=_select_section(raw.get("select"), path),
    )
    _validate(experiment)
    return experiment


# `curves:` options and the `mixsd train` fields the runner sets from them (with eval_every_epoch on and
# eval_corpus the cell's training questions); `capability: true` adds the offline capability probes.
CURVE_OPTIONS = {
    "limit": "eval_limit",
    "match": "eval_match",
    "kl_prompts": "eval_kl_prompts",
    "kl_limit": "eval_kl_limit",
    "probes": "eval_probes",
    "probe_limit": "eval_probe_limit",
    "max_new_tokens": "eval_max_new_tokens",
    "every": "eval_every_epochs",
}
CURVE_FIELDS = {"eval_every_epoch", "eval_corpus", *CURVE_OPTIONS.values()}
# capability: the offline capability probes; known_facts: the retention's known-facts probe (needs
# `retention: {known_facts: true}`), so that retention at matched memorization counts lost facts
CURVE_SWITCHES = ("capability", "known_facts")
# the offline capability probes (`mixsd probes build-capability` without --model) a curve can score
CAPABILITY_PROBES = ("in_context.jsonl", "instructions.jsonl")


def _curves_section(value: Any, path: Path) -> dict[str, Any] | None:
    """`curves: true` or a mapping of CURVE_OPTIONS (plus the switches `capability` and `known_facts`);
    None when absent or false.
    Types and ranges are checked when the training configs are built (`Runner.plan`)."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise InputError("expected true, false or a mapping of options", path, field="curves")
    for key in value:
        if key not in (*CURVE_OPTIONS, *CURVE_SWITCHES):
            raise InputError(
                f"unknown option; expected one of {', '.join(sorted([*CURVE_OPTIONS, *CURVE_SWITCHES]))}",
                path,
                field=f"curves.{key}",
            )
    for switch in CURVE_SWITCHES:
        if switch in value and not isinstance(value[switch], bool):
            raise InputError("expected true or false", path, field=f"curves.{switch}")
    probes = value.get("probes")
    if isinstance(probes, list):
        if not all(isinstance(p, str) and p and "," not in p for p in probes):
            raise InputError("expected a list of probe file paths", path, field="curves.probes")
        value = {**value, "probes": ",".join(probes)}
    return dict(value)


def _select_section(value: Any, path: Path) -> SelectionRule:
    """The `select` section as a SelectionRule (every option optional; the defaults when absent)."""
    if value is None:
        return SelectionRule()
    if not isinstance(value, dict):
        raise InputError("expected a mapping of options", path, field="select")
    options = {f.name for f in fields(SelectionRule)}
    for key in value:
        if key not in options:
            raise InputError(
                f"unknown option; expected one of {', '.join(sorted(options))}", path, field=f"select.{key}"
            )
    memorization = value.get("memorization", SelectionRule.memorization)
    if (
        isinstance(memorization, bool)
        or not isinstance(memorization, int | float)
        or not 0 < memorization <= 1
    ):
        raise InputError(f"must be in (0, 1]; got {memorization!r}", path, field="select.memorization")
    epochs = value.get("within_epochs")
    if epochs is not None and (
        isinstance(epochs, bool) or not isinstance(epochs, int | float) or epochs <= 0
    ):
        raise InputError(f"must be a number > 0 or null; got {epochs!r}", path, field="select.within_epochs")
    at = value.get("retention_at", SelectionRule.retention_at)
    if at not in ("matched", "final"):
        raise InputError(f"expected one of matched, final; got {at!r}", path, field="select.retention_at")
    seeds = value.get("seeds")
    if seeds is not None and (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise InputError("expected a non-empty list of integers or null", path, field="select.seeds")
    return SelectionRule(
        float(memorization),
        None if epochs is None else float(epochs),
        at,
        None if seeds is None else tuple(seeds),
    )


# What the runner sets itself in each stage's config; the file may set every other field.
RUNNER_SET = {
    "mix": ("mixsd.targets", "MixConfig", {"model", "input", "output", "lam", "seed"}),
    "train": (
        "mixsd.train",
        "TrainConfig",
        {"model", "out", "output_dir", "targets", "corpus", "method", "seed"},
    ),
    "opsd": (
        "mixsd.train",
        "TrainConfig",
        {"model", "out", "output_dir", "targets", "corpus", "method", "seed"},
    ),
    "memit": ("mixsd.edit", "EditConfig", {"model", "input", "out", "overwrite"}),
    "rewrite": ("mixsd.rewrite", "RewriteConfig", {"model", "input", "output"}),
    "eval": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "data", "out"}),
    "retention": ("mixsd.evaluate", "EvalConfig", {"model", "suite", "base", "out"}),
}
ANALYSES_OPTIONS: dict[str, Any] = {"nll": bool, "fisher": bool, "fisher_samples": int, "fisher_probe": str}
# data: the probe folder; probes: false skips them; known_facts: add the everyday facts the base model
# answers right (built by running it once, OUT/known-facts) to the probes, so that every fact a trained
# model gets wrong is a loss
RETENTION_EXTRA: dict[str, Any] = {"data": str, "probes": bool, "known_facts": bool}
# Fields that change only speed, logging or where a run goes, never what a stage writes: a change to
# them redoes nothing. (Training's own list is `mixsd.train.run_settings`.)
# `dtype` of eval and nll is in their settings as `bf16`, which those configs keep equal to
# `dtype == "bfloat16"` (`options.ModelOptions`); fisher runs with the default dtype here (no section
# sets it). Left out, records written before `dtype` existed stay current.
MIX_SPEED_ONLY = ("batch_size", "device", "threads", "overwrite")
EDIT_SPEED_ONLY = ("device", "threads", "overwrite")
EVAL_SPEED_ONLY = ("batch_size", "device", "threads", "overwrite", "base_cache", "dtype")
NLL_SPEED_ONLY = ("batch_size", "device", "threads", "dtype")
FISHER_SPEED_ONLY = ("device", "threads", "dtype")
# The capability probes of an experiment are built without a model: how one would be loaded is moot.
CAPABILITY_SPEED_ONLY = ("batch_size", "device", "threads", "dtype", "trust_remote_code")


def _validate(experiment: Experiment) -> None:
    """Build every config of every cell now, so a bad value fails at load, before any work is done."""
    # (the runner reads `retention.data` when it is made: its type first)
    for key, kind in RETENTION_EXTRA.items():
        if key in experiment.sections["retention"]:
            _typed(experiment.sections["retention"][key], kind, experiment, f"retention.{key}")
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
    if (experiment.curves or {}).get("known_facts") and not experiment.sections["retention"].get(
        "known_facts"
    ):
        raise InputError(
            "needs `retention: {known_facts: true}` (the curve scores the retention's known-facts probe)",
            experiment.path,
            field="curves.known_facts",
        )
    for cell in experiment.cells:
        runner.plan(cell)


def _cells(methods: list[Any], seeds: list[int], path: Path, mix_section: Any = None) -> list[Cell]:
    """The grid's cells from its method entries. `mix_section`: the file's `mix` section, which a mixsd
    entry's target options are compared with (only those that differ name the cell)."""
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
                f"unknown method {method!r} (expected base, sft, mixsd, opsd, memit, rewrite or cpt)",
                path,
                field=f"methods[{i}]",
            )
        if method == "base":
            cells.append(Cell("base"))
            continue
        if method != "mixsd" and "lam" in options:
            raise InputError(
                "unknown method option ['lam'] (mixsd takes lam; every trained method takes seeds and "
                "training options)",
                path,
                field=f"methods[{i}]",
            )
        if method == "memit" and set(options) - {"seeds"}:
            raise InputError(
                "memit takes only seeds here; its options go in the `memit` section",
                path,
                field=f"methods[{i}]",
            )
        method_seeds = options.get("seeds", seeds)
        if not isinstance(method_seeds, list) or not all(isinstance(s, int) for s in method_seeds):
            raise InputError("expected a list of integers", path, field=f"methods[{i}].seeds")
        lams = options.get("lam", [0.3]) if method == "mixsd" else [None]
        lams = lams if isinstance(lams, list) else [lams]
        target_keys = _target_option_keys(method)
        targets = _target_sweeps(
            method,
            {k: v for k, v in options.items() if k in target_keys},
            mix_section if isinstance(mix_section, dict) else {},
            path,
            f"methods[{i}]",
        )
        sweeps = _setting_sweeps(
            {k: v for k, v in options.items() if k not in ("lam", "seeds", *target_keys)},
            path,
            f"methods[{i}]",
        )
        for lam in lams:
            if lam is not None and not (isinstance(lam, int | float) and 0 <= lam <= 1):
                raise InputError(f"lam must be in [0, 1], got {lam!r}", path, field=f"methods[{i}].lam")
            for target in targets:
                for setting in sweeps:
                    cells.extend(
                        Cell(method, None if lam is None else float(lam), seed, setting, target)
                        for seed in method_seeds
                    )
    names = [cell.name for cell in cells]
    for name in names:
        if names.count(name) > 1:
            raise InputError(f"cell {name} is declared twice", path, field="methods")
    return cells


def _target_option_keys(method: str) -> set[str]:
    """What a method entry may say about its targets: sft's `target`; for mixsd every `mix` option that
    decides what the targets are (not the runner's fields, nor those of speed or loading)."""
    if method == "sft":
        return {"target"}
    if method == "mixsd":
        from mixsd.targets import MixConfig

        names = {f.name for f in fields(MixConfig) if f.init}
        return names - RUNNER_SET["mix"][2] - set(MIX_SPEED_ONLY) - {"trust_remote_code"}
    return set()


def _target_sweeps(
    method: str, options: dict[str, Any], mix_section: dict[str, Any], path: Path, where: str
) -> list[tuple[tuple[str, Any], ...]]:
    """The target options a method entry sweeps (each a value or a list, crossed in the order listed), each
    kept only where it differs from what the cell would get without it (sft: target answer; mixsd: the
    `mix` section, else MixConfig's default), so an entry that repeats the section names the same cells.
    Types are checked here, ranges when the targets' config is built."""
    if not options:
        return [()]
    if method == "sft":
        from mixsd.targets import SFT_TARGETS

        hints: dict[str, Any] = {"target": Literal[SFT_TARGETS]}  # type: ignore[valid-type]
        defaults: dict[str, Any] = {"target": "answer"}
    else:
        from mixsd.targets import MixConfig

        hints = typing.get_type_hints(MixConfig)
        defaults = {f.name: f.default for f in fields(MixConfig) if f.init}
        for key, value in mix_section.items():
            if key in options:
                fits, coerced = _coerce(value, hints.get(key))
                defaults[key] = coerced if fits else value
    axes = []
    for key, values in options.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise InputError("expected a value or a non-empty list", path, field=f"{where}.{key}")
        axis = []
        for value in values:
            fits, coerced = _coerce(value, hints.get(key))
            if not fits or isinstance(coerced, dict | list):
                raise InputError(
                    f"expected {_type_text(hints.get(key))}; got {value!r}", path, field=f"{where}.{key}"
                )
            axis.append(None if coerced == defaults.get(key) else (key, coerced))
        axes.append(axis)
    return [
        tuple(pair for pair in combination if pair is not None) for combination in itertools.product(*axes)
    ]


def _setting_sweeps(options: dict[str, Any], path: Path, where: str) -> list[tuple[tuple[str, Any], ...]]:
    """The settings a method entry sweeps: every training option it names (a value or a list of values),
    crossed in the order listed; [()] when it names none. Names and types are checked here (values read
    as the option's type, so `1e-4` names the same cell as `1.0e-4`), ranges when the configs are built."""
    if not options:
        return [()]
    from mixsd.train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    allowed = {f.name for f in fields(TrainConfig) if f.init} - RUNNER_SET["train"][2] - CURVE_FIELDS
    axes = []
    for key, values in options.items():
        if key not in allowed:
            raise InputError(
                "unknown method option (a method entry takes seeds, `mixsd train` options to sweep, each "
                "a value or a list, and target options: sft's target, mixsd's lam and `mix` options)",
                path,
                field=f"{where}.{key}",
            )
        values = values if isinstance(values, list) else [values]
        if not values:
            raise InputError("expected a value or a non-empty list", path, field=f"{where}.{key}")
        coerced = []
        for value in values:
            fits, value = _coerce(value, hints.get(key))
            if not fits or isinstance(value, dict | list):
                raise InputError(
                    f"expected {_type_text(hints.get(key))}; got {value!r}", path, field=f"{where}.{key}"
                )
            coerced.append(value)
        axes.append([(key, value) for value in coerced])
    return [tuple(setting) for setting in itertools.product(*axes)]


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


def _without(sections: list[tuple[str, dict[str, Any]]], keys: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The sections without `keys` nor their other spelling (lr / learning_rate ...): a cell's setting
    must win over the `train` section whichever name either uses (TrainConfig lets an alias win)."""
    from mixsd.train import ALIASES

    names = set(keys)
    for alias, target in ALIASES.items():
        if alias in keys or target in keys:
            names |= {alias, target}
    return [(name, {k: v for k, v in options.items() if k not in names}) for name, options in sections]


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
        if self.probes_dir is not None and self.x.sections["retention"].get("known_facts"):
            self.probes_dir = self.retention_probes_dir  # made by prepare_data
        self.stage_log = self.out / "stage-log.jsonl"
        self.capability_stage: Stage | None = self._capability_stage()
        self.train_configs: dict[str, Any] = {}  # cell name -> its TrainConfig, as planned

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
        if self.probes_dir is not None and self.x.sections["retention"].get("known_facts"):
            self.probes_dir = self._with_known_facts(self.probes_dir)
        if self.capability_stage is not None:
            from mixsd.corpora.capability import build_capability

            config = self._capability_config()
            self.capability_stage.run(lambda discard: build_capability(config), log=self._log(None))

    def _with_known_facts(self, probes: Path) -> Path:
        """OUT/retention-probes: the probe files plus known_facts.jsonl, filtered by the base model."""
        from mixsd.corpora.capability import CapabilityConfig, build_capability

        dtype = "bfloat16" if self.x.sections["retention"].get("bf16") else "float32"
        config = CapabilityConfig(out=str(self.out / "known-facts"), model=self.x.model, dtype=dtype)
        built = Path(config.out) / "known_facts.jsonl"
        Stage(
            "known-facts",
            [built, Path(config.out) / "manifest.json"],
            config_settings(config, ("batch_size", "device", "threads", "out")),
            inputs=[probes / "manifest.json"],
            record=self.out / "stages" / "known-facts.json",
        ).run(lambda discard: build_capability(config), log=self._log(None))
        if not built.is_file():  # the base model answered none: nothing to add
            return probes
        combined = self.retention_probes_dir
        combined.mkdir(parents=True, exist_ok=True)
        for source in [*sorted(probes.glob("*.jsonl")), probes / "manifest.json", built]:
            target = combined / source.name
            if file_hash(target) != file_hash(source):  # unchanged copies keep the retention stages current
                atomic_copy(source, target)
        return combined

    @property
    def retention_probes_dir(self) -> Path:
        return self.out / "retention-probes"

    # learning curves, shared by every trained cell
    def _capability_config(self):
        from mixsd.corpora.capability import CapabilityConfig

        corpus = self.x.corpus
        world = {}
        if corpus.get("generator", "kgfact") == "kgfact":  # in-context facts from the trained world
            world = {"kgfact_size": corpus.get("size", "small"), "kgfact_seed": corpus.get("seed", 0)}
        return CapabilityConfig(out=str(self.out / "capability"), **world)

    def _capability_stage(self) -> Stage | None:
        """OUT/capability: the offline capability probes (no model: in-context facts, instructions)."""
        if self.x.curves is None or not self.x.curves.get("capability"):
            return None
        config = self._capability_config()
        folder = Path(config.out)
        return Stage(
            "capability",
            [folder / "manifest.json", *(folder / name for name in CAPABILITY_PROBES)],
            config_settings(config, CAPABILITY_SPEED_ONLY),
            record=self.out / "stages" / "capability.json",
        )

    def curve_sections(
        self, train_file: Path
    ) -> tuple[dict[str, Any], tuple[str, dict[str, Any]], list[Path]]:
        """What a trained cell's curve adds to its TrainConfig: the runner's fields, the `curves` section
        as TrainConfig options, and the files the curve reads (their content is part of the fingerprint)."""
        curves = self.x.curves or {}
        options = {CURVE_OPTIONS[key]: value for key, value in curves.items() if key in CURVE_OPTIONS}
        probes = [p.strip() for p in str(options.get("eval_probes") or "").split(",") if p.strip()]
        if curves.get("capability"):
            probes = [str(self.out / "capability" / name) for name in CAPABILITY_PROBES] + probes
        if curves.get("known_facts"):
            probes.append(str(self.retention_probes_dir / "known_facts.jsonl"))
        if probes:
            options["eval_probes"] = ",".join(probes)
        files = [Path(p) for p in probes]
        if isinstance(options.get("eval_kl_prompts"), str):
            files.append(Path(options["eval_kl_prompts"]))
        runner_set = {"eval_every_epoch": True, "eval_corpus": str(train_file)}
        return runner_set, ("curves", options), files

    def curve_base_stage(self) -> tuple[Stage, Callable[[bool], Any]] | None:
        """OUT/curve-base.json: the curve's scores of the base model, epoch 0 of every trained cell's
        curve (with the first trained cell's curve settings); None without curves or trained cells."""
        trained = [cell for cell in self.x.cells if cell.method != "base"]
        if self.x.curves is None or not trained:
            return None
        if trained[0].name not in self.train_configs:
            self.plan(trained[0])
        config = self.train_configs[trained[0].name]
        path = self.out / "curve-base.json"
        settings = {
            name: getattr(config, name)
            for name in ("model", "bf16", *sorted(CURVE_FIELDS - {"eval_every_epoch"}))
        }
        files = [Path(config.eval_corpus)]
        files += [Path(p) for p in (config.eval_probes or "").split(",") if p.strip()]
        if config.eval_kl_prompts:
            files.append(Path(config.eval_kl_prompts))
        stage = Stage(
            "curve-base",
            path,
            settings,
            inputs=files,
            upstream=[self.capability_stage] if self.capability_stage else [],
            record=self.out / "stages" / "curve-base.json",
        )
        return stage, lambda discard: self._curve_base(config, path)

    def _curve_base(self, config, path: Path) -> None:
        from mixsd.curve import CurveCallback, CurveEvaluator
        from mixsd.models import load_model, load_tokenizer

        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
        model = load_model(config.model, dtype="float32", trust_remote_code=config.trust_remote_code)
        model.to(config.device)
        evaluator = CurveEvaluator(config, tokenizer)
        # the base against itself: KL 0 by definition, measured the same way as every epoch's
        row = CurveCallback(evaluator, path, base=model).evaluate(model, epoch=0.0, step=0)
        atomic_write_json(path, row)

    def curve_base_row(self) -> dict[str, Any] | None:
        """The base model's curve row when current for this config; None otherwise."""
        planned = self.curve_base_stage()
        if planned is None or not planned[0].is_current():
            return None
        return json.loads((self.out / "curve-base.json").read_text(encoding="utf-8"))

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

    def cpt_text_file(self, train_file: Path) -> Path:
        """What a cpt cell trains on: a documents corpus's passages, else the training records' contexts."""
        from mixsd.corpora.documents import PASSAGES_FILE

        passages = self.source_dir / PASSAGES_FILE
        return passages if passages.is_file() else train_file

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

        # every setting of a sweep trains on the targets of its bare cell (made once, reused by the rest)
        targets_dir = self.cell_dir(cell.targets_cell)
        targets_file = targets_dir / "targets.jsonl"
        targets: Stage | None = None
        if cell.method == "sft":
            sft_target = dict(cell.target_options).get("target", "answer")
            targets = Stage(
                "targets",
                targets_file,
                # `target` only when it is not the answer: answer targets made before the option existed
                # stay current
                {"method": "sft", "model": x.model, **dict(cell.target_options)},
                inputs=[train_file],
                record=targets_dir / "stages" / "targets.json",
            )
            plan["targets"] = (
                targets,
                lambda discard: self._sft_targets(train_file, targets_file, sft_target),
            )
        elif cell.method == "mixsd":
            base = {
                "model": x.model,
                "input": str(train_file),
                "output": str(targets_file),
                "lam": cell.lam,
                "seed": cell.seed,
            }
            mix_sections = [("mix", x.sections["mix"])]
            if cell.target_options:  # the entry's own mix options win over the section's
                mix_sections.append((f"methods.{cell.method}", dict(cell.target_options)))
            mix_config = _configure(MixConfig, base, mix_sections, x)
            targets = Stage(
                "targets",
                [targets_file, summary_path(targets_file)],
                config_settings(mix_config, MIX_SPEED_ONLY),
                inputs=[train_file, *_user_files(mix_config, ("expert_template",))],
                record=targets_dir / "stages" / "targets.json",
            )
            plan["targets"] = (targets, lambda discard: self._mix(mix_config, discard))
        elif cell.method == "rewrite":  # the self-rewrite baseline (SDFT): greedy, so the same for every seed
            from mixsd.rewrite import RewriteConfig

            rewrite_base = {"model": x.model, "input": str(train_file), "output": str(targets_file)}
            rewrite_config = _configure(RewriteConfig, rewrite_base, [("rewrite", x.sections["rewrite"])], x)
            targets = Stage(
                "targets",
                [targets_file, summary_path(targets_file)],
                config_settings(rewrite_config, MIX_SPEED_ONLY),
                inputs=[train_file, *_user_files(rewrite_config, ("expert_template",))],
                record=targets_dir / "stages" / "targets.json",
            )
            plan["targets"] = (targets, lambda discard: self._rewrite(rewrite_config, discard))

        model = x.model
        trained: list[Stage] = []
        if cell.method == "memit":  # an edit instead of training, written in train/ like a trained model
            from mixsd.edit import EditConfig, edit

            out = folder / "train"
            edit_base = {"model": x.model, "input": str(train_file), "out": str(out), "overwrite": True}
            edit_config = _configure(EditConfig, edit_base, [("memit", x.sections["memit"])], x)
            edit_stage = Stage(
                "train",
                [out / "summary.json", out / "model"],
                config_settings(edit_config, EDIT_SPEED_ONLY),
                inputs=[train_file, *_user_files(edit_config, ("stats",))],
                record=records / "train.json",
            )
            plan["train"] = (edit_stage, lambda discard: edit(edit_config))
            model = str(out / "model")
            trained = [edit_stage]
        elif cell.method != "base":
            out = str(folder / "train")
            base = {"model": x.model, "out": out, "output_dir": out, "seed": cell.seed}
            sections = [("train", x.sections["train"])]
            if cell.method == "opsd":
                base.update(method="opsd", corpus=str(train_file))
                sections.append(("opsd", x.sections["opsd"]))
            elif cell.method == "cpt":  # continued pre-training on the passages (else the records' contexts)
                base.update(method="cpt", corpus=str(self.cpt_text_file(train_file)))
            else:
                base["targets"] = str(targets_file)
            for section, options in sections:
                for key in CURVE_FIELDS & set(options):
                    raise InputError(
                        "the learning curve is set in the `curves` section", x.path, field=f"{section}.{key}"
                    )
            curve_files: list[Path] = []
            upstream = [targets] if targets else []
            if x.curves is not None:
                runner_set, curve_section, curve_files = self.curve_sections(train_file)
                base.update(runner_set)
                sections.append(curve_section)
                if self.capability_stage is not None:
                    upstream.append(self.capability_stage)
            if cell.settings:  # the cell's setting overrides the sections, alias or not (lr / learning_rate)
                sections = _without(sections, {key for key, _ in cell.settings})
                sections.append((f"methods.{cell.method}", dict(cell.settings)))
            train_config = _configure(TrainConfig, base, sections, x)
            self.train_configs[cell.name] = train_config
            outputs = [folder / "train" / "summary.json", folder / "train" / "model"]
            if x.curves is not None:
                outputs.append(folder / "train" / "curve.jsonl")
            # run_settings hashes the target file: taken when the fingerprint is, after targets are made
            train = Stage(
                "train",
                outputs,
                lambda: run_settings(train_config),
                inputs=[*_user_files(train_config, ("expert_template",)), *curve_files],
                upstream=upstream,
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
                inputs=[
                    *probe_files,
                    *_user_files(retention_config, ("entities", "kl_prompts")),
                    *include_files(retention_config.lm_eval_include),  # lm-eval task files, when used
                ],
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
        row_settings = {"cell": cell.name, "method": cell.method, "lam": cell.lam, "seed": cell.seed}
        if cell.settings:  # (kept out when empty: rows of grids without sweeps stay current)
            row_settings["settings"] = [list(pair) for pair in cell.settings]
        if cell.target_options:  # (likewise)
            row_settings["target_options"] = [list(pair) for pair in cell.target_options]
        row = Stage(
            "row",
            folder / "cell.json",
            row_settings,
            upstream=upstream,
            record=records / "row.json",
            version=f"{__version__}+{ROW_VERSION}",
        )
        plan["row"] = (row, lambda discard: self._write_row(cell, plan))
        return plan

    def _sft_targets(self, train_file: Path, targets_file: Path, target: str = "answer") -> None:
        from mixsd.models import load_tokenizer
        from mixsd.targets import load_sft_facts, sft_target_rows

        facts = load_sft_facts(train_file, target)  # refuses a record without its statement, no model loaded
        atomic_write_jsonl(targets_file, sft_target_rows(facts, load_tokenizer(self.x.model), target))

    def _mix(self, config, discard: bool) -> None:
        from mixsd.targets import mix

        mix(replace(config, overwrite=discard))

    def _rewrite(self, config, discard: bool) -> None:
        from mixsd.rewrite import rewrite

        rewrite(replace(config, overwrite=discard))

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
        if cell.method in ("mixsd", "rewrite"):  # both write `mix`'s summary beside their targets
            from mixsd.targets import summary_path

            mix_summary = read(summary_path(self.cell_dir(cell.targets_cell) / "targets.jsonl"))
        row = cell_row(cell, results, analyses, train_summary, mix_summary)
        if cell.target_options:  # what the cell's targets were made with, beside its name and family
            row.update(family=cell.family, target_options=dict(cell.target_options))
        # compute time of the stages as last made (each counted by the process that made it)
        seconds = [
            (stage.recorded() or {}).get("seconds") for name, (stage, _) in plan.items() if name != "row"
        ]
        row["seconds"] = round(sum(s for s in seconds if isinstance(s, int | float)), 1)
        atomic_write_json(folder / "cell.json", row)

    def run_cell(self, cell: Cell, progress) -> dict[str, Any]:
        """Run every stage of the cell that is not current for this config; return the cell's row."""
        self.cell_dir(cell).mkdir(parents=True, exist_ok=True)
        self.cell_dir(cell.targets_cell).mkdir(parents=True, exist_ok=True)
        log = self._log(cell)
        for name, (stage, produce) in self.plan(cell).items():
            progress(cell, name)
            if name == "targets":  # the settings of a sweep share these: one worker makes them, the rest wait
                with output_lock(stage.outputs[0], wait=True):
                    stage.run(produce, log=log)
            else:
                stage.run(produce, log=log)
        return json.loads((self.cell_dir(cell) / "cell.json").read_text(encoding="utf-8"))

    def cell_state(self, cell: Cell) -> dict[str, Any]:
        """Where the cell stands, from its stage records and lock (no model is loaded)."""
        plan = self.plan(cell)
        current = [name for name, (stage, _) in plan.items() if stage.is_current()]
        to_do = [name for name in plan if name not in current]
        # targets shared with other settings of a sweep do not make this cell started
        started = [name for name in current if name != "targets" or cell.targets_cell == cell]
        holder = live_lock_holder(self.cell_dir(cell))
        if holder:
            state = f"running: {holder}"
        elif not to_do:
            state = "done"
        elif (self.cell_dir(cell) / "cell.json").is_file():
            state = f"out of date for this config (to redo: {', '.join(to_do)})"
        elif started:
            state = f"partly done (to do: {', '.join(to_do)})"
        else:
            state = "not started"
        return {"cell": cell.name, "state": state, "stages": f"{len(current)}/{len(plan)}"}

    def current_row(self, cell: Cell) -> dict[str, Any] | None:
        """The cell's row when every stage of it is current for this config; None otherwise."""
        row, _ = self.plan(cell)["row"]
        return json.loads(row.outputs[0].read_text(encoding="utf-8")) if row.is_current() else None


def _default_probes_dir() -> Path:
    from mixsd.models import cache_dir

    return cache_dir() / "probes"


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def selected_cells(experiment: Experiment, only: str | None) -> list[Cell]:
    """The cells `--only` selects: those whose name contains one of its comma-separated texts (all without it)."""
    wanted = [text.strip() for text in only.split(",") if text.strip()] if only else None
    return [c for c in experiment.cells if wanted is None or any(text in c.name for text in wanted)]


def run_experiment(
    experiment: Experiment, *, only: str | None = None, report_only: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) every cell and write the report.

    Several workers may share one folder (the same command started twice, on other cores or machines
    with a shared disk): the shared data is made under the folder's lock, which the others wait for;
    each cell runs under its own lock, and a worker skips the cells another one holds. Whichever worker
    finishes last writes the report with every finished cell.
    """
    from tqdm.auto import tqdm

    runner = Runner(experiment)
    cells = selected_cells(experiment, only)
    if not report_only:
        with output_lock(experiment.out, wait=True):  # shared data: made once, other workers wait
            experiment.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(
                experiment.out / "experiment.yaml", yaml.safe_dump(experiment.raw, sort_keys=False)
            )
            runner.prepare_data()
            curve_base = runner.curve_base_stage() if any(c.method != "base" for c in cells) else None
            if curve_base is not None:  # the base model's scores: epoch 0 of every learning curve
                stage, produce = curve_base
                stage.run(produce, log=runner._log(None))
        bar = tqdm(total=len(cells), desc=experiment.name, unit="cell", disable=not show_progress)

        def progress(cell: Cell, stage: str) -> None:
            bar.set_postfix_str(f"{cell.name}: {stage}")

        for cell in cells:
            try:
                with output_lock(runner.cell_dir(cell)):
                    runner.run_cell(cell, progress)
            except LockHeld as held:
                print(
                    f"\n{cell.name}: skipped, another worker is running it ({held.holder})", file=sys.stderr
                )
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
    with output_lock(experiment.out, wait=True):
        return _write_results(experiment, runner)


def _write_results(experiment: Experiment, runner: Runner) -> dict[str, Any]:
    """The table and report from the cells whose every stage is current for this config."""
    from mixsd.report import write_report

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
    from mixsd.curve import CURVE_FILE, read_curve

    # the learning curves of the current trained cells (current rows: their train stage is current)
    curves = {
        row["cell"]: read_curve(experiment.out / "cells" / row["cell"] / "train" / CURVE_FILE)
        for row in rows
        if row["method"] != "base"
    }
    report = write_report(
        experiment.out,
        rows,
        meta,
        cells_dir=experiment.out / "cells",
        curves={name: curve for name, curve in curves.items() if curve},
        curve_base=runner.curve_base_row(),
        rule=experiment.select,
    )
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


def print_outcome(result: dict[str, Any]) -> None:
    rows = result["rows"]
    columns = [c for c in MAIN_COLUMNS if any(isinstance(r.get(c), int | float) for r in rows)]
    print()
    print(comparison_text(aggregate(rows, columns), columns))
    print(f"\nreport: {result['report']['html']}\n        {result['report']['markdown']}")


def grid_status(experiment: Experiment, only: str | None = None) -> list[dict[str, Any]]:
    """Each selected cell's state: see Runner.cell_state."""
    runner = Runner(experiment)
    return [runner.cell_state(cell) for cell in selected_cells(experiment, only)]


def print_status(experiment: Experiment, only: str | None = None) -> dict[str, Any]:
    states = grid_status(experiment, only)
    width = max(len(s["cell"]) for s in states)
    for s in states:
        print(f"{s['cell']:<{width}}  {s['stages']:>5}  {s['state']}")
    done = sum(s["state"] == "done" for s in states)
    print(f"{done} of {len(states)} cells done ({experiment.out})")
    return {"cells": states}


def experiment_command(config: ExperimentConfig) -> dict[str, Any]:
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    experiment = load_experiment(config.config, config.out)
    if config.status:
        return print_status(experiment, only=config.only)
    result = run_experiment(experiment, only=config.only, report_only=config.report_only)
    print_outcome(result)
    return result


def demo_command(config: DemoConfig) -> dict[str, Any]:
    experiment = load_experiment(config.config or PACKAGED_CONFIGS / "demo.yaml", config.out)
    print(f"mixsd demo: {experiment.name} on {experiment.model} -> {experiment.out}")
    result = run_experiment(experiment)
    print_outcome(result)
    return result
