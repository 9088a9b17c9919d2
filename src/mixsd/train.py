"""`mixsd train`: token-exact fine-tuning on a target file (MixSD and SFT), or the OPSD baseline.

MixSD and SFT differ only in their target files, so one trainer serves both (`mixsd.sft`: plain NLL of
the stored `target_ids` given the stored `prompt_ids`, never re-tokenized, on target tokens only); OPSD
has its own (`mixsd.opsd`). This module is the command: its config and which trainer each method gets.

The engine is `transformers.Trainer`, so `accelerate launch` / `torchrun` with DDP, FSDP or DeepSpeed
work unchanged (docs/training.md); the config *is* a `TrainingArguments` (as TRL's SFTConfig), so every
Trainer option is an option of `mixsd train`. The loss is the sum of target-token NLLs divided by the number of
target tokens in the *global* batch (every micro-batch of the accumulation window on every process):
Trainer counts those tokens up front (`num_items_in_batch`, gathered across processes), so batch 8 x
accumulation 1 on one process, 2 x 4, and 4 x 1 on each of two processes all take the same steps.

Output layout of `--out DIR`:
    DIR/run_config.json      the settings of the run (a resumed run must match them)
    DIR/checkpoint-*/        Trainer checkpoints (per epoch by default; the newest two kept), each marked
                             complete by its mixsd_run.json, written last; a rerun resumes from the newest
                             complete one and removes incomplete ones (a kill while writing)
    DIR/curve.jsonl          with --eval_every_epoch: one row of scores per epoch (mixsd.curve)
    DIR/opsd-diagnostics.jsonl  --method opsd: one row before training and one per epoch (mixsd.opsd)
    DIR/model/               the selected model: save_pretrained weights + tokenizer + mixsd_run.json
    DIR/summary.json         config, mixsd version, loss history, selected checkpoint
    DIR/stage.json           the settings fingerprint of the finished run (mixsd.stages): a rerun with
                             the same settings reuses it
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import Trainer, TrainingArguments, set_seed

from mixsd import __version__
from mixsd.checkpoints import checkpoint_files, checkpoint_folders, checkpoint_is_complete, resume_checkpoint
from mixsd.files import InputError, atomic_write_json, output_lock, sha256_file
from mixsd.prompts import pad_token_id
from mixsd.sft import PadCollator, TokenCountingTrainer, target_examples, target_nll
from mixsd.stages import Stage

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
class TrainConfig(TrainingArguments):
    """`mixsd train`'s options: every `transformers.TrainingArguments` option plus ours.

    Like TRL's `SFTConfig`, the config *is* the TrainingArguments Trainer runs with, so optimizers,
    `--report_to`, gradient checkpointing, `--torch_compile`, FSDP and DeepSpeed options work from the
    command line and the experiment file. Defaults that differ from TrainingArguments: learning rate 1e-4,
    constant schedule, seed 0, logging every step, a checkpoint per epoch keeping the newest two.
    """

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
    opsd_rollouts: int = field(
        default=8, metadata={"help": "OPSD: answers the student samples per prompt (T=1; the paper: 8)."}
    )
    opsd_divergence: Literal["forward", "reverse", "jsd"] = field(
        default="forward",
        metadata={
            "help": "OPSD: token-level KL(teacher||student) (forward), KL(student||teacher) (reverse), or JSD."
        },
    )
    opsd_top_k: int = field(
        default=64,
        metadata={
            "help": "OPSD: divergence over the teacher's top-k tokens (both renormalized); 0 = full vocabulary."
        },
    )
    opsd_max_new_tokens: int = field(
        default=64,
        metadata={
            "help": "OPSD: length cap of a sampled answer (SmolLM2's expert answers to KGFact-small: median 16 "
            "tokens, 90% within 27)."
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
    # ---- a learning curve: evaluation after every epoch (mixsd.curve) ------------------------------
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
        from mixsd.options import check_range

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
        from mixsd.answers import canonical_mode
        from mixsd.options import check_range

        choices = {
            "method": ("sft", "opsd", "cpt"),
            "select": ("last", "best"),
            "opsd_divergence": ("forward", "reverse", "jsd"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise InputError(
                    f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}", field=name
                )
        if not isinstance(self.model, str) or not self.model:
            raise InputError("--model is required (a model name or folder)", field="model")
        if self.method == "sft" and not self.targets:
            raise InputError(
                "--targets is required (or use --method opsd or cpt with --corpus)", field="targets"
            )
        if self.method in ("opsd", "cpt") and not self.corpus:
            raise InputError(f"--method {self.method} needs --corpus", field="corpus")
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
        check_range("opsd_rollouts", self.opsd_rollouts, 1, integer=True)
        check_range("opsd_top_k", self.opsd_top_k, 0, integer=True)
        check_range("opsd_max_new_tokens", self.opsd_max_new_tokens, 1, integer=True)
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
            if self.eval_corpus is None and self.method == "opsd":
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


# --------------------------------------------------------------------------------------------------
# Disk space: what the run keeps, checked before it starts
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskPlan:
    """What a run writes, estimated from its parameters: the optimizer state as two moments per trainable
    parameter (AdamW; one for SGD), in the parameters' dtype."""

    weights_bytes: int  # the weights in a checkpoint (only the adapter with LoRA)
    optimizer_bytes: int  # the optimizer state in a checkpoint (0 with --save_only_model)
    model_bytes: int  # the final OUT/model
    saves: int  # checkpoints the run writes
    kept: int  # checkpoints on disk at once (one more while the next one is written)

    @property
    def checkpoint_bytes(self) -> int:
        return self.weights_bytes + self.optimizer_bytes

    @property
    def needed_bytes(self) -> int:
        """The peak: the kept checkpoints plus the larger of a checkpoint being written and the final model."""
        writing = self.checkpoint_bytes if self.saves > self.kept else 0
        return self.kept * self.checkpoint_bytes + max(writing, self.model_bytes)

    def describe(self) -> str:
        parts = [
            f"one checkpoint is about {format_bytes(self.checkpoint_bytes)} (weights "
            f"{format_bytes(self.weights_bytes)} + optimizer state {format_bytes(self.optimizer_bytes)})",
            f"the run writes {self.saves} and keeps at most {self.kept}",
            f"the final model is {format_bytes(self.model_bytes)}",
        ]
        return "; ".join(parts) + f": about {format_bytes(self.needed_bytes)} at the peak"


