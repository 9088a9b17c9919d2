"""The options of `mixsd eval` (`EvalConfig`; the field help is the command's CLI help), checked before any
model loads, and each suite's default answer length. `mixsd.evaluation.evaluate` runs the command.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mixsd.core.files import InputError
from mixsd.core.options import ModelOptions, check_distinct, check_range
from mixsd.evaluation.lmeval import parse_tasks as parse_lm_eval_tasks

Suite = Literal["kgfact", "kgfunc", "qa", "retention"]
DEFAULT_MAX_NEW_TOKENS = {"kgfact": 64, "kgfunc": 384, "qa": 128, "retention": 64}


# --------------------------------------------------------------------------------------------------
# Configuration (the field help is the CLI help of `mixsd eval`)
# --------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig(ModelOptions):
    model: str = field(
        metadata={
            "help": "Model to evaluate: smollm2-135m, a HF folder, a `mixsd train` output "
            "folder, a LoRA adapter folder (merged into its base), .gguf or hub id."
        }
    )
    suite: Suite = field(metadata={"help": "kgfact | kgfunc | qa (every *.jsonl of --data) | retention."})
    out: str = field(
        metadata={"help": "Results JSON to write; predictions go beside it (.predictions.jsonl)."}
    )
    data: str | None = field(
        default=None,
        metadata={
            "help": "Corpus folder (kgfact, kgfunc), folder or file of corpus JSONL (qa), or probe folder "
            "(retention; default $MIXSD_CACHE/probes)."
        },
    )
    base: str | None = field(
        default=None,
        metadata={
            "help": "Base model for retention ratios and KL (retention suite); its results are cached."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Length cap of an answer; default kgfact 64, kgfunc 384, qa 128, retention (KL answers) 64."
        },
    )
    limit: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate only N records of each split / probe, "
            "taken evenly across the file (quick runs)."
        },
    )
    splits: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated splits to evaluate (e.g. train,paraphrase); default: every split of the suite."
        },
    )
    bf16: bool = field(default=False, metadata={"help": "Deprecated: same as --dtype bfloat16."})
    kl_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Prompts for the KL probe: a .txt file (one per line) or a corpus JSONL; default: built-in list."
        },
    )
    ppl_max_tokens: int = field(
        default=512, metadata={"help": "Text probe paragraphs are cut to this many tokens."}
    )
    entities: str | None = field(
        default=None,
        metadata={
            "help": "Corpus JSONL whose answer checks are the injected entities (leakage errors); "
            "default for kgfact: <data>/train.jsonl."
        },
    )
    match: Literal["entity", "exact", "number", "loose", "strict"] | None = field(
        default=None,
        metadata={
            "help": "How answers are matched for the headline accuracy: entity (old name loose; the answer "
            "appears as whole words), exact (strict; the final answer equals it), number (the final number "
            "equals it). Default: each corpus manifest's answer_match, else entity. Every mode is reported."
        },
    )
    taxonomy_on: Literal["entity", "exact", "number", "loose", "strict"] | None = field(
        default=None,
        metadata={
            "help": "Which scorer decides that an answer is wrong before its error type is assigned; "
            "default: the headline one (--match)."
        },
    )
    collapse_max_words: int = field(
        default=10,
        metadata={"help": "A wrong answer of at most this many words (with an answer in it) is 'collapse'."},
    )
    require_marker: bool = field(
        default=False,
        metadata={
            "help": "Count a wrong answer without \\boxed{} or 'answer is' as a 'format' error (else only empty "
            "answers and answers cut at the length cap without one are)."
        },
    )
    min_entity_chars: int = field(
        default=3,
        metadata={"help": "Ignore injected entities shorter than this (after normalization) for leakage."},
    )
    base_cache: bool = field(
        default=True, metadata={"help": "Reuse/store base-model retention results in $MIXSD_CACHE/eval-base."}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Recompute even if results for these settings exist."}
    )
    # lm-evaluation-harness tasks as retention probes (mixsd.evaluation.lmeval); OMIT_WHILE_DEFAULT: results recorded
    # before these options existed stay current while they are unset (stages.config_settings)
    lm_eval_tasks: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated lm-evaluation-harness tasks (or groups, tags) run in-process on the "
            "model and --base with identical settings (retention suite; needs `pip install "
            "'mixsd[lm-eval]'`); their data must be local when offline.",
        },
    )
    lm_eval_include: str | None = field(
        default=None,
        metadata={
            "help": "Folder of extra lm-eval task YAMLs (e.g. from `mixsd probes export-lm-eval`).",
        },
    )
    lm_eval_num_fewshot: int | None = field(
        default=None,
        metadata={
            "help": "Few-shot examples for every lm-eval task; default: each task's own.",
        },
    )
    # fields that change only speed or where the run goes, never the scores (`mixsd.core.stage_settings`); `dtype`
    # is in the settings as `bf16`, which `options.ModelOptions` keeps equal to `dtype == "bfloat16"`
    SPEED_ONLY: ClassVar[tuple[str, ...]] = (
        "batch_size",
        "device",
        "threads",
        "overwrite",
        "base_cache",
        "dtype",
    )
    OMIT_WHILE_DEFAULT: ClassVar[tuple[str, ...]] = (
        "lm_eval_tasks",
        "lm_eval_include",
        "lm_eval_num_fewshot",
    )

    def __post_init__(self) -> None:  # refuse bad options before any model is loaded (issue 10)
        self.check_model_options()
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_range("max_new_tokens", self.max_new_tokens, 1, integer=True, optional=True)
        check_range("limit", self.limit, 1, integer=True, optional=True)
        check_range("ppl_max_tokens", self.ppl_max_tokens, 2, integer=True)
        check_range("collapse_max_words", self.collapse_max_words, 0, integer=True)
        check_range("min_entity_chars", self.min_entity_chars, 0, integer=True)
        check_range("lm_eval_num_fewshot", self.lm_eval_num_fewshot, 0, integer=True, optional=True)
        if self.lm_eval_tasks is not None:
            parse_lm_eval_tasks(self.lm_eval_tasks)
            if self.suite != "retention":
                raise InputError(
                    "lm-eval tasks are retention probes: use --suite retention", field="lm_eval_tasks"
                )
        elif self.lm_eval_include is not None or self.lm_eval_num_fewshot is not None:
            raise InputError(
                "needs --lm-eval-tasks",
                field="lm_eval_include" if self.lm_eval_include else "lm_eval_num_fewshot",
            )
        inputs = {"data": self.data, "entities": self.entities, "kl_prompts": self.kl_prompts}
        inputs["lm_eval_include"] = self.lm_eval_include
        check_distinct({"out": self.out}, inputs)
