"""`mixsd rewrite`: the self-rewrite baseline (SDFT, Yang et al. 2024), targets in `mix`'s format.

SDFT ("Self-Distillation Bridges Distribution Gap in Language Model Fine-Tuning") shows the frozen base
model the task *and the reference answer*, asks it to write its own response using the reference as a
guide, keeps the rewrite when its answer checks out (and it does not talk about "the reference answer"),
falls back to the reference otherwise, and then runs ordinary SFT on (prompt -> rewrite).

Mechanically that is `mixsd mix` at λ=0 (every token from the expert conditional) decoded greedily, with
an expert prompt that shows the answer and asks for a rewrite (`prompts.REWRITE_EXPERT_TEMPLATE`), no
retries (a greedy λ=0 draw is deterministic: a retry would write the same tokens), SDFT's phrase filter
(`--reject-phrases`) and the ground-truth fallback (`--on-failure answer`). So this command is exactly
that `mix` call, with those settings fixed: its targets, summary, resume and fingerprint are `mix`'s, and
`mixsd train` reads them unchanged. What differs from MixSD at λ=0 is the prompt only: MixSD's default
expert reads the fact (KGFact: the fact's statement) and is asked to answer the question; the rewrite
reads the ground-truth answer text and is asked to rewrite it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from mixsd.core.files import InputError
from mixsd.core.options import ModelOptions, check_distinct, check_range
from mixsd.method.mix_config import MixConfig
from mixsd.method.prompts import load_expert_template
from mixsd.method.targets import mix

# SDFT's filter (sail-sg/sdft, eval/gen_distilled_data.py: a rewrite holding one of these, or starting with
# "Your turn", is replaced by the reference): the model talked about the task instead of answering.
# ("now it's your turn" is covered by "your turn", which we match anywhere, not only at the start).
SDFT_REJECT_PHRASES = "reference answer,your response,my response,your own response,your turn"


@dataclass
class RewriteConfig(ModelOptions):
    model: str = field(
        metadata={
            "help": "Base model that rewrites the answers: the alias smollm2-135m, a HF folder, a .gguf file or a hub id."
        }
    )
    input: str = field(metadata={"help": "Corpus JSONL (prompt, answer, optional id/context/check/system)."})
    output: str = field(metadata={"help": "Target JSONL to write (atomically, when every record is done)."})
    expert_template: str = field(
        default="rewrite",
        metadata={
            "help": "The rewrite prompt: a built-in name (rewrite), the text, or a file; it must hold {prompt} and "
            "{answer} (the reference answer the model rewrites)."
        },
    )
    verify: Literal["entity", "exact", "number", "none"] | None = field(
        default=None,
        metadata={
            "help": "How a rewrite is checked against the record's check: entity, exact, number (as `mixsd mix "
            "--verify`) or none. Default: the corpus manifest's answer_match, else entity."
        },
    )
    reject_phrases: str | None = field(
        default=SDFT_REJECT_PHRASES,
        metadata={
            "help": "Comma-separated phrases: a rewrite holding one (case-insensitive) fails verification "
            "(SDFT's filter); an empty string turns the filter off."
        },
    )
    on_failure: Literal["answer", "drop", "keep"] = field(
        default="answer",
        metadata={
            "help": "Records whose rewrite fails: train on the ground-truth answer instead (SDFT), drop them, "
            "or keep the rewrite marked correct=false."
        },
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Length cap of a rewrite, stop token included."}
    )
    keep_length_capped: bool = field(
        default=False,
        metadata={
            "help": "Let a rewrite that ran into --max-new-tokens (no end of answer) pass verification."
        },
    )
    batch_size: int = field(default=32, metadata={"help": "Records decoded at once."})
    overwrite: bool = field(default=False, metadata={"help": "Discard an existing output or unfinished run."})
    # fields that change only speed or where the run goes, never the rewritten answers (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "device", "threads", "overwrite")

    def __post_init__(self) -> None:  # bad options are refused before any model is loaded
        self.check_model_options()
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_distinct({"output": self.output}, {"input": self.input})
        try:
            template = load_expert_template(self.expert_template)
        except ValueError as err:
            raise InputError(str(err), field="expert_template") from None
        if "{answer}" not in template:
            raise InputError(
                "must hold {answer}: the rewrite prompt shows the reference answer (with {context} alone it "
                "is MixSD's expert at lam 0: use `mixsd mix --lam 0`)",
                field="expert_template",
            )

    def mix_config(self) -> MixConfig:
        """The `mix` call this rewrite is: λ=0, greedy, no retries, the rewrite prompt."""
        return MixConfig(
            model=self.model,
            input=self.input,
            output=self.output,
            lam=0.0,
            temperature=0.0,
            seed=0,
            retries=0,
            on_failure=self.on_failure,
            verify=self.verify,
            max_new_tokens=self.max_new_tokens,
            keep_length_capped=self.keep_length_capped,
            batch_size=self.batch_size,
            expert_template=self.expert_template,
            reject_phrases=self.reject_phrases or None,
            dtype=self.dtype,
            device=self.device,
            threads=self.threads,
            trust_remote_code=self.trust_remote_code,
            overwrite=self.overwrite,
        )


def rewrite(config: RewriteConfig, *, model=None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Write self-rewrite targets for a corpus file; return `mix`'s summary (also written beside them)."""
    return mix(config.mix_config(), model=model, tokenizer=tokenizer, progress=progress)


def format_rewrite_summary(summary: dict[str, Any]) -> str:
    records = summary["records"]
    tps = summary["tokens_per_second"]
    return (
        f"records {records}  rewrites verified {summary['verified']} ({summary['verified_rate']:.1%}, "
        f"{summary['verify_mode']})  ground-truth fallback {summary['fallback']}  "
        f"refused for a phrase {summary['phrase_rejections_this_run']}  written {summary['written']}  "
        f"{'-' if tps is None else f'{tps:.0f}'} tok/s"
    )


def rewrite_command(config: RewriteConfig) -> dict[str, Any]:
    config.set_threads()
    summary = rewrite(config)
    if not summary:  # a non-main process of a multi-process run: the main process reports
        return summary
    print(format_rewrite_summary(summary))
    for warning in summary.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {config.output}")
    return summary
