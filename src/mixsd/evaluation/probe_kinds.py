"""The probe kinds of the retention suite, registered once: how each is read, scored, summed up and compared.

    kind             file items                                 scored by
    multiple_choice  {"id", "query", "choices", "gold"}         log-likelihood of each choice (scoring.py)
    perplexity       {"id", "text"}                             token perplexity (scoring.py)
    generative       {"id", "prompt", "check" | "constraint"}   greedy answers, checked (capability.py)
    kl               no file: the KL prompt list                KL(base || model) on the base's answers

Each kind registers, in `PROBE_KINDS` below: its one name (the `kind` of its summary in results.json), the
tag of its prediction rows (`kind` in predictions.jsonl, journals and base caches, spelled as they always
were so that files written before stay readable: "mc", "text", "gen", "kl"), and its functions: parse an
item, score items, summarize rows, retention ratios and paired comparison against the base, the learning
curve's columns (KL's on the base's answers to the KL prompts), the line of `mixsd eval`'s table, for
`mixsd analyze fisher` the labelled sequences, the lm-eval task a file is exported as
(`mixsd.evaluation.lmeval_format`), the results table's columns (`mixsd.experiments.results`), a row's outcome where cells are
compared item by item (`mixsd.experiments.comparisons`) and its part of forgetting.json's erased knowledge
(`mixsd.evaluation.forgetting`).
`mixsd eval`, the learning curve (`mixsd.training.curve`), `mixsd analyze`, the lm-eval export and the results side
dispatch through here; no other module spells or compares kind names. lm-eval tasks are not probe files (lmeval.py scores them); only
the tag of their summaries and rows, `LM_EVAL`, is named here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixsd.core.files import InputError, read_jsonl
from mixsd.core.metrics import probe_columns
from mixsd.corpora.probes import spread
from mixsd.evaluation.capability import (
    compare_generative,
    format_generative,
    generative_rows,
    parse_generative_item,
    summarize_generative,
)
from mixsd.evaluation.lmeval_format import MULTIPLE_CHOICE_TASK, TEXT_TASK, LmEvalFormat
from mixsd.evaluation.scoring import (
    choice_tokens,
    compare_multiple_choice,
    compare_perplexity,
    retention_accuracy,
    retention_multiple_choice,
    retention_perplexity,
    score_multiple_choice,
    score_perplexity,
    summarize_kl,
    summarize_multiple_choice,
    summarize_perplexity,
)

Rows = list[dict[str, Any]]
Sequences = list[tuple[list[int], int]]  # (token ids, index of the first labelled token)

LM_EVAL = "lm_eval"  # the kind of lm-eval task summaries and rows (mixsd.evaluation.lmeval)
KL_ANSWER_TAG = "kl_answer"  # the base model's answers to the KL prompts, journaled beside the KL rows


@dataclass(frozen=True)
class ErasedKnowledge:
    """A kind's part of forgetting.json's `erased_knowledge` (`mixsd.evaluation.forgetting`): the section it fills,
    that section before any probe, and the section with one probe's summary added."""

    section: str
    empty: Callable[[], Any]
    add: Callable[[Any, str, dict[str, Any]], Any]  # (section, probe, summary) -> section


