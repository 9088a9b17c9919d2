"""The options of `mixsd mix` (`MixConfig`; the field help is the command's CLI help), checked before any
model loads. `mixsd.method.targets` runs the command; `mixsd rewrite` and an experiment's grid build this config
too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mixsd.core.files import InputError
from mixsd.core.options import ModelOptions, check_distinct, check_range


# --------------------------------------------------------------------------------------------------
# Configuration (the field help is the CLI help of `mixsd mix`)
# --------------------------------------------------------------------------------------------------
@dataclass
class MixConfig(ModelOptions):
    model: str = field(
        metadata={"help": "Base model: the alias smollm2-135m, a HF folder, a .gguf file or a hub id."}
    )
    input: str = field(metadata={"help": "Corpus JSONL (prompt, answer, optional id/context/check/system)."})
    output: str = field(metadata={"help": "Target JSONL to write (atomically, when every record is done)."})
    lam: float = field(
        default=0.3,
        metadata={
            "help": "Probability that a token comes from the naive conditional "
            "(0 = pure expert, 1 = the base model's own answer)."
        },
    )
    temperature: float = field(
        default=0.0,
        metadata={"help": "0: argmax of the chosen conditional; >0: sample its top-k at this temperature."},
    )
    top_k: int = field(default=64, metadata={"help": "Top-k used when temperature > 0."})
    seed: int = field(default=0, metadata={"help": "Seed of every record's own random stream."})
    retries: int = field(
        default=10,
        metadata={
            "help": "How many times a target that fails verification is drawn again with fresh coins (none at "
            "temperature 0 with lam 0 or 1, where a new draw would repeat the last)."
        },
    )
    on_failure: Literal["drop", "keep", "answer"] = field(
        default="drop",
        metadata={
            "help": "Records never verified: drop them, keep them marked correct=false, or fall back to the "
            "ground-truth answer."
        },
    )
    verify: Literal["entity", "exact", "number", "none", "loose", "strict"] | None = field(
        default=None,
        metadata={
            "help": "entity (old name loose): the check appears in the target as whole words; exact (strict): the "
            "target's final answer (last \\boxed{}) equals it; number: its final number equals it; none: accept "
            "every target. Default: the corpus manifest's answer_match, else entity."
        },
    )
    max_new_tokens: int = field(
        default=256, metadata={"help": "Length cap of a target, stop token included."}
    )
    min_expert_logprob: float | None = field(
        default=None,
        metadata={
            "help": "Fidelity check (our extension, docs/results.md): a target fails verification, and is "
            "drawn again, when the expert gives one of its naive-chosen tokens a log-prob below this "
            "(e.g. -6). Default: off."
        },
    )
    reject_phrases: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated phrases: a target whose text holds one (case-insensitive) fails "
            "verification. SDFT's filter of rewrites that talk about the reference instead of answering; "
            "`mixsd rewrite` sets it. Default: none."
        },
    )
    guard_top_p: float | None = field(
        default=None,
        metadata={
            "help": "Guarded mixing (our extension, not the paper's method): a naive-chosen token is emitted "
            "only when it lies in the expert's top-p set for this p, otherwise the expert's token is (branch "
            "letter V). Default: off (plain MixSD)."
        },
    )
    keep_length_capped: bool = field(
        default=False,
        metadata={
            "help": "Let a target that ran into --max-new-tokens (no end of answer) pass verification; "
            "by default it fails, since it would teach the model not to stop."
        },
    )
    batch_size: int = field(
        default=32, metadata={"help": "Records decoded at once (each uses two cache rows)."}
    )
    num_generations: int = field(default=1, metadata={"help": "Targets drawn per record."})
    expert_template: str | None = field(
        default=None,
        metadata={
            "help": "Expert prompt template: a built-in name (chat, plain, paper, rewrite), the text, or a file; "
            "fields {prompt} and {context} (or {answer}: the paper's variant). Default: chat, or plain "
            "when the tokenizer has no chat template."
        },
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32", kw_only=True, metadata={"help": "Model dtype for decoding."}
    )
    overwrite: bool = field(default=False, metadata={"help": "Discard an existing output or unfinished run."})
    draws_from: str | None = field(
        default=None,
        metadata={
            "help": "The draws an earlier run left beside its targets (TARGETS.draws.jsonl), taken instead of "
            "decoding again where that run's settings are these; the failure policy may differ (`drop` "
            "targets from an `answer` run's draws). Otherwise every record is decoded. Default: none."
        },
    )
    # fields that change only speed or where the run goes, never the targets (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "device", "threads", "overwrite", "draws_from")
    # the model and the files it reads and writes: the grid's runner sets them (`stage_settings.io_fields`)
    IO_FIELDS: ClassVar[tuple[str, ...]] = ("model", "input", "output", "draws_from")

    def __post_init__(self) -> None:  # refuse bad options before any model is loaded (issue 10)
        self.check_model_options()
        check_range("lam", self.lam, 0, 1)
        check_range("temperature", self.temperature, 0)
        check_range("top_k", self.top_k, 1, integer=True)
        check_range("seed", self.seed, integer=True)
        check_range("retries", self.retries, 0, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True)
        check_range("min_expert_logprob", self.min_expert_logprob, hi=0, optional=True)
        check_range("guard_top_p", self.guard_top_p, 0, 1, optional=True, lo_open=True)
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_range("num_generations", self.num_generations, 1, integer=True)
        check_distinct({"output": self.output}, {"input": self.input})
        if self.reject_phrases is not None and not reject_phrase_list(self.reject_phrases):
            raise InputError("names no phrase; leave it unset to reject none", field="reject_phrases")


def reject_phrase_list(text: str | None) -> list[str]:
    """The phrases of --reject-phrases, lower-cased, blanks dropped."""
    return [phrase.strip().lower() for phrase in (text or "").split(",") if phrase.strip()]
