"""`mixsd eval --suite retention`: what did the new knowledge cost? Held-out ability on probe files and KL to
the base, for the model and its base on the same items.

Every probe is scored through its kind in the registry (`mixsd.evaluation.probe_kinds`: read, score, summarize,
retention against the base, paired comparison); KL(base || model) per token is measured on the base
model's own greedy answers to held-out prompts (`scoring.reference_answers`, as the learning curve does).
lm-evaluation-harness tasks join as further probes (`mixsd.evaluation.lmeval`). The base model's rows are cached in
`$MIXSD_CACHE/eval-base`, so a grid of tuned models pays for the base once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mixsd.core.files import atomic_write_jsonl, dumps, read_journal, sha256_text
from mixsd.core.models import cache_dir
from mixsd.evaluation.eval_config import EvalConfig
from mixsd.evaluation.eval_models import EvalModels
from mixsd.evaluation.lmeval import LmEvalPlan, evaluate_tasks
from mixsd.evaluation.probe_kinds import KL, KL_ANSWER_TAG, ProbeKind
from mixsd.evaluation.scoring import kl_on_answers, reference_answers
from mixsd.method.prompts import pad_token_id

# the probes `mixsd probes fetch` writes: a missing one is listed among the skipped
EXPECTED_PROBES = ("general_knowledge", "social_iqa", "qa_wikidata", "squad_paragraphs")


def base_cache_file(key: dict[str, Any]) -> Path:
    """Where the base model's rows for these settings are cached."""
    return cache_dir() / "eval-base" / f"{sha256_text(dumps(key))[:20]}.jsonl"


def score_probe(
    models: EvalModels, who: str, probe: str, kind: ProbeKind, items: list[dict[str, Any]]
) -> list[dict]:
    """The prediction rows of `who` (model or base) on a probe's items, scored by the probe's kind."""
    model = models.model() if who == "model" else models.base()
    bar = models.bar(len(items), f"{who} {probe}")
    with models.autocast(model):
        rows = kind.score_items(
            model,
            models.tokenizer(),
            items,
            batch_size=models.config.batch_size,
            max_tokens=models.config.ppl_max_tokens,
            progress=bar,
        )
    bar.close()
    return [{"who": who, "split": probe, **row} for row in rows]


def base_kl_answers(
    models: EvalModels, prompts: list[tuple[str, str, str | None]], max_new_tokens: int
) -> list[dict]:
    """The base model's greedy answers to the KL prompts (the tokens KL is measured on)."""
    tokenizer, base = models.tokenizer(), models.base()
    bar = models.bar(len(prompts), "base kl answers")
    with models.autocast(base):
        answers = reference_answers(
            base,
            tokenizer,
            [(prompt, system) for _, prompt, system in prompts],
            max_new_tokens=max_new_tokens,
            batch_size=models.config.batch_size,
            progress=bar,
        )
    bar.close()
    return [
        {
            "who": "base",
            "split": KL.name,
            "id": prompt_id,
            "kind": KL_ANSWER_TAG,
            "prompt_ids": prompt_ids,
            "answer_ids": answer_ids,
            "finish": finish,
            "answer": text,
        }
        for (prompt_id, _, _), (prompt_ids, answer_ids, finish, text) in zip(prompts, answers, strict=True)
    ]


