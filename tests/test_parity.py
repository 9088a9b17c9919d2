"""Parity across architectures: the fast decoders against Hugging Face `generate`.

    MixedDecoder (spliced batch cache)  vs  ReferenceDecoder (generate + a mixing LogitsProcessor)
    generation.greedy_generate          vs  model.generate on each prompt alone

on tiny random models of seven architectures: Llama, Qwen2 (attention biases), Gemma3 (sliding-window
and full layers, a hybrid cache; run a second time with splicing switched off, so the decoders' one-batch-
at-a-time fallback runs), Mistral (sliding window on every layer), GPT-2 (absolute position embeddings),
Phi (partial rotary) and GPT-NeoX (partial rotary, parallel residual, fused qkv).
Every model is built in-process in milliseconds; its output layer is sharpened so greedy paths are far
from ties and a fp32 rounding difference cannot flip a token.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_SIZES, make_causal_lm
from mixsd.method import generation
from mixsd.method.decoder import Draw, Job, MixedDecoder
from mixsd.method.generation import RowBatch, greedy_generate
from mixsd.method.reference import ReferenceDecoder, record_uniforms

VOCAB = 128
PAD, BOS = 0, 1
# Every 7th id ends a sequence: with these seeds, rows of every architecture end at different steps
# (so rows leave and others join mid-batch) and some run to the length cap.
STOPS = set(range(2, VOCAB, 7))
MIX_STOPS = set(range(2, VOCAB, 13))  # fewer for mixing, whose paths wander more: most targets get longer
COMMON = dict(
    vocab_size=VOCAB,
    **TINY_SIZES,
    bos_token_id=BOS,
    eos_token_id=2,
    pad_token_id=PAD,
    tie_word_embeddings=False,  # the output layer is sharpened below; tied, that would scale the inputs too
)

# a window of 6 tokens, shorter than most prompts: the sliding layer really drops old keys
GEMMA3 = (
    "gemma3",
    dict(
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
        **COMMON,
    ),
)

# name -> (the conftest factory's architecture, its config)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", dict(num_key_value_heads=2, **COMMON)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, **COMMON)),
    "gemma3": GEMMA3,
    "gemma3_fallback": GEMMA3,
    # every layer slides, over a window shorter than most prompts
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=5, **COMMON)),
    "gpt2": (
        "gpt2",
        dict(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            bos_token_id=BOS,
            eos_token_id=2,
            pad_token_id=PAD,
            tie_word_embeddings=False,
        ),
    ),
    "phi": ("phi", dict(partial_rotary_factor=0.5, **COMMON)),
    "gpt_neox": ("gpt_neox", dict(rotary_pct=0.25, **COMMON)),
}
# Gemma3 again with splicing of sliding-window layers switched off: RowBatch.add declines, as it does for
# any cache layer it does not know, and the decoders take their one-batch-at-a-time fallback path.
UNSPLICEABLE = {"gemma3_fallback"}


# Initialization seeds other than 0, chosen so that each model's greedy and mixed paths both end by a stop
# token at various steps and by the length cap (what the tests assert is exercised).
SEEDS = {"mistral": 2}


def build(name: str, seed: int | None = None):
    arch, config = ARCHITECTURES[name]
    return make_causal_lm(arch, seed=SEEDS.get(name, 0) if seed is None else seed, sharpen=8.0, **config)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param, build(request.param)


def random_prompts(n: int, seed: int, low: int, high: int) -> list[list[int]]:
    """n prompts of lengths in [low, high), all different lengths where possible; no pad or stop ids."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([t for t in range(3, VOCAB) if t not in STOPS])
    prompts = []
    for _ in range(n):
        length = int(torch.randint(low, high, (1,), generator=g))
        prompts.append([BOS] + allowed[torch.randint(len(allowed), (length - 1,), generator=g)].tolist())
    return prompts


def random_jobs(n: int, seed: int) -> list[Job]:
    naive = random_prompts(n, seed, 3, 12)
    expert = random_prompts(n, seed + 1, 8, 30)
    return [Job(f"r{i}", i % 2, naive[i], expert[i]) for i in range(n)]


# ------------------------------------------------------------------------------------------------
# greedy_generate vs generate
# ------------------------------------------------------------------------------------------------
def generate_alone(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], str]:
    """model.generate on one unpadded prompt: the ground truth for greedy decoding."""
    out = model.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=sorted(STOPS),
        pad_token_id=PAD,
    )[0, len(prompt) :].tolist()
    if out and out[-1] in STOPS:
        return out[:-1], "stop"
    return out, "length"


