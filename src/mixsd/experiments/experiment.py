"""`mixsd experiment CONFIG.yaml` and `mixsd demo`: a declared grid, run end to end and reported.

A grid is corpus x methods x seeds. The whole file is checked when it is loaded: every section is built
into its command's config, for every cell, before any work. Each cell runs its stages in order, each
writing into `OUT/cells/<cell>/` atomically. Every stage is a `mixsd.core.stages.Stage`: its output is reused
only while the settings it recorded (config, input file hashes, upstream stages, mixsd version) equal the
current ones, so an interrupted experiment resumes where it stopped, and a changed config redoes exactly
the stages it affects and everything downstream of them. The records are in `OUT/cells/<cell>/stages/`;
every decision (ran / reused, and what changed) is appended to `OUT/stage-log.jsonl`:

    targets.jsonl   ground truth (sft), `mixsd mix` (mixsd) or `mixsd rewrite` (rewrite) — not for base / opsd / cpt
    train/          `mixsd train` output; train/model is the tuned model  — not for base
                    (with `curves:`, train/curve.jsonl: the scores after every epoch; memit's edit: one
                    row, the edited model scored by the same curve config, its own stage `curve`)
    eval.json       `mixsd eval` on the corpus suite (memorization, generalization)
    retention.json  `mixsd eval --suite retention` against the base model
    nll.json        `mixsd analyze nll`: the targets' NLL under the base model
    fisher.json     `mixsd analyze fisher`: Fisher-weighted displacement from the base
    cell.json       the cell's row of the results table (written last: the cell is done)

Then `OUT/results.jsonl`, `OUT/results.csv` and the report (`OUT/report.md`, `OUT/report.html`) are
written from every cell whose stages are all current for this config. The config file format is documented in docs/experiments.md.

The grid is read by `mixsd.experiments.grid`, the shared data made by `mixsd.experiments.grid_data`, each method's targets and
training planned by `mixsd.experiments.grid_methods`; this module plans and runs each cell's stages, then writes the
table and the report.

A method entry may sweep `mixsd train` options (`sft: {lr: [3e-5, 1e-4]}`): each setting is its own cell
and group; the settings of one method, λ and seed share their targets. The `select` section's rule
(`mixsd.experiments.tuning.SelectionRule`) picks each method's setting in the report, from the learning curves.
"""

from __future__ import annotations

import json
import platform
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from tqdm.auto import tqdm

from mixsd import __version__
from mixsd.core.files import (
    InputError,
    LockHeld,
    atomic_write_json,
    atomic_write_text,
    live_lock_holder,
    output_lock,
    read_yaml,
    require_input_file,
)
from mixsd.core.stage_settings import stage_settings, user_files
from mixsd.core.stages import Stage
from mixsd.editing.edit import EditConfig, edit
from mixsd.evaluation.analyze import FisherConfig, NLLConfig, fisher_displacement, target_nll
from mixsd.evaluation.eval_config import EvalConfig
from mixsd.evaluation.evaluate import evaluate
from mixsd.evaluation.lmeval import include_files
from mixsd.experiments.grid import (  # noqa: F401 - Cell and Experiment are imported from here by users
    RETENTION_EXTRA,
    Cell,
    Experiment,
    as_written,
    build_config,
    parse_grid,
)
from mixsd.experiments.grid_data import GridData
from mixsd.experiments.grid_methods import (
    METHODS,
    EditCurveConfig,
    SFTTargetsConfig,
    curve_scoring,
    write_edit_curve,
    write_sft_targets,
)
from mixsd.experiments.report import write_report
from mixsd.experiments.report_data import write_report_data
from mixsd.experiments.results import (  # noqa: F401 - cell_row and aggregate are imported from here by users
    MAIN_COLUMNS,
    add_relative_scores,
    aggregate,
    cell_row,
    comparison_text,
    write_table,
)
from mixsd.method.mix_config import MixConfig
from mixsd.method.rewrite import RewriteConfig, rewrite
from mixsd.method.targets import mix, summary_path
from mixsd.training.curve import CURVE_FILE, read_curve, write_curve_base
from mixsd.training.train import TrainConfig, train

