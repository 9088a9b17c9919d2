"""Greedy answers to prompt items and their check: the method's way of asking a model a question, shared by
the generative probes (`mixsd.evaluation.capability`), the learning curve and the corpus builders that keep only the
facts a base model knows.

An item is {"prompt", "max_new_tokens", optional "system"} and, to be checked, "check" (accepted answers,
matched as whole words: `answers.matches` in entity mode) or "constraint" (`instructions.check_constraint`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from mixsd.core.answers import matches
from mixsd.core.instructions import check_constraint
from mixsd.method.prompts import answer_end, encode_prompt, pad_token_id

ENTITY_MODE = "loose"  # whole-word entity matching (answers.py also calls it "entity")


def score_answer(item: dict[str, Any], output: str) -> bool:
    """Is the answer right: an accepted answer named (check), or the constraint met?"""
    if "constraint" in item:
        return check_constraint(output, item["constraint"])
    return any(matches(output, accepted, ENTITY_MODE) for accepted in item["check"])


def generate_answers(
    model,
    tokenizer,
    items: list[dict[str, Any]],
    *,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> list[tuple[str, int, str]]:
    """(decoded answer, answer tokens, finish) per item, greedy, in the items' order.

    finish: "stop" (stop token), "length" (the item's max_new_tokens) or "prompt_too_long" (the prompt
    and the answer cap exceed the model's context; answer empty).
    """
    # models and generation load torch: here, so that `mixsd probes build-capability` reads ENTITY_MODE
    # and scores answers without a model, and so without torch
    from mixsd.core.models import context_length
    from mixsd.method.generation import greedy_generate

    context = context_length(model) if getattr(model, "config", None) is not None else None
    prompts = [encode_prompt(tokenizer, item["prompt"], item.get("system")) for item in items]
    results: list[tuple[str, int, str] | None] = [None] * len(items)
    by_cap: dict[int, list[int]] = defaultdict(list)
    for i, item in enumerate(items):
        if context and len(prompts[i]) + item["max_new_tokens"] > context:
            results[i] = ("", 0, "prompt_too_long")
        else:
            by_cap[item["max_new_tokens"]].append(i)
    end, pad = answer_end(tokenizer, model), pad_token_id(tokenizer)  # answers end as training targets do
    for cap, indices in sorted(by_cap.items()):
        for k, tokens, finish in greedy_generate(
            model,
            [prompts[i] for i in indices],
            stop_ids=end.stop_ids,
            pad_id=pad,
            max_new_tokens=cap,
            batch_size=batch_size,
            text_stop=end.text_stop if end.stop_strings else None,
        ):
            results[indices[k]] = (tokenizer.decode(tokens, skip_special_tokens=True), len(tokens), finish)
            if progress is not None:
                progress(1)
    return [r if r is not None else ("", 0, "prompt_too_long") for r in results]