@dataclass(frozen=True)
class ProbeKind:
    """One kind of probe and everything that depends on it."""

    name: str  # the `kind` of its summaries (results.json); the name code uses
    row_tag: str  # the `kind` of its prediction rows (predictions.jsonl, journals, base caches)
    looks_like: (
        Callable[[dict[str, Any]], bool] | None
    )  # is a file record an item of this kind? (no file: None)
    parse: Callable[[dict[str, Any], os.PathLike | str, int, str], dict[str, Any]] | None
    score: Callable[..., Rows] | None  # (model, tokenizer, items, *, batch_size, max_tokens, progress)
    summarize_rows: Callable[[Rows], dict[str, Any]]
    retention: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
    compare: Callable[[Rows, Rows], dict[str, Any]]
    format: Callable[[dict[str, Any]], str]
    # the learning curve's columns of a probe named `name` and its per-item bits (None: not on the curve)
    curve: Callable[[str, Rows], tuple[dict[str, Any], dict[str, str]]] | None = None
    # `mixsd analyze fisher`: the word fisher.json records for such a file, and its labelled sequences
    fisher_label: str | None = None
    fisher_sequences: Callable[[Any, list[dict[str, Any]]], Sequences] | None = None
    # `mixsd probes export-lm-eval`: the lm-eval task such a file becomes (None: not exported)
    lm_eval: LmEvalFormat | None = None
    # `mixsd.experiments.results`: the results table's columns of probe `probe` under its chosen metric
    table_columns: Callable[[str, dict[str, Any], str], dict[str, Any]] = probe_columns
    # `mixsd.experiments.comparisons`: a model row's outcome under the probe's metric (None: not compared item by item)
    item_outcome: Callable[[dict[str, Any], str], bool] | None = None
    # `mixsd.evaluation.forgetting`: what a probe of this kind says about erased knowledge (None: nothing)
    erased: ErasedKnowledge | None = None

    def score_items(
        self,
        model,
        tokenizer,
        items: list[dict[str, Any]],
        *,
        batch_size: int,
        max_tokens: int,
        progress: Callable[[int], None] | None = None,
    ) -> Rows:
        """One prediction row per item, tagged with the kind (second, after the id, where rows had it)."""
        if self.score is None:
            raise ValueError(f"the {self.name} probe has no items to score")
        rows = self.score(
            model, tokenizer, items, batch_size=batch_size, max_tokens=max_tokens, progress=progress
        )
        return [{"id": row["id"], "kind": self.row_tag, **row} for row in rows]

    def summarize(self, rows: Rows) -> dict[str, Any]:
        return {"kind": self.name, **self.summarize_rows(rows)}


# --------------------------------------------------------------------------------------------------
# Reading items
# --------------------------------------------------------------------------------------------------
def _parse_multiple_choice(obj: dict[str, Any], path: os.PathLike | str, line: int, item_id: str) -> dict:
    query, choices, gold = obj.get("query"), obj.get("choices"), obj.get("gold")
    if not isinstance(query, str):
        raise InputError("expected a string", path, line, "query")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c.strip() for c in choices)
    ):
        raise InputError("expected a list of at least two non-empty strings", path, line, "choices")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise InputError(f"expected an index in [0, {len(choices) - 1}]", path, line, "gold")
    return {"id": item_id, "query": query, "choices": choices, "gold": gold}


def _parse_text(obj: dict[str, Any], path: os.PathLike | str, line: int, item_id: str) -> dict:
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InputError("expected a non-empty string", path, line, "text")
    return {"id": item_id, "text": text}


# --------------------------------------------------------------------------------------------------
# Scoring (one signature for every kind)
# --------------------------------------------------------------------------------------------------
def _score_multiple_choice(model, tokenizer, items, *, batch_size, max_tokens, progress) -> Rows:
    return score_multiple_choice(model, tokenizer, items, batch_size=batch_size, progress=progress)


def _score_text(model, tokenizer, items, *, batch_size, max_tokens, progress) -> Rows:
    return score_perplexity(
        model, tokenizer, items, batch_size=batch_size, max_tokens=max_tokens, progress=progress
    )


def _score_generative(model, tokenizer, items, *, batch_size, max_tokens, progress) -> Rows:
    return generative_rows(model, tokenizer, items, batch_size=batch_size, progress=progress)


# --------------------------------------------------------------------------------------------------
# The learning curve's columns
# --------------------------------------------------------------------------------------------------
def bits(flags: list[bool]) -> str:
    """Per-item outcomes as a compact string: "1" for true, "0" for false, in item order."""
    return "".join("1" if flag else "0" for flag in flags)


def _curve_multiple_choice(name: str, rows: Rows) -> tuple[dict[str, Any], dict[str, str]]:
    correct = [r["correct"] for r in rows]
    return {f"{name}_acc": sum(correct) / len(rows), f"{name}_n": len(rows)}, {name: bits(correct)}


def _curve_text(name: str, rows: Rows) -> tuple[dict[str, Any], dict[str, str]]:
    tokens = sum(r["tokens"] for r in rows)
    return {f"{name}_nll_per_token": sum(r["nll"] for r in rows) / tokens if tokens else None}, {}


def _curve_generative(name: str, rows: Rows) -> tuple[dict[str, Any], dict[str, str]]:
    correct, collapsed = [r["correct"] for r in rows], [r["collapsed"] for r in rows]
    scores = {
        f"{name}_acc": sum(correct) / len(rows),
        f"{name}_collapse": sum(collapsed) / len(rows),
        f"{name}_n": len(rows),  # the items behind the rates (intervals in the report)
    }
    return scores, {name: bits(correct), f"{name}_collapse": bits(collapsed)}