# Bumped when the way a row is built from the cell's files changes, so rows (cheap: no model) are rebuilt
# while every stage they read from stays current. 2: retention headline only on probes whose base model is
# well above chance (metrics.well_above_chance).
ROW_VERSION = "row2"

DEMO_FACTS = Path(str(resources.files("mixsd") / "data" / "facts-demo.jsonl"))
PACKAGED_CONFIGS = Path(str(resources.files("mixsd") / "configs"))


def _discarding(command: Callable[[Any], Any]) -> Callable[[Any, bool], Any]:
    """A command whose config says whether to discard what an earlier, other run left (`overwrite`)."""
    return lambda config, discard: command(replace(config, overwrite=discard))


def _train_keeping_only_the_model(config: TrainConfig, discard: bool) -> None:
    """`mixsd train`, then its checkpoints removed: a cell's later stages read only train/model, and a
    checkpoint (`train: {save_every: 0, keep_checkpoints: 1}`) exists only so that a killed training
    resumes from its last epoch; kept, it would cost three times the model's size in every cell."""
    train(replace(config, overwrite=discard))
    for checkpoint in Path(config.out).glob("checkpoint-*"):
        shutil.rmtree(checkpoint)


def _whole(command: Callable[[Any], Any]) -> Callable[[Any, bool], Any]:
    """A command that always makes its outputs whole (nothing of an earlier run is resumed)."""
    return lambda config, discard: command(config)


# The command that makes a stage's outputs, by its config's class.
COMMANDS: dict[type, Callable[[Any, bool], Any]] = {
    SFTTargetsConfig: _whole(write_sft_targets),
    MixConfig: _discarding(mix),
    RewriteConfig: _discarding(rewrite),
    TrainConfig: _train_keeping_only_the_model,
    EditConfig: _whole(edit),  # the runner sets overwrite: an edit is always made whole
    EditCurveConfig: _whole(write_edit_curve),
    EvalConfig: _discarding(evaluate),
    NLLConfig: _whole(target_nll),
    FisherConfig: _whole(fisher_displacement),
}


def _producer(config: Any) -> Callable[[bool], Any]:
    command = COMMANDS[type(config)]
    return lambda discard: command(config, discard)


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


def load_experiment(path: str | Path, out: str | None = None) -> Experiment:
    """The experiment file, read strictly (a duplicated key is refused) and checked whole: every config of
    every cell is built now, so a bad value fails at load, before any work is done. Every error names the
    file, the line and the key as the file writes it."""
    document = read_yaml(require_input_file(path, "experiment file not found"))
    try:
        experiment = parse_grid(document.path, document.data, out)
        runner = Runner(experiment)
        runner.corpus_config()
        for cell in experiment.cells:
            runner.plan(cell)
        return experiment
    except InputError as err:
        raise as_written(err, document) from None


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------
StagePlan = dict[str, tuple[Stage, Callable[[bool], Any]]]


