"""lm-evaluation-harness tasks as retention probes of `mixsd eval`, and their place in the results table.

    mixsd eval --suite retention --model M --base B --lm-eval-tasks T1,T2 [--lm-eval-include DIR] --out r.json

`mixsd eval --lm-eval-tasks` runs `lm_eval.simple_evaluate` in-process on the model and on its base with
identical settings (the tasks' own few-shot counts and prompts unless overridden) and joins lm-eval's
scores to the retention results: per task the reported metrics of both, their ratio, for multiple-choice
tasks the chance-normalized retention (as mixsd's own probes), and the per-item right->wrong /
wrong->right counts from lm-eval's logged samples. lm-eval is an optional dependency
(`pip install 'mixsd[lm-eval]'`); `lm_eval` is imported only inside the functions that need it.

The other direction, mixsd's probes as lm-eval tasks (`mixsd probes export-lm-eval`), is
`mixsd.evaluation.lmeval_export`; its names are importable from here too, as the README documents them.
"""

from __future__ import annotations

import copy
import difflib
import importlib.metadata
import json
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, atomic_write_json, sha256_file
from mixsd.core.metrics import chance_normalized, paired_comparison, well_above_chance

# re-exported: the README, the tests and the command table name them here
from mixsd.evaluation.lmeval_export import (
    EXPORT_METRIC,
    LmEvalExportConfig,
    export_command,
    export_lm_eval,
)
from mixsd.evaluation.lmeval_format import mc_context
from mixsd.evaluation.probe_kinds import LM_EVAL

# The headline of a task that does not name one (`metadata.mixsd_metric`): the first it reports of these.
HEADLINE_ORDER = ("acc_norm", "acc", "exact_match")
_INSTALL_HINT = "lm-eval is not installed: pip install 'mixsd[lm-eval]' (or `pip install lm-eval`)"


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401  # lm-eval is optional: its absence is an install hint, not a crash
    except ModuleNotFoundError:
        raise InputError(_INSTALL_HINT) from None


def lm_eval_version() -> str | None:
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# `mixsd eval --lm-eval-tasks`: which tasks, checked before any model loads
# --------------------------------------------------------------------------------------------------
@dataclass
class LmEvalPlan:
    """The requested tasks, resolved: each requested name and the leaf tasks it runs."""

    names: list[str]
    include: str | None
    num_fewshot: int | None
    limit: int | None
    leaves: dict[str, list[str]]
    headline: dict[str, str | None]  # leaf task -> metric it names (`metadata.mixsd_metric`), if any
    task_manager: Any = field(repr=False)


def plan_settings(
    tasks: str, include: str | None, num_fewshot: int | None, limit: int | None
) -> dict[str, Any]:
    """What determines lm-eval's numbers (the task names, the include folder's files, few-shot, limit and
    the harness's version), without loading the harness: a rerun with equal settings does nothing."""
    files = None
    if include and Path(include).is_dir():
        folder = Path(include)
        files = {str(p.relative_to(folder)): sha256_file(p) for p in include_files(include)}
    return {
        "tasks": parse_tasks(tasks),
        "include": files,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "lm_eval": lm_eval_version(),
    }


def include_files(include: str | None) -> list[Path]:
    """The files of an --lm-eval-include folder (task YAMLs and their data): an experiment's retention
    stage hashes them, so that a changed task or data file redoes it."""
    if not include or not Path(include).is_dir():
        return []
    return sorted(p for p in Path(include).rglob("*") if p.is_file())


