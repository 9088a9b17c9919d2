"""The grid's methods as a table: for each, how a cell's targets and its training stage are planned.

Each planner returns the stage and the config of the command that makes its outputs; the runner
(`mixsd.experiments.experiment`) runs that command when the stage is not current. A method without targets (base,
opsd, cpt, memit) has none planned; base has no training stage either, and memit's is an edit written in
train/ like a trained model. A method whose training scores no learning curve (memit) plans its curve
apart: one point, the edited model scored as the base row and the trained cells' epochs are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, atomic_write_jsonl
from mixsd.core.models import load_tokenizer
from mixsd.core.stage_settings import stage_settings, user_files
from mixsd.core.stages import Stage
from mixsd.editing.edit import EditConfig
from mixsd.experiments.grid import CURVE_FIELDS, Cell, build_config, without_options
from mixsd.experiments.grid_data import GridData
from mixsd.method.mix_config import MixConfig
from mixsd.method.rewrite import RewriteConfig
from mixsd.method.sft_targets import load_sft_facts, sft_target_rows
from mixsd.method.targets import draws_path, summary_path
from mixsd.training.curve import CURVE_FILE, curve_row
from mixsd.training.train_config import TrainConfig, run_settings

PlannedStage = tuple[Stage, Any]  # the stage and the config of the command that makes it


@dataclass(frozen=True)
class SFTTargetsConfig:
    """Ground-truth targets of a corpus (`mixsd sft-targets`): the answer, or the fact's statement."""

    model: str
    input: str
    output: str
    target: str = "answer"


def write_sft_targets(config: SFTTargetsConfig) -> None:
    facts = load_sft_facts(config.input, config.target)  # refuses a record without its statement, no model
    atomic_write_jsonl(config.output, sft_target_rows(facts, load_tokenizer(config.model), config.target))


def _targets_file(data: GridData, cell: Cell) -> Path:
    """Every setting of a sweep trains on the targets of its bare cell (made once, reused by the rest)."""
    return data.cell_dir(cell.targets_cell) / "targets.jsonl"


def _targets_record(data: GridData, cell: Cell) -> Path:
    return data.cell_dir(cell.targets_cell) / "stages" / "targets.json"


def plan_sft_targets(data: GridData, cell: Cell) -> PlannedStage:
    train_file, targets_file = data.corpus_dir / "train.jsonl", _targets_file(data, cell)
    options = dict(cell.target_options)
    config = SFTTargetsConfig(
        data.x.model, str(train_file), str(targets_file), options.get("target", "answer")
    )
    # `target` only when it is not the answer: answer targets made before the option existed stay current
    settings = {"method": "sft", "model": data.x.model, **options}
    stage = Stage("targets", targets_file, settings, inputs=[train_file], record=_targets_record(data, cell))
    return stage, config


def plan_mix_targets(data: GridData, cell: Cell) -> PlannedStage:
    train_file, targets_file = data.corpus_dir / "train.jsonl", _targets_file(data, cell)
    base = {
        "model": data.x.model,
        "input": str(train_file),
        "output": str(targets_file),
        "lam": cell.lam,
        "seed": cell.seed,
        "draws_from": _draws_from(data, cell),
    }
    sections = [("mix", data.x.sections["mix"])]
    if cell.target_options:  # the entry's own mix options win over the section's
        sections.append((f"methods.{cell.method}", dict(cell.target_options)))
    config = build_config(MixConfig, base, sections, data.x.path)
    return _mixed_targets_stage(data, cell, config, train_file, targets_file), config


def _draws_from(data: GridData, cell: Cell) -> str | None:
    """Cells that differ only in the failure policy (`on_failure: [answer, drop]`) draw the same targets: the
    first of them in the grid decodes, the others take its draws (`mix --draws-from`) once it has finished,
    and decode the same draws themselves when it has not."""

    def without_policy(c: Cell) -> Cell:
        return replace(
            c.targets_cell, target_options=tuple(o for o in c.target_options if o[0] != "on_failure")
        )

    key = without_policy(cell)
    first = next(c for c in data.x.cells if c.method == cell.method and without_policy(c) == key)
    if first.targets_cell == cell.targets_cell:
        return None
    return str(draws_path(_targets_file(data, first)))


