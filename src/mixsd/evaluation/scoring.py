"""Scoring a model on held-out probes by likelihood, and what the scores add up to.

    multiple choice  log p(" "+choice | query) summed -> acc, divided by the choice's length in characters
                     -> acc_norm (lm-evaluation-harness semantics)
    text             token perplexity
    kl               KL(base || model) per token, on the base model's own greedy answers

One function per kind and step (score, summarize, retention, compare); `mixsd.evaluation.probe_kinds` registers them
with the generative kind's (`mixsd.evaluation.capability`) and is the one place that dispatches on a kind. The rows
returned here carry no kind tag: the registry adds it. The summaries turn rows into a probe's scores and,
given the base model's rows on the same items, into retention ratios with intervals and paired statistics
(`mixsd.core.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from mixsd.core.metrics import (
    chance_normalized,
    chance_normalized_interval,
    paired_comparison,
    perplexity_ratio_interval,
    rate,
    ratio_interval,
    well_above_chance,
)
from mixsd.method.generation import greedy_generate, tail_logprobs
from mixsd.method.prompts import answer_end, encode_prompt, pad_token_id


# --------------------------------------------------------------------------------------------------
# Scoring: one row per item
# --------------------------------------------------------------------------------------------------
def _encode_plain(tokenizer, text: str) -> list[int]:
    """Raw text as the tokenizer encodes it by default (BOS only if the tokenizer adds one itself)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def choice_tokens(tokenizer, query: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a multiple-choice option, as lm-evaluation-harness splits them.

    The choice continues the query after one space unless either side already has whitespace there;
    trailing whitespace of the query moves into the continuation; the whole string is tokenized once and
    cut where the query's own tokens end, so the scored tokens are those the model would really see.
    """
    continuation = choice if choice[:1].isspace() or query[-1:].isspace() else " " + choice
    stripped = query.rstrip()
    continuation = query[len(stripped) :] + continuation
    whole = _encode_plain(tokenizer, stripped + continuation)
    context = _encode_plain(tokenizer, stripped)
    if not stripped or len(context) >= len(whole):
        # empty query: condition on the end-of-text token, as the harness does
        prefix = [tokenizer.eos_token_id if tokenizer.eos_token_id is not None else pad_token_id(tokenizer)]
        cont = list(tokenizer(continuation, add_special_tokens=False)["input_ids"])
        return (context if stripped else prefix), cont
    return context, whole[len(context) :]


def score_multiple_choice(
    model,
    tokenizer,
    items: list[dict[str, Any]],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per item: summed log-likelihood of each choice, and which choice acc / acc_norm pick."""
    sequences, tails, owners = [], [], []
    for n, item in enumerate(items):
        for c, choice in enumerate(item["choices"]):
            context, cont = choice_tokens(tokenizer, item["query"], choice)
            sequences.append(context + cont)
            tails.append(len(cont))
            owners.append((n, c))
    loglik: list[list[float]] = [[0.0] * len(item["choices"]) for item in items]
    remaining = [len(item["choices"]) for item in items]
    for index, logprobs in tail_logprobs(
        model, sequences, tails, pad_id=pad_token_id(tokenizer), batch_size=batch_size
    ):
        n, c = owners[index]
        loglik[n][c] = float(logprobs.sum())
        remaining[n] -= 1
        if remaining[n] == 0 and progress is not None:
            progress(1)
    rows = []
    for item, scores in zip(items, loglik, strict=True):
        lengths = [len(choice) for choice in item["choices"]]
        normed = [s / length for s, length in zip(scores, lengths, strict=True)]
        pred = max(range(len(scores)), key=lambda i: (scores[i], -i))  # first of ties, like numpy argmax
        pred_norm = max(range(len(normed)), key=lambda i: (normed[i], -i))
        rows.append(
            {
                "id": item["id"],
                "gold": item["gold"],
                "loglik": [round(s, 5) for s in scores],
                "char_lengths": lengths,
                "pred": pred,
                "pred_norm": pred_norm,
                "correct": pred == item["gold"],
                "correct_norm": pred_norm == item["gold"],
                "n_choices": len(scores),
            }
        )
    return rows


def score_perplexity(
    model,
    tokenizer,
    items: list[dict[str, Any]],
    *,
    batch_size: int,
    max_tokens: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Per text: summed NLL and the number of predicted tokens (the first token, with no context, is not)."""
    sequences = [_encode_plain(tokenizer, item["text"])[:max_tokens] for item in items]
    rows: list[dict[str, Any] | None] = [None] * len(items)
    usable = [i for i, seq in enumerate(sequences) if len(seq) >= 2]
    for k, logprobs in tail_logprobs(
        model,
        [sequences[i] for i in usable],
        [len(sequences[i]) - 1 for i in usable],
        pad_id=pad_token_id(tokenizer),
        batch_size=batch_size,
    ):
        i = usable[k]
        rows[i] = {
            "id": items[i]["id"],
            "nll": round(-float(logprobs.sum()), 5),
            "tokens": len(sequences[i]) - 1,
        }
        if progress is not None:
            progress(1)
    return [
        row if row is not None else {"id": items[i]["id"], "nll": 0.0, "tokens": 0}
        for i, row in enumerate(rows)
    ]


def kl_per_token(
    base, model, sequences: list[list[int]], tails: list[int], *, pad_id: int, batch_size: int
) -> list[tuple[float, float, int]]:
    """Per sequence: (sum, max, count) of KL(base || model) over the next-token distributions at the
    positions predicting its last `tail` tokens."""
    out: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(sequences)
    base_iter = tail_logprobs(base, sequences, tails, pad_id=pad_id, batch_size=batch_size, full=True)
    model_iter = tail_logprobs(model, sequences, tails, pad_id=pad_id, batch_size=batch_size, full=True)
    for (i, p_log), (j, q_log) in zip(base_iter, model_iter, strict=True):
        assert i == j
        if p_log.shape[-1] != q_log.shape[-1]:
            raise ValueError(f"base and model vocabularies differ ({p_log.shape[-1]} vs {q_log.shape[-1]})")
        kl = (p_log.exp() * (p_log - q_log)).sum(dim=-1).clamp_(min=0.0)
        out[i] = (float(kl.sum()), float(kl.max()), int(kl.numel()))
    return out


def reference_answers(
    base,
    tokenizer,
    prompts: list[tuple[str, str | None]],
    *,
    max_new_tokens: int,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[list[int], list[int], str, str]]:
    """The base model's greedy answers to the KL prompts ((prompt, system) pairs): per prompt (prompt ids,
    answer ids, finish, decoded answer). The answer ids end with the end token when the answer stopped
    (KL also covers the decision to stop), as every training target does; `mixsd eval` and the learning
    curve both measure KL on these tokens."""
    encoded = [encode_prompt(tokenizer, prompt, system) for prompt, system in prompts]
    end = answer_end(tokenizer, base)
    answers: list[tuple[list[int], list[int], str, str]] = [(ids, [], "", "") for ids in encoded]
    for k, tokens, finish in greedy_generate(
        base,
        encoded,
        stop_ids=end.stop_ids,
        pad_id=pad_token_id(tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        on_row=(lambda _: progress(1)) if progress is not None else None,
        text_stop=end.text_stop if end.stop_strings else None,
    ):
        answer = tokens + ([end.end_id] if finish in ("stop", "stop_text") else [])
        answers[k] = (encoded[k], answer, finish, tokenizer.decode(tokens, skip_special_tokens=True))
    return answers


def kl_on_answers(
    base, model, answers: list[tuple[list[int], list[int]]], *, pad_id: int, batch_size: int
) -> list[tuple[float, float, int]]:
    """Per (prompt ids, answer ids): (sum, max, count) of KL(base || model) over the answer's tokens;
    (0.0, 0.0, 0) for an empty answer."""
    usable = [k for k, (_, answer) in enumerate(answers) if answer]
    stats = kl_per_token(
        base,
        model,
        [answers[k][0] + answers[k][1] for k in usable],
        [len(answers[k][1]) for k in usable],
        pad_id=pad_id,
        batch_size=batch_size,
    )
    out: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * len(answers)
    for k, stat in zip(usable, stats, strict=True):
        out[k] = stat
    return out


# --------------------------------------------------------------------------------------------------
# Summaries: a probe's scores, and its retention against the base model
# --------------------------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize_multiple_choice(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {
        "n": n,
        "acc": rate(sum(r["correct"] for r in rows), n),
        "acc_norm": rate(sum(r["correct_norm"] for r in rows), n),
        "chance": sum(1 / r["n_choices"] for r in rows) / n if n else None,
    }


def summarize_perplexity(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rows)
    nll = sum(r["nll"] for r in rows)
    return {
        "n": len(rows),
        "tokens": tokens,
        "nll_per_token": nll / tokens if tokens else None,
        "ppl": math.exp(nll / tokens) if tokens else None,
    }


def summarize_kl(rows: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = sum(r["tokens"] for r in rows)
    return {
        "n": len(rows),
        "tokens": tokens,
        "kl_per_token": sum(r["kl_sum"] for r in rows) / tokens if tokens else None,
        "kl_per_prompt_mean": (
            sum(r["kl_sum"] / r["tokens"] for r in rows if r["tokens"])
            / max(1, sum(1 for r in rows if r["tokens"]))
        ),
        "kl_max": max((r["kl_max"] for r in rows), default=None),
    }


def retention_multiple_choice(model_summary: dict[str, Any], base_summary: dict[str, Any]) -> dict:
    """acc / acc_base and acc_norm / acc_norm_base (1.0 = unchanged)."""
    return {
        metric: _ratio(model_summary[metric]["value"], base_summary[metric]["value"])
        for metric in ("acc", "acc_norm")
    }


def retention_perplexity(model_summary: dict[str, Any], base_summary: dict[str, Any]) -> dict:
    """base_ppl / model_ppl, so 1.0 = unchanged and higher is better."""
    return {"ppl": _ratio(base_summary["ppl"], model_summary["ppl"])}


def retention_accuracy(model_summary: dict[str, Any], base_summary: dict[str, Any]) -> dict:
    """acc / acc_base (the generative probes' one score)."""
    return {"acc": _ratio(model_summary["acc"]["value"], base_summary["acc"]["value"])}


def _pairs(model_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    by_id = {row["id"]: row for row in base_rows}
    return [(row, by_id[row["id"]]) for row in model_rows if row["id"] in by_id]


def compare_multiple_choice(model_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict:
    """Base vs model on the same items: `retention_ci95` (paired bootstrap of acc / acc_base),
    `retention_normalized` ((acc - chance) / (acc_base - chance), None when the base is at chance) with its
    `_ci95`, and `paired` (right->wrong / wrong->right counts, McNemar p, difference with interval) per
    metric."""
    pairs = _pairs(model_rows, base_rows)
    out: dict[str, Any] = {"retention_ci95": {}, "retention_normalized": {}, "paired": {}}
    out["retention_normalized_ci95"] = {}
    chance = [1 / m["n_choices"] for m, _ in pairs]
    for metric, key in (("acc", "correct"), ("acc_norm", "correct_norm")):
        model = [bool(m[key]) for m, _ in pairs]
        base = [bool(b[key]) for _, b in pairs]
        n = len(pairs)
        out["retention_ci95"][metric] = ratio_interval(model, base)
        out["retention_normalized"][metric] = (
            chance_normalized(sum(model) / n, sum(base) / n, sum(chance) / n)
            if n and well_above_chance(sum(base), n, sum(chance) / n)
            else None
        )
        out["retention_normalized_ci95"][metric] = chance_normalized_interval(model, base, chance)
        out["paired"][metric] = paired_comparison(base, model)
    return out


def compare_perplexity(model_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict:
    """`retention_ci95` of base_ppl / model_ppl, resampling texts (those both scored on the same tokens)."""
    pairs = _pairs(model_rows, base_rows)
    usable = [(m, b) for m, b in pairs if m["tokens"] and m["tokens"] == b["tokens"]]
    return {
        "retention_ci95": {
            "ppl": perplexity_ratio_interval(
                [m["nll"] for m, _ in usable],
                [b["nll"] for _, b in usable],
                [m["tokens"] for m, _ in usable],
            )
        }
    }
