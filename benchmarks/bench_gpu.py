"""MixSD target building on a GPU: MixedDecoder (`mix`) against `generate` of one conditional, same card.

Needs no model weights: the models are randomly initialized with the real shapes of Qwen2.5-0.5B and
Qwen2.5-1.5B (hidden size, layers, heads, KV heads, MLP width, 151,936-token vocabulary, tied embeddings),
directly on the device in bf16, and the prompts are random token ids of the lengths the chat template gives
(expert prompts of 100-140 tokens, naive ones of 40-60: every batch is left-padded). Random weights never
emit an end token on purpose, so every record decodes exactly --tokens tokens (no stop ids) and both sides
do the same work:
  mix             MixedDecoder, lam 0.3: two cache rows per record (expert and naive), one token per record
                  a step
  generate        `model.generate` of the expert prompts alone (one conditional: one row per record), greedy,
                  min_new_tokens = max_new_tokens = --tokens
  generate_pairs  `model.generate` of both prompts of every record as independent rows (two rows per record,
                  as mix has, but nothing mixed)
All report target tokens per second (records x tokens / seconds). mix/generate is the price of the second
conditional; mix/generate_pairs is MixedDecoder's own cost against `generate` doing the same rows' work.
Each figure is the median of --repeats timed runs after an untimed warm-up.

    python benchmarks/bench_gpu.py --out gpu_check.json          # CUDA, both shapes, 16/64/128 records
    python benchmarks/bench_gpu.py --device cpu --tiny           # the same code on a tiny shape, in seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

from mixsd.method.decoder import Job, MixedDecoder
from mixsd.method.generation import left_pad

QWEN_VOCAB = 151936
# The published configs' shapes (config.json of Qwen/Qwen2.5-0.5B-Instruct and -1.5B-Instruct).
SHAPES = {
    "qwen2.5-0.5b": dict(
        vocab_size=QWEN_VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        vocab_size=QWEN_VOCAB,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    # --tiny: the same code paths in seconds on a CPU
    "tiny": dict(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
STARTED = time.perf_counter()


def log(message: str) -> None:
    elapsed = time.perf_counter() - STARTED
    print(f"[{datetime.now():%H:%M:%S} +{elapsed:6.1f}s] {message}", flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_model(shape: str, device: torch.device, dtype: torch.dtype):
    """A randomly initialized Qwen2 of the named shape, created on `device` in `dtype` (no weights needed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        **SHAPES[shape],
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialize in the target dtype: no fp32 copy of a 1.5B model
    try:
        with device:
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None  # nothing ends early: both sides decode --tokens tokens
    model.generation_config.pad_token_id = 0
    return model


def random_jobs(count: int, vocab: int, seed: int = 0) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        naive = [rng.randrange(100, vocab) for _ in range(rng.randrange(40, 61))]
        expert = [rng.randrange(100, vocab) for _ in range(rng.randrange(100, 141))]
        jobs.append(Job(f"r{i}", 0, naive, expert))
    return jobs


@torch.inference_mode()
def time_mix(model, jobs: list[Job], tokens: int, lam: float) -> tuple[float, int]:
    """(seconds, target tokens) of MixedDecoder decoding every job to exactly `tokens` tokens."""
    device = next(model.parameters()).device
    decoder = MixedDecoder(model, set(), lam=lam, max_new_tokens=tokens, batch_size=len(jobs), max_attempts=1)
    lengths: list[int] = []
    synchronize(device)
    start = time.perf_counter()
    decoder.run(jobs, lambda draw: True, lambda draw, ok: lengths.append(len(draw.tokens)))
    synchronize(device)
    seconds = time.perf_counter() - start
    if lengths != [tokens] * len(jobs):
        raise RuntimeError(f"mix decoded {sorted(set(lengths))} tokens per record, expected {tokens}")
    return seconds, decoder.generated_tokens


@torch.inference_mode()
def time_generate(model, jobs: list[Job], tokens: int, pairs: bool = False) -> tuple[float, int]:
    """(seconds, target tokens) of greedy `generate` over the expert prompts (with `pairs`, the expert and
    naive prompts as separate rows), exactly `tokens` new tokens each; target tokens count records."""
    device = next(model.parameters()).device
    prompts = [
        ids for job in jobs for ids in ((job.expert_ids, job.naive_ids) if pairs else (job.expert_ids,))
    ]
    ids, mask, _ = left_pad(prompts, 0, device)
    synchronize(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=tokens,
        min_new_tokens=tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    synchronize(device)
    seconds = time.perf_counter() - start
    new = out.shape[1] - ids.shape[1]
    if new != tokens:
        raise RuntimeError(f"generate produced {new} new tokens, expected {tokens}")
    return seconds, new * len(jobs)


def measure(model, jobs, tokens: int, lam: float, repeats: int, device: torch.device) -> dict:
    """Median tokens/s of mix, generate and generate_pairs over `repeats` interleaved runs, after a warm-up."""
    runs = {
        "mix": lambda n: time_mix(model, jobs, n, lam),
        "generate": lambda n: time_generate(model, jobs, n),
        "generate_pairs": lambda n: time_generate(model, jobs, n, pairs=True),
    }
    for run in runs.values():
        run(min(tokens, 8))  # warm-up: kernels, allocator, cuBLAS handles
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds, count = run(tokens)
            rates[name].append(count / seconds)
    median = {name: statistics.median(values) for name, values in rates.items()}
    return {
        "records": len(jobs),
        "tokens": tokens,
        **{f"{name}_tok_s": round(value, 1) for name, value in median.items()},
        "ratio_mix_over_generate": round(median["mix"] / median["generate"], 3),
        "ratio_mix_over_generate_pairs": round(median["mix"] / median["generate_pairs"], 3),
        **{f"{name}_tok_s_runs": [round(r, 1) for r in values] for name, values in rates.items()},
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None
        ),
    }


def environment(device: torch.device) -> dict:
    import accelerate
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
        try:
            version = torch.cuda.nccl.version()
            info["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        except (AttributeError, RuntimeError):
            info["nccl"] = None
    return info


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="Only the tiny shape (a dry run of the code).")
    parser.add_argument(
        "--models", nargs="+", default=["qwen2.5-0.5b", "qwen2.5-1.5b"], choices=sorted(SHAPES)
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[16, 64, 128], help="Records per batch.")
    parser.add_argument("--tokens", type=int, default=128, help="New tokens per record.")
    parser.add_argument("--lam", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=240.0,
        help="Skip the measurements that would start after this many seconds (the rest are recorded as skipped).",
    )
    parser.add_argument("--out", type=Path, help="Write every figure to this JSON file.")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="*",
        default=[],
        help="JSON files (e.g. the gpu tests' figures) to include.",
    )
    parser.add_argument("--pytest-rc", type=int, help="Exit status of the gpu tests, recorded in --out.")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: CUDA is not available (use --device cpu --tiny for a dry run)", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    models = ["tiny"] if args.tiny else args.models
    report: dict = {
        "environment": environment(device),
        "settings": vars(args) | {"models": models},
        "mix": [],
    }
    report["settings"] = {k: str(v) if isinstance(v, Path) else v for k, v in report["settings"].items()}
    report["settings"]["merge"] = [str(p) for p in args.merge]
    log(f"environment {json.dumps(report['environment'])}")
    print(
        f"{'model':<14} {'params':>7} {'records':>7} {'tokens':>6} {'mix tok/s':>10} {'generate':>9} "
        f"{'pairs':>9} {'mix/generate':>12} {'mix/pairs':>9}"
    )
    for name in models:
        if time.perf_counter() - STARTED > args.budget_s:
            report["mix"].append({"model": name, "skipped": "time budget spent"})
            log(f"{name}: skipped (time budget spent)")
            continue
        log(f"{name}: building random {args.dtype} model on {device}")
        model = random_model(name, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        for batch in args.batches:
            if time.perf_counter() - STARTED > args.budget_s:
                report["mix"].append({"model": name, "records": batch, "skipped": "time budget spent"})
                log(f"{name} batch {batch}: skipped (time budget spent)")
                continue
            log(f"{name}: batch {batch}, {args.tokens} tokens, {args.repeats} runs each")
            jobs = random_jobs(batch, model.config.vocab_size)
            row = {"model": name, "params_m": round(params / 1e6, 1), "dtype": args.dtype}
            row.update(measure(model, jobs, args.tokens, args.lam, args.repeats, device))
            report["mix"].append(row)
            print(
                f"{name:<14} {params / 1e6:>6.0f}M {batch:>7} {args.tokens:>6} {row['mix_tok_s']:>10.1f} "
                f"{row['generate_tok_s']:>9.1f} {row['generate_pairs_tok_s']:>9.1f} "
                f"{row['ratio_mix_over_generate']:>12.2f} {row['ratio_mix_over_generate_pairs']:>9.2f}",
                flush=True,
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for path in args.merge:
        report[path.stem] = json.loads(path.read_text()) if path.is_file() else None
    if args.pytest_rc is not None:
        report["pytest_rc"] = args.pytest_rc
    report["seconds"] = round(time.perf_counter() - STARTED, 1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
