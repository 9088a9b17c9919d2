"""`mixsd sft-targets`: the SFT baseline's targets, the ground truth (or the fact's plain statement, a
format control), in the record format `mixsd mix` writes, ended where `mix` ends its targets.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

# models by attribute (models.load_model): a test patching that module sees every resolution and load
from mixsd.core import models
from mixsd.core.answers import matches
from mixsd.core.files import InputError, atomic_write_jsonl, output_lock, read_jsonl
from mixsd.core.options import check_choices, check_distinct
from mixsd.core.records import Fact, load_corpus
from mixsd.method.prompts import answer_end, encode_answer, encode_prompt


# --------------------------------------------------------------------------------------------------
# `mixsd sft-targets`: the SFT baseline's targets (the ground truth), in the same record format
# --------------------------------------------------------------------------------------------------
@dataclass
class SFTTargetsConfig:
    model: str = field(metadata={"help": "Model whose tokenizer and chat template format the records."})
    input: str = field(metadata={"help": "Corpus JSONL."})
    output: str = field(metadata={"help": "Target JSONL to write."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow tokenizer code from the model folder."}
    )
    target: Literal["answer", "statement"] = field(
        default="answer",
        metadata={
            "help": "What the model is trained to say: `answer`, the record's answer (\"The answer is X. "
            "\\boxed{X}\"); `statement`, the fact's plain statement, the record's `context` (\"Vedux Vudratrox "
            "lives in Shiboshend.\"), a control for the answer's format. Every record then needs a context "
            "that names its answer."
        },
    )

    def __post_init__(self) -> None:
        check_distinct({"output": self.output}, {"input": self.input})
        check_choices(self)


# what an SFT target says: the record's answer, or the fact's statement (its `context`)
SFT_TARGETS = ("answer", "statement")


def load_sft_facts(path: str | os.PathLike, target: str = "answer") -> list[Fact]:
    """The corpus records SFT targets are made from. `statement` targets are the records' own `context`, so
    each record must carry one (a record without it would silently fall back to its answer) that names the
    record's answer (whole words, as `--verify entity` checks): InputError naming file and line otherwise."""
    facts = load_corpus(path)
    if target == "answer":
        return facts
    # read_jsonl yields the same non-blank lines load_corpus read, in order
    for (line, obj), fact in zip(read_jsonl(path), facts, strict=True):
        context = obj.get("context")
        if not isinstance(context, str) or not context.strip():
            raise InputError(
                "no statement to train on (--target statement trains on the record's context)",
                path,
                line,
                "context",
            )
        if not matches(context, fact.check, "entity"):
            raise InputError(f"the statement does not name the answer {fact.check!r}", path, line, "context")
    return facts


def sft_target_rows(facts: list[Fact], tokenizer, target: str = "answer") -> list[dict[str, Any]]:
    """Ground-truth targets: the answer (or, with target="statement", the fact's statement: the record's
    `context`) tokenized once and ended as `mix` ends its targets (`answer_end`), prompt formatted as for
    `mix`. In the plain format a text holding a stop string (a blank line, a "Question:" line) is cut
    there, as evaluation would cut it; such rows have finish "stop_text"."""
    if target not in SFT_TARGETS:
        raise ValueError(f"target must be one of {', '.join(SFT_TARGETS)}; got {target!r}")
    end = answer_end(tokenizer)
    rows = []
    for fact in facts:
        said = fact.context if target == "statement" else fact.answer
        target_ids = encode_answer(tokenizer, said, end)
        text = said if not end.stop_strings else end.cut_text(" " + said.lstrip()).lstrip()
        rows.append(
            {
                "id": fact.id,
                "generation": 0,
                "prompt": fact.prompt,
                "answer": fact.answer,
                "check": fact.check,
                "prompt_ids": encode_prompt(tokenizer, fact.prompt, fact.system),
                "target_ids": target_ids,
                "branch": "G" * len(target_ids),
                "correct": True,
                "attempts": 1,
                "finish": "stop" if text == said.lstrip() or not end.stop_strings else "stop_text",
                "text": text,
                "source": "statement" if target == "statement" else "ground_truth",
            }
        )
    return rows


def sft_targets_command(config: SFTTargetsConfig) -> None:
    facts = load_sft_facts(config.input, config.target)
    with output_lock(config.output):
        handle = models.resolve_model(config.model)
        tokenizer = models.load_tokenizer(handle, trust_remote_code=config.trust_remote_code)
        limit = models.context_length(models.load_config(handle, trust_remote_code=config.trust_remote_code))
        rows = sft_target_rows(facts, tokenizer, config.target)
        # As in `mix`: a record the model cannot hold is dropped here, not left for `train` to refuse.
        fits = [r for r in rows if limit is None or len(r["prompt_ids"]) + len(r["target_ids"]) <= limit]
        if not fits:
            raise InputError(f"no record fits the model's context ({limit} tokens)", config.input)
        if len(fits) < len(rows):
            kept = {r["id"] for r in fits}
            dropped = [r["id"] for r in rows if r["id"] not in kept]
            print(
                f"dropped {len(dropped)} of {len(rows)} records longer than the model's context "
                f"({limit} tokens): {', '.join(dropped)[:200]}",
                file=sys.stderr,
            )
        atomic_write_jsonl(config.output, fits)
        cut = sum(r["finish"] == "stop_text" for r in fits)
        if cut:
            print(
                f"{cut} answers hold a blank line or a 'Question:'/'Answer:' line: in the plain format (no chat "
                "template) an answer ends there, so their targets were cut there",
                file=sys.stderr,
            )
    what = "statement" if config.target == "statement" else "ground-truth"
    print(f"wrote {len(fits)} {what} targets to {config.output}")