class SpliceCounter:
    """Wraps RowBatch.add to count admissions that spliced into a running batch and that were declined."""

    def __init__(self, monkeypatch, name: str):
        self.name, self.spliced, self.declined = name, 0, 0
        if name in UNSPLICEABLE:
            monkeypatch.setattr(generation, "_SPLICEABLE", {"DynamicLayer"})
        original = RowBatch.add

        def add(batch, labels, prompts):
            running = batch.cache is not None
            added = original(batch, labels, prompts)
            self.spliced += running and added
            self.declined += not added
            return added

        monkeypatch.setattr(RowBatch, "add", add)

    def check(self) -> None:
        if self.name in UNSPLICEABLE:
            assert self.declined > 0 and self.spliced == 0, "the non-spliceable fallback was not exercised"
        else:
            assert self.spliced > 0 and self.declined == 0, "no rows were spliced into a running batch"


def test_greedy_generate_matches_generate(arch, monkeypatch):
    name, model = arch
    prompts = random_prompts(9, seed=3, low=2, high=34)
    expected = [generate_alone(model, p, 14) for p in prompts]
    assert {finish for _, finish in expected} == {"stop", "length"}, "both endings should be exercised"
    for batch_size in (3, 9):  # 3: rows leave and waiting prompts are spliced in (or wait); 9: one batch
        counter = SpliceCounter(monkeypatch, name)
        got = {
            i: (tokens, finish)
            for i, tokens, finish in greedy_generate(
                model, prompts, stop_ids=STOPS, pad_id=PAD, max_new_tokens=14, batch_size=batch_size
            )
        }
        assert [got[i] for i in range(len(prompts))] == expected, (name, batch_size)
        if batch_size == 3:
            counter.check()


# ------------------------------------------------------------------------------------------------
# MixedDecoder vs ReferenceDecoder
# ------------------------------------------------------------------------------------------------
def decode(decoder, jobs: list[Job], reject_first: set[str]) -> tuple[dict, dict]:
    """Every attempt each decoder drew, by (key, generation, attempt), and the final draw of each job."""
    attempts: dict[tuple[str, int, int], Draw] = {}
    final: dict[tuple[str, int], tuple[Draw, bool]] = {}

    def accept(draw: Draw) -> bool:
        job = draw.job
        attempts[(job.key, job.generation, job.attempt)] = draw
        return not (job.key in reject_first and job.attempt == 0)

    def on_done(draw: Draw, verified: bool) -> None:
        final[(draw.job.key, draw.job.generation)] = (draw, verified)

    decoder.run(jobs, accept, on_done)
    return attempts, final