def _mixed_targets_stage(data: GridData, cell: Cell, config, train_file: Path, targets_file: Path) -> Stage:
    """The targets stage of a mix-built target file (MixSD, self-rewrite): the file and its summary."""
    return Stage(
        "targets",
        [targets_file, summary_path(targets_file)],
        stage_settings(config),
        inputs=[train_file, *user_files(config, ("expert_template",))],
        record=_targets_record(data, cell),
    )


def plan_rewrite_targets(data: GridData, cell: Cell) -> PlannedStage:
    """The self-rewrite baseline (SDFT): greedy, so the same for every seed."""
    train_file, targets_file = data.corpus_dir / "train.jsonl", _targets_file(data, cell)
    base = {"model": data.x.model, "input": str(train_file), "output": str(targets_file)}
    config = build_config(RewriteConfig, base, [("rewrite", data.x.sections["rewrite"])], data.x.path)
    return _mixed_targets_stage(data, cell, config, train_file, targets_file), config


def plan_edit(data: GridData, cell: Cell, targets: Stage | None) -> PlannedStage:
    """memit: an edit instead of training, written in train/ like a trained model."""
    train_file, out = data.corpus_dir / "train.jsonl", data.cell_dir(cell) / "train"
    base = {"model": data.x.model, "input": str(train_file), "out": str(out), "overwrite": True}
    config = build_config(EditConfig, base, [("memit", data.x.sections["memit"])], data.x.path)
    stage = Stage(
        "train",
        [out / "summary.json", out / "model"],
        stage_settings(config),
        inputs=[train_file, *user_files(config, ("stats",))],
        record=data.cell_dir(cell) / "stages" / "train.json",
    )
    return stage, config


@dataclass(frozen=True)
class EditCurveConfig:
    """An edit's learning curve: the edited model (`model`) scored by the grid's curve config (`curve`,
    KL against its base model) as one row at epoch 1, step 0, marked with the edit's method."""

    curve: TrainConfig
    model: str
    out: str
    edit: str = "memit"


def write_edit_curve(config: EditCurveConfig) -> None:
    row = curve_row(config.curve, config.model, epoch=1.0, step=0)
    atomic_write_jsonl(config.out, [{**row, "edit": config.edit}])


def curve_scoring(config: TrainConfig) -> tuple[dict[str, Any], list[Path]]:
    """What a curve row scored outside training (the base row, an edit's point) depends on: the settings
    (the base model, bf16 and the curve's options) and the files the curve reads."""
    settings = {
        name: getattr(config, name)
        for name in ("model", "bf16", *sorted(CURVE_FIELDS - {"eval_every_epoch"}))
    }
    files = [Path(config.eval_corpus)]
    files += [Path(p) for p in (config.eval_probes or "").split(",") if p.strip()]
    if config.eval_kl_prompts:
        files.append(Path(config.eval_kl_prompts))
    return settings, files


def plan_edit_curve(data: GridData, cell: Cell, edit: Stage, curve: TrainConfig) -> PlannedStage:
    """memit's curve (train/curve.jsonl): one point, the edited model scored by `curve`, the config of the
    base row and of every trained epoch, so the edit enters the comparisons at matched memorization."""
    out = data.cell_dir(cell) / "train"
    config = EditCurveConfig(curve, str(out / "model"), str(out / CURVE_FILE))
    settings, files = curve_scoring(curve)
    stage = Stage(
        "curve",
        out / CURVE_FILE,
        {**settings, "scored": config.model, "edit": config.edit},
        inputs=files,
        upstream=[edit, *([data.capability_stage] if data.capability_stage else [])],
        record=data.cell_dir(cell) / "stages" / "curve.json",
    )
    return stage, config


