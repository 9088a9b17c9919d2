"""Training throughput of `mixsd train`'s machinery against a minimal hand-written PyTorch loop.

Both sides do the same work on the embedded model: the same target records (the ground-truth target of a
demo fact, repeated), the same batches, AdamW, gradient clipping, the loss on target tokens only, optional
bf16 autocast. The runs alternate (mixsd, loop, mixsd, loop, ...) so a shared machine's load hits both alike;
the first `--warmup` steps of every run are not timed. Throughput = target tokens / second.

    python benchmarks/bench_train.py --steps 6 --warmup 2 --repeats 2 --bf16 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from mixsd.core.models import load_model, load_tokenizer
from mixsd.core.records import load_corpus
from mixsd.method.prompts import pad_token_id
from mixsd.method.sft_targets import sft_target_rows
from mixsd.training.train import PadCollator, TrainConfig, target_examples, train

DEMO = Path(__file__).resolve().parents[1] / "src" / "mixsd" / "data" / "facts-demo.jsonl"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def target_rows(model_name: str, records: int) -> list[dict]:
    tokenizer = load_tokenizer(model_name)
    # Every record is the same demo fact (61 prompt + 16 target tokens with SmolLM2's template): both sides
    # then see identical batches whatever order their samplers pick.
    row = sft_target_rows(load_corpus(DEMO), tokenizer)[0]
    return [dict(row, id=f"r{i}") for i in range(records)]


def run_mixsd(args, rows, out: Path) -> tuple[float, float]:
    """Seconds and target tokens of the timed steps of one `train()` run."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    targets = out / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = TrainConfig(
        model=args.model,
        targets=str(targets),
        out=str(out / "run"),
        batch_size=args.batch_size,
        max_steps=args.steps,
        lr=1e-5,
        bf16=args.bf16,
        save_every=-1,
        lora_rank=args.lora_rank,
        overwrite=True,
        progress=False,
        cpu=True,
    )
    timer = StepTimer()
    from mixsd.training import train as train_module

    original = train_module.TokenCountingTrainer.__init__

    def init_with_timer(self, *a, **kw):  # attach the timer without changing what train() builds
        kw["callbacks"] = [*kw.get("callbacks", []), timer]
        original(self, *a, **kw)

    train_module.TokenCountingTrainer.__init__ = init_with_timer
    try:
        summary = train(config, model=load_model(args.model), tokenizer=load_tokenizer(args.model))
    finally:
        train_module.TokenCountingTrainer.__init__ = original
    tokens = [h["tokens"] for h in summary["history"]]
    # tokens[i] is the running total after step i+1; time the steps after the warm-up ones
    seconds = timer.times[-1] - timer.times[args.warmup - 1]
    return seconds, tokens[-1] - tokens[args.warmup - 1]


def run_loop(args, rows) -> tuple[float, float]:
    """The same work as a bare PyTorch loop: no Trainer, no accelerate."""
    torch.manual_seed(0)
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )
    model.config.use_cache = False
    model.train()
    examples = target_examples(rows)
    collate = PadCollator(pad_token_id(tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)  # what Trainer uses
    order = torch.randperm(len(examples)).tolist()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
    start, tokens = None, 0
    for step in range(args.steps):
        if step == args.warmup:
            start, tokens = time.perf_counter(), 0
        chosen = [examples[order[(step * args.batch_size + i) % len(order)]] for i in range(args.batch_size)]
        batch = collate(chosen)
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        with autocast:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1][keep].float(), labels[keep], reduction="sum") / keep.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(keep.sum())
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = target_rows(args.model, args.records)
    ours, loop = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            seconds, tokens = run_mixsd(args, rows, Path(tmp) / f"m{r}")
            ours.append(tokens / seconds)
            seconds, tokens = run_loop(args, rows)
            loop.append(tokens / seconds)
            print(f"repeat {r}: mixsd train {ours[-1]:.1f} tok/s   hand loop {loop[-1]:.1f} tok/s")
    a, b = statistics.median(ours), statistics.median(loop)
    print(
        f"model {args.model}  batch {args.batch_size}  bf16 {args.bf16}  lora {args.lora_rank}  "
        f"timed steps {args.steps - args.warmup} x {args.repeats}  threads {torch.get_num_threads()}"
    )
    print(f"target tokens/s (median): mixsd train {a:.1f}   hand-written loop {b:.1f}   ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
