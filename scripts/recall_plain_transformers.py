"""Recall of a corpus by a saved model loaded with plain transformers: no mixsd code loads the model or
generates, so the figure shows what a user gets from `OUT/model` with the tools they already know.

    python scripts/recall_plain_transformers.py --model OUT/model --corpus facts.jsonl [--max-new-tokens 64]

For each corpus record: the prompt as mixsd trains on it (with a chat template: the template with the
generation prompt; without one: "<bos>Question: ...\\nAnswer:"), greedy `generate`, the answer cut where
the plain format ends it (a blank line, or a line starting `Question:` or `Answer:`, counted from the
answer's first non-whitespace character), scored by entity match against the record's `check`.

The prompt is built here by hand, then compared token for token with `mixsd.method.prompts.encode_prompt`, so a
mismatch between what this script asks and what training used stops the run instead of skewing the
figure. Scoring (`mixsd.core.answers.entity_match`) and corpus reading (`mixsd.core.records.load_corpus`) are
mixsd's, so the figure is scored exactly as `mixsd eval` scores.
Prints one line per record and a JSON summary; --out writes the predictions as JSONL.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from mixsd.core.answers import entity_match
from mixsd.core.files import atomic_write_jsonl
from mixsd.core.records import load_corpus
from mixsd.method.prompts import encode_prompt

# The plain format's end of an answer (mixsd.method.prompts.PLAIN_STOP_STRINGS, written out again on purpose:
# this script states the rule it applies rather than importing it).
STOP_STRINGS = ("\n\n", "\nQuestion:", "\nAnswer:")


def prompt_ids(tokenizer, question: str, system: str | None) -> list[int]:
    """The prompt a user would write for this model: its chat template, else the plain format."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = (f"{system}\n\n" if system else "") + f"Question: {question}\nAnswer:"
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids if tokenizer.bos_token_id is None else [tokenizer.bos_token_id, *ids]


def answer_length(text: str, plain: bool) -> int | None:
    """Characters of `text` that are the answer when a stop string ends it after its first
    non-whitespace character (plain format only), else None."""
    if not plain:
        return None
    start = len(text) - len(text.lstrip())
    if start == len(text):
        return None
    hits = [at for at in (text.find(s, start) for s in STOP_STRINGS) if at >= 0]
    return min(hits) if hits else None


class PlainStop(StoppingCriteria):
    """Stops generation (batch of one) once the new text has reached the plain-format end of an answer."""

    def __init__(self, tokenizer, prompt_length: int, plain: bool):
        self.tokenizer, self.prompt_length, self.plain = tokenizer, prompt_length, plain

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_length :], skip_special_tokens=True)
        done = answer_length(text, self.plain) is not None
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="A model folder (e.g. OUT/model of `mixsd train`).")
    parser.add_argument("--corpus", required=True, help="Corpus JSONL (prompt, answer, check).")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="Length cap of an answer.")
    parser.add_argument("--out", help="Write the predictions here (JSONL).")
    args = parser.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    plain = not getattr(tokenizer, "chat_template", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    facts = load_corpus(args.corpus)
    rows, started = [], time.monotonic()
    for fact in facts:
        ids = prompt_ids(tokenizer, fact.prompt, fact.system)
        if ids != encode_prompt(tokenizer, fact.prompt, fact.system):
            print(
                f"{fact.id}: prompt differs from mixsd.method.prompts.encode_prompt; not comparable",
                file=sys.stderr,
            )
            return 1
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([PlainStop(tokenizer, len(ids), plain)]),
            )
        new = out[0, len(ids) :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True)
        length = answer_length(text, plain)
        answer = text if length is None else text[:length]
        eos_ids = model.generation_config.eos_token_id
        eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
        finish = "stop_text" if length is not None else "eos" if new and new[-1] in eos_ids else "length"
        correct = entity_match(answer, fact.check)
        rows.append(
            {
                "id": fact.id,
                "prompt": fact.prompt,
                "check": fact.check,
                "output": answer,
                "finish": finish,
                "new_tokens": len(new),
                "correct": correct,
            }
        )
        print(
            f"{'OK ' if correct else '-- '} {fact.check!r:>24} <- {answer.strip()!r} ({finish})", flush=True
        )
    finishes: dict[str, int] = {}
    for row in rows:
        finishes[row["finish"]] = finishes.get(row["finish"], 0) + 1
    summary = {
        "model": args.model,
        "corpus": args.corpus,
        "format": "plain" if plain else "chat template",
        "records": len(rows),
        "correct": sum(row["correct"] for row in rows),
        "recall": sum(row["correct"] for row in rows) / len(rows) if rows else None,
        "finish": finishes,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        atomic_write_jsonl(Path(args.out), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
