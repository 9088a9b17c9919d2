"""The OPSD baseline (on-policy self-distillation), trained through `mixsd train --method opsd`.

Each optimizer step:
  1. the student samples `rollouts` answers (T=1, full distribution) to each naive prompt x;
  2. the teacher, the frozen base model, reads the expert prompt x+ (built exactly as `mixsd mix` builds
     it: `expert_message` + `encode_prompt`) followed by the same sampled answer;
  3. the loss is a token-level divergence between teacher and student on every sampled token:
        forward  KL(p_teacher || p_student)
        reverse  KL(p_student || p_teacher)
        jsd      (KL(p_t || m) + KL(p_s || m)) / 2, m = (p_t + p_s) / 2
     over the teacher's top-k tokens (both distributions renormalized on that set, as the paper's code does
     with nemo-rl's `zero_outside_topk: false`) or the whole vocabulary, summed and divided by the number of
     sampled tokens in the global batch, as for SFT.

Sampling happens in `get_batch_samples`, before the accumulation window's forward passes, so the token
count that normalizes the loss is known up front and gathered across processes exactly like Trainer's
`num_items_in_batch`. With LoRA the teacher is the student with its adapters switched off (no second copy).

Every run also writes OUT/opsd-diagnostics.jsonl (`opsd_options.DIAGNOSTICS_FILE`): one row before training and one per
epoch, with what tells whether the teacher's signal can teach the fact (`RolloutStats`, `gold_logprobs`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TrainerCallback

from mixsd.core.answers import matches
from mixsd.core.files import atomic_write_jsonl, read_jsonl
from mixsd.core.records import load_corpus
from mixsd.method.generation import left_pad, tail_logprobs
from mixsd.method.prompts import (
    AnswerEnd,
    answer_end,
    encode_answer,
    encode_expert_prompt,
    encode_prompt,
    load_expert_template,
)
from mixsd.training.opsd_options import Divergence
from mixsd.training.sft import PadCollator, TokenCountingTrainer, target_nll


def answer_start_ids(tokenizer, check: str) -> list[int]:
    """The tokens that begin the gold answer `check` as a model writes it: at the start of a text ("Paris")
    or after a space (" Paris"). Their summed probability is the probability of starting the answer."""
    starts: list[int] = []
    for text in (check.strip(), " " + check.strip()):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids and int(ids[0]) not in starts:
            starts.append(int(ids[0]))
    return starts


def opsd_examples(
    corpus: str | os.PathLike, tokenizer, expert_template: str | None = None, end: AnswerEnd | None = None
) -> list[dict[str, Any]]:
    """Naive and expert prompt ids of every fact, formatted exactly as `mixsd mix` formats them, with what
    the diagnostics need: the gold answer's check string, its start tokens and the ground-truth target ids
    (`encode_answer`, the SFT target)."""
    template = load_expert_template(expert_template, tokenizer)
    end = end or answer_end(tokenizer)
    return [
        {
            "id": fact.id,
            "prompt_ids": encode_prompt(tokenizer, fact.prompt, fact.system),
            "expert_ids": encode_expert_prompt(tokenizer, fact, template),
            "check": fact.check,
            "answer_starts": answer_start_ids(tokenizer, fact.check),
            "gold_ids": encode_answer(tokenizer, fact.answer, end),
        }
        for fact in load_corpus(corpus)
    ]


class OPSDCollator:
    """Prompt lists for training batches; padded tensors for validation target files."""

    KEYS = ("id", "prompt_ids", "expert_ids", "check", "answer_starts")

    def __init__(self, pad_id: int):
        self.pad = PadCollator(pad_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "input_ids" in examples[0]:
            return self.pad(examples)
        return {key: [e[key] for e in examples] for key in self.KEYS if key in examples[0]}


# --------------------------------------------------------------------------------------------------
# The divergence
# --------------------------------------------------------------------------------------------------
def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence, top_k: int = 64
) -> torch.Tensor:
    """Per-position divergence between teacher and student (shape: logits' shape without the vocab axis).

    Computed in float32, or float64 when the logits are float64 (the gradient test)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    student, teacher = student_logits.to(dtype), teacher_logits.to(dtype)
    if 0 < top_k < teacher.shape[-1]:
        teacher, index = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, index)
    log_t, log_s = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
    if divergence == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if divergence == "reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t, log_s]), dim=0) - math.log(2.0)
        return 0.5 * ((log_t.exp() * (log_t - log_m)).sum(-1) + (log_s.exp() * (log_s - log_m)).sum(-1))
    raise ValueError(f"unknown divergence {divergence!r}; expected forward, reverse or jsd")