def format_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def optimizer_steps(config: TrainConfig, examples: int, processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a run over `examples` records."""
    per_process = math.ceil(examples / max(processes, 1))
    batches = math.ceil(per_process / config.per_device_train_batch_size)
    per_epoch = max(math.ceil(batches / config.gradient_accumulation_steps), 1)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * per_epoch)
    return per_epoch, total


def disk_plan(config: TrainConfig, model, examples: int, processes: int = 1) -> DiskPlan:
    """Estimate what the run keeps on disk (`model` as it will be trained: with its LoRA adapters)."""
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    all_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable_bytes = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    lora = config.lora_rank > 0
    moments = 1 if "sgd" in _strategy(config.optim) else 2
    weights = trainable_bytes if lora else all_bytes  # Trainer saves only the adapter of a peft model
    optimizer = 0 if config.save_only_model else moments * trainable_bytes
    final = trainable_bytes if config.save_adapter_only else all_bytes - (trainable_bytes if lora else 0)
    per_epoch, total = optimizer_steps(config, examples, processes)
    strategy = _strategy(config.save_strategy)
    if strategy == "no":
        saves = 0
    elif strategy == "steps":
        every = config.save_steps if config.save_steps >= 1 else math.ceil(config.save_steps * total)
        saves = math.ceil(total / max(int(every), 1))
    else:  # epoch (and best, which saves at most at every evaluation)
        saves = math.ceil(total / per_epoch)
    limit = config.save_total_limit
    if limit is not None and config.select == "best":
        limit = max(limit, 2)  # the best checkpoint is kept beside the newest
    kept = saves if limit is None else min(saves, limit)
    return DiskPlan(weights, optimizer, final, saves, kept)


def free_bytes(folder: str | os.PathLike) -> int:
    """Free space where `folder` is (or will be created)."""
    path = Path(folder).resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_disk_space(plan: DiskPlan, out: str | os.PathLike, free: int | None = None) -> str:
    """The plan as one line; InputError when the free space cannot hold it. Complete checkpoints already in
    `out` (a resumed run) count as written."""
    held = sum(
        sum(checkpoint_files(folder).values())
        for folder in checkpoint_folders(Path(out))
        if checkpoint_is_complete(folder)
    )
    needed = max(plan.needed_bytes - held, 0)
    free = free_bytes(out) if free is None else free
    line = f"disk: {plan.describe()}; free {format_bytes(free)}"
    if needed > free:
        raise InputError(
            f"not enough free disk space: {plan.describe()}, {format_bytes(needed)} still to write, but only "
            f"{format_bytes(free)} free. Free some space, keep fewer checkpoints (--save_total_limit 1), "
            "save no optimizer state (--save_only_model, no exact resume), or none at all (--save_every -1); "
            "--check_disk false skips this check",
            out,
        )
    return line


def _apply_lora(model, config: TrainConfig):
    from peft import LoraConfig, get_peft_model

    targets = (
        config.lora_targets
        if config.lora_targets == "all-linear"
        else [t.strip() for t in config.lora_targets.split(",") if t.strip()]
    )
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha or 2 * config.lora_rank,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def train_stage(config: TrainConfig, settings: dict[str, Any] | None = None) -> Stage:
    """The finished run in --out (summary.json and model/) as a stage: current while its settings hold."""
    out = Path(config.out)
    settings = run_settings(config) if settings is None else settings
    return Stage("train", [out / "summary.json", out / "model"], settings, record=out / "stage.json")


def _prepare_out(config: TrainConfig, record: dict[str, Any], is_main: bool) -> None:
    """Check that --out is empty or holds a run of the same config (to resume), or clear it for --overwrite."""
    out = Path(config.out)
    config_file = out / "run_config.json"
    if config.overwrite and is_main and out.exists():
        for child in out.iterdir():
            if child.name in (
                "run_config.json",
                "summary.json",
                "model",
                "curve.jsonl",
                "opsd-diagnostics.jsonl",
            ) or child.name.startswith("checkpoint-"):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif config_file.is_file():
        previous = json.loads(config_file.read_text())
        if previous.get("settings") != record["settings"]:
            changed = sorted(
                k for k in record["settings"] if previous.get("settings", {}).get(k) != record["settings"][k]
            )
            raise InputError(
                f"holds a run with other settings ({', '.join(changed)}); use another --out, the "
                "same arguments to resume, or --overwrite",
                config_file,
            )


def train(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Fine-tune `config.model` and return the run's summary (also written to OUT/summary.json)."""
    with output_lock(config.out):  # one run per --out: a second one refuses before any work (issue 10)
        return _train_locked(config, model=model, tokenizer=tokenizer)


def _train_locked(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    from accelerate import PartialState

    from mixsd.models import context_length, load_model, load_tokenizer
    from mixsd.records import load_targets

    state = PartialState()  # set up by the config (TrainingArguments): the process group, gloo on CPU
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    record = {"mixsd_version": __version__, "settings": run_settings(config), "config": config_record(config)}
    stage = train_stage(config, record["settings"])
    if not config.overwrite and stage.is_current():
        if state.is_main_process:
            print(
                f"{config.out} holds a finished run with these settings; nothing to do (--overwrite to redo)."
            )
        return json.loads((Path(config.out) / "summary.json").read_text())
    _prepare_out(config, record, state.is_main_process)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    if model is None:
        model = load_model(config.model, dtype="float32", trust_remote_code=config.trust_remote_code)
    vocab = model.get_input_embeddings().num_embeddings
    limit = context_length(model)
    pad_id = pad_token_id(tokenizer)

    eval_dataset = None
    if config.validation:
        eval_dataset = target_examples(
            load_targets(config.validation), vocab_size=vocab, context_limit=limit, path=config.validation
        )
    teacher = None
    if config.method == "opsd":
        from mixsd.opsd import opsd_examples
        from mixsd.prompts import answer_end

        train_dataset = opsd_examples(
            config.corpus, tokenizer, config.expert_template, answer_end(tokenizer, model)
        )
        if config.lora_rank <= 0:  # full fine-tuning: keep a frozen copy of the base model as the teacher
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    elif config.method == "cpt":  # continued pre-training: the passages' own tokens (mixsd.cpt)
        from mixsd.cpt import cpt_examples

        train_dataset = cpt_examples(config.corpus, tokenizer, context_limit=limit)
    else:
        train_dataset = target_examples(
            load_targets(config.targets), vocab_size=vocab, context_limit=limit, path=config.targets
        )

    callbacks = []
    if config.eval_every_epoch:  # its files are read (and checked) now, before any work
        from mixsd.curve import CURVE_FILE, CurveCallback, CurveEvaluator

        evaluator = CurveEvaluator(config, tokenizer)
        base = None
        if config.lora_rank <= 0:  # the base to measure KL against; with LoRA: the adapters switched off
            base = teacher if teacher is not None else copy.deepcopy(model).eval().requires_grad_(False)
        callbacks.append(
            CurveCallback(evaluator, Path(config.out) / CURVE_FILE, base=base, every=config.eval_every_epochs)
        )

    model.config.use_cache = False  # no KV cache while training; restored before saving
    if config.lora_rank > 0:
        set_seed(config.seed)  # the adapters' initialization follows --seed
        model = _apply_lora(model, config)
    if config.check_disk:
        line = check_disk_space(disk_plan(config, model, len(train_dataset), state.num_processes), config.out)
        if state.is_main_process:
            print(line)

    state.wait_for_everyone()  # inputs are valid: claim the output folder
    if state.is_main_process:
        atomic_write_json(Path(config.out) / "run_config.json", record)
        stage.begin()

    common = dict(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PadCollator(pad_id),
        callbacks=callbacks,
        run_record=record,
    )
    if config.method == "opsd":
        from mixsd.answers import resolve_match_mode
        from mixsd.opsd import DIAGNOSTICS_FILE, OPSDTrainer
        from mixsd.prompts import answer_end

        trainer = OPSDTrainer(
            **common,
            teacher=teacher,
            rollouts=config.opsd_rollouts,
            divergence=config.opsd_divergence,
            top_k=config.opsd_top_k,
            max_new_tokens=config.opsd_max_new_tokens,
            pad_id=pad_id,
            answer_end=answer_end(tokenizer, model),
            tokenizer=tokenizer,
            match_mode=resolve_match_mode(config.eval_match, config.corpus),
            diagnostics_file=Path(config.out) / DIAGNOSTICS_FILE,
        )
    else:
        trainer = TokenCountingTrainer(**common, compute_loss_func=target_nll)

    if config.disable_tqdm:  # quiet means quiet: no per-step log dicts on stdout either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if state.is_main_process:  # a checkpoint cut short by a kill or Ctrl-C is removed, never resumed
        resume_checkpoint(config.out, remove_incomplete=True)
    state.wait_for_everyone()
    resume = config.resume_from_checkpoint or resume_checkpoint(config.out, remove_incomplete=False)
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started

    model_dir = Path(config.out) / "model"
    summary = {
        **record,
        "model_dir": str(model_dir),
        "resumed_from": resume,
        "selected_checkpoint": trainer.state.best_model_checkpoint if config.select == "best" else "last",
        "best_validation_loss": trainer.state.best_metric,
        "global_steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "seconds": round(
            seconds, 3
        ),  # training time of this invocation (a resumed run counts from the resume)
        "seconds_this_run": round(seconds, 3),
        "history": [
            {
                "step": e["step"],
                "epoch": e.get("epoch"),
                "loss": e["loss"],
                "tokens": e.get("tokens"),
                "learning_rate": e.get("learning_rate"),
                "grad_norm": e.get("grad_norm"),
            }
            for e in trainer.state.log_history
            if "loss" in e
        ],
        "validation": [
            {"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"]}
            for e in trainer.state.log_history
            if "eval_loss" in e
        ],
    }
    _save_final(trainer, tokenizer, config, model_dir, summary)
    if state.is_main_process:
        atomic_write_json(Path(config.out) / "summary.json", summary)
        stage.finish()
    state.wait_for_everyone()
    return summary


