"""`mixsd train`: token-exact fine-tuning on a target file (MixSD and SFT), or the OPSD baseline.

MixSD and SFT differ only in their target files, so one trainer serves both (`mixsd.training.sft`: plain NLL of
the stored `target_ids` given the stored `prompt_ids`, never re-tokenized, on target tokens only); OPSD
has its own (`mixsd.training.opsd`). This module is the command: which examples and trainer each method gets
(`METHODS`); its config is `mixsd.training.train_config.TrainConfig`.

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
    DIR/curve.jsonl          with --eval_every_epoch: one row of scores per epoch (mixsd.training.curve)
    DIR/opsd-diagnostics.jsonl  --method opsd: one row before training and one per epoch (mixsd.training.opsd)
    DIR/model/               the selected model: save_pretrained weights + tokenizer + mixsd_run.json
    DIR/summary.json         config, mixsd version, loss history, selected checkpoint
    DIR/stage.json           the settings fingerprint of the finished run (mixsd.core.stages): a rerun with
                             the same settings reuses it
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from peft import LoraConfig, get_peft_model
from transformers import Trainer, set_seed
from transformers.trainer_callback import PrinterCallback

from mixsd import __version__
from mixsd.core import models
from mixsd.core.answers import resolve_match_mode
from mixsd.core.files import InputError, atomic_write_json, output_lock
from mixsd.core.models import context_length, load_model, load_tokenizer
from mixsd.core.records import load_targets
from mixsd.core.stages import Stage
from mixsd.method.prompts import answer_end, pad_token_id
from mixsd.training.checkpoints import (
    check_disk_space,
    disk_plan,
    resume_checkpoint,
)
from mixsd.training.cpt import cpt_examples
from mixsd.training.curve import CURVE_FILE, CurveCallback, CurveEvaluator
from mixsd.training.opsd import OPSDTrainer, opsd_examples
from mixsd.training.opsd_options import DIAGNOSTICS_FILE
from mixsd.training.sft import PadCollator, TokenCountingTrainer, target_examples, target_nll

# The config lives in mixsd.training.train_config (the grid reads it without the trainer); these names are
# imported from here by users and the CLI.
from mixsd.training.train_config import (  # noqa: F401
    ALIASES,
    TrainConfig,
    _has_accelerator,
    _strategy,
    config_record,
    run_settings,
)


def _apply_lora(model, config: TrainConfig):
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


# --------------------------------------------------------------------------------------------------
# The methods: what each trains on and with which trainer
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingMethod:
    """How `mixsd train --method NAME` trains: its examples, its trainer, and whether it keeps a frozen copy
    of the base model (the teacher; with LoRA the student with its adapters off serves instead)."""

    # (config, tokenizer, model, vocabulary size, context length) -> training examples
    examples: Callable[[TrainConfig, Any, Any, int, int], list[dict[str, Any]]]
    # (Trainer's arguments, config, tokenizer, model, teacher) -> the trainer
    trainer: Callable[[dict[str, Any], TrainConfig, Any, Any, Any], Trainer]
    teacher: bool = False


def _target_file_examples(
    config: TrainConfig, tokenizer, model, vocab: int, limit: int
) -> list[dict[str, Any]]:
    """The stored prompt and target ids of a target file (MixSD and SFT targets alike)."""
    return target_examples(
        load_targets(config.targets), vocab_size=vocab, context_limit=limit, path=config.targets
    )


def _opsd_examples(config: TrainConfig, tokenizer, model, vocab: int, limit: int) -> list[dict[str, Any]]:
    return opsd_examples(config.corpus, tokenizer, config.expert_template, answer_end(tokenizer, model))


def _cpt_examples(config: TrainConfig, tokenizer, model, vocab: int, limit: int) -> list[dict[str, Any]]:
    """Continued pre-training: the passages' own tokens (mixsd.training.cpt)."""
    return cpt_examples(config.corpus, tokenizer, context_limit=limit)


def _nll_trainer(common: dict[str, Any], config: TrainConfig, tokenizer, model, teacher) -> Trainer:
    return TokenCountingTrainer(**common, compute_loss_func=target_nll)


def _opsd_trainer(common: dict[str, Any], config: TrainConfig, tokenizer, model, teacher) -> Trainer:
    return OPSDTrainer(
        **common,
        teacher=teacher,
        rollouts=config.opsd_rollouts,
        divergence=config.opsd_divergence,
        top_k=config.opsd_top_k,
        max_new_tokens=config.opsd_max_new_tokens,
        pad_id=pad_token_id(tokenizer),
        answer_end=answer_end(tokenizer, model),
        tokenizer=tokenizer,
        match_mode=resolve_match_mode(config.eval_match, config.corpus),
        diagnostics_file=Path(config.out) / DIAGNOSTICS_FILE,
    )


# every value of TrainConfig.method (its inputs are checked by mixsd.training.train_config.METHOD_INPUTS)
METHODS: dict[str, TrainingMethod] = {
    "sft": TrainingMethod(_target_file_examples, _nll_trainer),
    "opsd": TrainingMethod(_opsd_examples, _opsd_trainer, teacher=True),
    "cpt": TrainingMethod(_cpt_examples, _nll_trainer),
}


def _train_locked(config: TrainConfig, *, model=None, tokenizer=None) -> dict[str, Any]:
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
    if tokenizer is None or model is None:
        handle = models.resolve_model(
            config.model
        )  # once: the tokenizer and the weights come from one handle
        if tokenizer is None:
            tokenizer = load_tokenizer(handle, trust_remote_code=config.trust_remote_code)
        if model is None:
            model = load_model(handle, dtype="float32", trust_remote_code=config.trust_remote_code)
    vocab = model.get_input_embeddings().num_embeddings
    limit = context_length(model)
    pad_id = pad_token_id(tokenizer)

    eval_dataset = None
    if config.validation:
        eval_dataset = target_examples(
            load_targets(config.validation), vocab_size=vocab, context_limit=limit, path=config.validation
        )
    method = METHODS[config.method]
    train_dataset = method.examples(config, tokenizer, model, vocab, limit)
    teacher = None
    if method.teacher and config.lora_rank <= 0:  # full fine-tuning: a frozen copy of the base model
        teacher = copy.deepcopy(model).eval().requires_grad_(False)

    callbacks = []
    if config.eval_every_epoch:  # its files are read (and checked) now, before any work
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
    trainer = method.trainer(common, config, tokenizer, model, teacher)

    if config.disable_tqdm:  # quiet means quiet: no per-step log dicts on stdout either
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
    if PartialState().is_main_process:
        print(format_summary(summary))
        print(f"model saved to {summary['model_dir']}")
    return summary