def parse_tasks(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError("expected comma-separated lm-eval task names", field="lm_eval_tasks")
    if len(set(names)) != len(names):
        raise InputError("a task is named twice", field="lm_eval_tasks")
    return names


# Task indexes of this process, by include folder (and the state of its YAMLs): indexing the harness's
# ~15,000 built-in tasks takes half a minute, and an experiment evaluates many cells in one process.
_MANAGERS: dict[tuple, Any] = {}


def _index(include: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager  # lm-eval is optional (mixsd[lm-eval]): loaded only with tasks

    state = None
    if include:
        folder = Path(include).resolve()
        state = (str(folder), tuple(sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*.yaml"))))
    key = (defaults, state)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=include, include_defaults=defaults)
    return _MANAGERS[key]


def _task_manager(names: list[str], include: str | None):
    """lm-eval's task index; only the include folder's when it holds every name."""
    if include:
        local = _index(include, defaults=False)
        if all(name in local.all_tasks for name in names):
            return local
    return _index(include, defaults=True)


def _last_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.splitlines()[-1].split())


def prepare(
    tasks: str, include: str | None, *, num_fewshot: int | None = None, limit: int | None = None
) -> LmEvalPlan:
    """Check the task names and load each task's data (InputError naming the task otherwise)."""
    names = parse_tasks(tasks)
    if include is not None and not Path(include).is_dir():
        raise InputError("not a folder of lm-eval task YAMLs", include)
    _require_lm_eval()
    _quiet_lm_eval()
    manager = _task_manager(names, include)
    known = set(manager.all_tasks)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" (nor in {include})" if include else " (pass --lm-eval-include DIR for your own tasks)"
            raise InputError(f"unknown lm-eval task '{name}'{where}{hint}", field="lm_eval_tasks")
    leaves: dict[str, list[str]] = {}
    headline: dict[str, str | None] = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except Exception as err:  # the harness raises whatever its loader does (datasets, a missing package)
            raise InputError(
                f"lm-eval task '{name}': could not load its data ({_last_line(err)}); offline only tasks "
                "whose data is local can run (an --lm-eval-include folder, e.g. from `mixsd probes "
                "export-lm-eval`, or the Hugging Face datasets cache)",
                field="lm_eval_tasks",
            ) from None
        unsafe = sorted(leaf for leaf, task in loaded["tasks"].items() if getattr(task, "UNSAFE_CODE", False))
        if unsafe:  # lm-eval would refuse them only after the model ran; mixsd never executes model output
            raise InputError(
                f"lm-eval task '{name}' executes the model's generated code ({', '.join(unsafe[:3])}); "
                "mixsd does not run such tasks: run them with lm_eval --confirm_run_unsafe_code yourself",
                field="lm_eval_tasks",
            )
        leaves[name] = sorted(loaded["tasks"])
        for leaf, task in loaded["tasks"].items():
            metadata = getattr(task.config, "metadata", None) or {}
            headline[leaf] = metadata.get("mixsd_metric") if isinstance(metadata, dict) else None
    return LmEvalPlan(names, include, num_fewshot, limit, leaves, headline, manager)


def _quiet_lm_eval() -> None:
    # the harness logs every task's settings at INFO/WARNING; mixsd prints its own summary
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# --------------------------------------------------------------------------------------------------
# Running the harness and reading its output
# --------------------------------------------------------------------------------------------------
def run(plan: LmEvalPlan, model, tokenizer, *, batch_size: int) -> dict[str, Any]:
    """lm-eval on one in-memory model: the reported results and, per leaf task, its per-item samples."""
    # lm-eval is optional (mixsd[lm-eval]) and slow to import: loaded only when tasks run
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    _quiet_lm_eval()
    # a fixed batch size: "auto" has run out of memory when cached across calls (method notes §9)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(plan.names),
        task_manager=plan.task_manager,
        num_fewshot=plan.num_fewshot,
        limit=plan.limit,
        log_samples=True,
    )
    return {
        "results": output["results"],
        "n-shot": output.get("n-shot", {}),
        "versions": output.get("versions", {}),
        "samples": {task: [compact_sample(s) for s in rows] for task, rows in output["samples"].items()},
    }


def compact_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One logged sample without its document: doc id, filter, per-item metric values and, for
    log-likelihood requests, the log-likelihood of each choice."""
    row: dict[str, Any] = {"doc_id": sample["doc_id"], "filter": sample.get("filter", "none")}
    for metric in sample.get("metrics", []):
        value = sample.get(metric)
        if isinstance(value, bool | int | float):
            row[metric] = float(value)
    responses = sample.get("filtered_resps")
    if (
        isinstance(responses, list)
        and responses
        and all(isinstance(r, list | tuple) and len(r) == 2 and isinstance(r[0], float) for r in responses)
    ):
        row["loglik"] = [float(r[0]) for r in responses]
    return row


def _metric_names(result: dict[str, Any]) -> list[str]:
    """`acc,none`, `exact_match,strict-match`, ... : the reported metrics, without their stderr."""
    return [
        key
        for key, value in result.items()
        if "," in key
        and "_stderr," not in key
        and isinstance(value, int | float)
        and not isinstance(value, bool)
    ]


def headline_metric(result: dict[str, Any], named: str | None) -> str | None:
    metrics = _metric_names(result)
    for wanted in ([named] if named else []) + list(HEADLINE_ORDER):
        match = [m for m in metrics if m.split(",", 1)[0] == wanted]
        if match:
            return match[0]
    return metrics[0] if metrics else None


def _item_values(output: dict[str, Any], leaves: list[str], metric: str) -> dict[tuple[str, int], float]:
    name, _, filter_key = metric.partition(",")
    values = {}
    for leaf in leaves:
        for sample in output["samples"].get(leaf, []):
            if sample["filter"] == filter_key and name in sample:
                values[(leaf, sample["doc_id"])] = sample[name]
    return values


def summarize_task(
    plan: LmEvalPlan, task: str, model_out: dict[str, Any], base_out: dict[str, Any] | None
) -> dict[str, Any]:
    """One requested task (or group): every reported metric of model and base with their ratio, the
    headline metric, and for binary per-item metrics the paired comparison from the logged samples."""
    leaves = plan.leaves.get(task, [task])
    result = model_out["results"].get(task, {})
    base_result = (base_out or {}).get("results", {}).get(task, {})
    named = {plan.headline.get(leaf) for leaf in leaves} - {None}
    metric = headline_metric(result, named.pop() if len(named) == 1 else None)
    summary: dict[str, Any] = {
        "kind": LM_EVAL,
        "leaves": leaves,
        "n": sum(len({s["doc_id"] for s in model_out["samples"].get(leaf, [])}) for leaf in leaves),
        "n_shot": {leaf: model_out["n-shot"].get(leaf) for leaf in leaves},
        "metric": metric,
        "metrics": {},
    }
    for name in _metric_names(result):
        value, base_value = result[name], base_result.get(name)
        entry = {"value": value, "stderr": _stderr(result, name)}
        if base_out is not None:
            entry["base"] = base_value
            entry["base_stderr"] = _stderr(base_result, name)
            entry["retention"] = (
                value / base_value if isinstance(base_value, int | float) and base_value else None
            )
        summary["metrics"][name] = entry
    # chance of the multiple-choice items (every logged sample with one log-likelihood per choice)
    choices = [
        len(s["loglik"]) for leaf in leaves for s in model_out["samples"].get(leaf, []) if s.get("loglik")
    ]
    summary["chance"] = (
        sum(1 / n for n in choices) / len(choices) if choices and len(choices) == summary["n"] else None
    )
    if base_out is None or metric is None:
        return summary
    model_items = _item_values(model_out, leaves, metric)
    base_items = _item_values(base_out, leaves, metric)
    keys = [k for k in model_items if k in base_items]
    binary = all(v in (0.0, 1.0) for k in keys for v in (model_items[k], base_items[k]))
    if keys and binary:
        summary["paired"] = paired_comparison(
            [base_items[k] == 1.0 for k in keys], [model_items[k] == 1.0 for k in keys]
        )
    headline = summary["metrics"][metric]
    summary["retention_raw"] = headline.get("retention")
    summary["retention"] = headline.get("retention")
    if summary["chance"] is not None and keys and binary:
        correct = sum(base_items[k] == 1.0 for k in keys)
        summary["base_above_chance"] = well_above_chance(correct, len(keys), summary["chance"])
        # as mixsd's own probes: the share of the base's above-chance skill kept; none when at chance
        summary["retention"] = (
            chance_normalized(headline["value"], headline["base"], summary["chance"])
            if summary["base_above_chance"]
            else None
        )
    return summary


def _stderr(result: dict[str, Any], metric: str) -> float | None:
    name, _, filter_key = metric.partition(",")
    value = result.get(f"{name}_stderr,{filter_key}")
    return value if isinstance(value, int | float) else None


def report_names(plan: LmEvalPlan, model_out: dict[str, Any]) -> list[str]:
    """The names results are reported under: each requested task or group, or a tag's tasks one by one
    (a tag has no aggregate of its own)."""
    names = []
    for name in plan.names:
        if name in model_out["results"]:
            names.append(name)
        else:
            names += [leaf for leaf in plan.leaves[name] if leaf in model_out["results"]]
    return names


def evaluate_tasks(
    plan: LmEvalPlan,
    *,
    model: Callable[[], Any],
    tokenizer: Any,
    base: Callable[[], Any] | None,
    base_is_model: bool,
    batch_size: int,
    autocast: Callable[[Any], AbstractContextManager],
    base_cache: Path | None = None,
) -> dict[str, Any]:
    """lm-eval on the model and (when `base` is given) its base with identical settings.

    Returns `lm_eval` (per reported task: `summarize_task`), `lm_eval_base_cache` and `_predictions`
    (every logged sample of both). The base's output is stored in `base_cache` when given and read
    back on the next call, so a grid of tuned models pays for the base once.
    """

    def run_on(loaded: Any) -> dict[str, Any]:
        with autocast(loaded):
            # a copy: the harness sets a missing pad token on the tokenizer it is given
            return run(plan, loaded, copy.deepcopy(tokenizer), batch_size=batch_size)

    model_out = run_on(model())
    base_out = None
    if base is not None:
        if base_is_model:
            base_out = model_out
        elif base_cache is not None and base_cache.is_file():
            base_out = json.loads(base_cache.read_text(encoding="utf-8"))
        else:
            base_out = run_on(base())
            if base_cache is not None:
                atomic_write_json(base_cache, base_out)
    summaries = {
        name: summarize_task(plan, name, model_out, base_out) for name in report_names(plan, model_out)
    }
    rows = prediction_rows("model", model_out) + (prediction_rows("base", base_out) if base_out else [])
    return {
        "lm_eval": summaries,
        "lm_eval_versions": model_out.get("versions", {}),
        "lm_eval_base_cache": str(base_cache) if base_cache is not None else None,
        "_predictions": rows,
    }


def prediction_rows(who: str, output: dict[str, Any]) -> list[dict[str, Any]]:
    """Every logged sample as a row of the predictions file (`split` = "lm_eval:" + leaf task)."""
    rows = []
    for leaf, samples in sorted(output["samples"].items()):
        for sample in samples:
            rows.append(
                {
                    "who": who,
                    "split": f"lm_eval:{leaf}",
                    "id": f"{sample['doc_id']}"
                    + ("" if sample["filter"] == "none" else f":{sample['filter']}"),
                    "kind": LM_EVAL,
                    **sample,
                }
            )
    return rows


def format_task(name: str, summary: dict[str, Any]) -> str:
    """One line of `mixsd eval`'s printed summary."""
    metric = summary.get("metric")
    if metric is None:
        return f"lm_eval:{name:<12} no metric reported"
    entry = summary["metrics"][metric]
    text = f"lm_eval:{name:<12} n={summary['n']:<5} {metric} {entry['value']:.3f}"
    if "base" in entry and entry["base"] is not None:
        text += f"  | base {entry['base']:.3f}  retention {_fmt(summary.get('retention'))}"
        text += f" (raw {_fmt(summary.get('retention_raw'))})"
        paired = summary.get("paired")
        if paired:
            text += f"  right->wrong {paired['right_to_wrong']} wrong->right {paired['wrong_to_right']}"
    return text


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


# --------------------------------------------------------------------------------------------------
# The results table
# --------------------------------------------------------------------------------------------------
def lm_eval_columns(task: str, summary: dict[str, Any]) -> dict[str, Any]:
    """A task's columns in the results table: `lm_eval_{task}_{metric}` (model) and `_base`, `_retention`
    (chance-normalized for multiple choice, None when the base is at chance; else model / base) with
    `_retention_raw`, and the per-item `_right_to_wrong`, `_wrong_to_right`, `_mcnemar_p`."""
    prefix = f"lm_eval_{task}"
    metric = summary.get("metric")
    entry = (summary.get("metrics") or {}).get(metric) or {}
    paired = summary.get("paired") or {}
    columns: dict[str, Any] = {
        f"{prefix}_metric": metric,
        f"{prefix}_{(metric or 'score').split(',')[0]}": entry.get("value"),
        f"{prefix}_base": entry.get("base"),
        f"{prefix}_retention": summary.get("retention"),
        f"{prefix}_retention_raw": summary.get("retention_raw"),
    }
    for key in ("right_to_wrong", "wrong_to_right", "mcnemar_p"):
        columns[f"{prefix}_{key}"] = paired.get(key)
    return columns


def item_outcomes(summaries: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per reported task, from a predictions file's rows of the model: item -> right under the task's
    headline metric (binary metrics only), keyed "lm_eval:TASK (METRIC)" for the report's paired
    comparisons between cells."""
    outcomes: dict[str, dict[str, bool]] = {}
    for task, summary in summaries.items():
        metric = summary.get("metric")
        if not metric:
            continue
        name, _, filter_key = metric.partition(",")
        leaves = set(summary.get("leaves") or [task])
        items = {
            f"{row['split']}:{row['doc_id']}": row[name] == 1.0
            for row in rows
            if row.get("who") == "model"
            and row.get("kind") == LM_EVAL
            and row["split"].removeprefix("lm_eval:") in leaves
            and row.get("filter") == filter_key
            and row.get(name) in (0.0, 1.0)
        }
        if items:
            outcomes[f"lm_eval:{task} ({name})"] = items
    return outcomes


def table_tasks(rows: list[dict[str, Any]]) -> list[str]:
    """The lm-eval tasks that have columns in a results table, in order of first appearance."""
    tasks: list[str] = []
    for row in rows:
        for key in row:
            if key.startswith("lm_eval_") and key.endswith("_metric"):
                task = key[len("lm_eval_") : -len("_metric")]
                if task not in tasks:
                    tasks.append(task)
    return tasks


__all__ = [
    "EXPORT_METRIC",
    "LmEvalExportConfig",
    "LmEvalPlan",
    "export_command",
    "export_lm_eval",
    "lm_eval_columns",
    "mc_context",
    "prepare",
    "run",
    "summarize_task",
]
