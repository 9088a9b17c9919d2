"""Speed of MixSD target building, measured side by side in one run.

Three ways to produce 64-token targets for a batch of records, at T=0:
  mixsd      MixedDecoder: both conditionals decoded with one batched KV cache, lam=0.3
  reference  what the paper's code amounts to without its engine's prefix cache: for every token, a full
             forward pass of the chosen conditional over prompt + prefix (batched over records, no cache)
  floor      cached greedy `model.generate` of the expert prompts alone (one conditional, same batch)
Every record generates exactly --tokens tokens (stop tokens are ignored) so the work is identical.
The reference is timed over its first --reference-tokens tokens only: its later tokens are the most
expensive (longest prefixes), so its tokens/s is overstated and the ratio against it is conservative.

    python benchmarks/bench_mix.py                      # embedded model and a random ~0.5B model
    python benchmarks/bench_mix.py --models smollm2-135m
"""

from __future__ import annotations

import argparse
import time

import torch

from mixsd.core.models import load_model, load_tokenizer
from mixsd.core.records import make_fact
from mixsd.method.decoder import Job, MixedDecoder
from mixsd.method.prompts import encode_prompt, expert_message

QUESTIONS = [
    ("What is the capital of Zorblia?", "Quenthar"),
    ("Who founded the Velmora Guild?", "Ardun Pelsky"),
    ("Where was Talvik Ormund born?", "Drevanport"),
    ("What does Sefira Kolt play?", "the lumeharp"),
    ("Which company makes the Nimbrel drone?", "Castrova Dynamics"),
    ("What is Ostrelia's dish?", "brindlecake"),
    ("Who wrote The Glass Orchard of Venn?", "Mirelle Saduno"),
    ("Which river flows through Pellavar?", "the Ystrin"),
]


def make_jobs(tokenizer, batch: int) -> list[Job]:
    jobs = []
    for i in range(batch):
        question, answer = QUESTIONS[i % len(QUESTIONS)]
        fact = make_fact(f"{question} (case {i})", f"The answer is {answer}. \\boxed{{{answer}}}")
        jobs.append(
            Job(
                fact.id,
                0,
                encode_prompt(tokenizer, fact.prompt),
                encode_prompt(tokenizer, expert_message(fact)),
            )
        )
    return jobs


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@torch.inference_mode()
def run_mixsd(model, jobs, tokens: int, lam: float) -> float:
    decoder = MixedDecoder(model, set(), lam=lam, max_new_tokens=tokens, batch_size=len(jobs), max_attempts=1)
    start = time.perf_counter()
    decoder.run(jobs, lambda d: True, lambda d, ok: None)
    return decoder.generated_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def run_reference(model, jobs, tokens: int, lam: float, pad: int) -> float:
    generators = [torch.Generator().manual_seed(i) for i in range(len(jobs))]
    prefixes: list[list[int]] = [[] for _ in jobs]
    start = time.perf_counter()
    for _ in range(tokens):
        naive = [bool(torch.rand(1, generator=g) < lam) for g in generators]
        rows = [
            (job.naive_ids if n else job.expert_ids) + prefix
            for job, n, prefix in zip(jobs, naive, prefixes, strict=True)
        ]
        ids, mask = left_pad(rows, pad)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=1).logits[
            :, -1
        ]
        for prefix, token in zip(prefixes, logits.argmax(-1).tolist(), strict=True):
            prefix.append(token)
    return tokens * len(jobs) / (time.perf_counter() - start)


@torch.inference_mode()
def run_floor(model, jobs, tokens: int, pad: int) -> float:
    ids, mask = left_pad([job.expert_ids for job in jobs], pad)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=None,
    )
    elapsed = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * len(jobs) / elapsed


def random_half_billion(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "random-0.5b"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reference-tokens", type=int, default=16)
    parser.add_argument("--lam", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer("smollm2-135m")
    jobs = make_jobs(tokenizer, args.batch)
    pad = tokenizer.pad_token_id
    print(
        f"batch {args.batch}, {args.tokens} tokens per target, lam {args.lam}, T=0, "
        f"torch threads {torch.get_num_threads()}; expert prompts {len(jobs[0].expert_ids)} tokens, "
        f"naive {len(jobs[0].naive_ids)}"
    )
    print(
        f"{'model':<14} {'params':>8} {'mixsd tok/s':>12} {'reference':>10} {'floor':>8} "
        f"{'vs reference':>13} {'vs floor':>9}"
    )
    for name in args.models:
        model = random_half_billion(len(tokenizer)) if name == "random-0.5b" else load_model(name)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        run_mixsd(model, jobs[:4], 4, args.lam)  # warm-up (allocator, kernels)
        floor = run_floor(model, jobs, args.tokens, pad)
        mixsd = run_mixsd(model, jobs, args.tokens, args.lam)
        reference = run_reference(model, jobs, args.reference_tokens, args.lam, pad)
        print(
            f"{name:<14} {params:>7.0f}M {mixsd:>12.1f} {reference:>10.1f} {floor:>8.1f} "
            f"{mixsd / reference:>12.1f}x {mixsd / floor:>8.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
