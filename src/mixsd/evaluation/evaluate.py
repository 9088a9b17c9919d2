"""`mixsd eval`: did the knowledge go in (kgfact, kgfunc, qa suites) and what did it cost (retention)?

This module is the command: what is evaluated and its hashes, the resume journal, the results file and
its printed table. The suites themselves are `mixsd.evaluation.eval_generation` (kgfact, kgfunc, qa: greedy answers
scored under every matching mode, wrong ones typed by the error taxonomy) and `mixsd.evaluation.eval_retention`
(held-out ability on probe files, each scored through its kind in `mixsd.evaluation.probe_kinds`, KL to the base on
the base model's own answers, lm-evaluation-harness tasks); the options are `mixsd.evaluation.eval_config.EvalConfig`,
the models `mixsd.evaluation.eval_models.EvalModels`.

Retention of a probe = score(model) / score(base) (perplexity: base_ppl / model_ppl, so higher is better);
multiple choice also gets the chance-normalized retention (acc - chance) / (acc_base - chance) and a paired
comparison with the base on the same items (right->wrong / wrong->right counts, exact McNemar p-value,
paired-bootstrap interval of the difference); every ratio has a paired-bootstrap 95% interval (see
metrics.py). Results for a base model are cached in `$MIXSD_CACHE/eval-base`.

Outputs: `--out results.json` (scores with 95% Wilson intervals, model and data hashes, settings, version)
and `results.predictions.jsonl` beside it (every prediction). An interrupted run resumes from
`results.predictions.jsonl.journal`. See docs/evaluation.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mixsd import __version__
from mixsd.core import models
from mixsd.core.answers import SCORING_MODES
from mixsd.core.files import (
    InputError,
    JournalWriter,
    atomic_write_json,
    atomic_write_jsonl,
    output_lock,
    read_journal,
    sha256_file,
)
from mixsd.core.models import cache_dir, fingerprint
from mixsd.core.stages import Stage
from mixsd.corpora.probes import load_kl_prompts
from mixsd.evaluation.eval_config import DEFAULT_MAX_NEW_TOKENS, EvalConfig
from mixsd.evaluation.eval_generation import run_generation, suite_files
from mixsd.evaluation.eval_models import EvalModels
from mixsd.evaluation.eval_retention import EXPECTED_PROBES, run_lm_eval, run_retention
from mixsd.evaluation.lmeval import format_task, plan_settings, prepare
from mixsd.evaluation.probe_kinds import KL, PROBE_KINDS, format_number, format_percent, load_probe


def data_hashes(folder: Path | None, files: Iterable[Path]) -> dict[str, Any]:
    manifest = folder / "manifest.json" if folder is not None and folder.is_dir() else None
    return {
        "folder": str(folder) if folder is not None else None,
        "manifest_sha256": sha256_file(manifest) if manifest is not None and manifest.is_file() else None,
        "files": {p.name: sha256_file(p) for p in sorted(set(files))},
    }


def predictions_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".predictions.jsonl")


def _journal_path(out: str | Path) -> Path:
    path = predictions_path(out)
    return path.with_name(path.name + ".journal")


def evaluate(
    config: EvalConfig, *, model=None, tokenizer=None, base_model=None, progress: bool = True
) -> dict[str, Any]:
    """Run one evaluation suite (see `_evaluate_locked`) under the lock of its results file."""
    with output_lock(config.out):  # one run per results file: a second one refuses before any work
        return _evaluate_locked(
            config, model=model, tokenizer=tokenizer, base_model=base_model, progress=progress
        )


def _evaluate_locked(
    config: EvalConfig, *, model=None, tokenizer=None, base_model=None, progress: bool = True
) -> dict[str, Any]:
    """Run one evaluation suite; write results (and predictions) and return the results dict.

    `model`/`tokenizer` (and `base_model`) may be passed already loaded; `config.model` / `config.base` then
    only label them in the results.
    """
    if config.batch_size < 1 or (config.limit is not None and config.limit < 1):
        raise InputError("--batch-size and --limit must be >= 1")
    if (model is None) != (tokenizer is None) and model is not None:
        raise ValueError("pass the tokenizer together with an in-process model")
    config.set_threads()
    started = time.perf_counter()
    max_new_tokens = config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS[config.suite]
    out = Path(config.out)
    skipped: list[dict[str, str]] = []

    # ---- what is evaluated, and its hashes -----------------------------------------------------------
    if config.suite == "retention":
        folder = Path(config.data) if config.data else cache_dir() / "probes"
        probe_files = sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
        if not folder.is_dir():
            skipped.append(
                {
                    "split": "probes",
                    "reason": f"{folder} not found (run `mixsd probes fetch`); "
                    "multiple-choice and perplexity probes skipped",
                }
            )
        for name in EXPECTED_PROBES:
            if folder.is_dir() and not (folder / f"{name}.jsonl").is_file():
                skipped.append({"split": name, "reason": f"{folder / (name + '.jsonl')} not found"})
        probes = {p.stem: load_probe(p, config.limit) for p in probe_files}
        kl_prompts, kl_sha = load_kl_prompts(config.kl_prompts, config.limit)
        if config.base is None and base_model is None:
            skipped.append(
                {"split": KL.name, "reason": "no --base: KL and retention ratios need the base model"}
            )
        hashes = data_hashes(folder if folder.is_dir() else None, probe_files)
        hashes["kl_prompts_sha256"] = kl_sha
        files: list[tuple[str, Path]] = []
    else:
        if not config.data:
            raise InputError(f"--data is required for the {config.suite} suite", field="data")
        folder = Path(config.data)
        if not folder.exists():
            raise InputError("not found", folder)
        files, skipped = suite_files(config.suite, folder)
        if config.splits:
            wanted = [name.strip() for name in config.splits.split(",") if name.strip()]
            unknown = set(wanted) - {name for name, _ in files} - {s["split"] for s in skipped}
            if unknown:
                raise InputError(
                    f"unknown split(s) {', '.join(sorted(unknown))} for suite {config.suite}", field="splits"
                )
            skipped += [
                {"split": name, "reason": "not selected (--splits)"}
                for name, _ in files
                if name not in wanted
            ]
            files = [(name, path) for name, path in files if name in wanted]
        hashes = data_hashes(folder if folder.is_dir() else folder.parent, [f for _, f in files])

    # each model named is resolved once, here: its fingerprint and its loading use the handle
    model_handle = models.try_resolve(config.model) if model is None else None
    model_fp = (
        fingerprint(config.model, model_handle)
        if model is None
        else {"name": config.model, "path": None, "sha256": None, "in_process": True}
    )
    base_handle, base_fp = None, None
    if config.base is not None:
        if base_model is None:
            same_name = config.base == config.model and model is None
            base_handle = model_handle if same_name else models.try_resolve(config.base)
        base_fp = (
            fingerprint(config.base, base_handle)
            if base_model is None
            else {"name": config.base, "path": None, "sha256": None, "in_process": True}
        )
    determines = {
        "suite": config.suite,
        "model": model_fp,
        "base": base_fp,
        "data": hashes,
        "limit": config.limit,
        "splits": config.splits,
        "max_new_tokens": max_new_tokens,
        "bf16": config.bf16,  # mirrors --dtype (float32 or bfloat16): the key results had before it
        "ppl_max_tokens": config.ppl_max_tokens,
    }
    if config.lm_eval_tasks:  # only then: the settings of results without lm-eval keep their fingerprint
        determines["lm_eval"] = plan_settings(
            config.lm_eval_tasks, config.lm_eval_include, config.lm_eval_num_fewshot, config.limit
        )
    settings = {
        **determines,
        "match": config.match,
        "taxonomy": {
            "on": config.taxonomy_on,
            "collapse_max_words": config.collapse_max_words,
            "require_marker": config.require_marker,
            "min_entity_chars": config.min_entity_chars,
            "entities": config.entities,
        },
    }

    # A model passed in-process has no content hash: its results are written but never vouched for.
    in_process = bool((model_fp or {}).get("in_process") or (base_fp or {}).get("in_process"))
    stage = Stage("eval", [out, predictions_path(out)], settings)
    if not config.overwrite and not in_process and stage.is_current():
        print(f"{out} is up to date for these settings; nothing to do (--overwrite to redo).")
        return json.loads(out.read_text(encoding="utf-8"))
    # task names and their data are checked here, before any model loads
    lm_eval_plan = (
        prepare(
            config.lm_eval_tasks,
            config.lm_eval_include,
            num_fewshot=config.lm_eval_num_fewshot,
            limit=config.limit,
        )
        if config.lm_eval_tasks
        else None
    )
    stage.begin()

    journal = _journal_path(out)
    if config.overwrite:
        journal.unlink(missing_ok=True)
    header = {"journal_of": "mixsd eval", "settings": determines}
    done_rows = read_journal(journal)
    if done_rows and done_rows[0] != header:
        raise InputError(
            "an unfinished evaluation with different settings exists; rerun with the same "
            "arguments or pass --overwrite",
            journal,
        )
    rows: dict[tuple[str, str, str], dict[str, Any]] = {
        (r["who"], r["split"], r["id"]): r for r in done_rows[1:]
    }
    loaded = EvalModels(config, model, tokenizer, base_model, progress, (model_handle, base_handle))

    with JournalWriter(journal, header=header) as writer:

        def write(new: list[dict[str, Any]]) -> None:
            writer.write(new)
            rows.update({(r["who"], r["split"], r["id"]): r for r in new})

        if config.suite != "retention":
            result = run_generation(config, loaded, files, max_new_tokens, rows, write, folder)
        else:
            result = run_retention(
                config, loaded, probes, kl_prompts, max_new_tokens, rows, write, skipped, determines
            )

    if lm_eval_plan is not None:
        lm_eval = run_lm_eval(config, loaded, lm_eval_plan, determines)
        result["_predictions"] += lm_eval.pop("_predictions")
        result.update(lm_eval)
    predictions = result.pop("_predictions")
    atomic_write_jsonl(predictions_path(out), predictions)
    results = {
        "mixsd_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": config.suite,
        "model": model_fp,
        "base": base_fp,
        "data": hashes,
        "settings": settings,
        "config": asdict(config),
        **result,
        "skipped": skipped,
        "predictions": predictions_path(out).name,
        "seconds": round(time.perf_counter() - started, 2),
    }
    atomic_write_json(out, results)
    journal.unlink(missing_ok=True)
    if not in_process:
        stage.finish()
    return results


# --------------------------------------------------------------------------------------------------
# `mixsd eval`
# --------------------------------------------------------------------------------------------------
def format_results(results: dict[str, Any]) -> str:
    lines = []
    if "splits" in results:
        lines.append(
            f"{'split':<16}{'n':>6}  {'match':<8}{'accuracy (95% CI)':<26}"
            + "".join(f"{m:<10}" for m in SCORING_MODES)
            + "errors f/l/c/g"
        )
        for name, s in results["splits"].items():
            e = s["errors"]
            others = "".join(f"{format_number(s[m]['value']):<10}" for m in SCORING_MODES)
            lines.append(
                f"{name:<16}{s['n']:>6}  {s['match']:<8}{format_percent(s['accuracy']):<26}{others}"
                f"{e['format']}/{e['leakage']}/{e['collapse']}/{e['genuine']}"
            )
    else:
        for name, p in results["probes"].items():
            lines.append(f"{name:<18}n={p['n']:<5} {PROBE_KINDS[p['kind']].format(p)}")
    lines += [format_task(name, summary) for name, summary in results.get("lm_eval", {}).items()]
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['split']}: {s['reason']}")
    lines.append(f"{results['seconds']:.1f} s")
    return "\n".join(lines)


def eval_command(config: EvalConfig) -> dict[str, Any]:
    results = evaluate(config)
    print(format_results(results))
    print(f"wrote {config.out} and {predictions_path(config.out).name}")
    return results


__all__ = ["EvalConfig", "eval_command", "evaluate", "format_results", "predictions_path"]
