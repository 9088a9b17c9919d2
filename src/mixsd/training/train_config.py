"""`mixsd train`'s config: `TrainConfig`, every `transformers.TrainingArguments` option plus ours, and the
settings of a run that decide what it trains (`run_settings`: its stage fingerprint).

Apart from the command (`mixsd.training.train`) so that the experiment grid can read, check and sweep training
options without importing the trainer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from transformers import TrainingArguments

from mixsd.core.answers import canonical_mode
from mixsd.core.files import InputError, sha256_file
from mixsd.core.options import check_range
from mixsd.training.opsd_options import OPSDOptions

# What each method trains on: the option it needs, and the message when it is missing.
METHOD_INPUTS: dict[str, tuple[str, str]] = {
    "sft": ("targets", "--targets is required (or use --method opsd or cpt with --corpus)"),
    "opsd": ("corpus", "--method {method} needs --corpus"),
    "cpt": ("corpus", "--method {method} needs --corpus"),
}
# Methods whose --corpus holds the training questions, so a learning curve scores them by default (cpt's
# corpus is passages, not questions).
CURVE_SCORES_CORPUS = ("opsd",)

# --------------------------------------------------------------------------------------------------
# Configuration (the field help is the CLI help of `mixsd train`)
# --------------------------------------------------------------------------------------------------
# Short option names of earlier mixsd versions, kept so configs and commands keep working: each is
# copied into its TrainingArguments field when given, then cleared (the TrainingArguments field is the
# one that counts, so `dataclasses.replace` on either name behaves).
ALIASES = {
    "epochs": "num_train_epochs",
    "lr": "learning_rate",
    "lr_scheduler": "lr_scheduler_type",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
}

_ALIAS_BOUNDS: dict[str, dict[str, Any]] = {
    "epochs": {"lo": 0, "lo_open": True},
    "lr": {"lo": 0},
    "batch_size": {"lo": 1, "integer": True},
    "grad_accum": {"lo": 1, "integer": True},
}


@dataclass
class TrainConfig(OPSDOptions, TrainingArguments):
    """`mixsd train`'s options: every `transformers.TrainingArguments` option plus ours (and OPSD's,
    `mixsd.training.opsd_options.OPSDOptions`, kept beside the method they tune).

    Like TRL's `SFTConfig`, the config *is* the TrainingArguments Trainer runs with, so optimizers,
    `--report_to`, gradient checkpointing, `--torch_compile`, FSDP and DeepSpeed options work from the
    command line and the experiment file. Defaults that differ from TrainingArguments: learning rate 1e-4,
    constant schedule, seed 0, logging every step, a checkpoint per epoch keeping the newest two.
    """

    # the model and the files it reads and writes (--output_dir is --out): the grid's runner sets them
    # (`stage_settings.io_fields`)
    IO_FIELDS: ClassVar[tuple[str, ...]] = ("model", "out", "output_dir", "targets", "corpus")

    # ---- what to train ---------------------------------------------------------------------------
    model: str = field(
        kw_only=True,
        metadata={"help": "Base model: the alias smollm2-135m, a HF folder, a .gguf file or a hub id."},
    )
    out: str | None = field(
        default=None,
        metadata={
            "help": "Output folder: checkpoints, the final model in OUT/model, summary.json, curve.jsonl. "
            "--output_dir is the same option (--out wins when both are given)."
        },
    )
    targets: str | None = field(
        default=None,
        metadata={
            "help": "Target JSONL from `mixsd mix` or `mixsd sft-targets` (required unless --method opsd)."
        },
    )
    method: Literal["sft", "opsd", "cpt"] = field(
        default="sft",
        metadata={
            "help": "sft: NLL on the stored targets (serves MixSD and SFT targets alike); opsd: on-policy "
            "self-distillation from the base model given the expert prompt (needs --corpus); cpt: continued "
            "pre-training, next-token NLL on the passages' text (needs --corpus)."
        },
    )
    corpus: str | None = field(
        default=None,
        metadata={
            "help": "--method opsd: corpus JSONL; --method cpt: passages JSONL (`text` per line, e.g. a "
            "documents corpus's documents/passages.jsonl) or corpus JSONL (its distinct `context` texts)."
        },
    )
    lora_rank: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA alpha (default: 2 x rank)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_targets: str = field(
        default="all-linear",
        metadata={"help": "Modules LoRA adapts: all-linear, or a comma-separated list of module names."},
    )
    save_adapter_only: bool = field(
        default=False,
        metadata={
            "help": "With LoRA: save only the adapter (loadable with peft and by every mixsd command) "
            "instead of the merged model."
        },
    )
    select: Literal["last", "best"] = field(
        default="last",
        metadata={
            "help": "Which checkpoint becomes OUT/model: the last, or the one with the lowest target NLL on "
            "--validation."
        },
    )
    validation: str | None = field(
        default=None,
        metadata={
            "help": "Target JSONL scored (mean target-token NLL) at every checkpoint; required by --select best."
        },
    )
    expert_template: str | None = field(
        default=None,
        metadata={
            "help": "OPSD: expert prompt template (text or file) with {prompt} and {context}; default: ours, "
            "the same as `mixsd mix`."
        },
    )
    overwrite: bool = field(
        default=False, metadata={"help": "Discard an existing run in --out and start over."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model folder."}
    )
    threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch (torch.set_num_threads), as for every mixsd command that loads "
            "a model. Default: torch's choice."
        },
    )
    check_disk: bool = field(
        default=True,
        metadata={
            "help": "Refuse to start when the free space in --out cannot hold what the run keeps "
            "(checkpoints and the final model, estimated from the parameter count)."
        },
    )
    # ---- a learning curve: evaluation after every epoch (mixsd.training.curve) ------------------------------
    eval_every_epoch: bool = field(
        default=False,
        metadata={
            "help": "After every epoch score memorization on --eval_corpus, KL to the base model and the "
            "--eval_probes, and append a row to OUT/curve.jsonl."
        },
    )
    eval_corpus: str | None = field(
        default=None,
        metadata={
            "help": "Corpus JSONL of the training questions for the curve (default with --method opsd: --corpus)."
        },
    )
    eval_match: str | None = field(
        default=None,
        metadata={
            "help": "Match mode of the curve's memorization score (entity, exact, number); default: the "
            "corpus manifest's answer_match, else entity."
        },
    )
    eval_limit: int | None = field(
        default=None, metadata={"help": "Curve: score at most this many training questions (spread evenly)."}
    )
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Curve: length cap of an answer."})
    eval_kl_prompts: str | None = field(
        default=None,
        metadata={
            "help": "Curve: prompts for KL(base||model) on the base model's own answers (text file, one per "
            "line, or corpus JSONL); default: the packaged held-out prompts."
        },
    )
    eval_kl_limit: int = field(default=16, metadata={"help": "Curve: KL prompts to use; 0 = no KL."})
    eval_probes: str | None = field(
        default=None,
        metadata={
            "help": "Curve: comma-separated probe files: question corpora (scored like memorization), "
            "multiple-choice or text probes (as `mixsd eval`)."
        },
    )
    eval_probe_limit: int = field(default=20, metadata={"help": "Curve: items per probe file."})
    eval_every_epochs: int = field(
        default=1, metadata={"help": "Curve: score every N-th epoch only (the last epoch always)."}
    )
    # ---- short names of earlier versions (see ALIASES) ---------------------------------------------
    epochs: float | None = field(default=None, metadata={"help": "Same as --num_train_epochs."})
    lr: float | None = field(default=None, metadata={"help": "Same as --learning_rate."})
    lr_scheduler: str | None = field(default=None, metadata={"help": "Same as --lr_scheduler_type."})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Same as --per_device_train_batch_size (and sets --per_device_eval_batch_size). The "
            "global batch is batch x gradient accumulation x processes."
        },
    )
    grad_accum: int | None = field(default=None, metadata={"help": "Same as --gradient_accumulation_steps."})
    save_every: int | None = field(
        default=None,
        metadata={
            "help": "Checkpoint every N optimizer steps; 0 = every epoch; -1 = no checkpoints (no resume, "
            "only the final model). Sets --save_strategy / --save_steps."
        },
    )
    keep_checkpoints: int | None = field(
        default=None,
        metadata={"help": "Same as --save_total_limit (0 = keep all)."},
    )
    cpu: bool = field(
        default=False, metadata={"help": "Train on CPU even when a GPU is present (--use_cpu)."}
    )
    progress: bool | None = field(
        default=None, metadata={"help": "Show progress bars (false: no bars and no per-step log lines)."}
    )
    # ---- TrainingArguments fields whose default or help is ours ----------------------------------
    output_dir: str | None = field(default=None, metadata={"help": "Same as --out."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate. Short: --lr."})
    lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "Learning-rate schedule: constant, linear, cosine, ... (transformers' names)."},
    )
    bf16: bool = field(
        default=False,
        metadata={
            "help": "bfloat16 autocast (mixed precision, CPU or GPU): master weights, optimizer state and "
            "the saved model stay float32. The one meaning of bf16 in mixsd."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialization, data order and OPSD sampling."})
    logging_steps: float = field(default=1, metadata={"help": "Log the loss every N optimizer steps."})
    logging_first_step: bool = field(default=True, metadata={"help": "Log the first step too."})
    save_strategy: str = field(
        default="epoch",
        metadata={"help": "When to write a checkpoint (model + optimizer state): epoch, steps or no."},
    )
    save_total_limit: int | None = field(
        default=2,
        metadata={
            "help": "Checkpoints kept on disk: the newest N (the best one too with --select best); a rerun "
            "resumes from the newest complete one. None keeps all."
        },
    )
    disable_tqdm: bool | None = field(default=False, metadata={"help": "No progress bars."})
    ddp_find_unused_parameters: bool | None = field(
        default=False, metadata={"help": "DDP: look for parameters without gradient (slower; off)."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Always false here: the collators need every column of the examples."},
    )

    def __post_init__(self):
        self._apply_aliases()
        self._check_own_options()
        self._derive_trainer_options()
        super().__post_init__()  # TrainingArguments: its own checks, then the device / process group
        self.out = self.output_dir  # with ~ expanded

    def _apply_aliases(self) -> None:
        for alias, target in ALIASES.items():
            value = getattr(self, alias)
            if value is None:
                continue
            if alias == "lr_scheduler":
                if not isinstance(value, str):
                    raise InputError(f"must be a schedule name; got {value!r}", field=alias)
            else:
                check_range(alias, value, **_ALIAS_BOUNDS[alias])
            setattr(self, target, value)
            setattr(self, alias, None)
            if alias == "batch_size":
                self.per_device_eval_batch_size = value
        if self.save_every is not None:
            check_range("save_every", self.save_every, -1, integer=True)
            if self.save_every < 0:
                self.save_strategy = "no"
            elif self.save_every == 0:
                self.save_strategy = "epoch"
            else:
                self.save_strategy, self.save_steps = "steps", self.save_every
            self.save_every = None
        if self.keep_checkpoints is not None:
            check_range("keep_checkpoints", self.keep_checkpoints, 0, integer=True)
            self.save_total_limit = self.keep_checkpoints or None
            self.keep_checkpoints = None
        if self.progress is not None:
            self.disable_tqdm = not self.progress
            self.progress = None
        if self.cpu:
            self.use_cpu = True
        if self.out is None and self.output_dir is None:
            raise InputError("--out is required (the output folder)", field="out")
        self.output_dir = self.out = str(self.out if self.out is not None else self.output_dir)

    def _check_own_options(self) -> None:
        """Our options and the TrainingArguments numbers a YAML file may get wrong, with the field named."""
        choices = {"method": tuple(METHOD_INPUTS), "select": ("last", "best")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}", field=name
                )
        if not isinstance(self.model, str) or not self.model:
            raise InputError("--model is required (a model name or folder)", field="model")
        needed, message = METHOD_INPUTS[self.method]
        if not getattr(self, needed):
            raise InputError(message.format(method=self.method), field=needed)
        if self.max_steps is None:
            self.max_steps = -1
        check_range("max_steps", self.max_steps, -1, integer=True)
        if self.max_steps == 0:  # 0 meant "no cap" in earlier versions
            self.max_steps = -1
        check_range("num_train_epochs", self.num_train_epochs, 0, lo_open=self.max_steps <= 0)
        check_range("learning_rate", self.learning_rate, 0)
        check_range("per_device_train_batch_size", self.per_device_train_batch_size, 1, integer=True)
        check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, integer=True)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("max_grad_norm", self.max_grad_norm, 0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("logging_steps", self.logging_steps, 0, lo_open=True)
        check_range("save_total_limit", self.save_total_limit, 1, integer=True, optional=True)
        check_range("seed", self.seed, 0, integer=True)
        check_range("threads", self.threads, 1, integer=True, optional=True)
        check_range("lora_rank", self.lora_rank, 0, integer=True)
        check_range("lora_alpha", self.lora_alpha, 0, lo_open=True, optional=True)
        check_range("lora_dropout", self.lora_dropout, 0, 1, hi_open=True)
        self.check_opsd_options()
        check_range("eval_limit", self.eval_limit, 1, integer=True, optional=True)
        check_range("eval_max_new_tokens", self.eval_max_new_tokens, 1, integer=True)
        check_range("eval_kl_limit", self.eval_kl_limit, 0, integer=True)
        check_range("eval_probe_limit", self.eval_probe_limit, 1, integer=True)
        check_range("eval_every_epochs", self.eval_every_epochs, 1, integer=True)
        if self.save_adapter_only and self.lora_rank <= 0:
            raise InputError("--save_adapter_only needs --lora_rank > 0", field="save_adapter_only")
        if self.select == "best":
            if not self.validation:
                raise InputError(
                    "--select best needs --validation (a target file to score)", field="validation"
                )
            if _strategy(self.save_strategy) == "no":
                raise InputError(
                    "--select best needs checkpoints; --save_every must be >= 0", field="save_every"
                )
        if self.eval_match is not None:
            try:
                self.eval_match = canonical_mode(self.eval_match)
            except ValueError as err:
                raise InputError(str(err), field="eval_match") from err
        if self.eval_every_epoch:
            if self.eval_corpus is None and self.method in CURVE_SCORES_CORPUS:
                self.eval_corpus = self.corpus
            if not self.eval_corpus:
                raise InputError(
                    "--eval_every_epoch needs --eval_corpus (the corpus JSONL of the training questions)",
                    field="eval_corpus",
                )
            if self.fsdp or self.deepspeed:
                raise InputError(
                    "--eval_every_epoch evaluates on the main process and needs the whole model there; "
                    "it does not work with FSDP or DeepSpeed",
                    field="eval_every_epoch",
                )
        if _fsdp_requested(self) and (self.use_cpu or not _has_accelerator()):
            # accelerate switches to FSDP only for GPU-like devices; on CPU it keeps plain DDP without a word
            # (measured with accelerate 1.16: DistributedType.MULTI_CPU, unsharded parameters)
            raise InputError(
                "FSDP runs only on GPUs (or other accelerators): on CPU accelerate would train with plain DDP "
                "instead; for several CPU processes use torchrun (DDP), see docs/training.md",
                field="fsdp",
            )

    def _derive_trainer_options(self) -> None:
        # The datasets are lists of dicts the collators read whole; Trainer must not drop "unused" columns.
        self.remove_unused_columns = False
        # accelerate sets up multi-process CPU training (gloo) only when told the run is on CPU
        if not self.use_cpu and not _has_accelerator():
            self.use_cpu = True
        if self.validation and _strategy(self.eval_strategy) == "no":
            # validation loss at every checkpoint (every epoch when there are none)
            saving = _strategy(self.save_strategy)
            self.eval_strategy = "epoch" if saving in ("no", "best") else saving
            if self.eval_strategy == "steps":
                self.eval_steps = self.save_steps
        if self.select == "best":
            self.load_best_model_at_end = True
            self.metric_for_best_model, self.greater_is_better = "eval_loss", False


def _strategy(value: Any) -> str:
    """An interval strategy as its name, whether given as text or already converted to the enum."""
    return str(getattr(value, "value", value))


def _fsdp_requested(config: TrainingArguments) -> bool:
    """FSDP asked for, by `--fsdp` or by an accelerate config (`accelerate launch` sets the variable)."""
    return bool(config.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _has_accelerator() -> bool:
    return (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )


# Options that do not change what is trained or written: a resumed run may differ in them.
_NON_DETERMINING = {
    *ALIASES,
    "save_every",
    "keep_checkpoints",
    "cpu",
    "progress",
    "output_dir",
    "overwrite",
    "check_disk",
    "threads",
    "use_cpu",
    "disable_tqdm",
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "save_on_each_node",
    "save_only_model",
    "enable_jit_checkpoint",
    "logging_strategy",
    "logging_steps",
    "logging_first_step",
    "logging_nan_inf_filter",
    "log_on_each_node",
    "log_level",
    "log_level_replica",
    "report_to",
    "run_name",
    "project",
    "push_to_hub",
    "resume_from_checkpoint",
    "dataloader_num_workers",
    "dataloader_pin_memory",
    "dataloader_persistent_workers",
    "dataloader_prefetch_factor",
    "dataloader_multiprocessing_context",
    "skip_memory_metrics",
    "torch_empty_cache_steps",
    "include_num_input_tokens_seen",
    "ddp_timeout",
    "local_rank",
    "debug",
    "do_train",
    "do_eval",
    "do_predict",
}
_NON_DETERMINING_PREFIXES = ("hub_", "trackio_")


def config_record(config: TrainConfig) -> dict[str, Any]:
    """Every option of the run as plain JSON values (TrainingArguments.to_dict: enums as their names)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def run_settings(config: TrainConfig) -> dict[str, Any]:
    """The options that determine the trained weights and outputs, with the content hash of each input."""
    settings = {
        k: v
        for k, v in config_record(config).items()
        if k not in _NON_DETERMINING and not k.startswith(_NON_DETERMINING_PREFIXES)
    }
    for name in ("targets", "corpus", "validation", "eval_corpus"):
        path = getattr(config, name)
        settings[f"{name}_sha256"] = sha256_file(path) if path and Path(path).is_file() else None
    return settings