def _save_final(
    trainer: Trainer, tokenizer, config: TrainConfig, model_dir: Path, summary: dict[str, Any]
) -> None:
    """Save the selected model into a staging folder, then rename it to OUT/model (never half a folder)."""
    staging = model_dir.with_name(".model.staging")
    is_main = trainer.accelerator.is_main_process
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    model = trainer.accelerator.unwrap_model(trainer.model)
    model.config.use_cache = True
    if config.lora_rank > 0 and not config.save_adapter_only:
        if is_main:  # merge LoRA into the base weights: a plain model any transformers code loads
            merged = model.merge_and_unload()
            merged.config.use_cache = True
            merged.save_pretrained(staging, safe_serialization=True)
    else:
        trainer.save_model(str(staging))  # gathers FSDP / DeepSpeed shards; saves only the adapter with LoRA
    if is_main:
        tokenizer.save_pretrained(staging)
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and not (staging / "generation_config.json").exists():
            generation_config.save_pretrained(staging)
        atomic_write_json(staging / "mixsd_run.json", {k: v for k, v in summary.items() if k != "history"})
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(staging, model_dir)
    trainer.accelerator.wait_for_everyone()


def format_summary(summary: dict[str, Any]) -> str:
    history = summary["history"]
    first, last = (history[0], history[-1]) if history else ({}, {})
    parts = [
        f"steps {summary['global_steps']}",
        f"loss {first.get('loss', float('nan')):.4f} -> {last.get('loss', float('nan')):.4f}",
        f"tokens {last.get('tokens')}",
    ]
    if summary.get("validation"):
        parts.append(f"validation loss {summary['validation'][-1]['loss']:.4f}")
    parts.append(f"selected {summary['selected_checkpoint']}")
    parts.append(f"{summary['seconds_this_run']:.1f}s")
    return "  ".join(parts)


def train_command(config: TrainConfig) -> dict[str, Any]:
    summary = train(config)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(format_summary(summary))
        print(f"model saved to {summary['model_dir']}")
    return summary