def kl_to_base(models: EvalModels, answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """KL(base || model) over the tokens of each of the base's answers: one row per KL prompt."""
    model, base = models.model(), models.base()
    with models.autocast(model):
        stats = kl_on_answers(
            base,
            model,
            [(a["prompt_ids"], a["answer_ids"]) for a in answers],
            pad_id=pad_token_id(models.tokenizer()),
            batch_size=models.config.batch_size,
        )
    return [
        {
            "who": "model",
            "split": KL.name,
            "id": a["id"],
            "kind": KL.row_tag,
            "kl_sum": round(total, 6),
            "kl_max": round(peak, 6),
            "tokens": count,
            "answer": a["answer"],
        }
        for a, (total, peak, count) in zip(answers, stats, strict=True)
    ]


def run_retention(
    config: EvalConfig,
    models: EvalModels,
    probes: dict[str, tuple[ProbeKind, list[dict[str, Any]]]],
    kl_prompts: list,
    max_new_tokens: int,
    rows: dict,
    write: Callable,
    skipped: list[dict[str, str]],
    determines: dict[str, Any],
) -> dict[str, Any]:
    """Every probe on the model (and on the base, with retention and paired comparison), then KL to the
    base; rows already in `rows` (journal, base cache) are reused, new ones go through `write`."""
    has_base, same = models.has_base, models.base_is_model
    base_rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    cache_file = None
    if has_base and config.base_cache and determines["base"] and determines["base"].get("sha256"):
        key = {
            "base": determines["base"]["sha256"],
            "data": determines["data"],
            "limit": config.limit,
            "max_new_tokens": max_new_tokens,
            "bf16": config.bf16,
            "ppl_max_tokens": config.ppl_max_tokens,
            "version": 2,
        }
        cache_file = base_cache_file(key)
        if cache_file.is_file():
            base_rows = {(r["who"], r["split"], r["id"]): r for r in read_journal(cache_file)}
            rows.update(base_rows)

    def collect(
        who: str, probe: str, items: list[dict], fill: Callable[[list[dict]], list[dict]]
    ) -> list[dict]:
        todo = [it for it in items if (who, probe, it["id"]) not in rows]
        if todo:
            write(fill(todo))
        return [rows[(who, probe, it["id"])] for it in items]

    results, predictions = {}, []
    for probe, (kind, items) in sorted(probes.items()):
        model_rows = collect(
            "model", probe, items, lambda todo, p=probe, k=kind: score_probe(models, "model", p, k, todo)
        )
        predictions += model_rows
        summary = kind.summarize(model_rows)
        if has_base:
            if same:  # the base is the model itself: its scores are the model's
                fill = lambda todo, p=probe: [{**rows[("model", p, t["id"])], "who": "base"} for t in todo]  # noqa: E731
            else:
                fill = lambda todo, p=probe, k=kind: score_probe(models, "base", p, k, todo)  # noqa: E731
            base_probe_rows = collect("base", probe, items, fill)
            predictions += base_probe_rows
            summary["base"] = kind.summarize(base_probe_rows)
            summary["retention"] = kind.retention(summary, summary["base"])
            summary.update(kind.compare(model_rows, base_probe_rows))
        results[probe] = summary

    if has_base:
        items = [{"id": pid} for pid, _, _ in kl_prompts]
        answers = collect(
            "base",
            KL.name,
            items,
            lambda todo: base_kl_answers(
                models, [p for p in kl_prompts if p[0] in {t["id"] for t in todo}], max_new_tokens
            ),
        )
        by_id = {a["id"]: a for a in answers}
        kl_rows = collect(
            "model", KL.name, items, lambda todo: kl_to_base(models, [by_id[t["id"]] for t in todo])
        )
        predictions += answers + kl_rows
        results[KL.name] = KL.summarize(kl_rows)
        if cache_file is not None:
            fresh = [r for r in predictions if r["who"] == "base"]
            if len(fresh) != len(base_rows):
                atomic_write_jsonl(cache_file, fresh)
    return {
        "probes": results,
        "max_new_tokens": max_new_tokens,
        "base_cache": str(cache_file) if cache_file else None,
        "_predictions": predictions,
    }


def run_lm_eval(
    config: EvalConfig, models: EvalModels, plan: LmEvalPlan, determines: dict[str, Any]
) -> dict[str, Any]:
    """lm-eval's tasks on the model and its base (mixsd.evaluation.lmeval); the base's output cached like its probes."""
    has_base, same = models.has_base, models.base_is_model
    cache = None
    if has_base and not same and config.base_cache and (determines["base"] or {}).get("sha256"):
        key = {
            "base": determines["base"]["sha256"],
            "lm_eval": determines["lm_eval"],
            "batch_size": config.batch_size,  # padding moves the last digits of the log-likelihoods
            "bf16": config.bf16,
            "version": 1,
        }
        cache = base_cache_file(key).with_suffix(".lm-eval.json")
    return evaluate_tasks(
        plan,
        model=models.model,
        tokenizer=models.tokenizer(),
        base=models.base if has_base else None,
        base_is_model=same,
        batch_size=config.batch_size,
        autocast=models.autocast,
        base_cache=cache,
    )
