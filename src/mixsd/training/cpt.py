"""Continued pre-training (CPT), the documents baseline: next-token training on the passages themselves.

What a user holding documents would try first: no questions, no targets, just the language-modelling loss
on the text (`mixsd train --method cpt --corpus FILE`). The examples are the passages' tokens as the
tokenizer encodes plain text (with the special tokens it adds itself: Llama's and Gemma's BOS, none for
SmolLM2; no chat template, no end token: a passage is a piece of a document, not an answer), with the
loss on every token after the first. They go
through the same collator, loss (`sft.target_nll`: summed over tokens, divided by the global count) and
trainer as SFT, so CPT differs from SFT in its data only.

`--corpus` is a JSONL file of
    passages       {"text": ...} per line (`mixsd corpus documents` writes documents/passages.jsonl), or
    corpus records {"prompt", "answer", "context", ...}: the distinct `context` texts, in file order (a
                   KGFact corpus gives its facts' statements: CPT on the facts as plain text).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from mixsd.core.files import InputError, read_jsonl
from mixsd.training.sft import IGNORE, PadCollator, target_nll


def passage_texts(path: str | os.PathLike) -> list[str]:
    """The texts to train on: each record's `text`, or else its `context`; repeats kept once, in order."""
    path = Path(path)
    texts: dict[str, None] = {}
    for line, obj in read_jsonl(path):
        field = "text" if "text" in obj else "context"
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            raise InputError(
                "expected a non-empty `text` (a passage) or `context` (a corpus record)", path, line, field
            )
        texts.setdefault(value.strip(), None)
    if not texts:
        raise InputError("no passages", path)
    return list(texts)


def cpt_examples(
    path: str | os.PathLike, tokenizer, *, context_limit: int | None = None
) -> list[dict[str, list[int]]]:
    """One example per passage: its token ids as input and as labels (the loss shifts them: every token
    after the first is predicted)."""
    examples = []
    for number, text in enumerate(passage_texts(path), start=1):
        ids = list(tokenizer(text)["input_ids"])
        if context_limit is not None and len(ids) > context_limit:
            raise InputError(
                f"passage {number} is {len(ids)} tokens, longer than the model's context ({context_limit})",
                path,
            )
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def passage_nll(model, examples: list[dict[str, Any]], pad_id: int, batch_size: int = 8) -> float:
    """Mean NLL per labelled token of the examples under `model` (for checks and tests)."""

    collate = PadCollator(pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            total += float(target_nll(out, batch["labels"])) * tokens
            count += tokens
    return total / count