def _curve_kl(name: str, rows: Rows) -> tuple[dict[str, Any], dict[str, str]]:
    """KL per token over every answer token, and the token count (no per-item outcome to keep)."""
    tokens = sum(r["tokens"] for r in rows)
    return {name: sum(r["kl_sum"] for r in rows) / tokens if tokens else None, f"{name}_tokens": tokens}, {}


# --------------------------------------------------------------------------------------------------
# `mixsd analyze fisher`'s labelled sequences
# --------------------------------------------------------------------------------------------------
def _fisher_multiple_choice(tokenizer, items: list[dict[str, Any]]) -> Sequences:
    """The query, labelled with its gold choice's tokens."""
    out = []
    for item in items:
        context, cont = choice_tokens(tokenizer, item["query"], item["choices"][item["gold"]])
        out.append((context + cont, len(context)))
    return out


def _fisher_text(tokenizer, items: list[dict[str, Any]]) -> Sequences:
    """Every token but the first (which has no context) labelled."""
    return [(list(tokenizer(item["text"], add_special_tokens=True)["input_ids"]), 1) for item in items]


# --------------------------------------------------------------------------------------------------
# The line of `mixsd eval`'s table
# --------------------------------------------------------------------------------------------------
def format_percent(r: dict[str, Any]) -> str:
    """A rate with its interval: "42.0% [30.1%, 54.9%]" ("-" without a value)."""
    if r.get("value") is None:
        return "-"
    return f"{r['value']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"


def format_number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _format_multiple_choice(p: dict[str, Any]) -> str:
    text = (
        f"acc {format_percent(p['acc'])}  acc_norm {format_percent(p['acc_norm'])}  chance {p['chance']:.2f}"
    )
    if "base" in p:
        r, normed = p["retention"], p.get("retention_normalized", {})
        flips = p.get("paired", {}).get("acc", {})
        text += (
            f"  | base acc {p['base']['acc']['value']:.1%} acc_norm "
            f"{p['base']['acc_norm']['value']:.1%}  retention acc "
            f"{format_number(r['acc'])} acc_norm {format_number(r['acc_norm'])}  chance-normalized acc "
            f"{format_number(normed.get('acc'))} acc_norm {format_number(normed.get('acc_norm'))}"
        )
        if flips:
            text += (
                f"  acc right->wrong {flips['right_to_wrong']} wrong->right {flips['wrong_to_right']}"
                f" (McNemar p {flips['mcnemar_p']:.3g})"
            )
    return text


def _format_perplexity(p: dict[str, Any]) -> str:
    text = f"ppl {format_number(p['ppl'])} ({p['tokens']} tokens)"
    if "base" in p:
        text += f"  | base ppl {format_number(p['base']['ppl'])}  retention {format_number(p['retention']['ppl'])}"
    return text


def _format_kl(p: dict[str, Any]) -> str:
    return f"KL(base||model) {p['kl_per_token']:.5f} nats/token over {p['tokens']} tokens"


# --------------------------------------------------------------------------------------------------
# The results side: table columns, item outcomes, erased knowledge
# --------------------------------------------------------------------------------------------------
def _kl_columns(probe: str, summary: dict[str, Any], metric: str) -> dict[str, Any]:
    """KL has no retention ratio: one column, the KL per token (None where it is not a number)."""
    value = summary.get("kl_per_token")
    return {"kl_per_token": value if isinstance(value, int | float) and not isinstance(value, bool) else None}


def _outcome_multiple_choice(row: dict[str, Any], metric: str) -> bool:
    return bool(row["correct_norm" if metric == "acc_norm" else "correct"])


def _strip(columns: dict[str, Any], probe: str) -> dict[str, Any]:
    return {key.removeprefix(f"{probe}_"): value for key, value in columns.items()}


def _erased_multiple_choice(section: dict, probe: str, summary: dict[str, Any]) -> dict:
    metrics = {metric: _strip(probe_columns(probe, summary, metric), probe) for metric in ("acc", "acc_norm")}
    return {**section, probe: metrics}


def _erased_perplexity(section: dict, probe: str, summary: dict[str, Any]) -> dict:
    return {**section, probe: _strip(probe_columns(probe, summary, "ppl"), probe)}


def _erased_generative(section: dict, probe: str, summary: dict[str, Any]) -> dict:
    """Facts the model lost (`lost`, in summaries of probes whose items name facts)."""
    return {**section, probe: summary["lost"]} if "lost" in summary else section