class Runner(GridData):
    """The grid's shared data (GridData) and each cell's stages: planned, run, and read back as its row."""

    def __init__(self, experiment: Experiment):
        super().__init__(experiment)
        self.train_configs: dict[str, TrainConfig] = {}  # cell name -> its TrainConfig, as planned

    # one cell: its stages, each with what it reads, what it depends on and how it is made
    def plan(self, cell: Cell) -> StagePlan:
        """The cell's stages in run order, each with its producer. Building it checks every config."""
        x, folder = self.x, self.cell_dir(cell)
        records = folder / "stages"
        data_files = [*sorted(self.corpus_dir.glob("*.jsonl")), self.corpus_dir / "manifest.json"]
        targets_file = self.cell_dir(cell.targets_cell) / "targets.jsonl"
        method = METHODS[cell.method]
        plan: StagePlan = {}
        targets: Stage | None = None
        if method.targets is not None:
            targets, config = method.targets(self, cell)
            plan["targets"] = (targets, _producer(config))
        model = x.model
        trained: list[Stage] = []
        if method.training is not None:
            stage, config = method.training(self, cell, targets)
            if isinstance(config, TrainConfig):
                self.train_configs[cell.name] = config
            plan["train"] = (stage, _producer(config))
            model = str(folder / "train" / "model")
            trained = [stage]
            if method.curve is not None and x.curves is not None:  # an edit's curve: its one point
                curve, curve_config = method.curve(self, cell, stage, self.curve_config())
                plan["curve"] = (curve, _producer(curve_config))

        suite = {"kgfunc": "kgfunc", "folder": "qa"}.get(x.corpus.get("generator", "kgfact"), "kgfact")
        eval_base = {
            "model": model,
            "suite": suite,
            "data": str(self.corpus_dir),
            "out": str(folder / "eval.json"),
        }
        eval_config = build_config(EvalConfig, eval_base, [("eval", x.sections["eval"])], x.path)
        plan["eval"] = (
            Stage(
                "eval",
                folder / "eval.json",
                stage_settings(eval_config),
                inputs=[*data_files, *user_files(eval_config, ("entities", "kl_prompts"))],
                upstream=trained,
                record=records / "eval.json",
            ),
            _producer(eval_config),
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
        retention_config = build_config(EvalConfig, retention_base, [("retention", options)], x.path)
        probe_files = [*sorted(probes.glob("*.jsonl")), probes / "manifest.json"] if probes else []
        plan["retention"] = (
            Stage(
                "retention",
                folder / "retention.json",
                stage_settings(retention_config),
                inputs=[
                    *probe_files,
                    *user_files(retention_config, ("entities", "kl_prompts")),
                    *include_files(retention_config.lm_eval_include),  # lm-eval task files, when used
                ],
                upstream=trained,
                record=records / "retention.json",
            ),
            _producer(retention_config),
        )

        analyses = x.analyses
        if targets is not None and analyses.nll:
            nll_config = build_config(
                NLLConfig,
                {"model": x.model, "targets": str(targets_file), "out": str(folder / "nll.json")},
                [],
                x.path,
            )
            plan["nll"] = (
                Stage(
                    "nll",
                    folder / "nll.json",
                    stage_settings(nll_config),
                    inputs=[targets_file],
                    upstream=[targets],
                    record=records / "nll.json",
                ),
                _producer(nll_config),
            )
        if trained and analyses.fisher:
            probe = Path(analyses.fisher_probe or self._fisher_probe())
            fisher_base = {
                "base": x.model,
                "model": model,
                "probe": str(probe),
                "samples": analyses.fisher_samples,
                "out": str(folder / "fisher.json"),
            }
            fisher_config = build_config(FisherConfig, fisher_base, [], x.path)
            plan["fisher"] = (
                Stage(
                    "fisher",
                    folder / "fisher.json",
                    stage_settings(fisher_config),
                    inputs=[probe],
                    upstream=trained,
                    record=records / "fisher.json",
                ),
                _producer(fisher_config),
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

    def curve_config(self) -> TrainConfig:
        """The config every curve row is scored with: the first cell trained by `mixsd train` (its epochs),
        for the base row and an edit's point alike."""
        trained = [c for c in self.x.cells if METHODS[c.method].training and not METHODS[c.method].curve]
        if not trained:
            raise InputError(
                "needs a cell trained by `mixsd train`: every curve row is scored as its epochs are",
                self.x.path,
                field="curves",
            )
        if trained[0].name not in self.train_configs:
            self.plan(trained[0])
        return self.train_configs[trained[0].name]

    def curve_base_stage(self) -> tuple[Stage, Callable[[bool], Any]] | None:
        """OUT/curve-base.json: the curve's scores of the base model, epoch 0 of every trained (or edited)
        cell's curve, scored with `curve_config`; None without curves or such cells."""
        if self.x.curves is None or all(cell.method == "base" for cell in self.x.cells):
            return None
        config = self.curve_config()
        path = self.out / "curve-base.json"
        settings, files = curve_scoring(config)
        stage = Stage(
            "curve-base",
            path,
            settings,
            inputs=files,
            upstream=[self.capability_stage] if self.capability_stage else [],
            record=self.out / "stages" / "curve-base.json",
        )
        return stage, lambda discard: write_curve_base(config, path)

    def curve_base_row(self) -> dict[str, Any] | None:
        """The base model's curve row when current for this config; None otherwise."""
        planned = self.curve_base_stage()
        if planned is None or not planned[0].is_current():
            return None
        return json.loads((self.out / "curve-base.json").read_text(encoding="utf-8"))

    def _write_row(self, cell: Cell, plan: StagePlan) -> None:
        """The cell's row of the results table, from the stage files just checked to be current."""
        folder = self.cell_dir(cell)

        def read(path: Path) -> dict[str, Any]:
            return json.loads(path.read_text(encoding="utf-8"))

        results = {"eval": read(folder / "eval.json"), "retention": read(folder / "retention.json")}
        analyses = {name: read(folder / f"{name}.json") for name in ("nll", "fisher") if name in plan}
        train_summary = read(folder / "train" / "summary.json") if "train" in plan else None
        mix_summary = None
        summary = summary_path(self.cell_dir(cell.targets_cell) / "targets.jsonl")
        if "targets" in plan and summary in plan["targets"][0].outputs:  # mixsd's and rewrite's targets
            mix_summary = read(summary)
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
    each cell runs under its own lock, and a worker skips the cells another one holds. After each cell
    the table (results.jsonl, results.csv) is rewritten with every finished cell, so a worker killed later
    leaves it up to date; whichever worker finishes last writes the report with every finished cell.
    """
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
                with output_lock(experiment.out, wait=True):  # a worker killed later leaves a table
                    write_table(experiment.out, _current_rows(experiment, runner, quiet=True))
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


def _current_rows(experiment: Experiment, runner: Runner, quiet: bool = False) -> list[dict[str, Any]]:
    """The rows of the cells whose every stage is current for this config, with their relative scores."""
    # Only rows whose every stage is current for this config: a cell not rerun (--only, --report-only)
    # after its settings changed is left out, never shown with old numbers.
    rows, out_of_date = [], []
    for cell in experiment.cells:
        row = runner.current_row(cell)
        if row is not None:
            rows.append(row)
        elif (runner.cell_dir(cell) / "cell.json").is_file():
            out_of_date.append(cell.name)
    if out_of_date and not quiet:
        print(
            f"left out of the table, out of date for this config (rerun them): {', '.join(out_of_date)}",
            file=sys.stderr,
        )
    add_relative_scores(rows)
    return rows


def _write_results(experiment: Experiment, runner: Runner) -> dict[str, Any]:
    """The table and report from the cells whose every stage is current for this config."""
    rows = _current_rows(experiment, runner)
    write_table(experiment.out, rows)
    meta = run_metadata(experiment)
    # the learning curves of the current trained cells (current rows: their train stage is current)
    curves = {
        row["cell"]: read_curve(experiment.out / "cells" / row["cell"] / "train" / CURVE_FILE)
        for row in rows
        if row["method"] != "base"
    }
    # the results side computes what the report shows (JSON beside results.jsonl); the report draws it
    write_report_data(
        experiment.out,
        rows,
        curves={name: curve for name, curve in curves.items() if curve},
        curve_base=runner.curve_base_row(),
        rule=experiment.select,
    )
    report = write_report(experiment.out, rows, meta)
    return {"rows": rows, "report": report, "meta": meta}


def run_metadata(experiment: Experiment) -> dict[str, Any]:
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
