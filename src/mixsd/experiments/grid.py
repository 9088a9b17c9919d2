"""An experiment file read into a grid: its cells (method x target options x settings x seeds) and sections.

The YAML is read strictly (`mixsd.core.files.read_yaml`: a duplicated key is refused) and every error names the
file, the line and the key as the file writes it (`as_written`). Each section becomes its command's config
dataclass through one helper, `build_config`: the runner's own fields, then the file's options on top, each
checked against the field's type here and against the config's own checks when it is built. Planning and
running the cells' stages is the runner's (`mixsd.experiments.experiment`); this module knows no stage.
"""

from __future__ import annotations

import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from mixsd.core.files import InputError, YamlDocument, sha256_text
from mixsd.core.stage_settings import io_fields, speed_only
from mixsd.experiments.tuning import SelectionRule
from mixsd.method.mix_config import MixConfig
from mixsd.method.sft_targets import SFT_TARGETS
from mixsd.training.train_config import ALIASES, TrainConfig

T = typing.TypeVar("T")

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
    analyses: AnalysesOptions = field(default_factory=lambda: AnalysesOptions())
    # the retention section's own options (the rest are `mixsd eval`'s)
    retention_extras: RetentionExtras = field(default_factory=lambda: RetentionExtras())


@dataclass(frozen=True)
class AnalysesOptions:
    """The `analyses` section: which analyses run, and the Fisher's sample count and probe text."""

    nll: bool = True
    fisher: bool = True
    fisher_samples: int = 64
    fisher_probe: str | None = None


@dataclass(frozen=True)
class RetentionExtras:
    """The `retention` section's options that are the runner's, not `mixsd eval`'s. data: the probe folder;
    probes: false skips them; known_facts: add the everyday facts the base model answers right (built by
    running it once, OUT/known-facts) to the probes, so that every fact a trained model gets wrong is a loss."""

    data: str | None = None
    probes: bool = True
    known_facts: bool = False


RETENTION_EXTRA = {f.name for f in fields(RetentionExtras)}


def as_written(err: InputError, document: YamlDocument) -> InputError:
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
        spellings = {target: alias for alias, target in ALIASES.items()}
        spellings.update(ALIASES)
        other = (*key_path[:-1], spellings.get(key_path[-1]))
        if other in document.lines:
            key_path = list(other)
    field_name = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in key_path)
    return InputError(err.message, err.path, document.line(tuple(key_path)), field_name.lstrip("."))


def parse_grid(path: Path, raw: Any, out: str | None = None) -> Experiment:
    """The grid of a file's parsed YAML: its cells and sections, each section's own options checked. The
    stages' configs are built, and so checked, when the runner plans the cells (`mixsd.experiments.experiment`)."""
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
        analyses=build_config(AnalysesOptions, {}, [("analyses", sections["analyses"])], path),
        retention_extras=build_config(
            RetentionExtras,
            {},
            [("retention", {k: v for k, v in sections["retention"].items() if k in RETENTION_EXTRA})],
            path,
        ),
    )
    if (experiment.curves or {}).get("known_facts") and not experiment.retention_extras.known_facts:
        raise InputError(
            "needs `retention: {known_facts: true}` (the curve scores the retention's known-facts probe)",
            path,
            field="curves.known_facts",
        )
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
    """The `select` section as a SelectionRule (the defaults when absent): types checked by build_config,
    the ranges the rule needs here."""
    if value is None:
        return SelectionRule()
    if not isinstance(value, dict):
        raise InputError("expected a mapping of options", path, field="select")
    rule = build_config(SelectionRule, {}, [("select", value)], path)
    if not 0 < rule.memorization <= 1:
        raise InputError(f"must be in (0, 1]; got {rule.memorization!r}", path, field="select.memorization")
    if rule.within_epochs is not None and rule.within_epochs <= 0:
        raise InputError(
            f"must be a number > 0 or null; got {rule.within_epochs!r}", path, field="select.within_epochs"
        )
    if rule.seeds is not None and not rule.seeds:
        raise InputError("expected a non-empty list of integers or null", path, field="select.seeds")
    return rule


