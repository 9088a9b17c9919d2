"""Analyses behind the paper's two mechanistic claims.

`mixsd analyze nll`: the NLL of every target token under a model (normally the base) given the naive
prompt, read from the token ids stored in a target file (never re-tokenized), so ground-truth (SFT)
and MixSD targets are compared on exactly the tokens training sees; overall and per branch letter
(E expert, N naive, G ground truth), with the share of tokens above 5 nats (the paper's count of tokens
the base model would almost never write) and its Wilson interval.

`mixsd analyze fisher`: the diagonal empirical Fisher of the base model on probe data,
F_i = mean over samples of (d log p(y | x) / d theta_i)^2, where a sample is one sequence and
log p(y | x) the summed log-probability of its labelled tokens; then the Fisher-weighted displacement
of a tuned model, sum_i F_i (theta_i - theta0_i)^2, also divided by sum_i F_i (a Fisher-weighted mean
squared step) and by ||theta - theta0||^2 (the mean Fisher along the step), per layer and per kind of
weight. `--label data` (default) uses the probe's own tokens as labels: the empirical Fisher.
`--label model` draws each labelled token from the base model's next-token distribution at that
position (given the data prefix): the true Fisher.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tqdm.auto import tqdm

# models by attribute (models.load_model): a test patching that module sees every resolution and load
from mixsd import __version__
from mixsd.core import models
from mixsd.core.files import InputError, atomic_write_json, read_jsonl, sha256_file
from mixsd.core.metrics import HIGH_NLL_NATS, wilson_interval
from mixsd.core.models import default_device, fingerprint
from mixsd.core.options import ModelOptions, check_distinct, check_range
from mixsd.core.records import load_corpus, load_targets
from mixsd.evaluation.probe_kinds import kind_of_item, load_probe
from mixsd.method.generation import autocast, tail_logprobs
from mixsd.method.prompts import encode_answer, encode_prompt

# Fixed histogram edges (nats), so histograms of different target files line up bin for bin.
NLL_BIN_EDGES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


# --------------------------------------------------------------------------------------------------
# NLL of target tokens
# --------------------------------------------------------------------------------------------------
@dataclass
class NLLConfig(ModelOptions):
    model: str = field(
        metadata={"help": "Model that scores the targets (normally the base the targets came from)."}
    )
    targets: str = field(metadata={"help": "Target JSONL from `mixsd mix` or `mixsd sft-targets`."})
    out: str | None = field(default=None, metadata={"help": "JSON file for the full statistics (optional)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass."})
    bf16: bool = field(default=False, metadata={"help": "Deprecated: same as --dtype bfloat16."})
    # fields that change only speed or where the run goes, never the NLL table; `dtype` is in the settings as `bf16` (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("batch_size", "device", "threads", "dtype")

    def __post_init__(self) -> None:  # refuse bad options before any model is loaded (issue 10)
        self.check_model_options()
        check_range("batch_size", self.batch_size, 1, integer=True)
        check_distinct({"out": self.out}, {"targets": self.targets})


def high_nll_share(values: list[float], threshold: float = HIGH_NLL_NATS) -> dict[str, Any]:
    """How many tokens have NLL strictly above `threshold` nats: count, n, share and its 95% Wilson interval."""
    count = sum(1 for v in values if v > threshold)
    low, high = wilson_interval(count, len(values))
    return {
        "threshold": threshold,
        "count": count,
        "n": len(values),
        "value": count / len(values) if values else None,
        "ci95": [round(low, 6), round(high, 6)] if values else None,
    }


def distribution(values: list[float]) -> dict[str, Any]:
    """Mean, median, quantiles, a fixed-bin histogram and the NLL > 5 share of per-token NLLs."""
    if not values:
        return {
            "tokens": 0,
            "mean": None,
            "median": None,
            "quantiles": {},
            "histogram": {},
            "high_nll": high_nll_share(values),
        }
    data = torch.tensor(values, dtype=torch.float64)
    qs = torch.quantile(data, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    edges = NLL_BIN_EDGES
    counts = [int(((data >= lo) & (data < hi)).sum()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    return {
        "tokens": len(values),
        "mean": float(data.mean()),
        "median": float(data.median()),
        "std": float(data.std()) if len(values) > 1 else 0.0,
        "quantiles": {f"q{round(q * 100):02d}": v for q, v in zip(QUANTILES, qs, strict=True)},
        "histogram": {"edges": [e if math.isfinite(e) else "inf" for e in edges], "counts": counts},
        "fraction_below_0.1": float((data < 0.1).double().mean()),
        "high_nll": high_nll_share(values),
    }


def target_nll(config: NLLConfig, *, model=None) -> dict[str, Any]:
    """Per-token NLL statistics of a target file under `config.model` (or the given in-process model)."""
    config.set_threads()
    rows = load_targets(config.targets)
    for line, row in enumerate(rows, start=1):
        branch = row.get("branch")
        if branch is not None and (not isinstance(branch, str) or len(branch) != len(row["target_ids"])):
            raise InputError(
                f"must be a string of one letter per target token ({len(row['target_ids'])})",
                config.targets,
                line,
                "branch",
            )
    started = time.perf_counter()
    handle = models.try_resolve(config.model) if isinstance(config.model, str) else None
    if model is None:
        model = models.load_model(
            handle or config.model,
            device=config.device or default_device(),
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )
    pad = 0  # padded positions are masked, so any valid token id will do
    sequences = [row["prompt_ids"] + row["target_ids"] for row in rows]
    tails = [len(row["target_ids"]) for row in rows]
    per_row: list[list[float]] = [[] for _ in rows]
    bar = tqdm(total=len(rows), desc="nll", unit="rec")
    with autocast(next(model.parameters()).device, config.dtype == "bfloat16"):
        for index, logprobs in tail_logprobs(
            model, sequences, tails, pad_id=pad, batch_size=config.batch_size
        ):
            per_row[index] = (-logprobs).tolist()
            bar.update(1)
    bar.close()

    by_branch: dict[str, list[float]] = defaultdict(list)
    everything: list[float] = []
    records = []
    for row, nlls in zip(rows, per_row, strict=True):
        branch = row.get("branch") or "?" * len(nlls)
        for letter, value in zip(branch, nlls, strict=True):
            by_branch[letter].append(value)
        everything.extend(nlls)
        records.append(
            {
                "id": row["id"],
                "generation": row.get("generation", 0),
                "tokens": len(nlls),
                "mean_nll": sum(nlls) / len(nlls),
                "sum_nll": sum(nlls),
                # tokens above HIGH_NLL_NATS: with `correct` and `source`, the high-NLL share of a subset
                # (verified targets, per token or per target: mixsd.method.target_accounting)
                "high_nll_tokens": sum(value > HIGH_NLL_NATS for value in nlls),
                "correct": row.get("correct"),
                "source": row.get("source"),
            }
        )
    result = {
        "mixsd_version": __version__,
        "model": fingerprint(config.model, handle) if isinstance(config.model, str) else None,
        "targets": {"path": str(config.targets), "sha256": sha256_file(config.targets)},
        "records": len(rows),
        "overall": distribution(everything),
        "by_branch": {letter: distribution(values) for letter, values in sorted(by_branch.items())},
        "sequence_mean_nll": sum(r["mean_nll"] for r in records) / len(records),
        "per_record": records,
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if config.out:
        atomic_write_json(config.out, result)
    return result


def format_nll(result: dict[str, Any]) -> str:
    lines = [
        f"{'tokens':<10}{'n':>8}{'mean':>10}{'median':>10}{'q95':>10}{'<0.1':>8}"
        f"{f'>{HIGH_NLL_NATS:g} [95%]':>26}"
    ]
    groups = [("all", result["overall"]), *result["by_branch"].items()]
    for name, d in groups:
        if d["tokens"]:
            high = d.get("high_nll") or high_nll_share([])  # nll.json files from before the share existed
            share = (
                f"{high['count']} {high['value']:.1%} [{high['ci95'][0]:.1%}, {high['ci95'][1]:.1%}]"
                if high["n"]
                else "-"
            )
            lines.append(
                f"{name:<10}{d['tokens']:>8}{d['mean']:>10.4f}{d['median']:>10.4f}"
                f"{d['quantiles']['q95']:>10.4f}{d['fraction_below_0.1']:>8.1%}{share:>26}"
            )
    lines.append(f"{result['records']} records from {result['targets']['path']}")
    return "\n".join(lines)


def nll_command(config: NLLConfig) -> dict[str, Any]:
    result = target_nll(config)
    print(format_nll(result))
    if config.out:
        print(f"wrote {config.out}")
    return result


# --------------------------------------------------------------------------------------------------
# Fisher-weighted displacement
# --------------------------------------------------------------------------------------------------
@dataclass
class FisherConfig(ModelOptions):
    base: str = field(metadata={"help": "The base model (where the Fisher is measured)."})
    model: str = field(
        metadata={
            "help": "The tuned model: a HF folder, a `mixsd train` output, or a LoRA adapter "
            "folder (merged into its base)."
        }
    )
    probe: str = field(
        metadata={
            "help": "Probe data: a corpus JSONL (prompt/answer), a target file "
            "(prompt_ids/target_ids), a multiple-choice probe (query/choices/gold) "
            "or a text probe (text)."
        }
    )
    samples: int = field(default=64, metadata={"help": "Probe sequences used (a seeded random subset)."})
    label: Literal["data", "model"] = field(
        default="data",
        metadata={
            "help": "data: the probe's tokens are the labels (empirical Fisher); model: labels drawn from the base "
            "model at each position (true Fisher)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the subset and of sampled labels."})
    max_tokens: int = field(default=256, metadata={"help": "Cut each probe sequence to this many tokens."})
    out: str | None = field(default=None, metadata={"help": "JSON file for the results (optional)."})
    # fields that change only speed or where the run goes, never the Fisher estimate; a grid runs fisher with the default dtype (`mixsd.core.stage_settings`)
    SPEED_ONLY: ClassVar[tuple[str, ...]] = ("device", "threads", "dtype")

    def __post_init__(self) -> None:
        self.check_model_options()
        check_range("samples", self.samples, 1, integer=True)
        check_range("seed", self.seed, integer=True)
        check_range("max_tokens", self.max_tokens, 2, integer=True)
        check_distinct({"out": self.out}, {"probe": self.probe})


def probe_sequences(
    path: str | Path, tokenizer, max_tokens: int = 256
) -> tuple[str, list[tuple[list[int], int]]]:
    """(kind, [(token ids, index of the first labelled token)]) from any supported probe file."""
    path = Path(path)
    first = next(iter(read_jsonl(path)), None)
    if first is None:
        raise InputError("no records", path)
    keys = first[1].keys()
    out: list[tuple[list[int], int]] = []
    if {"prompt_ids", "target_ids"} <= keys:
        kind = "targets"
        out = [(r["prompt_ids"] + r["target_ids"], len(r["prompt_ids"])) for r in load_targets(path)]
    elif (probe_kind := kind_of_item(first[1])) is not None and probe_kind.fisher_sequences is not None:
        kind, items = probe_kind.fisher_label or probe_kind.name, load_probe(path, None)[1]
        out = probe_kind.fisher_sequences(tokenizer, items)
    else:  # a corpus file (its records have a prompt, as generative probe items do)
        kind = "corpus"
        for fact in load_corpus(path):
            prompt = encode_prompt(tokenizer, fact.prompt, fact.system)
            out.append((prompt + encode_answer(tokenizer, fact.answer), len(prompt)))
    clipped = [(ids[:max_tokens], start) for ids, start in out if start < min(len(ids), max_tokens)]
    if not clipped:
        raise InputError(f"no sequence has a labelled token within the first {max_tokens} tokens", path)
    return kind, clipped


def diagonal_fisher(
    model,
    sequences: Iterable[tuple[list[int], int]],
    *,
    label: str = "data",
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean squared per-sequence gradient of log p(labels | inputs) for every trainable parameter.

    A sequence (ids, start) labels ids[start:]; with label="model" each of those tokens is replaced by
    a draw from the model's own next-token distribution at that position. Returns (Fisher, samples).
    """
    if label not in ("data", "model"):
        raise ValueError(f"label must be 'data' or 'model', got {label!r}")
    sequences = list(sequences)
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in params.items()}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    try:
        for p in params.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            for ids, start in tqdm(sequences, desc="fisher", unit="seq", disable=not progress):
                model.zero_grad(set_to_none=True)
                x = torch.tensor([ids], device=device)
                logits = model(input_ids=x).logits[0, start - 1 : len(ids) - 1].float()
                logprobs = torch.log_softmax(logits, dim=-1)
                if label == "data":
                    y = x[0, start:]
                else:
                    y = (
                        torch.multinomial(logprobs.detach().exp().cpu(), 1, generator=generator)
                        .squeeze(1)
                        .to(device)
                    )
                logprobs.gather(1, y[:, None]).sum().backward()
                for name, p in params.items():
                    if p.grad is not None:
                        fisher[name] += p.grad.detach().float() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        for name, p in params.items():
            p.requires_grad_(flags[name])
        model.train(was_training)
    for tensor in fisher.values():
        tensor /= max(1, len(sequences))
    return fisher, len(sequences)


