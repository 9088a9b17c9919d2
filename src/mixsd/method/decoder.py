"""The MixSD decoder: the frozen base model writes its own supervision, token by token.

For each record two conditionals of the same frozen model run side by side:
    expert  p0(. | x+, y_<t)   the prompt with the fact in context (built by `prompts.expert_message`)
    naive   p0(. | x,  y_<t)   the prompt alone
At every step a coin u ~ Bernoulli(lam) picks the emitter: u=1 naive, u=0 expert (with --guard-top-p, our
extension, a naive token outside the expert's top-p set is replaced by the expert's). The chosen token is
appended to *both* sequences, so both always continue from the same mixed prefix. T=0 takes the argmax
of the chosen conditional; T>0 samples its top-k with temperature T. A finished target is verified
against the record's answer; on failure it is drawn again with fresh coins, up to --retries times.

Speed: every record owns two rows (expert, naive) of one batched KV cache, so a step is one forward
pass of one token per row. Rows of different lengths are left-padded inside the cache and masked; a
finished record's rows are dropped and a waiting record's freshly prefilled rows are spliced in at once
(continuous batching).

Determinism: a record's coins and samples come from its own random stream, seeded by
(seed, record id, generation, attempt); nothing depends on batch size, order, resume or sharding.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch

from mixsd.method.generation import ContinuousBatcher
from mixsd.method.prompts import AnswerEnd


@dataclass(frozen=True)
class Job:
    """One target to draw: record `key`, generation number, attempt number, and both prompts."""

    key: str
    generation: int
    naive_ids: list[int]
    expert_ids: list[int]
    attempt: int = 0


@dataclass
class Draw:
    """One finished attempt."""

    job: Job
    tokens: list[int] = field(default_factory=list)
    branch: list[str] = field(default_factory=list)
    logprob_expert: list[float | None] = field(default_factory=list)  # None: the appended end token
    logprob_naive: list[float | None] = field(default_factory=list)
    # stop (a stop token) | stop_text (a text-level stop; cut and ended) | length | prompt_too_long
    finish: str = "stop"


def _end_at(draw: Draw, count: int, end_id: int) -> None:
    """Cut a draw whose text reached a stop string to its first `count` tokens and end it with `end_id`.

    Neither conditional chose the appended token: its branch letter is "S" and its log-probs are None.
    """
    del draw.tokens[count:], draw.branch[count:], draw.logprob_expert[count:], draw.logprob_naive[count:]
    draw.tokens.append(end_id)
    draw.branch.append("S")
    draw.logprob_expert.append(None)
    draw.logprob_naive.append(None)


def record_seed(seed: int, key: str, generation: int, attempt: int) -> int:
    digest = hashlib.sha256(f"mixsd|{seed}|{key}|{generation}|{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class _Slot:
    """A record's attempt: its draw so far and its pre-drawn random numbers.

    The random numbers are drawn when the slot first chooses a token, so a queue of waiting slots holds
    only their jobs (they are the same numbers whenever they are drawn: the stream is the record's own).
    """

    def __init__(self, job: Job, max_new_tokens: int, seed: int):
        self.draw = Draw(job)
        self._max_new_tokens, self._seed = max_new_tokens, seed
        self._uniforms: tuple[list[float], list[float]] | None = None

    def _drawn(self) -> tuple[list[float], list[float]]:
        if self._uniforms is None:
            job = self.draw.job
            generator = torch.Generator().manual_seed(
                record_seed(self._seed, job.key, job.generation, job.attempt)
            )
            coin_u, sample_u = torch.rand(
                2, self._max_new_tokens, generator=generator, dtype=torch.float64
            ).tolist()
            self._uniforms = (coin_u, sample_u)
        return self._uniforms

    @property
    def coin_u(self) -> list[float]:
        return self._drawn()[0]

    @property
    def sample_u(self) -> list[float]:
        return self._drawn()[1]

    @property
    def prompts(self) -> list[list[int]]:
        """The slot's two rows of the batch: the expert's sequence, then the naive one."""
        return [self.draw.job.expert_ids, self.draw.job.naive_ids]

    @property
    def step(self) -> int:
        return len(self.draw.tokens)


class MixedDecoder:
    """Continuous-batching decoder of mixed expert/naive targets over one frozen model."""

    def __init__(
        self,
        model,
        stop: AnswerEnd | Iterable[int],
        *,
        lam: float,
        temperature: float = 0.0,
        top_k: int = 64,
        seed: int = 0,
        max_new_tokens: int = 256,
        batch_size: int = 32,
        max_attempts: int = 11,
        pad_id: int = 0,
        context_limit: int | None = None,
        guard_top_p: float | None = None,
    ):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if guard_top_p is not None and not 0.0 < guard_top_p <= 1.0:
            raise ValueError(f"guard_top_p must be in (0, 1], got {guard_top_p}")
        if temperature < 0 or max_new_tokens < 1 or batch_size < 1 or max_attempts < 1 or top_k < 1:
            raise ValueError(
                "temperature >= 0, max_new_tokens >= 1, batch_size >= 1, top_k >= 1 and "
                "max_attempts >= 1 are required"
            )
        # `stop`: the end-of-answer contract (`prompts.answer_end`: stop tokens and, for the plain format,
        # text-level stops), or bare stop token ids
        self.answer_end = stop if isinstance(stop, AnswerEnd) else None
        self._first_ban: torch.Tensor | None = None  # plain format: tokens that may not start a target
        self.model = model
        self.stop_ids = set(stop.stop_ids) if isinstance(stop, AnswerEnd) else set(stop)
        self.lam, self.temperature, self.top_k, self.seed = lam, temperature, top_k, seed
        self.max_new_tokens, self.batch_size, self.max_attempts = max_new_tokens, batch_size, max_attempts
        self.pad_id, self.context_limit = pad_id, context_limit
        # guarded mixing (our extension, not the paper's method): see `_choose`
        self.guard_top_p = guard_top_p
        self.generated_tokens = 0  # every token decoded, failed attempts included
        self.naive_tokens = 0  # of which the naive conditional emitted

    # -- the public loop ----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(
        self, jobs: Iterable[Job], accept: Callable[[Draw], bool], on_done: Callable[[Draw, bool], None]
    ) -> None:
        """Decode every job; call `on_done(draw, verified)` once per job, with its last attempt."""
        waiting: list[_Slot] = []
        for job in jobs:
            if self.context_limit and len(job.expert_ids) + self.max_new_tokens > self.context_limit:
                on_done(Draw(job, finish="prompt_too_long"), False)
            else:
                waiting.append(_Slot(job, self.max_new_tokens, self.seed))
        batcher = ContinuousBatcher(
            self.model,
            self.pad_id,
            batch_size=self.batch_size,
            rows_per_job=2,  # rows 2k and 2k+1: slot k's expert and naive sequences
            prompts=lambda slot: slot.prompts,
            choose=self._choose,
            finish=self._finish,
            admit_at=1,  # a free slot is filled at once
        )
        for slot in batcher.run(waiting):
            draw = slot.draw
            verified = accept(draw)
            if not verified and draw.job.attempt + 1 < self.max_attempts:
                retry = replace(draw.job, attempt=draw.job.attempt + 1)
                batcher.requeue(_Slot(retry, self.max_new_tokens, self.seed))
            else:
                on_done(draw, verified)

    # -- pieces -------------------------------------------------------------------------------------
    def _finish(self, slot: _Slot, token: int) -> bool:
        """Whether the slot's draw (its token already appended by `_choose`) has ended; if so, how."""
        cut = None
        if token not in self.stop_ids and self.answer_end is not None:
            cut = self.answer_end.text_stop(slot.draw.tokens)
        if token not in self.stop_ids and cut is None and slot.step < self.max_new_tokens:
            return False
        draw = slot.draw
        if cut is not None:
            _end_at(draw, cut, self.answer_end.end_id)
        draw.finish = "stop" if token in self.stop_ids else "stop_text" if cut is not None else "length"
        return True

    def _choose(self, slots: list[_Slot], logits: torch.Tensor) -> list[int]:
        """Pick each slot's next token from the conditional its coin names; record both log-probs."""
        self.generated_tokens += len(slots)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expert, naive = logprobs[0::2], logprobs[1::2]
        use_naive = torch.tensor([s.coin_u[s.step] < self.lam for s in slots], device=logits.device)
        chosen = torch.where(use_naive[:, None], naive, expert)
        ban: torch.Tensor | None = None  # (slot, token) pairs that may not be picked
        first = [s.step == 0 for s in slots]
        if self.answer_end is not None and self.answer_end.stop_strings and any(first):
            # Plain format: a target begins on the "Answer:" line, as the ground truth does, so its first
            # token may not start a new line (the recorded log-probs stay those of the free conditionals).
            if self._first_ban is None:
                line_breaks = self.answer_end.line_break_ids(chosen.shape[-1])
                self._first_ban = torch.zeros(chosen.shape[-1], dtype=torch.bool, device=logits.device)
                self._first_ban[line_breaks] = True
            rows = torch.tensor(first, device=logits.device)
            ban = rows[:, None] & self._first_ban[None, :]
            chosen = chosen.masked_fill(ban, float("-inf"))
        if self.guard_top_p is None:
            tokens = self._pick(slots, chosen)
            vetoed = torch.zeros_like(use_naive)
        else:
            # Guarded mixing (our extension): pick from both conditionals with the same random numbers; a
            # naive pick outside the expert's top-p set is replaced by the expert's pick.
            naive_pick = self._pick(slots, naive if ban is None else naive.masked_fill(ban, float("-inf")))
            expert_pick = self._pick(slots, expert if ban is None else expert.masked_fill(ban, float("-inf")))
            vetoed = use_naive & ~in_top_p(expert, naive_pick, self.guard_top_p)
            tokens = torch.where(use_naive & ~vetoed, naive_pick, expert_pick)
        lp_expert = expert.gather(1, tokens[:, None]).squeeze(1).tolist()
        lp_naive = naive.gather(1, tokens[:, None]).squeeze(1).tolist()
        token_list, naive_list, vetoed_list = tokens.tolist(), use_naive.tolist(), vetoed.tolist()
        self.naive_tokens += sum(naive_list) - sum(vetoed_list)  # tokens the naive conditional emitted
        for i, slot in enumerate(slots):
            draw = slot.draw
            draw.tokens.append(token_list[i])
            draw.branch.append("V" if vetoed_list[i] else "N" if naive_list[i] else "E")
            draw.logprob_expert.append(lp_expert[i])
            draw.logprob_naive.append(lp_naive[i])
        return token_list

    def _pick(self, slots: list[_Slot], dist: torch.Tensor) -> torch.Tensor:
        """Each row's token from its (log-prob) distribution: argmax at T=0, else a top-k sample."""
        if self.temperature == 0:
            return dist.argmax(dim=-1)
        # Inverse-CDF sampling from the top-k with the slot's own uniform number: one vectorized op,
        # and the outcome depends on nothing but the record's random stream.
        top_values, top_ids = dist.topk(min(self.top_k, dist.shape[-1]), dim=-1)
        cdf = torch.softmax(top_values / self.temperature, dim=-1).cumsum(dim=-1)
        u = torch.tensor([s.sample_u[s.step] for s in slots], device=dist.device, dtype=cdf.dtype)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        return top_ids.gather(1, pick).squeeze(1)


def in_top_p(logprobs: torch.Tensor, tokens: torch.Tensor, top_p: float) -> torch.Tensor:
    """Per row, whether `tokens[row]` lies in the top-p set of `logprobs[row]`.

    The top-p set is the smallest set of most probable tokens whose probability reaches `top_p`; a token
    is in it exactly when the tokens strictly more probable than it hold less than `top_p` (tied tokens
    are all in or all out). The argmax is always in it.
    """
    probs = logprobs.float().exp()
    own = probs.gather(-1, tokens[:, None])
    return (probs * (probs > own)).sum(dim=-1) < top_p
