"""Generative capability probes: read their items, answer them greedily, score and summarize the answers.

A generative probe file (built by `mixsd probes build-capability`, see corpora/capability.py) holds one
item a line:
    {"id", "prompt", "check": str | [str, ...]}     answered right when any accepted answer appears in the
                                                    answer as whole words (`answers.matches`, entity mode)
    {"id", "prompt", "constraint": {"kind", "args"}} answered right when the programmatic check passes
                                                    (`instructions.check_constraint`)
with optional `system`, `group` (the row of the per-group table: "k=4", "bullets", "capital" ...) and
`max_new_tokens` (the answer's length cap; default 64). The prompt is asked the way every stage asks,
`prompts.encode_prompt` (the model's chat template when it has one), with greedy decoding. Each answer
also gets the collapse flag of `instructions.is_collapsed`.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from mixsd.core.files import InputError
from mixsd.core.instructions import is_collapsed, validate_constraint
from mixsd.core.metrics import pair_rows, paired_comparison, rate, ratio_interval
from mixsd.method.answering import generate_answers, score_answer

DEFAULT_MAX_NEW_TOKENS = 64


def parse_generative_item(obj: dict[str, Any], path: os.PathLike | str, line: int, item_id: str) -> dict:
    """Validate one item of a generative probe file; InputError names the line and field."""
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("expected a non-empty string", path, line, "prompt")
    has_check, has_constraint = "check" in obj, "constraint" in obj
    if has_check == has_constraint:
        raise InputError("expected exactly one of 'check' and 'constraint'", path, line, "check")
    item: dict[str, Any] = {"id": item_id, "prompt": prompt}
    if has_check:
        check = obj["check"]
        accepted = [check] if isinstance(check, str) else check
        if (
            not isinstance(accepted, list)
            or not accepted
            or not all(isinstance(a, str) and a.strip() for a in accepted)
        ):
            raise InputError("expected a non-empty string or list of non-empty strings", path, line, "check")
        item["check"] = accepted
    else:
        problem = validate_constraint(obj["constraint"])
        if problem is not None:
            raise InputError(problem, path, line, "constraint")
        item["constraint"] = {
            "kind": obj["constraint"]["kind"],
            "args": dict(obj["constraint"].get("args", {})),
        }
    for name in ("system", "group"):
        value = obj.get(name)
        if value is not None and not isinstance(value, str):
            raise InputError("expected a string", path, line, name)
        item[name] = value
    if item["group"] is None and has_constraint:
        item["group"] = item["constraint"]["kind"]
    limit = obj.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError("expected a positive integer", path, line, "max_new_tokens")
    item["max_new_tokens"] = limit
    return item


def generative_rows(
    model,
    tokenizer,
    items: list[dict[str, Any]],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """One prediction row per item: the answer, whether it is right, and whether it collapsed."""
    answers = generate_answers(model, tokenizer, items, batch_size=batch_size, progress=progress)
    rows = []
    for item, (output, tokens, finish) in zip(items, answers, strict=True):
        rows.append(
            {
                "id": item["id"],
                "group": item.get("group"),
                "output": output,
                "output_tokens": tokens,
                "finish": finish,
                "correct": score_answer(item, output),
                "collapsed": is_collapsed(output),
            }
        )
    return rows


def summarize_generative(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall and per group, and the collapse rate, each with its 95% Wilson interval."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row.get("group") or "all"].append(row)
    return {
        "n": len(rows),
        "acc": rate(sum(r["correct"] for r in rows), len(rows)),
        "groups": {
            name: rate(sum(r["correct"] for r in members), len(members))
            for name, members in sorted(groups.items())
        },
        "collapse": rate(sum(r["collapsed"] for r in rows), len(rows)),
        "finish": dict(sorted(Counter(r["finish"] for r in rows).items())),
    }


def compare_generative(model_rows: list[dict[str, Any]], base_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Base vs model on the same items: `retention_ci95` of acc / acc_base (paired bootstrap), `paired`
    comparisons of accuracy and of the collapse flag (right->wrong counts, McNemar p, difference with its
    interval), and `lost`: right -> wrong among the items the base answers right, with its Wilson
    interval. On a known-facts probe (kept because the base answers them right) every lost item is a fact
    forgotten."""
    base_right, model_right = pair_rows(base_rows, model_rows, "correct")
    base_collapsed, model_collapsed = pair_rows(base_rows, model_rows, "collapsed")
    accuracy = paired_comparison(base_right, model_right)
    return {
        "retention_ci95": {"acc": ratio_interval(model_right, base_right)},
        "paired": {"acc": accuracy, "collapse": paired_comparison(base_collapsed, model_collapsed)},
        "lost": rate(accuracy["right_to_wrong"], sum(base_right)),
    }


def _percent(r: dict[str, Any]) -> str:
    return "-" if r.get("value") is None else f"{r['value']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}]"


def format_generative(summary: dict[str, Any]) -> str:
    """The probe's line of `mixsd eval`'s table, then one indented line per group."""
    text = f"acc {_percent(summary['acc'])}  collapse {_percent(summary['collapse'])}"
    base = summary.get("base")
    if base is not None:
        text += f"  | base acc {_percent(base['acc'])}  base collapse {_percent(base['collapse'])}"
        if "lost" in summary:
            text += f"  lost {summary['lost']['correct']}/{summary['lost']['n']}"
    for name, group in summary["groups"].items():
        line = f"\n    {name:<18}{group['correct']:>4}/{group['n']:<4} {_percent(group)}"
        if base is not None and name in base["groups"]:
            line += f"  | base {base['groups'][name]['correct']}/{base['groups'][name]['n']}"
        text += line
    return text