def parameter_group(name: str) -> tuple[str, str]:
    """(layer, kind) of a parameter name: ("layer.3", "self_attn.q_proj.weight"), ("embed_tokens", ...)."""
    match = re.search(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.(.+)$", name)
    if match:
        return f"layer.{int(match.group(1)):03d}", match.group(2)
    parts = name.split(".")
    short = parts[-2] if len(parts) >= 2 else parts[0]
    return short, name.split(".", 1)[-1] if name.startswith("model.") else name


def _stats(d: float, f: float, step: float, n: int, base_sq: float) -> dict[str, Any]:
    return {
        "displacement": d,
        "fisher_sum": f,
        "delta_sq": step,
        "params": n,
        "normalized_by_fisher": d / f if f > 0 else None,
        "normalized_by_delta": d / step if step > 0 else None,
        "relative_change": math.sqrt(step / base_sq) if base_sq > 0 else None,
    }


def displacement(
    fisher: dict[str, torch.Tensor], base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]
) -> dict[str, Any]:
    """sum F (theta - theta0)^2, its normalizations, per layer and per kind of weight (float64 sums)."""
    missing = sorted(set(fisher) - set(tuned))
    totals = [0.0, 0.0, 0.0, 0, 0.0]
    by_layer: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0.0])
    by_kind: dict[str, list] = defaultdict(lambda: [0.0, 0.0, 0.0, 0, 0.0])
    for name, f in fisher.items():
        if name not in tuned:
            continue
        theta0 = base[name].detach().double()
        theta = tuned[name].detach().double().to(theta0.device)
        if theta.shape != theta0.shape:
            raise InputError(
                f"parameter {name} has shape {tuple(theta.shape)} in the tuned model but "
                f"{tuple(theta0.shape)} in the base; are they the same architecture?"
            )
        delta_sq = (theta - theta0).pow_(2)
        f64 = f.double().to(delta_sq.device)
        values = [
            float((f64 * delta_sq).sum()),
            float(f64.sum()),
            float(delta_sq.sum()),
            theta.numel(),
            float(theta0.pow(2).sum()),
        ]
        layer, kind = parameter_group(name)
        for acc in (totals, by_layer[layer], by_kind[kind]):
            for i, v in enumerate(values):
                acc[i] += v
    return {
        "totals": _stats(*totals),
        "by_layer": {k: _stats(*v) for k, v in sorted(by_layer.items())},
        "by_kind": {k: _stats(*v) for k, v in sorted(by_kind.items())},
        "missing_in_tuned": missing,
    }