def assert_same_draws(fast: dict, reference: dict, label) -> None:
    assert fast.keys() == reference.keys(), label
    for key, ref in reference.items():
        got = fast[key]
        assert got.tokens == ref.tokens, (label, key)
        assert got.branch == ref.branch, (label, key)
        assert got.finish == ref.finish, (label, key)
        torch.testing.assert_close(got.logprob_expert, ref.logprob_expert, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.logprob_naive, ref.logprob_naive, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_mixed_decoder_matches_reference(arch, lam, temperature, monkeypatch):
    name, model = arch
    jobs = random_jobs(7, seed=20)
    reject_first = {"r1", "r4"}  # their first attempts fail verification: redrawn with fresh coins
    settings = dict(lam=lam, temperature=temperature, top_k=5, seed=7, max_new_tokens=16, max_attempts=2)
    counter = SpliceCounter(monkeypatch, name)
    fast = MixedDecoder(model, MIX_STOPS, batch_size=3, **settings)
    fast_attempts, fast_final = decode(fast, jobs, reject_first)
    counter.check()
    ref_attempts, ref_final = decode(ReferenceDecoder(model, MIX_STOPS, **settings), jobs, reject_first)

    assert len(ref_attempts) == len(jobs) + len(reject_first)
    assert_same_draws(fast_attempts, ref_attempts, (name, lam, temperature))
    assert {k: (d.job, ok) for k, (d, ok) in fast_final.items()} == {
        k: (d.job, ok) for k, (d, ok) in ref_final.items()
    }
    branches = "".join("".join(d.branch) for d in ref_attempts.values())
    if lam in (0.0, 1.0):
        assert set(branches) == {"N" if lam else "E"}
    else:
        assert set(branches) == {"E", "N"}
    # targets of different lengths: records left the batch at different steps while others ran on
    assert len({len(d.tokens) for d in ref_attempts.values()}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_guarded_mixing_matches_reference(arch, temperature, monkeypatch):
    """--guard-top-p (our extension): both decoders veto the same naive tokens and emit the same expert ones."""
    name, model = arch
    jobs = random_jobs(7, seed=20)
    settings = dict(
        lam=0.7, temperature=temperature, top_k=5, seed=7, max_new_tokens=16, max_attempts=2, guard_top_p=0.6
    )
    counter = SpliceCounter(monkeypatch, name)
    fast_attempts, _ = decode(MixedDecoder(model, MIX_STOPS, batch_size=3, **settings), jobs, {"r2"})
    counter.check()
    ref_attempts, _ = decode(ReferenceDecoder(model, MIX_STOPS, **settings), jobs, {"r2"})
    assert_same_draws(fast_attempts, ref_attempts, (name, "guard", temperature))
    # the guard both let naive tokens through and overruled some (tests/test_fidelity.py checks what it emits)
    assert set("".join("".join(d.branch) for d in ref_attempts.values())) == {"E", "N", "V"}


def uncached_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """One full forward pass of prompt + tokens, no cache, no padding: the log-probs before each token."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(tokens) - 1], dim=-1)


def test_reference_follows_coins_and_uncached_conditionals(arch):
    """The reference itself, checked step by step against plain forward passes and its own coins."""
    name, model = arch
    jobs = random_jobs(4, seed=31)
    decoder = ReferenceDecoder(model, MIX_STOPS, lam=0.5, temperature=0.0, seed=3, max_new_tokens=16)
    for job in jobs:
        draw = decoder.draw(job)
        coin_u, _ = record_uniforms(3, job, 16)
        expert = uncached_logprobs(model, job.expert_ids, draw.tokens)
        naive = uncached_logprobs(model, job.naive_ids, draw.tokens)
        for t, (token, letter) in enumerate(zip(draw.tokens, draw.branch, strict=True)):
            assert letter == ("N" if coin_u[t] < 0.5 else "E")
            chosen = naive[t] if letter == "N" else expert[t]
            assert token == int(chosen.argmax()), (name, job.key, t)
            assert draw.logprob_expert[t] == pytest.approx(float(expert[t, token]), abs=1e-4)
            assert draw.logprob_naive[t] == pytest.approx(float(naive[t, token]), abs=1e-4)
        assert (draw.finish == "stop") == (draw.tokens[-1] in MIX_STOPS)
        assert len(draw.tokens) == 16 or draw.finish == "stop"


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_reference_with_a_static_cache_matches_the_fast_decoder(name):
    """The reference needs nothing of the cache: with a static (for Gemma3: static sliding) cache it agrees."""
    model = build(name, seed=1)
    jobs = random_jobs(4, seed=41)
    settings = dict(lam=0.5, temperature=1.0, top_k=5, seed=1, max_new_tokens=12, max_attempts=1)
    static = ReferenceDecoder(
        model, MIX_STOPS, generate_kwargs={"cache_implementation": "static"}, **settings
    )
    ref_attempts, _ = decode(static, jobs, set())
    fast_attempts, _ = decode(MixedDecoder(model, MIX_STOPS, batch_size=2, **settings), jobs, set())
    assert_same_draws(fast_attempts, ref_attempts, name)


def test_reference_marks_prompts_beyond_the_context_limit():
    model = build("llama")
    [job] = random_jobs(1, seed=5)
    decoder = ReferenceDecoder(
        model, MIX_STOPS, lam=0.3, max_new_tokens=8, context_limit=len(job.expert_ids) + 7
    )
    done = []
    decoder.run([job], lambda draw: True, lambda draw, ok: done.append((draw.finish, draw.tokens, ok)))
    assert done == [("prompt_too_long", [], False)]


def test_reference_ignores_the_models_own_generation_defaults():
    """A repetition penalty in the model's generation config must not bend the logits the coin sees."""
    model = build("llama")
    model.generation_config.repetition_penalty = 3.0
    model.generation_config.no_repeat_ngram_size = 2
    jobs = random_jobs(3, seed=51)
    settings = dict(lam=0.5, temperature=0.0, seed=2, max_new_tokens=16, max_attempts=1)
    ref_attempts, _ = decode(ReferenceDecoder(model, MIX_STOPS, **settings), jobs, set())
    fast_attempts, _ = decode(MixedDecoder(model, MIX_STOPS, batch_size=2, **settings), jobs, set())
    assert_same_draws(fast_attempts, ref_attempts, "generation defaults")
    assert model.generation_config.repetition_penalty == 3.0  # restored after each call