def plan_training(
    data: GridData, cell: Cell, targets: Stage | None, fields: dict[str, Any], sections: tuple[str, ...] = ()
) -> PlannedStage:
    """`mixsd train` in the cell's train/: the runner's `fields` and the `train` section (then `sections`,
    the curve's options and the cell's setting) on top of the defaults."""
    x, folder = data.x, data.cell_dir(cell)
    out = str(folder / "train")
    base = {"model": x.model, "out": out, "output_dir": out, "seed": cell.seed, **fields}
    options = [(name, x.sections[name]) for name in ("train", *sections)]
    for section, values in options:
        for key in CURVE_FIELDS & set(values):
            raise InputError(
                "the learning curve is set in the `curves` section", x.path, field=f"{section}.{key}"
            )
    curve_files: list[Path] = []
    upstream = [targets] if targets else []
    if x.curves is not None:
        runner_set, curve_section, curve_files = data.curve_sections(data.corpus_dir / "train.jsonl")
        base.update(runner_set)
        options.append(curve_section)
        if data.capability_stage is not None:
            upstream.append(data.capability_stage)
    if cell.settings:  # the cell's setting overrides the sections, alias or not (lr / learning_rate)
        options = without_options(options, {key for key, _ in cell.settings})
        options.append((f"methods.{cell.method}", dict(cell.settings)))
    config = build_config(TrainConfig, base, options, x.path)
    outputs = [folder / "train" / "summary.json", folder / "train" / "model"]
    if x.curves is not None:
        outputs.append(folder / "train" / "curve.jsonl")
    # run_settings hashes the target file: taken when the fingerprint is, after targets are made
    stage = Stage(
        "train",
        outputs,
        lambda: run_settings(config),
        inputs=[*user_files(config, ("expert_template",)), *curve_files],
        upstream=upstream,
        record=folder / "stages" / "train.json",
    )
    return stage, config


def train_on_targets(data: GridData, cell: Cell, targets: Stage | None) -> PlannedStage:
    return plan_training(data, cell, targets, {"targets": str(_targets_file(data, cell))})


def train_opsd(data: GridData, cell: Cell, targets: Stage | None) -> PlannedStage:
    fields = {"method": "opsd", "corpus": str(data.corpus_dir / "train.jsonl")}
    return plan_training(data, cell, targets, fields, sections=("opsd",))


def train_cpt(data: GridData, cell: Cell, targets: Stage | None) -> PlannedStage:
    """Continued pre-training on the passages (else the records' contexts)."""
    corpus = data.cpt_text_file(data.corpus_dir / "train.jsonl")
    return plan_training(data, cell, targets, {"method": "cpt", "corpus": str(corpus)})


@dataclass(frozen=True)
class GridMethod:
    """What a method's cell makes before it is evaluated: its targets, then its trained (or edited) model,
    and with `curves:` the curve of a model whose training scores none (given the grid's curve config)."""

    targets: Callable[[GridData, Cell], PlannedStage] | None
    training: Callable[[GridData, Cell, Stage | None], PlannedStage] | None
    curve: Callable[[GridData, Cell, Stage, TrainConfig], PlannedStage] | None = None


METHODS: dict[str, GridMethod] = {
    "base": GridMethod(targets=None, training=None),
    "sft": GridMethod(targets=plan_sft_targets, training=train_on_targets),
    "mixsd": GridMethod(targets=plan_mix_targets, training=train_on_targets),
    "rewrite": GridMethod(targets=plan_rewrite_targets, training=train_on_targets),
    "opsd": GridMethod(targets=None, training=train_opsd),
    "cpt": GridMethod(targets=None, training=train_cpt),
    "memit": GridMethod(targets=None, training=plan_edit, curve=plan_edit_curve),
}