def fisher_displacement(
    config: FisherConfig, *, base_model=None, tuned_model=None, tokenizer=None
) -> dict[str, Any]:
    """The Fisher of `config.base` on `config.probe` and the Fisher-weighted displacement of `config.model`."""
    if config.samples < 1 or config.max_tokens < 2:
        raise InputError("--samples must be >= 1 and --max-tokens >= 2")
    config.set_threads()
    started = time.perf_counter()
    device = config.device or default_device()
    base_handle = models.try_resolve(config.base) if isinstance(config.base, str) else None
    model_handle = models.try_resolve(config.model) if isinstance(config.model, str) else None
    if base_model is None:
        base_model, loaded_tokenizer = models.load_for_inference(
            base_handle or config.base,
            device=device,
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )
        tokenizer = tokenizer or loaded_tokenizer
    if tokenizer is None:
        raise ValueError("pass the tokenizer together with an in-process base model")
    kind, sequences = probe_sequences(config.probe, tokenizer, config.max_tokens)
    available = len(sequences)
    random.Random(config.seed).shuffle(sequences)
    sequences = sequences[: config.samples]
    fisher, used = diagonal_fisher(base_model, sequences, label=config.label, seed=config.seed)
    base_params = {n: p.detach() for n, p in base_model.named_parameters()}
    if tuned_model is None:
        tuned_model = models.load_model(
            model_handle or config.model,
            device="cpu",
            dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
        )
    tuned_params = {n: p.detach() for n, p in tuned_model.named_parameters()}
    result = {
        "mixsd_version": __version__,
        "base": fingerprint(config.base, base_handle) if isinstance(config.base, str) else None,
        "model": fingerprint(config.model, model_handle) if isinstance(config.model, str) else None,
        "probe": {
            "path": str(config.probe),
            "sha256": sha256_file(config.probe),
            "kind": kind,
            "available": available,
            "samples": used,
        },
        "label": config.label,
        "fisher": "empirical" if config.label == "data" else "true (sampled labels)",
        **displacement(fisher, base_params, tuned_params),
        "config": asdict(config),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if config.out:
        atomic_write_json(config.out, result)
    return result


def format_fisher(result: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, Any]) -> str:
        nf, nd = s["normalized_by_fisher"], s["normalized_by_delta"]
        return (
            f"{name:<34}{s['displacement']:>12.4e}{s['delta_sq']:>12.4e}"
            f"{'-' if nf is None else f'{nf:.4e}':>12}{'-' if nd is None else f'{nd:.4e}':>12}"
        )

    lines = [
        f"{'group':<34}{'sum F d^2':>12}{'|d|^2':>12}{'/sum F':>12}{'/|d|^2':>12}",
        row("total", result["totals"]),
    ]
    lines += [row(name, s) for name, s in result["by_layer"].items()]
    lines.append(
        f"{result['fisher']} Fisher from {result['probe']['samples']} {result['probe']['kind']} samples"
    )
    return "\n".join(lines)


def fisher_command(config: FisherConfig) -> dict[str, Any]:
    result = fisher_displacement(config)
    print(format_fisher(result))
    if config.out:
        print(f"wrote {config.out}")
    return result