# What the runner sets itself in the configs of targets and training: the model and files each command names
# (its IO_FIELDS) and the cell's coordinates where the config has them; the file may set every other field.
CELL_FIELDS = {"method", "lam", "seed"}
MIX_RUNNER_FIELDS = io_fields(MixConfig) | CELL_FIELDS & {f.name for f in fields(MixConfig)}
TRAIN_RUNNER_FIELDS = io_fields(TrainConfig) | CELL_FIELDS & {f.name for f in fields(TrainConfig)}


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
        names = {f.name for f in fields(MixConfig) if f.init}
        return names - MIX_RUNNER_FIELDS - speed_only(MixConfig) - {"trust_remote_code"}
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
        hints: dict[str, Any] = {"target": Literal[SFT_TARGETS]}  # type: ignore[valid-type]
        defaults: dict[str, Any] = {"target": "answer"}
    else:
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
    hints = typing.get_type_hints(TrainConfig)
    allowed = {f.name for f in fields(TrainConfig) if f.init} - TRAIN_RUNNER_FIELDS - CURVE_FIELDS
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
    if typing.get_origin(hint) is tuple:
        return f"a list, each {_type_text(typing.get_args(hint)[0])}"
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
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):  # a YAML list
        if not isinstance(value, list):
            return False, value
        items = [_coerce(item, typing.get_args(hint)[0]) for item in value]
        return all(fits for fits, _ in items), tuple(item for _, item in items)
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


def typed(value: Any, hint: Any, path: Path, where: str) -> Any:
    """`value` read as `hint` (see _coerce); an InputError naming `where` in `path` when it does not fit."""
    fits, coerced = _coerce(value, hint)
    if not fits:
        raise InputError(f"expected {_type_text(hint)}; got {value!r}", path, field=where)
    return coerced


def build_config(
    cls: type[T], base: dict[str, Any], sections: list[tuple[str, dict[str, Any]]], path: Path
) -> T:
    """Any config dataclass from the file: the runner's fields (`base`), then the sections' options on top
    (a later section wins), e.g. [("train", ...), ("methods.sft", {"lr": 1e-4})].

    Every value is checked against its field's type here and against the config's own checks (ranges,
    choices) when it is built; either failure names the file and `section.field`.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls) if f.init}
    where = sections[0][0] if sections else cls.__name__
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for section, options in sections:
        for key, value in options.items():
            if key not in names or key in base:
                raise InputError(
                    f"'{key}' is not an option of this stage (or is set by the runner); "
                    f"options: {', '.join(sorted(names - set(base)))}",
                    path,
                    field=f"{section}.{key}",
                )
            values[key] = typed(value, hints.get(key), path, f"{section}.{key}")
            origin[key] = section
    try:
        return cls(**base, **values)
    except InputError as err:
        if err.path is not None or err.line is not None or err.field is None:
            raise InputError(str(err), path, field=where) from None
        message = str(err).removeprefix(f"field '{err.field}': ")
        section = origin.get(err.field, where)
        raise InputError(message, path, field=f"{section}.{err.field}") from None
    except (TypeError, ValueError) as err:
        raise InputError(str(err), path, field=where) from None


def without_options(
    sections: list[tuple[str, dict[str, Any]]], keys: set[str]
) -> list[tuple[str, dict[str, Any]]]:
    """The sections without `keys` nor their other spelling (lr / learning_rate ...): a cell's setting
    must win over the `train` section whichever name either uses (TrainConfig lets an alias win)."""
    names = set(keys)
    for alias, target in ALIASES.items():
        if alias in keys or target in keys:
            names |= {alias, target}
    return [(name, {k: v for k, v in options.items() if k not in names}) for name, options in sections]
