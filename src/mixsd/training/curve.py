"""Learning curves: score the model after every epoch of `mixsd train --eval_every_epoch`.

Each epoch appends one row to OUT/curve.jsonl:

    epoch, step          where in training (Trainer's epoch counter, optimizer steps)
    memorization         share of the training questions (--eval_corpus) answered right: greedy answers
                         scored with the corpus's own scorer (its manifest's answer_match, or --eval_match)
    memorized, questions the counts behind it
    kl, kl_tokens        KL(base || model) per token on the base model's own greedy answers to held-out
                         prompts (the measure of `mixsd eval --suite retention`, on --eval_kl_limit prompts)
    <probe>_acc          per probe file (--eval_probes, at most --eval_probe_limit items): accuracy of a
                         generative or multiple-choice probe (<probe>_n: its items); <probe>_collapse
                         for generative probes;
                         <probe>_nll_per_token for a text probe
    items                per item, in file order: "1" right / "0" wrong, one character per item, for
                         the memorization questions and each accuracy probe (<probe>_collapse: "1" for
                         an answer in the injected targets' shape), so that intervals can resample items
    seconds              time the evaluation took

With --eval_every_epochs N only every N-th epoch is scored (and always the last one).

The base model is a frozen copy of the model before training (full fine-tuning; OPSD's teacher is that
copy already) or, with LoRA, the model with its adapters switched off. The evaluation runs on the main
process, in eval mode, under the run's bf16 autocast, with the RNG state saved and restored around it: it
changes nothing in training (a run with a curve ends with the weights of one without; tested). A resumed
run drops the rows past the checkpoint it resumes from, and writes them again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import TrainerCallback

from mixsd.core.answers import matches, resolve_match_mode
from mixsd.core.files import atomic_write_json, atomic_write_jsonl, read_jsonl
from mixsd.core.models import load_model, load_tokenizer, resolve_model
from mixsd.core.records import load_corpus
from mixsd.corpora.probes import load_kl_prompts, spread
from mixsd.evaluation.probe_kinds import KL, ProbeKind, bits, load_probe
from mixsd.evaluation.scoring import kl_on_answers, reference_answers
from mixsd.method.answering import generate_answers
from mixsd.method.generation import autocast
from mixsd.method.prompts import pad_token_id

CURVE_FILE = "curve.jsonl"


class AdaptersOff(torch.nn.Module):
    """A peft model with its adapters switched off, as a model of its own: the base model without a copy.

    Every forward pass switches them off for its own duration, so it can alternate with forward passes of
    the adapted model (as `scoring.kl_per_token` does, batch by batch).
    """

    def __init__(self, peft_model):
        super().__init__()
        self.peft_model = peft_model
        self.config = peft_model.config
        self.generation_config = getattr(peft_model, "generation_config", None)

    def forward(self, *args, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


class CurveEvaluator:
    """The curve's scores of one model state. Files are read (and checked) when it is built."""

    def __init__(self, config, tokenizer):
        self.tokenizer = tokenizer
        self.bf16 = bool(config.bf16)
        self.batch_size = int(config.per_device_eval_batch_size)
        self.max_new_tokens = int(config.eval_max_new_tokens)
        self.facts = spread(load_corpus(config.eval_corpus), config.eval_limit)
        self.mode = resolve_match_mode(config.eval_match, config.eval_corpus)
        self.kl_prompts = (
            load_kl_prompts(config.eval_kl_prompts, config.eval_kl_limit)[0] if config.eval_kl_limit else []
        )
        self.probes: list[tuple[str, ProbeKind, list[dict[str, Any]]]] = []
        for name in (config.eval_probes or "").split(","):
            if name.strip():
                path = Path(name.strip())
                kind, items = load_probe(path, config.eval_probe_limit)
                self.probes.append((path.stem, kind, items))
        self._base_answers: list[tuple[list[int], list[int]]] | None = None

    def scores(self, model, base) -> dict[str, Any]:
        """Memorization, KL to `base` and the probes for `model` (both in eval mode, on one device)."""
        items = [
            {"prompt": f.prompt, "system": f.system, "max_new_tokens": self.max_new_tokens}
            for f in self.facts
        ]
        answers = generate_answers(model, self.tokenizer, items, batch_size=self.batch_size)
        hits = [
            matches(text, fact.check, self.mode)
            for (text, _, _), fact in zip(answers, self.facts, strict=True)
        ]
        row: dict[str, Any] = {
            "memorization": sum(hits) / len(self.facts),
            "memorized": sum(hits),
            "questions": len(self.facts),
            "match": self.mode,
        }
        items = {"memorization": bits(hits)}
        if self.kl_prompts:
            row.update(self._kl(model, base))
        for name, kind, probe_items in self.probes:
            scores, per_item = self._probe(model, name, kind, probe_items)
            row.update(scores)
            items.update(per_item)
        row["items"] = items
        return row

    def _kl(self, model, base) -> dict[str, Any]:
        if self._base_answers is None:  # the base never changes: its answers are generated once
            self._base_answers = [
                (prompt_ids, answer_ids)
                for prompt_ids, answer_ids, _, _ in reference_answers(
                    base,
                    self.tokenizer,
                    [(prompt, system) for _, prompt, system in self.kl_prompts],
                    max_new_tokens=self.max_new_tokens,
                    batch_size=self.batch_size,
                )
            ]
        stats = kl_on_answers(
            base,
            model,
            self._base_answers,
            pad_id=pad_token_id(self.tokenizer),
            batch_size=self.batch_size,
        )
        # the registry names the KL columns, as it names every probe's (the same sums as `mixsd eval`'s)
        assert KL.curve is not None
        columns, _ = KL.curve(KL.name, [{"kl_sum": total, "tokens": count} for total, _, count in stats])
        return columns

    def _probe(
        self, model, name: str, kind: ProbeKind, items: list[dict[str, Any]]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """A probe's scores for the row, and its per-item bits for the row's `items` (as `mixsd eval`
        scores it; text probes cut at 512 tokens, its default)."""
        if kind.curve is None:
            raise ValueError(f"a {kind.name} probe has no learning-curve columns")
        rows = kind.score_items(model, self.tokenizer, items, batch_size=self.batch_size, max_tokens=512)
        return kind.curve(name, rows)


def read_curve(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a curve.jsonl (none when it does not exist)."""
    path = Path(path)
    return [row for _, row in read_jsonl(path)] if path.is_file() else []


class CurveCallback(TrainerCallback):
    """Evaluate after every epoch and append the scores to OUT/curve.jsonl (main process only)."""

    def __init__(self, evaluator: CurveEvaluator, path: str | Path, base=None, every: int = 1):
        self.evaluator, self.path = evaluator, Path(path)
        self.base = base  # the frozen base model; None: the trained model is a peft model (adapters off)
        self.every = every  # score every `every`-th epoch, and always the last

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run trains again from its checkpoint: rows past it were made by the interrupted run.
        if state.is_world_process_zero:
            rows = read_curve(self.path)
            kept = [row for row in rows if row["step"] <= state.global_step]
            if len(kept) != len(rows):
                atomic_write_jsonl(self.path, kept)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        epoch = round(float(state.epoch or 0))
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if epoch % self.every and not last:
            return
        if state.is_world_process_zero:
            row = self.evaluate(extract_model_from_parallel(model), epoch=state.epoch, step=state.global_step)
            atomic_write_jsonl(self.path, [*read_curve(self.path), row])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the other processes wait for the main one's evaluation

    def evaluate(self, model, *, epoch: float | None, step: int) -> dict[str, Any]:
        """One curve row for `model` as it is now; training state (mode, RNG) is left as it was."""
        base = self.base if self.base is not None else AdaptersOff(model)
        return evaluate_state(self.evaluator, model, base, epoch=epoch, step=step)


def evaluate_state(
    evaluator: CurveEvaluator, model, base, *, epoch: float | None, step: int
) -> dict[str, Any]:
    """One curve row for `model` against `base`, on `model`'s device; its mode and the RNG are left as
    they were (every row of every curve is scored here: epochs, the base row, an edit's point)."""
    device = next(model.parameters()).device
    if not isinstance(base, AdaptersOff):
        base.to(device).eval()
    started = time.perf_counter()
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    model.eval()
    try:
        with torch.random.fork_rng(devices=devices), autocast(device, evaluator.bf16):
            scores = evaluator.scores(model, base)
    finally:
        model.train(was_training)
    epoch_value = None if epoch is None else round(float(epoch), 4)
    return {
        "epoch": epoch_value,
        "step": int(step),
        **scores,
        "seconds": round(time.perf_counter() - started, 3),
    }


def curve_row(config: Any, model: str | None = None, *, epoch: float, step: int = 0) -> dict[str, Any]:
    """One learning-curve row of the model at `model` (None: `config.model` itself), scored as `config`'s
    curve scores every epoch, KL against `config.model` (the base): the base row and an edit's one point."""
    handle = resolve_model(config.model)  # once for the tokenizer and the weights
    tokenizer = load_tokenizer(handle, trust_remote_code=config.trust_remote_code)
    base = load_model(handle, dtype="float32", trust_remote_code=config.trust_remote_code)
    base.to(config.device)
    scored = base
    if model is not None:
        scored = load_model(model, dtype="float32", trust_remote_code=config.trust_remote_code)
        scored.to(config.device)
    evaluator = CurveEvaluator(config, tokenizer)
    # the base row is the base against itself: KL 0 by definition, measured the same way as every epoch's
    return evaluate_state(evaluator, scored, base, epoch=epoch, step=step)


def write_curve_base(config: Any, path: Path) -> None:
    """The learning curve's row of the base model (epoch 0), scored as `config`'s curve scores every epoch
    (the grid writes it once for all its trained cells: `mixsd train` scores only the epochs it trains)."""
    atomic_write_json(path, curve_row(config, epoch=0.0))
