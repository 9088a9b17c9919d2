"""A slow, obviously correct MixSD decoder built on Hugging Face `generate`: the yardstick of the fast one.

Each record is one call of `model.generate` on a batch of two rows, (expert prompt, naive prompt), left
padded by `generate` itself. A `LogitsProcessor` sees both rows' next-token logits at every step, applies
the record's coin, picks the token from the conditional the coin names, and forces that token on both rows
(every other logit is set to -inf), so both rows always continue from the same mixed prefix. Everything
else (cache, attention masks, position ids, sliding windows, static caches) is whatever `generate` does
for the model, which is why this decoder works with every cache type `generate` supports and why the fast
`decoder.MixedDecoder`, with its own spliced batch cache, is tested against it (tests/test_parity.py).

The random numbers are the fast decoder's, defined here again on purpose: a record's stream is seeded by
`record_seed(seed, key, generation, attempt)` and gives `max_new_tokens` coin uniforms, then as many
sampling uniforms (float64). Step t takes the naive conditional when coin_u[t] < lam; at T > 0 it samples
the top-k of the chosen conditional at temperature T by inverse CDF with sample_u[t]. With guard_top_p
(guarded mixing, our extension), a naive step picks from both conditionals with the same sample_u[t] and
emits the naive pick only when it lies in the expert's top-p set (`decoder.in_top_p`), else the expert's
pick, branch letter "V".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList

from mixsd.method.decoder import Draw, Job, in_top_p, record_seed
from mixsd.method.generation import left_pad


def record_uniforms(seed: int, job: Job, max_new_tokens: int) -> tuple[list[float], list[float]]:
    """(coin_u, sample_u): the record's pre-drawn uniforms, one of each per step."""
    generator = torch.Generator().manual_seed(record_seed(seed, job.key, job.generation, job.attempt))
    coin_u, sample_u = torch.rand(2, max_new_tokens, generator=generator, dtype=torch.float64).tolist()
    return coin_u, sample_u


class MixingProcessor:
    """The LogitsProcessor of one record: choose each step's token from one conditional, force it on both rows.

    Row 0 is the expert, row 1 the naive sequence. The chosen tokens, branches and both conditionals'
    log-probs of each chosen token accumulate in `draw`.
    """

    def __init__(
        self,
        draw: Draw,
        *,
        lam: float,
        temperature: float,
        top_k: int,
        seed: int,
        max_new_tokens: int,
        guard_top_p: float | None = None,
    ):
        self.draw, self.lam, self.temperature, self.top_k = draw, lam, temperature, top_k
        self.guard_top_p = guard_top_p
        self.coin_u, self.sample_u = record_uniforms(seed, draw.job, max_new_tokens)

    def _pick(self, dist: torch.Tensor, u: float) -> int:
        """The token of one conditional: its argmax at T=0, else its top-k sampled with uniform `u`."""
        if self.temperature == 0:
            return int(dist.argmax())
        top_values, top_ids = dist.topk(min(self.top_k, dist.shape[-1]))
        cdf = torch.softmax(top_values / self.temperature, dim=-1).cumsum(dim=-1)
        # the first index whose cumulative probability reaches u (scaled by the total, which is 1 up to
        # rounding); the same rule as torch.searchsorted with side="left"
        target = torch.tensor(u, dtype=cdf.dtype) * cdf[-1]
        pick = min(int((cdf < target).sum()), cdf.shape[-1] - 1)
        return int(top_ids[pick])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != 2:
            raise ValueError(
                f"the reference decodes one record (2 rows) per generate call, got {scores.shape[0]}"
            )
        step = len(self.draw.tokens)
        logprobs = torch.log_softmax(scores.float(), dim=-1)
        expert, naive = logprobs[0], logprobs[1]
        use_naive = self.coin_u[step] < self.lam
        letter = "N" if use_naive else "E"
        token = self._pick(naive if use_naive else expert, self.sample_u[step])
        guarded = use_naive and self.guard_top_p is not None
        if guarded and not bool(
            in_top_p(expert[None], torch.tensor([token], device=expert.device), self.guard_top_p)
        ):
            token, letter = self._pick(expert, self.sample_u[step]), "V"
        self.draw.tokens.append(token)
        self.draw.branch.append(letter)
        self.draw.logprob_expert.append(float(expert[token]))
        self.draw.logprob_naive.append(float(naive[token]))
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token] = 0.0
        return forced