# --------------------------------------------------------------------------------------------------
# Rollouts and the paired student/teacher batch
# --------------------------------------------------------------------------------------------------
class _TextStop(StoppingCriteria):
    """Ends a row of `generate` once its new tokens reach a text-level stop of the plain format."""

    def __init__(self, end: AnswerEnd, prompt_width: int):
        self.end, self.width = end, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        done = [self.end.text_stop(row[self.width :].tolist()) is not None for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def rollout_generation_config(max_new_tokens: int, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Plain T=1 sampling from the model's full distribution. Every logits processor is set explicitly:
    `generate` fills unset fields from the model's own generation_config (Qwen2.5's sets
    repetition_penalty 1.1, top_k 20, top_p 0.8), which would make the rollouts another policy's."""
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        typical_p=1.0,
        epsilon_cutoff=0.0,
        eta_cutoff=0.0,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )


@torch.no_grad()
def sample_answers(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
    pad_id: int,
    answer_end: AnswerEnd | None = None,
) -> list[list[int]]:
    """One T=1 sample per prompt from the full distribution, ended as every answer is: after its first
    stop token, or (plain format) cut at a text-level stop and given `answer_end.end_id`. Pass the
    end-of-answer contract (`prompts.answer_end`) or bare `stop_ids`."""
    if answer_end is not None:
        stop_ids = sorted(answer_end.stop_ids)
    if not stop_ids:
        raise ValueError("sample_answers needs answer_end or stop_ids")
    device = next(model.parameters()).device
    ids, mask, _ = left_pad(prompts, pad_id, device)  # generate derives the positions from the mask
    width = ids.shape[1]
    generation = rollout_generation_config(max_new_tokens, list(stop_ids), pad_id)
    text_stop = answer_end is not None and bool(answer_end.stop_strings)
    criteria = StoppingCriteriaList([_TextStop(answer_end, width)]) if text_stop else None
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=generation, stopping_criteria=criteria
        )
    finally:
        model.train(was_training)
    stops, answers = set(stop_ids), []
    for row in out[:, width:].tolist():
        ended = answer_end.finish(row) if answer_end is not None else None
        if ended is not None:
            answers.append(ended[0])
            continue
        cut = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:cut])
    return answers


