"""The OPSD baseline (on-policy self-distillation), trained through `mixsd train --method opsd`.

Each optimizer step:
  1. the student samples `rollouts` answers (T=1, full distribution) to each naive prompt x;
  2. the teacher, the frozen base model, reads the expert prompt x+ (built exactly as `mixsd mix` builds
     it: `expert_message` + `encode_prompt`) followed by the same sampled answer;
  3. the loss is a token-level divergence between teacher and student on every sampled token:
        forward  KL(p_teacher || p_student)
        reverse  KL(p_student || p_teacher)
        jsd      (KL(p_t || m) + KL(p_s || m)) / 2, m = (p_t + p_s) / 2
     over the teacher's top-k tokens (both distributions renormalized on that set) or the whole vocabulary,
     summed and divided by the number of sampled tokens in the global batch, as for SFT.

Sampling happens in `get_batch_samples`, before the accumulation window's forward passes, so the token
count that normalizes the loss is known up front and gathered across processes exactly like Trainer's
`num_items_in_batch`. With LoRA the teacher is the student with its adapters switched off (no second copy).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from mixsd.prompts import AnswerEnd, encode_expert_prompt, encode_prompt, load_expert_template
from mixsd.records import load_corpus
from mixsd.sft import PadCollator, TokenCountingTrainer, target_nll

Divergence = Literal["forward", "reverse", "jsd"]


def opsd_examples(
    corpus: str | os.PathLike, tokenizer, expert_template: str | None = None
) -> list[dict[str, Any]]:
    """Naive and expert prompt ids of every fact, formatted exactly as `mixsd mix` formats them."""
    template = load_expert_template(expert_template, tokenizer)
    return [
        {
            "id": fact.id,
            "prompt_ids": encode_prompt(tokenizer, fact.prompt, fact.system),
            "expert_ids": encode_expert_prompt(tokenizer, fact, template),
        }
        for fact in load_corpus(corpus)
    ]


class OPSDCollator:
    """Prompt lists for training batches; padded tensors for validation target files."""

    def __init__(self, pad_id: int):
        self.pad = PadCollator(pad_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if "input_ids" in examples[0]:
            return self.pad(examples)
        return {
            "prompt_ids": [e["prompt_ids"] for e in examples],
            "expert_ids": [e["expert_ids"] for e in examples],
        }


# --------------------------------------------------------------------------------------------------
# The divergence
# --------------------------------------------------------------------------------------------------
def token_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: Divergence, top_k: int = 64
) -> torch.Tensor:
    """Per-position divergence between teacher and student (shape: logits' shape without the vocab axis)."""
    student, teacher = student_logits.float(), teacher_logits.float()
    if 0 < top_k < teacher.shape[-1]:
        teacher, index = teacher.topk(top_k, dim=-1)
        student = student.gather(-1, index)
    log_t, log_s = F.log_softmax(teacher, dim=-1), F.log_softmax(student, dim=-1)
    if divergence == "forward":
        return (log_t.exp() * (log_t - log_s)).sum(-1)
    if divergence == "reverse":
        return (log_s.exp() * (log_s - log_t)).sum(-1)
    if divergence == "jsd":
        log_m = torch.logsumexp(torch.stack([log_t, log_s]), dim=0) - torch.log(torch.tensor(2.0))
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
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    generation = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        use_cache=True,
    )
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
    batch: dict[str, torch.Tensor],
    divergence: Divergence,
    top_k: int,
    teacher_context=contextlib.nullcontext,
) -> torch.Tensor:
    """Sum over all sampled tokens of the teacher/student divergence (gradient flows into the student)."""
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad(), teacher_context():
        teacher_logits = teacher(input_ids=batch["teacher_ids"], attention_mask=batch["teacher_mask"]).logits
    per_token = token_divergence(
        _at(student_logits, batch["student_index"]),
        _at(teacher_logits, batch["teacher_index"]),
        divergence,
        top_k,
    )
    return (per_token * batch["loss_mask"].to(per_token.device)).sum()


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------
class OPSDTrainer(TokenCountingTrainer):
    loss_is_scaled_for_ga = True  # normalized by the global token count of the accumulation window

    def __init__(
        self,
        *args,
        teacher=None,
        rollouts: int = 4,
        divergence: Divergence = "forward",
        top_k: int = 64,
        max_new_tokens: int = 128,
        pad_id: int = 0,
        answer_end: AnswerEnd | None = None,
        **kwargs,
    ):
        kwargs["data_collator"] = OPSDCollator(pad_id)
        super().__init__(*args, **kwargs)
        self.teacher, self.rollouts, self.divergence, self.top_k = teacher, rollouts, divergence, top_k
        # rollouts end exactly where `mix` targets and evaluation answers end (`prompts.answer_end`)
        self.max_new_tokens, self.pad_id, self.answer_end = max_new_tokens, pad_id, answer_end
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
            batches.append(paired_batch(naive, expert, answers, self.pad_id))
        if not batches:
            return batches, None
        count = torch.stack([b["loss_mask"].sum() for b in batches]).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count[None]).sum()
        self._count(count)
        return batches, count

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
