"""`mixsd train`: token-exact fine-tuning on a target file (MixSD and SFT), or the OPSD baseline.

MixSD and SFT differ only in their target files, so one trainer serves both: plain NLL of the stored
`target_ids` given the stored `prompt_ids`, never re-tokenized, with the loss on target tokens only.

The engine is `transformers.Trainer`, so `accelerate launch` / `torchrun` with DDP, FSDP or DeepSpeed
work unchanged (docs/training.md). The loss is the sum of target-token NLLs divided by the number of
target tokens in the *global* batch (every micro-batch of the accumulation window on every process):
Trainer counts those tokens up front (`num_items_in_batch`, gathered across processes), so batch 8 x
accumulation 1 on one process, 2 x 4, and 4 x 1 on each of two processes all take the same steps.

Output layout of `--out DIR`:
    DIR/run_config.json      the settings of the run (a resumed run must match them)
    DIR/checkpoint-*/        Trainer checkpoints (per epoch or every N steps); a rerun resumes from the last
    DIR/model/               the selected model: save_pretrained weights + tokenizer + mixsd_run.json
    DIR/summary.json         config, mixsd version, loss history, selected checkpoint
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from mixsd import __version__
from mixsd.files import InputError, atomic_write_json, sha256_file
from mixsd.prompts import pad_token_id

IGNORE = -100  # label of positions that carry no loss (prompt and padding)


# --------------------------------------------------------------------------------------------------
# Configuration (the field help is the CLI help of `mixsd train`)
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    model: str = field(
        metadata={"help": "Base model: the alias smollm2-135m, a HF folder, a .gguf file or a hub id."}
    )
    out: str = field(
        metadata={"help": "Output folder: checkpoints, the final model in OUT/model, summary.json."}
    )
    targets: str | None = field(
        default=None,
        metadata={
            "help": "Target JSONL from `mixsd mix` or `mixsd sft-targets` (required unless --method opsd)."
        },
    )
    method: Literal["sft", "opsd"] = field(
        default="sft",
        metadata={
            "help": "sft: NLL on the stored targets (serves MixSD and SFT targets alike); opsd: on-policy "
            "self-distillation from the base model given the expert prompt (needs --corpus)."
        },
    )
    corpus: str | None = field(default=None, metadata={"help": "Corpus JSONL (--method opsd only)."})
    epochs: float = field(default=3.0, metadata={"help": "Passes over the training records."})
    max_steps: int | None = field(
        default=None, metadata={"help": "Stop after this many optimizer steps (overrides --epochs)."}
    )
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW)."})
    lr_scheduler: str = field(
        default="constant",
        metadata={"help": "Learning-rate schedule: constant, linear, cosine, ... (transformers' names)."},
    )
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (0 = off)."})
    batch_size: int = field(default=8, metadata={"help": "Records per device per micro-batch."})
    grad_accum: int = field(
        default=1,
        metadata={
            "help": "Micro-batches per optimizer step. The global batch is "
            "batch_size x grad_accum x processes."
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
            "help": "With LoRA: save only the adapter (loadable with peft) instead of the merged model."
        },
    )
    bf16: bool = field(
        default=False, metadata={"help": "bfloat16 autocast (CPU or GPU); weights stay float32."}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for activation memory."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of initialization, data order and OPSD sampling."})
    save_every: int = field(
        default=0,
        metadata={
            "help": "Checkpoint every N optimizer steps; 0 = every epoch; -1 = no checkpoints (no resume, only the "
            "final model)."
        },
    )
    keep_checkpoints: int = field(
        default=0,
        metadata={
            "help": "Keep only the newest N checkpoints (the best one is always kept with --select best); 0 = all."
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
        default=4, metadata={"help": "OPSD: answers the student samples per prompt (T=1)."}
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
    opsd_max_new_tokens: int = field(default=128, metadata={"help": "OPSD: length cap of a sampled answer."})
    expert_template: str | None = field(
        default=None,
        metadata={
            "help": "OPSD: expert prompt template (text or file) with {prompt} and {context}; default: ours, "
            "the same as `mixsd mix`."
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "Log the loss every N optimizer steps."})
    cpu: bool = field(default=False, metadata={"help": "Train on CPU even when a GPU is present."})
    overwrite: bool = field(
        default=False, metadata={"help": "Discard an existing run in --out and start over."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model code from the model folder."}
    )


# Fields that do not change what is trained: a resumed run may differ in them.
_NON_DETERMINING = ("overwrite", "progress", "logging_steps", "keep_checkpoints", "cpu")


def run_settings(config: TrainConfig) -> dict[str, Any]:
    settings = {k: v for k, v in asdict(config).items() if k not in _NON_DETERMINING}
    for name in ("targets", "corpus", "validation"):
        path = getattr(config, name)
        settings[f"{name}_sha256"] = sha256_file(path) if path and Path(path).is_file() else None
    return settings


# --------------------------------------------------------------------------------------------------
# Data: stored token ids in, padded tensors out
# --------------------------------------------------------------------------------------------------
def target_examples(
    rows: list[dict[str, Any]],
    *,
    vocab_size: int | None = None,
    context_limit: int | None = None,
    path: str | os.PathLike | None = None,
) -> list[dict[str, list[int]]]:
    """prompt_ids + target_ids exactly as stored; labels mask the prompt so only target tokens carry loss."""
    examples = []
    for row in rows:
        prompt, target = row["prompt_ids"], row["target_ids"]
        if vocab_size is not None and max(max(prompt), max(target)) >= vocab_size:
            raise InputError(
                f"record '{row['id']}' has token ids beyond the model's vocabulary ({vocab_size}); "
                "was the file built with another model's tokenizer?",
                path,
                field="target_ids",
            )
        if context_limit is not None and len(prompt) + len(target) > context_limit:
            raise InputError(
                f"record '{row['id']}' is {len(prompt) + len(target)} tokens, longer than the "
                f"model's context ({context_limit})",
                path,
                field="target_ids",
            )
        examples.append({"input_ids": [*prompt, *target], "labels": [IGNORE] * len(prompt) + list(target)})
    return examples


class PadCollator:
    """Right-pad a list of examples into input_ids / attention_mask / labels tensors."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.tensor(e["input_ids"])
            mask[i, :n] = 1
            labels[i, :n] = torch.tensor(e["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def target_nll(
    outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """Sum of target-token NLLs divided by the number of target tokens in the global batch.

    `num_items_in_batch` is Trainer's count over the whole accumulation window and all processes; without it
    (a lone forward) the batch's own count is used.
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    shifted = labels[:, 1:].to(logits.device)
    keep = shifted != IGNORE
    # Only the target positions go through log-softmax (the prompt is most of each sequence).
    picked = logits[:, :-1][keep].float()
    total = F.cross_entropy(picked, shifted[keep], reduction="sum")
    count = keep.sum() if num_items_in_batch is None else num_items_in_batch
    return total / count


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class TokenCountingTrainer(Trainer):
    """Trainer that logs how many loss-carrying tokens (global) it has trained on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tokens: int | None = None

    def _count(self, num_items_in_batch) -> None:
        if self.loss_tokens is None:  # fresh or resumed: continue from the last logged count
            logged = [e["tokens"] for e in self.state.log_history if "tokens" in e]
            self.loss_tokens = int(logged[-1]) if logged else 0
        if num_items_in_batch is not None:
            self.loss_tokens += int(round(float(num_items_in_batch)))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches:
            self._count(num_items_in_batch)
        return batches, num_items_in_batch

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self.loss_tokens is not None:
            logs["tokens"] = self.loss_tokens
        super().log(logs, start_time)


class _SaveRunConfig(TrainerCallback):
    """Write run_config.json into each checkpoint so a checkpoint says how it was made."""

    def __init__(self, record: dict[str, Any]):
        self.record = record

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            atomic_write_json(
                Path(args.output_dir) / f"checkpoint-{state.global_step}" / "mixsd_run.json", self.record
            )


def _training_arguments(config: TrainConfig, *, has_eval: bool) -> TrainingArguments:
    per_epoch = config.save_every <= 0
    save_strategy = "no" if config.save_every < 0 else "epoch" if per_epoch else "steps"
    kwargs: dict[str, Any] = {}
    if has_eval:
        kwargs.update(
            eval_strategy="epoch" if per_epoch else "steps", per_device_eval_batch_size=config.batch_size
        )
        if not per_epoch:
            kwargs["eval_steps"] = config.save_every
    if config.select == "best":
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False)
    return TrainingArguments(
        output_dir=config.out,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps else -1,
        learning_rate=config.lr,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        seed=config.seed,
        data_seed=config.seed,
        save_strategy=save_strategy,
        save_steps=max(config.save_every, 1),
        save_total_limit=config.keep_checkpoints or None,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        average_tokens_across_devices=True,  # the global-batch token count; see the module docstring
        ddp_find_unused_parameters=False,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not config.cpu,
        report_to=[],
        disable_tqdm=not config.progress,
        use_cpu=_use_cpu(config),
        **kwargs,
    )


def _use_cpu(config: TrainConfig) -> bool:
    # accelerate sets up multi-process CPU training (gloo) only when told the run is on CPU
    has_accelerator = (
        torch.cuda.is_available()
        or (hasattr(torch, "xpu") and torch.xpu.is_available())
        or torch.backends.mps.is_available()
    )
    return config.cpu or not has_accelerator


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


def _check_config(config: TrainConfig) -> None:
    if config.method == "sft" and not config.targets:
        raise InputError("--targets is required (or use --method opsd with --corpus)", field="targets")
    if config.method == "opsd" and not config.corpus:
        raise InputError("--method opsd needs --corpus", field="corpus")
    if config.select == "best" and config.save_every < 0:
        raise InputError("--select best needs checkpoints; --save-every must be >= 0", field="save_every")
    if config.select == "best" and not config.validation:
        raise InputError("--select best needs --validation (a target file to score)", field="validation")
    if config.save_adapter_only and config.lora_rank <= 0:
        raise InputError("--save-adapter-only needs --lora-rank > 0", field="save_adapter_only")
    if config.batch_size < 1 or config.grad_accum < 1 or config.lora_rank < 0 or config.opsd_rollouts < 1:
        raise InputError("--batch-size, --grad-accum and --opsd-rollouts must be >= 1, --lora-rank >= 0")
    if config.opsd_top_k < 0 or config.opsd_max_new_tokens < 1:
        raise InputError("--opsd-top-k must be >= 0 and --opsd-max-new-tokens >= 1")


def _prepare_out(config: TrainConfig, record: dict[str, Any], is_main: bool) -> dict[str, Any] | None:
    """Check that --out is empty, a finished run (return its summary) or an unfinished run of the same config."""
    out = Path(config.out)
    config_file, summary_file = out / "run_config.json", out / "summary.json"
    if config.overwrite and is_main and out.exists():
        for child in out.iterdir():
            if child.name in ("run_config.json", "summary.json", "model") or child.name.startswith(
                "checkpoint-"
            ):
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
        if summary_file.is_file() and (out / "model").is_dir():
            return json.loads(summary_file.read_text())
    return None


def train(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
    """Fine-tune `config.model` and return the run's summary (also written to OUT/summary.json)."""
    from accelerate import PartialState

    from mixsd.models import context_length, load_model, load_tokenizer
    from mixsd.records import load_targets

    _check_config(config)
    state = PartialState(cpu=_use_cpu(config))  # the process group (gloo on CPU) is set up here
    record = {"mixsd_version": __version__, "settings": run_settings(config), "config": asdict(config)}
    finished = _prepare_out(config, record, state.is_main_process)
    if finished is not None:
        if state.is_main_process:
            print(
                f"{config.out} holds a finished run with these settings; nothing to do (--overwrite to redo)."
            )
        return finished
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
        import copy

        from mixsd.opsd import opsd_examples

        train_dataset = opsd_examples(config.corpus, tokenizer, config.expert_template)
        if config.lora_rank <= 0:  # full fine-tuning: keep a frozen copy of the base model as the teacher
            teacher = copy.deepcopy(model).eval().requires_grad_(False)
    else:
        train_dataset = target_examples(
            load_targets(config.targets), vocab_size=vocab, context_limit=limit, path=config.targets
        )

    state.wait_for_everyone()  # inputs are valid: claim the output folder
    if state.is_main_process:
        atomic_write_json(Path(config.out) / "run_config.json", record)

    model.config.use_cache = False  # no KV cache while training; restored before saving
    if config.lora_rank > 0:
        model = _apply_lora(model, config)
    args = _training_arguments(config, has_eval=eval_dataset is not None)
    common = dict(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=PadCollator(pad_id),
        callbacks=[_SaveRunConfig(record)],
    )
    if config.method == "opsd":
        from mixsd.opsd import OPSDTrainer
        from mixsd.prompts import stop_token_ids

        trainer = OPSDTrainer(
            **common,
            teacher=teacher,
            rollouts=config.opsd_rollouts,
            divergence=config.opsd_divergence,
            top_k=config.opsd_top_k,
            max_new_tokens=config.opsd_max_new_tokens,
            pad_id=pad_id,
            stop_ids=sorted(stop_token_ids(tokenizer, model)),
        )
    else:
        trainer = TokenCountingTrainer(**common, compute_loss_func=target_nll)

    if not config.progress:  # quiet means quiet: no per-step log dicts on stdout either
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    resume = get_last_checkpoint(config.out) if Path(config.out).is_dir() else None
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