class ReferenceDecoder:
    """Same constructor arguments, `run` contract and output as `decoder.MixedDecoder`, one record at a time.

    `generate_kwargs` go to every `model.generate` call, e.g. {"cache_implementation": "static"}.
    """

    def __init__(
        self,
        model,
        stop_ids: Iterable[int],
        *,
        lam: float,
        temperature: float = 0.0,
        top_k: int = 64,
        seed: int = 0,
        max_new_tokens: int = 256,
        max_attempts: int = 11,
        pad_id: int = 0,
        context_limit: int | None = None,
        generate_kwargs: dict[str, Any] | None = None,
        guard_top_p: float | None = None,
    ):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        if guard_top_p is not None and not 0.0 < guard_top_p <= 1.0:
            raise ValueError(f"guard_top_p must be in (0, 1], got {guard_top_p}")
        if temperature < 0 or max_new_tokens < 1 or max_attempts < 1 or top_k < 1:
            raise ValueError(
                "temperature >= 0, max_new_tokens >= 1, top_k >= 1 and max_attempts >= 1 are required"
            )
        self.stop_ids = sorted(set(stop_ids))
        if not self.stop_ids:
            raise ValueError("the reference decoder needs at least one stop id")
        self.model, self.lam, self.temperature, self.top_k, self.seed = model, lam, temperature, top_k, seed
        self.max_new_tokens, self.max_attempts = max_new_tokens, max_attempts
        self.pad_id, self.context_limit = pad_id, context_limit
        self.generate_kwargs = dict(generate_kwargs or {})
        self.guard_top_p = guard_top_p

    @torch.inference_mode()
    def draw(self, job: Job) -> Draw:
        """One attempt of one record."""

        draw = Draw(job)
        if self.context_limit and len(job.expert_ids) + self.max_new_tokens > self.context_limit:
            draw.finish = "prompt_too_long"
            return draw
        device = next(self.model.parameters()).device
        # generate derives the positions from the mask itself
        input_ids, attention_mask, _ = left_pad([job.expert_ids, job.naive_ids], self.pad_id, device)
        width = input_ids.shape[1]
        processor = MixingProcessor(
            draw,
            lam=self.lam,
            temperature=self.temperature,
            top_k=self.top_k,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            guard_top_p=self.guard_top_p,
        )
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        # generate fills every option left unset from the model's own generation config (a repetition
        # penalty, say), which would change the logits before the coin sees them: hide it for this call.
        own_config = self.model.generation_config
        self.model.generation_config = GenerationConfig()
        try:
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                logits_processor=LogitsProcessorList([processor]),
                **self.generate_kwargs,
            )
        finally:
            self.model.generation_config = own_config
        generated = output[:, width:].tolist()
        # both rows carry the forced tokens, then padding if generation stopped early
        for row in generated:
            if row[: len(draw.tokens)] != draw.tokens:
                raise RuntimeError("generate did not emit the tokens the mixing processor forced")
        draw.finish = "stop" if draw.tokens and draw.tokens[-1] in self.stop_ids else "length"
        return draw

    def run(
        self, jobs: Iterable[Job], accept: Callable[[Draw], bool], on_done: Callable[[Draw, bool], None]
    ) -> None:
        """Decode every job in order, redrawing a rejected attempt with fresh coins like MixedDecoder.run."""
        for job in jobs:
            while True:
                draw = self.draw(job)
                if draw.finish == "prompt_too_long":
                    on_done(draw, False)
                    break
                verified = accept(draw)
                if verified or job.attempt + 1 >= self.max_attempts:
                    on_done(draw, verified)
                    break
                job = replace(job, attempt=job.attempt + 1)
