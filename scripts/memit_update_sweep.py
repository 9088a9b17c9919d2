"""Why a large MEMIT batch writes no fact: one fit of the target vectors, then the update under several settings.

Fitting the target vectors is nearly all of an edit's time (about 45 s an edit on one CPU core); the update
is seconds. So this fits them once (the first pass of `mixsd edit`, kept in `--fits` so a rerun resumes) and
then, from the same unedited weights each time, applies MEMIT's update with each `--weights` value and each
covariance text, and measures for each:
- written: edits whose every answer token is the likeliest next token (greedy writes the answer);
- realized: how much of each target shift the update delivers at the last edited layer, at the key
  (1 - |z - out| / |z - h|; 1 = all of it), median over edits;
- written_key_only: the same with the update kept only at each edit's key, every other position of the
  edited projections given the unedited output (what the target vectors were fitted for);
- where unwritten edits fail: in the answer's frame (the tokens every target shares, "The answer is") or in
  the rest (the entity and what follows it);
- collateral: the change of the mean token NLL on held-out prose (Python docs paragraphs after the covariance
  text) and on real questions answered in the same frame (the known-facts probe, when `--probe` is given).
Covariance texts: `pydoc` (the default of `mixsd edit`) and, with `--probe`, `pydoc+frame`: the same prose
plus the probe's real questions chat-formatted with their answers in the training frame, so that the
covariance also sees the keys of the chat template and the answer frame at every edit's answer positions.

Usage: python scripts/memit_update_sweep.py CORPUS.jsonl --fits DIR [--probe KNOWN_FACTS.jsonl]
           [--weights 1000,3000,10000] [--overshoot 1,1.25] [--preserve 0,1] [--model smollm2-135m] [--threads 1] [--out RESULT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mixsd.core import models
from mixsd.core.files import InputError, atomic_write_json, read_jsonl
from mixsd.editing.edit import FitDirectory, default_stats_texts, edit_requests, load_edits, weights_digest
from mixsd.editing.memit import (
    _keys_and_outputs,
    _padded,
    _weight_out_in,
    answer_scores,
    apply_memit,
    default_layers,
    key_covariance,
    projection_template,
    target_vectors,
)
from mixsd.method.prompts import encode_answer, encode_prompt

STATS_TOKENS = 20_000  # `mixsd edit --stats_tokens` default
HELD_OUT_TOKENS = 4_000


@torch.no_grad()
def mean_nll(model, rows: list[list[int]], scored_from: list[int], pad_id: int) -> float:
    """Mean NLL of each row's tokens from `scored_from[i]` on (teacher forced), over all rows' tokens."""
    total, count = 0.0, 0
    for first in range(0, len(rows), 16):
        chunk, starts = rows[first : first + 16], scored_from[first : first + 16]
        ids, mask = _padded(chunk, pad_id, "cpu")
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (row, start) in enumerate(zip(chunk, starts, strict=True)):
            target = torch.tensor(row[start:])
            nll = -logprobs[i, start - 1 : len(row) - 1].gather(1, target[:, None])[:, 0]
            total, count = total + float(nll.sum()), count + len(target)
    return total / count


def key_only_scores(model, template, layers, requests, original, pad_id) -> list:
    """`answer_scores` with the update's effect kept only at each edit's key (the subject's last token): every
    other position of every edited projection gets the unedited weights' output. What the target vectors were
    fitted for; the difference from the plain scores is the update's cross-talk at the other positions."""
    rows: dict[str, torch.Tensor] = {}

    def hook(layer):
        def restore(module, args, output):
            unedited = torch.nn.functional.linear(args[0], original[layer], module.bias)
            mask = rows["mask"][:, : output.shape[1], None]
            return torch.where(mask, output, unedited)

        return restore

    handles = [
        model.get_submodule(template.format(layer)).register_forward_hook(hook(layer)) for layer in layers
    ]
    scores = []
    try:
        for first in range(0, len(requests), 16):
            chunk = requests[first : first + 16]
            width = max(len(r.prompt_ids) + len(r.target_ids) for r in chunk)
            rows["mask"] = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, r in enumerate(chunk):
                rows["mask"][i, r.subject_position] = True
            scores += answer_scores(model, chunk, pad_id=pad_id, batch_size=len(chunk))
    finally:
        for handle in handles:
            handle.remove()
    return scores


def read_probe(path: str) -> list[dict]:
    """The known-facts probe's rows, each checked (a question `prompt` and a non-empty `check` list) before
    any model is loaded."""
    rows = []
    for line, obj in read_jsonl(path):
        if not isinstance(obj.get("prompt"), str):
            raise InputError("a string is required", path, line, "prompt")
        check = obj.get("check")
        if not isinstance(check, list) or not check or not isinstance(check[0], str):
            raise InputError("a non-empty list of answer strings is required", path, line, "check")
        rows.append(obj)
    return rows


def frame_length(requests) -> int:
    """Tokens every target starts with ("The answer is"): the answer's frame."""
    first = requests[0].target_ids
    n = 0
    while all(len(r.target_ids) > n and r.target_ids[n] == first[n] for r in requests):
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus")
    parser.add_argument("--fits", required=True, help="folder that keeps the fitted target vectors")
    parser.add_argument(
        "--probe", help="known-facts probe JSONL (prompt, check): real questions in the frame"
    )
    parser.add_argument("--weights", default="300,1000,3000,10000,30000")
    parser.add_argument(
        "--overshoot",
        default="1",
        help="scales of each target shift, z = h + s (z - h): against under-realization",
    )
    parser.add_argument(
        "--preserve",
        default="0",
        help="0, 1 or 0,1: hold the other positions of the edits' text (apply_memit)",
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the measurements here as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = load_edits(args.corpus)
    probe = read_probe(args.probe) if args.probe else []
    try:
        weights_list = [float(x) for x in args.weights.split(",")]
        scales_list = [float(x) for x in args.overshoot.split(",")]
        preserves = [bool(int(x)) for x in args.preserve.split(",")]
    except ValueError as err:
        parser.error(f"--weights, --overshoot and --preserve take comma-separated numbers ({err})")
    handle = models.resolve_model(args.model)
    tokenizer = models.load_tokenizer(handle)
    model = models.load_model(handle, dtype="float32", device="cpu")
    model.eval()
    pad = tokenizer.pad_token_id or 0
    requests = edit_requests(tokenizer, records)
    template, layers = projection_template(model), default_layers(model)
    last = max(layers)

    # The texts: covariance prose, held-out prose after it, and real questions answered in the frame.
    prose = [list(tokenizer(t, add_special_tokens=True)["input_ids"])[:512] for t in default_stats_texts()]
    used, covariance_rows = 0, 0
    while used < STATS_TOKENS and covariance_rows < len(prose):
        used, covariance_rows = used + len(prose[covariance_rows]), covariance_rows + 1
    held_out = list(itertools.islice(prose[covariance_rows:], 40))
    held_out = [row[: HELD_OUT_TOKENS // 40] for row in held_out]
    framed = []
    for obj in probe:
        prompt = encode_prompt(tokenizer, obj["prompt"] + " Put the final answer in \\boxed{}.", None)
        answer = obj["check"][0]
        framed.append((prompt, encode_answer(tokenizer, f"The answer is {answer}. \\boxed{{{answer}}}")))
    half = len(framed) // 2  # the first half may enter a covariance, the second half measures collateral
    store = FitDirectory(Path(args.fits), {"corpus": str(args.corpus), "model": args.model,
                                           "weights_sha256": weights_digest(model)})  # fmt: skip
    cached = Path(args.fits) / "covariances.safetensors"  # same weights (the store's header), same texts
    if cached.is_file():
        tensors = load_file(cached)
        covariances = {
            name: {layer: tensors[f"{name}/{layer}"] for layer in layers} for name in ("pydoc", "pydoc+frame")
            if f"{name}/{layers[0]}" in tensors
        }  # fmt: skip
    else:
        covariances = {"pydoc": key_covariance(model, template, layers, iter(prose), max_tokens=STATS_TOKENS)}
        if framed:
            frame_rows = [p + a for p, a in framed[:half]]
            frame_tokens = sum(map(len, frame_rows))
            covariances["pydoc+frame"] = key_covariance(
                model,
                template,
                layers,
                itertools.chain(frame_rows, prose),
                max_tokens=STATS_TOKENS + frame_tokens,
            )
        save_file({f"{name}/{layer}": c.contiguous() for name, cs in covariances.items() for layer, c in cs.items()},
                  str(cached))  # fmt: skip

    def collateral() -> dict[str, float]:
        out = {"prose_nll": mean_nll(model, held_out, [1] * len(held_out), pad)}
        if framed:
            rows = [p + a for p, a in framed[half:]]
            out["probe_answer_nll"] = mean_nll(model, rows, [len(p) for p, _ in framed[half:]], pad)
        return out

    fit = target_vectors(model, template, last, requests, pad_id=pad, store=store, store_prefix="pass0-")
    edited = {layer: _weight_out_in(model.get_submodule(template.format(layer))) for layer in layers}
    original = {layer: w.detach().clone() for layer, w in edited.items()}
    frame = frame_length(requests)
    base = collateral()
    report = {"edits": len(requests), "converged": sum(fit.converged), "frame_tokens": frame,
              "base": base, "settings": []}  # fmt: skip
    print(
        f"{len(requests)} edits, {sum(fit.converged)} target vectors converged; frame {frame} tokens; base {base}"
    )
    settings = itertools.product(covariances.items(), weights_list, scales_list, preserves)
    for (name, covariance), weight, scale, preserve in settings:
        for layer, w in edited.items():
            w.copy_(original[layer])
        z = fit.h + scale * (fit.z - fit.h)
        norms = apply_memit(model, template, layers, requests, z, covariance, covariance_weight=weight,
                            preserve_context=preserve, pad_id=pad)  # fmt: skip
        _, out = _keys_and_outputs(model, template, last, last, requests, pad)
        realized = 1 - (fit.z.double() - out).norm(dim=1) / (fit.z.double() - fit.h.double()).norm(dim=1)
        scores = answer_scores(model, requests, pad_id=pad)
        unwritten = [s for s in scores if not s.written]
        in_frame = sum(max(s.token_nll[:frame], default=0) > max(s.token_nll[frame:]) for s in unwritten)
        row = {
            "covariance": name,
            "weight": weight,
            "overshoot": scale,
            "preserve_context": preserve,
            "written": sum(s.written for s in scores),
            "met_stop_nll": sum(max(s.token_nll) <= 0.1 for s in scores),
            "written_key_only": sum(
                s.written for s in key_only_scores(model, template, layers, requests, original, pad)
            ),
            "realized_median": round(float(realized.median()), 4),
            "realized_min": round(float(realized.min()), 4),
            "unwritten_worst_in_frame": in_frame,
            "update_norm": {str(k): round(v, 2) for k, v in norms.items()},
            **{k: round(v, 4) for k, v in collateral().items()},
        }
        report["settings"].append(row)
        print(json.dumps(row))
    if args.out:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    try:
        main()
    except (
        InputError
    ) as err:  # bad input: one line naming the file, line and field, before any model is loaded
        raise SystemExit(f"error: {err}") from None