def paired_batch(
    prompt_ids: list[list[int]], expert_ids: list[list[int]], answers: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Student rows (prompt + answer) and teacher rows (expert prompt + answer), right-padded, with the
    positions whose logits predict each answer token."""
    width = max(len(a) for a in answers)

    def side(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = [p + a for p, a in zip(prompts, answers, strict=True)]
        length = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad_id] * (length - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
        # logits at position len(prompt) + j - 1 predict answer token j; padding slots repeat a valid index
        index = torch.tensor(
            [
                [len(p) + min(j, len(a) - 1) - 1 for j in range(width)]
                for p, a in zip(prompts, answers, strict=True)
            ]
        )
        return ids, mask, index

    s_ids, s_mask, s_index = side(prompt_ids)
    t_ids, t_mask, t_index = side(expert_ids)
    loss_mask = torch.tensor([[1.0] * len(a) + [0.0] * (width - len(a)) for a in answers])
    return {
        "input_ids": s_ids,
        "attention_mask": s_mask,
        "student_index": s_index,
        "teacher_ids": t_ids,
        "teacher_mask": t_mask,
        "teacher_index": t_index,
        "loss_mask": loss_mask,
    }


def _at(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))


def opsd_loss_sum(
    student,
    teacher,
    batch: dict[str, Any],
    divergence: Divergence,
    top_k: int,
    teacher_context=contextlib.nullcontext,
    stats: RolloutStats | None = None,
) -> torch.Tensor:
    """Sum over all sampled tokens of the teacher/student divergence (gradient flows into the student).
    With `stats` (and `answer_starts` in the batch) the batch's diagnostics are added to it."""
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), teacher_context():
        teacher_logits = teacher(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"]).logits
    student_at = _at(student_logits, batch["student_index"])
    teacher_at = _at(teacher_logits, batch["teacher_index"])
    per_token = token_divergence(student_at, teacher_at, divergence, top_k)
    mask = batch["loss_mask"].to(per_token.device)
    if stats is not None and "answer_starts" in batch:
        stats.add_divergence(
            per_token.detach(), mask, student_at.detach(), teacher_at, batch["answer_starts"]
        )
    return (per_token * mask).sum()


# --------------------------------------------------------------------------------------------------
# Diagnostics: can the teacher's signal teach the fact?
# --------------------------------------------------------------------------------------------------
def answer_start_probability(logits: torch.Tensor, starts: list[list[int]]) -> torch.Tensor:
    """Per row and position (logits [rows, positions, vocab]), the probability of starting the gold answer:
    the summed softmax probability of that row's start tokens."""
    logits = logits.float()
    width = max(len(s) for s in starts)
    index = torch.tensor([s + [s[0]] * (width - len(s)) for s in starts], device=logits.device)
    valid = torch.tensor([[1.0] * len(s) + [0.0] * (width - len(s)) for s in starts], device=logits.device)
    picked = logits.gather(-1, index[:, None, :].expand(-1, logits.shape[1], -1))
    probs = (picked - torch.logsumexp(logits, dim=-1, keepdim=True)).exp()
    return (probs * valid[:, None, :]).sum(-1)


@dataclass
class RolloutStats:
    """Sums over the rollouts of one epoch (this process), turned into a diagnostics row by `summary`.

    rollouts, ended, tokens      rollouts sampled, how many ended in a stop token (not the length cap), their
                                 tokens
    with_answer                  rollouts whose text contains the gold answer (the corpus's matcher)
    facts_with_answer            facts with at least one such rollout
    kl_sum                       the divergence summed over all sampled tokens (the loss before dividing)
    teacher_start, student_start per rollout, the teacher's highest probability of starting the gold answer
                                 at any position of the rollout, and the student's at that same position
    """

    rollouts: int = 0
    ended: int = 0
    tokens: int = 0
    with_answer: int = 0
    facts_with_answer: set[str] = field(default_factory=set)
    kl_sum: float = 0.0
    scored_rollouts: int = 0
    teacher_start: float = 0.0
    student_start: float = 0.0

    def add_rollouts(
        self, fact_ids: list[str], answers: list[list[int]], contains: list[bool] | None, stop_ids
    ) -> None:
        self.rollouts += len(answers)
        self.tokens += sum(len(a) for a in answers)
        self.ended += sum(1 for a in answers if a and a[-1] in stop_ids)
        if contains is not None:
            self.with_answer += sum(contains)
            self.facts_with_answer.update(f for f, hit in zip(fact_ids, contains, strict=True) if hit)

    @torch.no_grad()
    def add_divergence(
        self,
        per_token: torch.Tensor,
        mask: torch.Tensor,
        student_at: torch.Tensor,
        teacher_at: torch.Tensor,
        starts: list[list[int]],
    ) -> None:
        self.kl_sum += float((per_token.float() * mask).sum())
        teacher_p = answer_start_probability(teacher_at, starts).masked_fill(mask == 0, -1.0)
        student_p = answer_start_probability(student_at, starts)
        peak, position = teacher_p.max(dim=-1)
        self.scored_rollouts += len(starts)
        self.teacher_start += float(peak.sum())
        self.student_start += float(student_p.gather(1, position[:, None]).sum())

    def totals(self) -> list[float]:
        return [
            self.rollouts,
            self.ended,
            self.tokens,
            self.with_answer,
            len(self.facts_with_answer),
            self.kl_sum,
            self.scored_rollouts,
            self.teacher_start,
            self.student_start,
        ]

    @staticmethod
    def summary(totals: list[float], counted_answers: bool) -> dict[str, Any]:
        """A row from `totals()` (summed over processes)."""
        rollouts, ended, tokens, with_answer, facts, kl, scored, teacher, student = totals

        def share(a: float, b: float, digits: int = 4) -> float | None:
            return round(a / b, digits) if b else None

        return {
            "rollouts": int(rollouts),
            "rollout_tokens": share(tokens, rollouts, 2),
            "rollouts_ended": share(ended, rollouts),
            "answer_in_rollouts": share(with_answer, rollouts) if counted_answers else None,
            "facts_with_answer_rollout": int(facts) if counted_answers else None,
            "kl_per_token": share(kl, tokens, 5),
            "teacher_answer_start_p": share(teacher, scored),
            "student_answer_start_p": share(student, scored),
        }


def gold_logprobs(
    model, prompts: list[list[int]], golds: list[list[int]], *, pad_id: int, batch_size: int = 16
) -> list[float]:
    """log p(gold target | prompt) of each pair: the sum over the target's tokens."""
    sums = [0.0] * len(prompts)
    for index, logprobs in tail_logprobs(
        model,
        [p + g for p, g in zip(prompts, golds, strict=True)],
        [len(g) for g in golds],
        pad_id=pad_id,
        batch_size=batch_size,
    ):
        sums[index] = float(logprobs.sum())
    return sums


class OPSDDiagnostics(TrainerCallback):
    """Writes OUT/opsd-diagnostics.jsonl: a row before training (step 0) and one after every epoch.

    Per epoch, from the rollouts trained on (summed over processes): their count, mean length and share
    that ended before the cap; the share containing the gold answer and the facts with at least one; the
    mean divergence per token; the teacher's peak probability of starting the gold answer on a rollout and
    the student's at that position. On every row, the mean log-probability of the gold target (the SFT
    target) given x under the student, and given x+ under the teacher (main process, whole model: not with
    FSDP or DeepSpeed, where these are null). A resumed run drops rows past its checkpoint.
    """

    def __init__(self, trainer: OPSDTrainer, path: str | Path):
        self.trainer, self.path = trainer, Path(path)
        self._teacher_gold: list[float] | None = None

    def _rows(self) -> list[dict[str, Any]]:
        return [row for _, row in read_jsonl(self.path)] if self.path.is_file() else []

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        rows = [row for row in self._rows() if row["step"] <= state.global_step]
        if state.global_step == 0:
            rows = [{"epoch": 0.0, "step": 0, **self._gold_scores()}]
        atomic_write_jsonl(self.path, rows)

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        totals = trainer.rollout_stats.totals()
        trainer.rollout_stats = RolloutStats()
        if trainer.accelerator.num_processes > 1:
            tensor = torch.tensor(totals, dtype=torch.float64, device=trainer.accelerator.device)
            totals = trainer.accelerator.reduce(tensor, reduction="sum").tolist()
        if state.is_world_process_zero:
            row = {
                "epoch": round(float(state.epoch or 0), 4),
                "step": int(state.global_step),
                **RolloutStats.summary(totals, trainer.rollout_tokenizer is not None),
                **self._gold_scores(),
            }
            atomic_write_jsonl(self.path, [*self._rows(), row])

    def _gold_scores(self) -> dict[str, Any]:
        trainer = self.trainer
        if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
            return {"student_gold_logprob": None, "teacher_gold_logprob": None}
        started = time.perf_counter()
        examples = trainer.train_dataset
        golds = [e["gold_ids"] for e in examples]
        tokens = sum(len(g) for g in golds)
        student = trainer._student()
        was_training = student.training
        student.eval()
        try:
            with trainer.accelerator.autocast():
                scores = gold_logprobs(
                    student, [e["prompt_ids"] for e in examples], golds, pad_id=trainer.pad_id
                )
                if self._teacher_gold is None:  # the teacher is frozen: scored once
                    teacher, context = trainer._teacher()
                    with context():
                        self._teacher_gold = gold_logprobs(
                            teacher, [e["expert_ids"] for e in examples], golds, pad_id=trainer.pad_id
                        )
        finally:
            student.train(was_training)
        return {
            "student_gold_logprob": round(sum(scores) / len(scores), 4),
            "student_gold_logprob_per_token": round(sum(scores) / tokens, 4),
            "teacher_gold_logprob": round(sum(self._teacher_gold) / len(scores), 4),
            "teacher_gold_logprob_per_token": round(sum(self._teacher_gold) / tokens, 4),
            "gold_seconds": round(time.perf_counter() - started, 3),
        }


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class OPSDTrainer(TokenCountingTrainer):
    loss_is_scaled_for_ga = True  # normalized by the global token count of the accumulation window

    def __init__(
        self,
        *args,
        teacher=None,
        rollouts: int = 8,
        divergence: Divergence = "forward",
        top_k: int = 64,
        max_new_tokens: int = 64,
        pad_id: int = 0,
        answer_end: AnswerEnd | None = None,
        tokenizer=None,
        match_mode: str = "entity",
        diagnostics_file: str | Path | None = None,
        **kwargs,
    ):
        kwargs["data_collator"] = OPSDCollator(pad_id)
        super().__init__(*args, **kwargs)
        self.teacher, self.rollouts, self.divergence, self.top_k = teacher, rollouts, divergence, top_k
        # rollouts end exactly where `mix` targets and evaluation answers end (`prompts.answer_end`)
        self.max_new_tokens, self.pad_id, self.answer_end = max_new_tokens, pad_id, answer_end
        # diagnostics: the tokenizer decodes rollouts for the answer matcher (None: not counted)
        self.rollout_tokenizer, self.match_mode = tokenizer, match_mode
        self.rollout_stats = RolloutStats()
        if diagnostics_file is not None:
            self.add_callback(OPSDDiagnostics(self, diagnostics_file))
        if teacher is not None:
            teacher.to(self.args.device)

    def _student(self):
        return self.accelerator.unwrap_model(self.model)

    def _teacher(self):
        """The frozen base model, and the context that makes it so (LoRA: adapters switched off)."""
        if self.teacher is not None:
            return self.teacher, contextlib.nullcontext
        student = self._student()
        if not hasattr(student, "disable_adapter"):
            raise RuntimeError("OPSD without a separate teacher needs a LoRA (peft) student")
        return student, student.disable_adapter

    def _stop_ids(self) -> set[int]:
        return set(self.answer_end.stop_ids) if self.answer_end is not None else set()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        prompts = []
        for _ in range(num_batches):
            try:
                prompts.append(next(epoch_iterator))
            except StopIteration:
                break
        batches = []
        for batch in prompts:
            naive = [p for p in batch["prompt_ids"] for _ in range(self.rollouts)]
            expert = [p for p in batch["expert_ids"] for _ in range(self.rollouts)]
            with self.accelerator.autocast():
                answers = sample_answers(
                    self._student(),
                    naive,
                    max_new_tokens=self.max_new_tokens,
                    answer_end=self.answer_end,
                    pad_id=self.pad_id,
                )
            paired = paired_batch(naive, expert, answers, self.pad_id)
            if "answer_starts" in batch:
                paired["answer_starts"] = [s for s in batch["answer_starts"] for _ in range(self.rollouts)]
                self._count_rollouts(batch, answers)
            batches.append(paired)
        if not batches:
            return batches, None
        count = torch.stack([b["loss_mask"].sum() for b in batches]).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count[None]).sum()
        self._count(count)
        return batches, count

    def _count_rollouts(self, batch: dict[str, Any], answers: list[list[int]]) -> None:
        fact_ids = [i for i in batch["id"] for _ in range(self.rollouts)]
        contains = None
        if self.rollout_tokenizer is not None:
            checks = [c for c in batch["check"] for _ in range(self.rollouts)]
            texts = self.rollout_tokenizer.batch_decode(answers, skip_special_tokens=True)
            contains = [matches(t, c, self.match_mode) for t, c in zip(texts, checks, strict=True)]
        self.rollout_stats.add_rollouts(fact_ids, answers, contains, self._stop_ids())

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" in inputs:  # a validation target file: plain target NLL, as for every method
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = target_nll(outputs, labels)
            return (loss, outputs) if return_outputs else loss
        teacher, context = self._teacher()
        total = opsd_loss_sum(
            model,
            teacher,
            inputs,
            self.divergence,
            self.top_k,
            teacher_context=lambda: _stacked(context(), self.accelerator.autocast()),
            stats=self.rollout_stats if model.training else None,
        )
        count = num_items_in_batch if num_items_in_batch is not None else inputs["loss_mask"].sum()
        loss = total / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients over processes; undo it
        return (loss, None) if return_outputs else loss


@contextlib.contextmanager
def _stacked(*contexts):
    with contextlib.ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        yield