def _no_comparison(*_: Any) -> dict[str, Any]:
    return {}  # KL is itself a comparison with the base: no ratio, no paired statistics on top


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
# multiple-choice retention per probe in forgetting.json, which the grid summary also reads
ERASED_CHOICES = ErasedKnowledge("multiple_choice", dict, _erased_multiple_choice)
GENERATIVE = ProbeKind(
    name="generative",
    row_tag="gen",
    looks_like=lambda obj: "prompt" in obj,
    parse=parse_generative_item,
    score=_score_generative,
    summarize_rows=summarize_generative,
    retention=retention_accuracy,
    compare=compare_generative,
    format=format_generative,
    curve=_curve_generative,
    erased=ErasedKnowledge("facts_lost", dict, _erased_generative),
)
MULTIPLE_CHOICE = ProbeKind(
    name="multiple_choice",
    row_tag="mc",
    looks_like=lambda obj: "choices" in obj,
    parse=_parse_multiple_choice,
    score=_score_multiple_choice,
    summarize_rows=summarize_multiple_choice,
    retention=retention_multiple_choice,
    compare=compare_multiple_choice,
    format=_format_multiple_choice,
    curve=_curve_multiple_choice,
    fisher_label="multiple_choice",
    fisher_sequences=_fisher_multiple_choice,
    lm_eval=MULTIPLE_CHOICE_TASK,
    item_outcome=_outcome_multiple_choice,
    erased=ERASED_CHOICES,
)
PERPLEXITY = ProbeKind(
    name="perplexity",
    row_tag="text",
    looks_like=lambda obj: "text" in obj,
    parse=_parse_text,
    score=_score_text,
    summarize_rows=summarize_perplexity,
    retention=retention_perplexity,
    compare=compare_perplexity,
    format=_format_perplexity,
    curve=_curve_text,
    fisher_label="text",  # as fisher.json has always named a text probe
    fisher_sequences=_fisher_text,
    lm_eval=TEXT_TASK,
    erased=ErasedKnowledge("perplexity", dict, _erased_perplexity),
)
KL = ProbeKind(
    name="kl",
    row_tag="kl",
    looks_like=None,
    parse=None,
    score=None,
    summarize_rows=summarize_kl,
    retention=_no_comparison,
    compare=_no_comparison,
    format=_format_kl,
    curve=_curve_kl,  # on the base's answers to the KL prompts (mixsd.training.curve), not on a probe file
    table_columns=_kl_columns,
    erased=ErasedKnowledge(
        "kl_per_token", lambda: None, lambda _, probe, summary: summary.get("kl_per_token")
    ),
)
# In the order a file record is matched: a generative item may also carry a `text` field.
PROBE_KINDS: dict[str, ProbeKind] = {
    kind.name: kind for kind in (GENERATIVE, MULTIPLE_CHOICE, PERPLEXITY, KL)
}


def kind_of_row(row: dict[str, Any]) -> ProbeKind | None:
    """The kind a prediction row is tagged with (`kind`), or None (lm-eval rows, KL answers)."""
    return next((k for k in PROBE_KINDS.values() if k.row_tag == row.get("kind")), None)


def kind_of_item(obj: dict[str, Any]) -> ProbeKind | None:
    """The kind a probe-file record belongs to, or None."""
    return next((k for k in PROBE_KINDS.values() if k.looks_like is not None and k.looks_like(obj)), None)


def load_probe(path: Path, limit: int | None) -> tuple[ProbeKind, list[dict[str, Any]]]:
    """Read a probe file: its kind and its items (`limit` of them, spread across the file); InputError
    names the bad line and field."""
    kind: ProbeKind | None = None
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for line, obj in read_jsonl(path):
        item_kind = kind_of_item(obj)
        if item_kind is None:
            raise InputError(
                "expected a multiple-choice item (query, choices, gold), a text item (text) or a "
                "generative item (prompt, check or constraint)",
                path,
                line,
                "choices",
            )
        if kind is not None and item_kind is not kind:
            raise InputError(f"mixes {kind.row_tag} and {item_kind.row_tag} items", path, line)
        kind = item_kind
        item_id = str(obj.get("id", line))
        if item_id in seen:
            raise InputError(f"duplicate id '{item_id}'", path, line, "id")
        seen.add(item_id)
        assert kind.parse is not None  # kinds matched from a record have a parser
        items.append(kind.parse(obj, path, line, item_id))
    if kind is None:
        raise InputError("no records", path)
    return kind, spread(items, limit)
