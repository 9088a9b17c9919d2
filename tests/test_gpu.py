"""The GPU path (marked `gpu`): bf16 mixing on CUDA against fp32, DDP `mix` over NCCL, bf16 `mixsd train`.

Skipped without CUDA. `MIXSD_GPU_TESTS_DEVICE=cpu` runs the same tests on the CPU (a dry run of this file's
code; NCCL itself needs CUDA and is skipped there). Figures (the bf16 near-tie flip rate and the rest) are
printed and, when `MIXSD_GPU_FIGURES` names a JSON file, merged into it: `benchmarks/gpu_check.sh` collects
them into its report.

    python -m pytest -q -m gpu tests/test_gpu.py -rA
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from conftest import make_causal_lm, make_word_model, make_word_tokenizer
from mixsd.method.decoder import Draw, Job, MixedDecoder
from mixsd.method.mix_config import MixConfig
from mixsd.method.targets import mix, summary_path

DEVICE = os.environ.get("MIXSD_GPU_TESTS_DEVICE") or ("cuda" if torch.cuda.is_available() else None)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (or MIXSD_GPU_TESTS_DEVICE=cpu for a dry run)"),
]

VOCAB = 512
# 32 of the 512 ids end a target, so records finish at different steps and new rows are spliced into the
# running batch (with no stop ids every record would end at the same step and the batch would only refill).
STOPS = frozenset(range(6, 38))
# Random init gives nearly uniform logits, where any rounding flips the argmax. A sharper output layer puts
# most greedy choices far from ties, as a trained model's are; the flips left are the near-ties measured here.
SHARPEN = 24.0


def record_figures(name: str, figures: dict) -> None:
    """Print the figures and merge them into the JSON file named by MIXSD_GPU_FIGURES, if any."""
    print(f"{name}: {json.dumps(figures)}")
    target = os.environ.get("MIXSD_GPU_FIGURES")
    if not target:
        return
    path = Path(target)
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[name] = {"device": DEVICE, **figures}
    path.write_text(json.dumps(merged, indent=2) + "\n")


def qwen2_model(dtype: torch.dtype, seed: int = 0):
    """A small random Qwen2 (q/k/v biases, GQA) with SDPA attention on DEVICE; same weights for every dtype."""
    model = make_causal_lm(
        "qwen2",
        seed=seed,
        sharpen=SHARPEN,
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = model.to(device=DEVICE, dtype=dtype).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def varied_jobs(n: int, seed: int = 3) -> list[Job]:
    """Records whose prompts differ widely in length, so every batch is left-padded."""
    rng = random.Random(seed)
    jobs = []
    for i in range(n):
        naive = [rng.randrange(40, VOCAB) for _ in range(rng.randrange(3, 24))]
        expert = [rng.randrange(40, VOCAB) for _ in range(rng.randrange(10, 90))]
        jobs.append(Job(f"r{i}", 0, naive, expert))
    return jobs


def decode(
    model, jobs: list[Job], *, batch_size: int, lam: float, temperature: float = 0.0
) -> dict[str, Draw]:
    decoder = MixedDecoder(
        model,
        STOPS,
        lam=lam,
        temperature=temperature,
        max_new_tokens=32,
        batch_size=batch_size,
        max_attempts=1,
        seed=7,
    )
    draws: dict[str, Draw] = {}
    decoder.run(jobs, lambda draw: True, lambda draw, ok: draws.__setitem__(draw.job.key, draw))
    assert len(draws) == len(jobs)
    return draws


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def margin_at(model, draw: Draw, step: int, other: int) -> float:
    """fp32 log-prob of the token the draw chose at `step` minus that of `other`, in the conditional it used."""
    job = draw.job
    prompt = job.expert_ids if draw.branch[step] == "E" else job.naive_ids
    ids = torch.tensor([prompt + draw.tokens[:step]], device=DEVICE)
    logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), dim=-1)
    return float(logprobs[draw.tokens[step]] - logprobs[other])


def compare(reference: dict[str, Draw], other: dict[str, Draw], model_fp32) -> dict:
    """Where `other` leaves `reference` and how close their shared prefixes are.

    For each record: the first step whose token differs, the fp32 log-prob margin there between the
    reference's token and the other's (in the conditional both used: the coins never depend on the numbers),
    and the log-prob differences over the shared prefix. flip_rate is the share of records that diverge;
    flips_per_token the divergences per token compared (each record counts up to its divergence).
    """
    divergences, margins, prefix_errors, compared = [], [], [], 0
    for key, ref in reference.items():
        low = other[key]
        at = first_divergence(ref.tokens, low.tokens)
        shared = len(ref.tokens) if at is None else at
        compared += shared if at is None else at + 1
        for a, b in ((ref.logprob_expert, low.logprob_expert), (ref.logprob_naive, low.logprob_naive)):
            prefix_errors += [abs(x - y) for x, y in zip(a[:shared], b[:shared], strict=True)]
        if at is None:
            continue
        assert ref.branch[: at + 1] == low.branch[: at + 1], key
        divergences.append(at)
        if at < min(len(ref.tokens), len(low.tokens)):
            margins.append(margin_at(model_fp32, ref, at, low.tokens[at]))
    return {
        "records": len(reference),
        "tokens_compared": compared,
        "flip_rate": len(divergences) / len(reference),
        "flips_per_token": len(divergences) / compared,
        "first_divergence_positions": sorted(divergences),
        "first_divergence_median": statistics.median(divergences) if divergences else None,
        "fp32_margin_at_divergence_max": max(margins) if margins else None,
        "fp32_margin_at_divergence_median": statistics.median(margins) if margins else None,
        "shared_prefix_logprob_abs_error_max": max(prefix_errors),
        "shared_prefix_logprob_abs_error_mean": sum(prefix_errors) / len(prefix_errors),
    }


# --------------------------------------------------------------------------------------------------
# (a) bf16 mixing with SDPA and padded rows against fp32
# --------------------------------------------------------------------------------------------------
def reference_name() -> str:
    return (
        "ReferenceDecoder (generate)"
        if importlib.util.find_spec("mixsd.method.reference")
        else "MixedDecoder batch 1"
    )


def reference_decode(model, jobs: list[Job], *, lam: float, temperature: float = 0.0) -> dict[str, Draw]:
    """Targets from the generate-based reference decoder (`mixsd.method.reference`), or, in a tree without it, from
    MixedDecoder one record at a time (batch 1: no padding, no splicing)."""
    try:
        from mixsd.method.reference import ReferenceDecoder
    except ImportError:
        return decode(model, jobs, batch_size=1, lam=lam, temperature=temperature)
    decoder = ReferenceDecoder(
        model, STOPS, lam=lam, temperature=temperature, max_new_tokens=32, max_attempts=1, seed=7
    )
    draws: dict[str, Draw] = {}
    decoder.run(jobs, lambda draw: True, lambda draw, ok: draws.__setitem__(draw.job.key, draw))
    assert len(draws) == len(jobs)
    return draws


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fp32_mixing_with_padded_rows_matches_the_reference(temperature):
    """On the device, padding and splicing change nothing: MixedDecoder at batch 12 of 40 records equals the
    reference decoder (one record per `generate` call).

    Different batch shapes may run different kernels, so fp32 results can differ in the last bits; at T=0
    a record may then leave the other only at an exact tie (fp32 margin below 1e-3), which is allowed.
    """
    model = qwen2_model(torch.float32)
    jobs = varied_jobs(40)
    batched = decode(model, jobs, batch_size=12, lam=0.5, temperature=temperature)
    reference = reference_decode(model, jobs, lam=0.5, temperature=temperature)
    lengths = [len(d.tokens) for d in batched.values()]
    assert min(lengths) < max(lengths)  # records ended at different steps: rows were spliced in
    if temperature == 0:
        figures = {"reference": reference_name(), **compare(reference, batched, model)}
        record_figures("fp32_mixing_vs_reference", figures)
        assert figures["flip_rate"] <= 0.05, figures
        margin = figures["fp32_margin_at_divergence_max"]
        assert margin is None or margin < 1e-3, figures
        assert figures["shared_prefix_logprob_abs_error_max"] < 2e-3, figures
        return
    for job in jobs:
        a, b = batched[job.key], reference[job.key]
        assert a.tokens == b.tokens and a.branch == b.branch, job.key
        assert a.logprob_expert == pytest.approx(b.logprob_expert, abs=2e-3)
        assert a.logprob_naive == pytest.approx(b.logprob_naive, abs=2e-3)


def test_bf16_mixing_differs_from_fp32_only_at_near_ties():
    """bf16 targets (MixedDecoder, batch 16) equal the fp32 reference's until a near-tie, where rounding may pick the other token.

    Reported: the flip rate (share of records whose tokens differ from fp32), where the first divergence
    falls, and the fp32 log-prob margin of the two tokens there. A masking or padding error would make
    records diverge where fp32 prefers its token by a wide margin, or shift the log-probs of the shared prefix.
    """
    jobs = varied_jobs(64)
    model_fp32 = qwen2_model(torch.float32)
    reference = reference_decode(model_fp32, jobs, lam=0.5)
    bf16 = decode(qwen2_model(torch.bfloat16), jobs, batch_size=16, lam=0.5)
    figures = {"reference": reference_name(), **compare(reference, bf16, model_fp32)}
    record_figures("bf16_vs_fp32_mixing", figures)
    margin = figures["fp32_margin_at_divergence_max"]
    # Every flip is a near-tie: bf16 rounding moves these log-probs by hundredths of a nat, not by 0.5.
    # (CPU dry run: margins up to 0.16, prefix errors 0.03 on average, 2.2% flips per token.)
    assert margin is None or margin < 0.5, figures
    assert figures["shared_prefix_logprob_abs_error_max"] < 0.5, figures
    assert figures["shared_prefix_logprob_abs_error_mean"] < 0.1, figures
    assert figures["flips_per_token"] <= 0.08, figures  # small, though not zero


# --------------------------------------------------------------------------------------------------
# (c) bf16 training steps of `mixsd train`
# --------------------------------------------------------------------------------------------------
TRAIN_VOCAB = 96


def train_config(**wanted):
    """A TrainConfig from our field names, whichever spelling the class uses (issue 12 moves TrainConfig onto
    TrainingArguments: `lr` may become `learning_rate`, `out` `output_dir`, and so on)."""
    from mixsd.training.train import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    spellings = {
        "out": ("out", "output_dir"),
        "lr": ("lr", "learning_rate"),
        "epochs": ("epochs", "num_train_epochs"),
        "batch_size": ("batch_size", "per_device_train_batch_size"),
        "progress": ("progress",),
    }
    kwargs = {}
    for key, value in wanted.items():
        name = next((n for n in spellings.get(key, (key,)) if n in names), None)
        if name is not None:
            kwargs[name] = value
        elif key == "progress":
            kwargs["disable_tqdm"] = not value
        else:
            raise AssertionError(f"TrainConfig has no field for {key!r}")
    if "save_every" in names:
        kwargs["save_every"] = -1  # no checkpoints: only the final model
    elif "save_strategy" in names:
        kwargs["save_strategy"] = "no"
    return TrainConfig(**kwargs)


def test_bf16_training_steps_lower_the_loss_and_save_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from mixsd.training.train import train

    folder = tmp_path / "base"
    start = make_word_model(TRAIN_VOCAB, max_positions=64)
    start.save_pretrained(folder)
    make_word_tokenizer(TRAIN_VOCAB).save_pretrained(folder)
    rng = random.Random(0)
    with (tmp_path / "targets.jsonl").open("w") as handle:
        for i in range(16):
            prompt = [1] + [rng.randrange(6, TRAIN_VOCAB) for _ in range(rng.randrange(3, 10))]
            target = [rng.randrange(6, TRAIN_VOCAB) for _ in range(rng.randrange(1, 7))] + [2]
            handle.write(json.dumps({"id": f"r{i}", "prompt_ids": prompt, "target_ids": target}) + "\n")
    config = train_config(
        model=str(folder),
        targets=str(tmp_path / "targets.jsonl"),
        out=str(tmp_path / "run"),
        epochs=4,
        lr=1e-2,
        batch_size=8,
        bf16=True,
        progress=False,
    )

    def cuda_allocations() -> int:
        return torch.cuda.memory_stats().get("allocation.all.allocated", 0) if DEVICE == "cuda" else 0

    before = cuda_allocations()
    summary = train(config)
    allocations = cuda_allocations() - before
    losses = [h["loss"] for h in summary["history"]]
    record_figures(
        "bf16_train", {"losses": losses, "steps": summary["global_steps"], "cuda_allocations": allocations}
    )
    assert summary["global_steps"] == 8 and len(losses) >= 2
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0]
    if DEVICE == "cuda":
        assert allocations > 100, allocations  # the steps ran on the GPU (every step allocates many tensors)

    model_dir = Path(summary["model_dir"])
    trained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    assert not torch.equal(
        trained.model.embed_tokens.weight.float().cpu(),
        start.model.embed_tokens.weight.to(torch.bfloat16).float(),
    )
    with torch.inference_mode():
        logits = trained(input_ids=torch.tensor([[1, 7, 8, 9]], device=DEVICE)).logits
    assert torch.isfinite(logits.float()).all()


# --------------------------------------------------------------------------------------------------
# (b) `mixsd mix` in two processes (NCCL on CUDA); last, since it launches processes and may skip
# --------------------------------------------------------------------------------------------------
def _mix_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _assert_same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for key in x:
            if key.startswith("logprob_"):
                assert x[key] == pytest.approx(y[key], abs=2e-3), key
            elif key != "settings":
                assert x[key] == y[key], key


def test_mix_in_two_processes_writes_the_same_file_as_one(tiny_model_dir, tiny_corpus, tmp_path):
    """`torchrun --nproc_per_node 2 -m mixsd.cli mix`: NCCL on CUDA (both ranks share cuda:0 on a one-GPU
    machine: accelerate maps rank r to device r mod the device count), gloo with --device cpu."""
    options = ["--lam", "0.5", "--max-new-tokens", "12", "--verify", "none", "--batch-size", "4"]
    single = tmp_path / "one.jsonl"
    mix(
        MixConfig(
            model=str(tiny_model_dir),
            input=str(tiny_corpus),
            output=str(single),
            lam=0.5,
            max_new_tokens=12,
            verify="none",
            batch_size=4,
            device=DEVICE,
        ),
        progress=False,
    )
    double = tmp_path / "two.jsonl"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "mixsd.cli",
        "mix",
        "--model",
        str(tiny_model_dir),
        "--input",
        str(tiny_corpus),
        "--output",
        str(double),
        *options,
    ]
    if DEVICE == "cpu":
        command += ["--device", "cpu"]  # otherwise each rank takes the device accelerate gives it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_DEBUG": "WARN"}
    # A session of its own, so a hung run is ended with both its workers (torchrun's children).
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"two-process mix did not finish in 150 s:\n{output[-4000:]}")
    # One GPU cannot host two NCCL ranks: NCCL refuses a communicator with two ranks on one device, and a
    # barrier addressed to cuda:<local rank> finds no cuda:1. Either is the machine's limit, not mixsd's.
    signs = ("Duplicate GPU", "invalid device ordinal")
    refusal = next((line.strip() for line in output.splitlines() if any(s in line for s in signs)), None)
    if process.returncode != 0 and refusal is not None and torch.cuda.device_count() < 2:
        record_figures("ddp_mix_nccl", {"ran": False, "reason": refusal})
        pytest.skip(f"two NCCL ranks cannot share this machine's one GPU: {refusal}")
    assert process.returncode == 0, output[-4000:]
    _assert_same_rows(_mix_rows(double), _mix_rows(single))
    summary = json.loads(summary_path(double).read_text())
    assert summary["processes"] == 2
    backend = "gloo" if DEVICE == "cpu" else "nccl"
    record_figures(
        f"ddp_mix_{backend}", {"ran": True, "records": summary["records"], "gpus": torch.cuda.device_count()}
    )
